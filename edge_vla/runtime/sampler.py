"""The runtime sampler: prefix once, then N steps of a flow solver, on a backend's preallocated buffers.

It runs any bundle the manifest describes (docs/MANIFEST.md): the flow's direction and grid, the
solver's tableau and the step graph's time input (a scalar t or a row of a time-conditioning table)
all come from the Contract; the backend only knows graph IO names and time slots. The state x is kept
in float32 whatever the graph's x_t dtype; updates use numpy's out= on scratch arrays made once, so
the loop allocates nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from edge_vla.errors import ConfigError
from edge_vla.runtime.backend import Backend
from edge_vla.runtime.contract import Contract
from edge_vla.runtime.flow import tableau


class Sampler:
    def __init__(self, backend: Backend, contract: Contract, solver: str, steps: int) -> None:
        contract.check_solver(solver)
        contract.check_steps(steps)
        self.backend, self.contract = backend, contract
        self.solver, self.steps = solver, steps
        self.tableau = tableau(solver)
        self.dt = contract.flow.dt(steps)
        backend.set_time_rows(contract.time.name, contract.time_rows(steps))
        self.x_t = backend.buffer(contract.x_t.name)
        self.v = backend.buffer(contract.velocity.name)
        shape = self.x_t.shape
        self.x = np.zeros(shape, dtype=np.float32)  # the state, FP32 even for FP16 graphs
        self.slopes = [np.zeros(shape, dtype=np.float32) for _ in self.tableau.b]
        self.scratch = np.zeros(shape, dtype=np.float32)
        self.x_in = np.zeros(shape, dtype=np.float32)
        # Per step and stage: (half-grid offset, [(coefficient * dt, slope index)]); b * dt per slope.
        self._stages = [(c, [(a * self.dt, j) for j, a in enumerate(row) if a])
                        for c, row in zip(self.tableau.c_half, self.tableau.a, strict=True)]
        self._weights = [(b * self.dt, j) for j, b in enumerate(self.tableau.b) if b]
        # RTC: the step graph's prefix mask (None for bundles without real-time chunking).
        mask = contract.prefix_mask
        self.mask = None if mask is None else backend.buffer(mask.name)
        self.max_delay = contract.rtc_max_delay

    def run(self, noise: np.ndarray, step_times: list[float] | None = None,
            clock: Callable[[], float] = time.perf_counter, prefix: np.ndarray | None = None) -> np.ndarray:
        """Integrate from `noise`; returns the (reused) float32 state buffer. `prefix` [d, D] (normalized
        actions, RTC bundles only) are the chunk's first d actions, given: they are held in x (their velocity is
        zeroed at every stage) while the rest is generated consistent with them."""
        x = self.x
        np.copyto(x, noise)
        d = self._set_prefix(prefix)
        if d:
            x[0, :d, : prefix.shape[1]] = prefix  # type: ignore[union-attr]
        for i in range(self.steps):
            t0 = clock()
            for s, (c, terms) in enumerate(self._stages):
                if terms:
                    np.copyto(self.x_in, x)
                    for coef, j in terms:
                        np.multiply(self.slopes[j], coef, out=self.scratch)
                        self.x_in += self.scratch
                    np.copyto(self.x_t, self.x_in, casting="same_kind")
                else:
                    np.copyto(self.x_t, x, casting="same_kind")
                self.backend.run_step(2 * i + c)
                np.copyto(self.slopes[s], self.v, casting="same_kind")
                if d:
                    self.slopes[s][0, :d] = 0.0  # the frozen actions do not move
            for coef, j in self._weights:
                np.multiply(self.slopes[j], coef, out=self.scratch)
                x += self.scratch
            if step_times is not None:
                step_times[i] = clock() - t0
        return x

    def _set_prefix(self, prefix: np.ndarray | None) -> int:
        """Write the mask for a prefix of d actions (0: none) and return d; refuses what the bundle cannot take."""
        d = 0 if prefix is None else int(prefix.shape[0])
        if d and self.mask is None:
            raise ConfigError("this bundle was not trained for real-time chunking (no 'rtc' block in its manifest): "
                              "it cannot take an action prefix")
        if d > self.max_delay or (d and (prefix.ndim != 2 or prefix.shape[1] > self.x.shape[2])):  # type: ignore[union-attr]
            raise ConfigError(f"action prefix of shape {list(prefix.shape)}: this bundle takes up to "  # type: ignore[union-attr]
                              f"{self.max_delay} actions of at most {self.x.shape[2]} dimensions")
        if self.mask is not None:
            self.mask[...] = 0
            self.mask[..., :d] = 1
        return d
