"""ODE solvers for the flow (t: 0 -> 1) that run on a backend's preallocated buffers.

Each solver calls `backend.run_step()` with buf["x_t"], buf["t"] set and reads buf["velocity"].
No arrays are allocated inside the loop: updates use numpy's out= on scratch buffers made once.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

SOLVERS = ("euler", "heun", "midpoint")
EVALS_PER_STEP = {"euler": 1, "heun": 2, "midpoint": 2}


class OdeLoop:
    def __init__(self, backend, solver: str = "euler") -> None:
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; choose one of {SOLVERS}")
        self.backend = backend
        self.solver = solver
        buf = backend.buf
        self.x_t, self.t, self.v = buf["x_t"], buf["t"], buf["velocity"]
        self.x = np.zeros_like(self.x_t, dtype=np.float32)  # the state, kept FP32 even for FP16 graphs
        self.v0 = np.zeros_like(self.x)
        self.scratch = np.zeros_like(self.x)

    def _eval(self, x: np.ndarray, t: float) -> np.ndarray:
        np.copyto(self.x_t, x, casting="same_kind")
        self.t[...] = t
        self.backend.run_step()
        return self.v

    def run(self, noise: np.ndarray, steps: int, step_times: list[float] | None = None,
            clock: Callable[[], float] = time.perf_counter) -> np.ndarray:
        """Integrate from `noise` over `steps` steps; returns the (reused) state buffer."""
        x, dt = self.x, 1.0 / steps
        np.copyto(x, noise)
        for i in range(steps):
            t0 = clock()
            t = i * dt
            v = self._eval(x, t)
            if self.solver == "euler":
                np.multiply(v, dt, out=self.scratch)
                x += self.scratch
            elif self.solver == "heun":
                np.copyto(self.v0, v)
                np.multiply(self.v0, dt, out=self.scratch)
                self.scratch += x  # x_pred
                v1 = self._eval(self.scratch, t + dt)
                np.add(self.v0, v1, out=self.scratch)
                self.scratch *= 0.5 * dt
                x += self.scratch
            else:  # midpoint
                np.multiply(v, 0.5 * dt, out=self.scratch)
                self.scratch += x
                v1 = self._eval(self.scratch, t + 0.5 * dt)
                np.multiply(v1, dt, out=self.scratch)
                x += self.scratch
            if step_times is not None:
                step_times[i] = clock() - t0
        return x
