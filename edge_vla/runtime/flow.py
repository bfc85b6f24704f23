"""The one definition of a flow sampler's schedule and update rule (see docs/MANIFEST.md).

A bundle declares where time starts and ends; with N steps, dt = (end - start) / N, t_i = start + i dt,
and every solver updates x <- x + dt * (weighted velocities). Solvers are explicit two-stage Runge-Kutta
tableaus whose stage times all fall on the half-step grid tau_k = start + k dt / 2 (k = 0..2N), so a
step graph fed from a precomputed time table needs 2N + 1 rows per step count, whatever the solver.

`integrate` is the out-of-place loop (torch tensors or numpy arrays) used on the workstation: the
unrolled chunk graph, calibration trajectories, distillation targets. The runtime's `Sampler` runs the
same tableaus in place on preallocated buffers. The PyTorch model's own `VLA.sample` and the kernels'
CPU reference are deliberately separate implementations: they are the oracles both are tested against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

X = TypeVar("X")  # numpy array or torch tensor: anything with + and * by a float


@dataclass(frozen=True)
class Tableau:
    """Stage k is evaluated at half-step offset `c_half[k]` on x + dt * sum_j a[k][j] v_j; x += dt * sum b_k v_k."""

    c_half: tuple[int, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]


TABLEAUS: dict[str, Tableau] = {
    "euler": Tableau(c_half=(0,), a=((),), b=(1.0,)),
    "midpoint": Tableau(c_half=(0, 1), a=((), (0.5,)), b=(0.0, 1.0)),
    "heun": Tableau(c_half=(0, 2), a=((), (1.0,)), b=(0.5, 0.5)),
}
SOLVERS = tuple(TABLEAUS)
EVALS_PER_STEP = {name: len(tab.b) for name, tab in TABLEAUS.items()}


def tableau(solver: str) -> Tableau:
    if solver not in TABLEAUS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {SOLVERS}")
    return TABLEAUS[solver]


@dataclass(frozen=True)
class Flow:
    """Time runs from `start` to `end` (edge-vla reference model: 0 -> 1; pi0: 1 -> 0)."""

    start: float = 0.0
    end: float = 1.0

    def dt(self, steps: int) -> float:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        return (self.end - self.start) / steps

    def half_grid(self, steps: int) -> np.ndarray:
        """tau_k = start + k dt / 2 for k = 0..2N (float64): every time any solver evaluates at."""
        return self.start + np.arange(2 * steps + 1, dtype=np.float64) * (self.dt(steps) / 2)

    def slot(self, step: int, stage_c_half: int) -> int:
        """The half-grid index of a stage: step i, stage offset c -> 2 i + c."""
        return 2 * step + stage_c_half


REFERENCE_FLOW = Flow(0.0, 1.0)


def integrate(velocity: Callable[[X, float], X], x: X, flow: Flow, steps: int, solver: str = "euler",
              record: Callable[[int, int, X, float, X], Any] | None = None) -> X:
    """Integrate dx/dt = velocity(x, t) over the flow's grid (out of place). `record(step, stage, x_in, t, v)`
    sees every model evaluation (calibration feeds, distillation paths)."""
    tab = tableau(solver)
    dt = flow.dt(steps)
    grid = flow.half_grid(steps)
    for i in range(steps):
        slopes: list[X] = []
        for s, (c, row) in enumerate(zip(tab.c_half, tab.a, strict=True)):
            x_in = x
            for a, v_j in zip(row, slopes, strict=False):
                x_in = x_in + (a * dt) * v_j
            t = float(grid[flow.slot(i, c)])
            v = velocity(x_in, t)
            if record is not None:
                record(i, s, x_in, t, v)
            slopes.append(v)
        for b, v_j in zip(tab.b, slopes, strict=True):
            if b:
                x = x + (b * dt) * v_j
    return x
