"""The runtime Sampler against independent oracles: the kernels' CPU reference integrator (kernels/reference.py)
and a direct transcription of each tableau, on an analytic velocity field behind the Backend interface."""

from __future__ import annotations

import numpy as np
import pytest

from edge_vla.kernels import reference as kref
from edge_vla.runtime.backend import Backend
from edge_vla.runtime.contract import Contract
from edge_vla.runtime.flow import Flow, integrate
from edge_vla.runtime.sampler import Sampler

SHAPE = (1, 4, 3)


class FieldBackend(Backend):
    """v(x, t) = sin(3 t) - x * (1 + t^2): a non-linear, time-dependent field evaluated in numpy."""

    name = "field"

    def __init__(self) -> None:
        self.bufs = {"x_t": np.zeros(SHAPE, np.float32), "t": np.zeros(1, np.float32),
                     "velocity": np.zeros(SHAPE, np.float32)}
        self.rows: np.ndarray | None = None
        self.slots: list[int] = []

    def buffer(self, name):
        return self.bufs[name]

    def set_time_rows(self, name, rows):
        self.rows = rows

    def run_prefix(self):
        pass

    def run_step(self, slot):
        self.slots.append(slot)
        t = float(self.rows[slot][0])
        x = self.bufs["x_t"].astype(np.float64)
        self.bufs["velocity"][...] = np.sin(3 * t) - x * (1 + t * t)

    def _release(self):
        pass


def field(x, t):
    return np.sin(3 * t) - x * (1 + t * t)


def contract(start=0.0, end=1.0):
    io = {"shape": list(SHAPE), "dtype": "float32"}
    return Contract.from_manifest({
        "family": "test", "preprocessing": {"kind": "none"},
        "graphs": {"p": {"role": "prefix", "file": "p", "inputs": [], "outputs": []},
                   "s": {"role": "step", "file": "s",
                         "inputs": [{"name": "x_t", "role": "x_t", **io},
                                    {"name": "t", "role": "time", "shape": [1], "dtype": "float32"}],
                         "outputs": [{"name": "velocity", "role": "velocity", **io}]}},
        "sampler": {"time": {"start": start, "end": end}, "solvers": ["euler", "heun", "midpoint"],
                    "solver": "euler", "num_steps": 4, "min_steps": 1, "max_steps": 16,
                    "time_input": {"kind": "scalar", "input": "t"}},
    })


@pytest.fixture
def noise():
    return np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)


@pytest.mark.parametrize(("solver", "method"), [("euler", "euler"), ("heun", "heun")])
def test_sampler_matches_the_kernels_cpu_reference(noise, solver, method):
    backend = FieldBackend()
    got = Sampler(backend, contract(), solver, 6).run(noise)
    want = kref.integrate(lambda x, t: field(x, t).astype(np.float32), noise, steps=6, method=method)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_midpoint_matches_its_textbook_form(noise):
    steps, dt = 5, 0.2
    x = noise.astype(np.float64)
    for i in range(steps):
        t = i * dt
        x = x + dt * field(x + 0.5 * dt * field(x, t), t + 0.5 * dt)
    got = Sampler(FieldBackend(), contract(), "midpoint", steps).run(noise)
    np.testing.assert_allclose(got, x, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("solver", ["euler", "heun", "midpoint"])
def test_reversed_flow_evaluates_the_mirrored_grid(noise, solver):
    """pi0's convention: t from 1 to 0, dt = -1/N; the in-place Sampler equals the out-of-place integrate."""
    backend = FieldBackend()
    got = Sampler(backend, contract(1.0, 0.0), solver, 3).run(noise)
    want = integrate(field, noise.astype(np.float64), Flow(1.0, 0.0), 3, solver)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    slots = {"euler": [0, 2, 4], "heun": [0, 2, 2, 4, 4, 6], "midpoint": [0, 1, 2, 3, 4, 5]}[solver]
    assert backend.slots == slots
    assert backend.rows[0, 0] == 1.0 and backend.rows[-1, 0] == 0.0


def test_the_step_loop_allocates_nothing(noise):
    import tracemalloc

    sampler = Sampler(FieldBackend(), contract(), "heun", 8)
    sampler.run(noise)
    backend = sampler.backend
    backend.run_step = lambda slot: None  # measure the sampler's own loop, not the test field's numpy
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    sampler.run(noise)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename") if "sampler.py" in str(s.traceback))
    assert grown <= 0


def test_unsupported_solver_and_step_count_are_refused():
    from edge_vla.errors import ConfigError

    c = contract()
    with pytest.raises(ConfigError, match="allows 1..16 ODE steps, not 17"):
        Sampler(FieldBackend(), c, "euler", 17)
    with pytest.raises(ConfigError, match="unknown solver 'rk4'"):
        Sampler(FieldBackend(), c, "rk4", 4)
