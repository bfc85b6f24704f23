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

    def run(self, noise: np.ndarray, step_times: list[float] | None = None,
            clock: Callable[[], float] = time.perf_counter) -> np.ndarray:
        """Integrate from `noise`; returns the (reused) float32 state buffer."""
        x = self.x
        np.copyto(x, noise)
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
            for coef, j in self._weights:
                np.multiply(self.slopes[j], coef, out=self.scratch)
                x += self.scratch
            if step_times is not None:
                step_times[i] = clock() - t0
        return x
