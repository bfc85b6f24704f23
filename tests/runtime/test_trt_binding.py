"""The TensorRT backend's binding, lifetime and capture logic, on the CPU, through a recording fake of
TensorRT and the CUDA runtime (tests/runtime/trt_fakes.py). The real thing runs in the gpu-marked tests."""

from __future__ import annotations

import gc
import logging

import numpy as np
import pytest
import trt_fakes as F

from edge_vla.errors import EdgeVlaError
from edge_vla.runtime.contract import Contract
from edge_vla.runtime.flow import Flow, integrate
from edge_vla.runtime.sampler import Sampler


@pytest.fixture
def fake(monkeypatch):
    cudart = F.FakeCudart()
    trt = F.FakeTensorRT({b"prefix": F.prefix_spec(), b"step": F.step_spec()}, cudart)
    trt.kernels = F.install(monkeypatch, trt)
    return trt


def make_backend(fake):
    from edge_vla.runtime.trt_backend import TrtBackend

    backend = TrtBackend(b"prefix", b"step")
    rng = np.random.default_rng(0)
    backend.buffer("images")[...] = rng.random((1, 1, 3, 4, 4))
    backend.buffer("tokens")[...] = np.arange(6)
    backend.buffer("state")[...] = [0.3, -0.1]
    return backend


def expected(backend_inputs, noise, flow, steps, solver="euler"):
    """The same computation on the host: the fake prefix's terms from the inputs, then flow.integrate."""
    images, tokens, state = backend_inputs
    extra = F.prefix_term(float(state.sum()), float(images.mean()) * 2 + float(tokens.sum()) * 1e-3)
    return integrate(lambda x, t: -x * (1.0 + t) + t + extra, noise.astype(np.float64), flow, steps, solver)


def inputs(backend):
    return tuple(backend.buffer(n).copy() for n in ("images", "tokens", "state"))


def scalar_rows(flow, steps):
    return flow.half_grid(steps).astype(np.float32).reshape(-1, 1)


def test_fused_chunk_binds_each_step_at_its_own_aligned_time_slot(fake):
    steps, flow = 4, Flow(0.0, 1.0)
    backend = make_backend(fake)
    backend.set_time_rows("t", scalar_rows(flow, steps))
    backend.prepare_fused_chunk(steps, flow.dt(steps))
    noise = np.random.default_rng(1).standard_normal((1, F.H, F.D)).astype(np.float32)
    got = backend.run_fused_chunk(noise).copy()

    step_ctx = fake.context(b"step")
    assert all(c.ok for c in step_ctx.calls), [c for c in step_ctx.calls if not c.ok]
    assert all(c.ptr % 256 == 0 for ctx in fake.contexts for c in ctx.calls)
    # The captured graph: one step enqueue per step, each at slot 2i (Euler evaluates at t_i = i dt).
    captured = [e["t"] for e in step_ctx.enqueued[-steps:]]
    assert len(set(captured)) == steps
    assert captured == [backend.time_slot(2 * i) for i in range(steps)]
    np.testing.assert_allclose(got, expected(inputs(backend), noise, flow, steps), rtol=1e-5, atol=1e-5)
    assert fake.cudart.execs, "the chunk should have been captured into a CUDA graph"
    backend.close()


@pytest.mark.parametrize("solver", ["euler", "heun", "midpoint"])
def test_host_stepping_through_the_sampler_uses_every_half_grid_slot(fake, solver):
    steps, flow = 3, Flow(1.0, 0.0)  # pi0's direction: t from 1 to 0, dt = -1/3
    manifest = {
        "family": "fake", "preprocessing": {"kind": "fake"},
        "graphs": {
            "prefix": {"role": "prefix", "file": "p", "inputs": [], "outputs": [
                {"name": f"prefix_{kv}_{i}", "shape": list(F.KV_SHAPE), "dtype": "float32", "role": "prefix"}
                for i in range(F.LAYERS) for kv in ("k", "v")]},
            "step": {"role": "step", "file": "s", "inputs": [
                {"name": "x_t", "shape": [1, F.H, F.D], "dtype": "float32", "role": "x_t"},
                {"name": "t", "shape": [1], "dtype": "float32", "role": "time"}] + [
                {"name": f"prefix_{kv}_{i}", "shape": list(F.KV_SHAPE), "dtype": "float32", "role": "prefix"}
                for i in range(F.LAYERS) for kv in ("k", "v")],
                "outputs": [{"name": "velocity", "shape": [1, F.H, F.D], "dtype": "float32", "role": "velocity"}]},
        },
        "sampler": {"time": {"start": 1.0, "end": 0.0}, "solvers": ["euler", "heun", "midpoint"], "solver": "euler",
                    "num_steps": 3, "min_steps": 1, "max_steps": 8, "time_input": {"kind": "scalar", "input": "t"}},
    }
    contract = Contract.from_manifest(manifest)
    backend = make_backend(fake)
    sampler = Sampler(backend, contract, solver, steps)
    backend.run_prefix()
    noise = np.random.default_rng(2).standard_normal((1, F.H, F.D)).astype(np.float32)
    got = sampler.run(noise).copy()
    np.testing.assert_allclose(got, expected(inputs(backend), noise, flow, steps, solver), rtol=1e-5, atol=1e-5)
    bound_t = [c.ptr for c in fake.context(b"step").calls if c.name == "t"][1:]  # after the initial binding
    evals = steps * {"euler": 1, "heun": 2, "midpoint": 2}[solver]
    assert len(bound_t) == evals and all(p % 256 == 0 for p in bound_t)
    backend.close()


def test_time_table_rows_and_a_negative_dt_in_the_fused_chunk(monkeypatch):
    cudart = F.FakeCudart()
    fake = F.FakeTensorRT({b"prefix": F.prefix_spec(), b"step": F.step_spec("time_cond", 5)}, cudart)
    F.install(monkeypatch, fake)
    steps, flow = 5, Flow(1.0, 0.0)
    grid = flow.half_grid(steps)
    rows = np.zeros((2 * steps + 1, 1, 5), np.float32)  # 20-byte rows: the slots must still be 256 apart
    rows[:, 0, 0], rows[:, 0, 1] = 1.0 + grid, grid
    backend = make_backend(fake)
    backend.set_time_rows("time_cond", rows)
    assert backend.time_stride == 256
    backend.prepare_fused_chunk(steps, flow.dt(steps))
    noise = np.random.default_rng(3).standard_normal((1, F.H, F.D)).astype(np.float32)
    got = backend.run_fused_chunk(noise)
    np.testing.assert_allclose(got, expected(inputs(backend), noise, flow, steps), rtol=1e-5, atol=1e-5)
    backend.close()


def test_a_refused_tensor_address_raises_and_frees_what_was_allocated(fake):
    from edge_vla.runtime.trt_backend import TrtBackend

    fake.refuse = {"prefix_v_1"}
    with pytest.raises(EdgeVlaError, match=r"refused the address .* 'prefix_v_1'"):
        TrtBackend(b"prefix", b"step")
    assert fake.cudart.live() == {"device": 0, "pinned": 0, "streams": 0, "graphs": 0, "execs": 0}


def test_stream_is_non_blocking(fake):
    backend = make_backend(fake)
    assert list(fake.cudart.streams.values()) == [fake.cudart.cudaStreamNonBlocking]
    backend.close()


def test_close_frees_everything_is_idempotent_and_reprepare_frees_the_old_graph(fake):
    backend = make_backend(fake)
    backend.set_time_rows("t", scalar_rows(Flow(), 4))
    backend.prepare_fused_chunk(4, 0.25)
    backend.prepare_fused_chunk(4, 0.25)  # re-prepare: the first graph and exec are freed
    assert len(fake.cudart.graphs) == 1 and len(fake.cudart.execs) == 1
    backend.close()
    assert fake.cudart.live() == {"device": 0, "pinned": 0, "streams": 0, "graphs": 0, "execs": 0}
    backend.close()  # idempotent
    assert backend.closed


def test_policy_and_backend_work_as_context_managers_and_warn_if_never_closed(fake):
    with make_backend(fake) as backend:
        assert not backend.closed
    assert backend.closed and fake.cudart.live()["device"] == 0
    leaked = make_backend(fake)
    with pytest.warns(ResourceWarning, match="was not closed"):
        del leaked
        gc.collect()
    assert fake.cudart.live()["device"] == 0  # __del__ still released it


def test_a_failed_capture_reports_the_original_error_not_end_capture(fake, caplog):
    fake.fail_enqueue_in_capture = {"step": True}
    backend = make_backend(fake)
    backend.set_time_rows("t", scalar_rows(Flow(), 2))
    with caplog.at_level(logging.WARNING):
        backend.prepare_fused_chunk(2, 0.5)
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "step engine failed to enqueue" in message and "cudaStreamEndCapture" not in message
    assert backend.graph_exec is None and not fake.cudart.capturing  # capture ended, eager fallback
    backend.close()
