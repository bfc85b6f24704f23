"""Kernels on a GPU against the numpy references, on fresh random inputs (skipped without a GPU).

Run on a GPU box:  .venv/bin/pytest -m gpu tests/kernels -v
"""

from __future__ import annotations

import numpy as np
import pytest

from edge_vla.kernels import reference as ref

pytestmark = pytest.mark.gpu

PRESETS = {"tiny": (8, 2, 128), "base": (16, 2, 512)}  # H, D, E


def _dev(arr: np.ndarray, dtype: str = "fp32"):
    from edge_vla.kernels.loader import DeviceBuffer

    if dtype == "fp16":
        return DeviceBuffer.from_array(np.asarray(arr, np.float32).astype(np.float16))
    if dtype == "bf16":
        return DeviceBuffer.from_array(ref.f32_to_bf16_bits(np.asarray(arr, np.float32)))
    return DeviceBuffer.from_array(np.asarray(arr, np.float32))


def _host(buf, shape, dtype: str = "fp32") -> np.ndarray:
    if dtype == "fp16":
        return buf.download(shape, np.float16).astype(np.float32)
    if dtype == "bf16":
        return ref.bf16_bits_to_f32(buf.download(shape, np.uint16))
    return buf.download(shape, np.float32)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("mode", [ref.MODE_INIT, ref.MODE_EULER, ref.MODE_HEUN_PREDICT, ref.MODE_HEUN_CORRECT])
def test_ode_step_matches_reference(gpu_kernels, preset: str, dtype: str, mode: int) -> None:
    from edge_vla.kernels.loader import synchronize

    H, D, E = PRESETS[preset]
    rng = np.random.default_rng()  # fresh inputs every run
    x = rng.standard_normal((H, D)).astype(np.float32)
    v = ref.round_to(rng.standard_normal((H, D)) * 2, dtype)  # what the engine hands over
    vp = rng.standard_normal((H, D)).astype(np.float32)
    lo, hi = np.array([-1.2, -0.8], np.float32), np.array([1.0, 1.5], np.float32)
    t_next = float(rng.uniform())
    bx, bv, bvp, bxin, btemb = _dev(x), _dev(v, dtype), _dev(vp), _dev(np.zeros_like(x), dtype), _dev(np.zeros(E), dtype)
    blo, bhi = _dev(lo), _dev(hi)
    gpu_kernels.ode_step(bx, bv, bvp, bxin, btemb, blo, bhi, n=H * D, D=D, E=E, dt=0.1, t_next=t_next, mode=mode,
                         dtype=dtype)
    synchronize()
    wx, wxin, wvp, wtemb = ref.ode_step(x, v, vp, 0.1, t_next, mode, E, lo, hi)
    ref.check_close(_host(bx, (H, D)), wx, "fp32", "x")  # state is fp32 whatever the storage type
    ref.check_close(_host(bxin, (H, D), dtype), ref.round_to(wxin, dtype), dtype, "x_in")
    ref.check_close(_host(btemb, E, dtype), ref.round_to(wtemb, dtype), dtype, "temb")
    if mode == ref.MODE_HEUN_PREDICT:
        ref.check_close(_host(bvp, (H, D)), wvp, "fp32", "v_prev")


@pytest.mark.parametrize("preset", PRESETS)
def test_fused_ode_step_matches_unfused_v1(gpu_kernels, preset: str) -> None:
    """ode_step_v2 (one launch) against the v1 chain it replaces (axpy, clamp, time embedding: 3 launches)."""
    from edge_vla.kernels.loader import synchronize

    H, D, E = PRESETS[preset]
    n = H * D
    rng = np.random.default_rng()
    x = (rng.standard_normal((H, D)) * 2).astype(np.float32)  # wide enough that some elements hit the bounds
    v = (rng.standard_normal((H, D)) * 3).astype(np.float32)
    lo, hi = np.array([-1.2, -0.8], np.float32), np.array([1.0, 1.5], np.float32)
    dt, t_next = 0.1, float(rng.uniform())
    bv, blo, bhi = _dev(v), _dev(lo), _dev(hi)
    bx2, bxin2, btemb2 = _dev(x), _dev(np.zeros_like(x)), _dev(np.zeros(E))
    gpu_kernels.ode_step(bx2, bv, None, bxin2, btemb2, blo, bhi, n=n, D=D, E=E, dt=dt, t_next=t_next,
                         mode=ref.MODE_EULER)
    bx1, btemb1 = _dev(x), _dev(np.zeros(E))
    gpu_kernels.launch("axpy_v1_f32", (n + 255) // 256, 256, (bx1, bv, dt, n))
    gpu_kernels.launch("clamp_v1_f32", (n + 255) // 256, 256, (bx1, blo, bhi, n, D))
    gpu_kernels.launch("time_embed_v1_f32", (E + 255) // 256, 256, (btemb1, t_next, E))
    synchronize()
    unfused_x = _host(bx1, (H, D))
    assert np.any(unfused_x == hi) or np.any(unfused_x == lo), "draw too small to exercise the clamp"
    ref.check_close(_host(bx2, (H, D)), unfused_x, "fp32", "x: fused vs unfused")
    ref.check_close(_host(bxin2, (H, D)), unfused_x, "fp32", "x_in: fused vs unfused x")
    ref.check_close(_host(btemb2, E), _host(btemb1, E), "fp32", "temb: fused vs unfused")


def test_ode_step_nan_is_not_clamped_away(gpu_kernels) -> None:
    from edge_vla.kernels.loader import synchronize

    x = np.array([[np.nan, 0.0]], np.float32)
    bx, bv, bxin = _dev(x), _dev(np.zeros_like(x)), _dev(np.zeros_like(x))
    gpu_kernels.ode_step(bx, bv, None, bxin, None, _dev(np.array([-1, -1])), _dev(np.array([1, 1])), n=2, D=2,
                         E=2, dt=0.1, t_next=0.1, mode=ref.MODE_EULER)
    synchronize()
    assert np.isnan(_host(bx, (1, 2))[0, 0])


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_captured_graph_integrates_like_reference(gpu_kernels, method: str) -> None:
    """Heun/Euler kernel modes in one captured graph, t baked per node (the time-slot binding is the next test)."""
    from edge_vla.kernels.loader import CapturedGraph, new_stream, synchronize

    H, D, E, steps = 8, 2, 128, 4
    rng = np.random.default_rng()
    x0 = rng.standard_normal((H, D)).astype(np.float32)
    bx, bxin, bv, bvp, btemb = _dev(x0), _dev(x0), _dev(np.zeros_like(x0)), _dev(np.zeros_like(x0)), _dev(np.zeros(E))
    dt = 1.0 / steps

    def record(stream) -> None:
        gpu_kernels.ode_step(bx, bv, bvp, bxin, btemb, None, None, n=H * D, D=D, E=E, dt=dt, t_next=0.0,
                             mode=ref.MODE_INIT, stream=stream)
        for k in range(steps):
            t = k * dt
            # stand-in for the TensorRT engine (v <- v + 0 v): a foreign node between our kernels
            gpu_kernels.launch("axpy_v1_f32", 1, 32, (bv, bv, 0.0, H * D), stream)
            modes = [ref.MODE_EULER] if method == "euler" else [ref.MODE_HEUN_PREDICT, ref.MODE_HEUN_CORRECT]
            for m in modes:
                gpu_kernels.ode_step(bx, bv, bvp, bxin, btemb, None, None, n=H * D, D=D, E=E, dt=dt,
                                     t_next=t + dt, mode=m, stream=stream)

    v_const = rng.standard_normal((H, D)).astype(np.float32)
    bv.upload(v_const)
    stream = new_stream()
    graph = CapturedGraph(stream, record)
    graph.launch()
    synchronize(stream)
    want = ref.integrate(lambda x, t: v_const, x0, steps, method)
    ref.check_close(_host(bx, (H, D)), want, "fp32", "graph-integrated x")
    ref.check_close(_host(btemb, E), ref.time_embedding(1.0, E), "fp32", "temb(1)")
    # Replaying the graph runs the same loop again from the current state.
    graph.launch()
    synchronize(stream)
    ref.check_close(_host(bx, (H, D)), want + v_const, "fp32", "after replay")


@pytest.mark.parametrize("flow", [(0.0, 1.0), (1.0, 0.0)], ids=["reference-0to1", "pi0-1to0"])
def test_captured_graph_binds_each_step_time_slot(gpu_kernels, flow: tuple[float, float]) -> None:
    """The fused chunk's real per-step time binding (TrtBackend._enqueue_chunk, MANIFEST.md `set_time_rows`).

    The schedule's half-grid times live in one device array, row k at its own 256-byte-aligned slot; step i's
    model evaluation reads slot 2i through a pointer baked into the captured graph. With TensorRT absent,
    a real kernel stands in for the step engine and *reads t from that slot*: v = temb(t_slot) over the
    H*D action elements (time_embed_schedule_f32 with one row), then ode_step (E=0, as the backend launches
    it) integrates. A graph in which every step read the same t (the old `ts + 4*i` hazard: misaligned or
    aliased slots) cannot reproduce the reference integral.
    """
    from edge_vla.kernels.loader import CapturedGraph, DeviceBuffer, new_stream, synchronize
    from edge_vla.runtime.flow import Flow, integrate
    from edge_vla.runtime.trt_backend import ALIGN, aligned

    H, D, steps = 8, 2, 10
    n = H * D
    f = Flow(*flow)
    rows = f.half_grid(steps).astype(np.float32)  # [2N+1] scalar time rows, as Sampler.set_time_rows hands them
    stride = aligned(rows.itemsize)
    assert stride % ALIGN == 0 and stride >= ALIGN
    padded = np.zeros((len(rows), stride), np.uint8)
    padded[:, :rows.itemsize] = rows.reshape(-1, 1).view(np.uint8)
    slots = DeviceBuffer.from_array(padded)
    assert slots.ptr % ALIGN == 0  # cuMemAlloc is at least 256-byte aligned; every slot then is too
    slot_ptr = [slots.ptr + k * stride for k in range(len(rows))]
    assert all(p % ALIGN == 0 for p in slot_ptr)

    rng = np.random.default_rng()
    x0 = rng.standard_normal((H, D)).astype(np.float32)
    bx, bxin, bv = _dev(x0), _dev(np.zeros_like(x0)), _dev(np.zeros_like(x0))
    dt = f.dt(steps)

    def record(stream) -> None:
        gpu_kernels.ode_step(bx, bv, None, bxin, None, None, None, n=n, D=D, E=0, dt=dt, t_next=0.0,
                             mode=ref.MODE_INIT, stream=stream)
        for i in range(steps):
            # "step engine": reads x_in's shape and t from slot 2i (pointer baked into this node)
            gpu_kernels.time_embed_schedule(bv, slot_ptr[f.slot(i, 0)], 1, n, stream=stream)
            gpu_kernels.ode_step(bx, bv, None, bxin, None, None, None, n=n, D=D, E=0, dt=dt, t_next=0.0,
                                 mode=ref.MODE_EULER, stream=stream)

    stream = new_stream()
    graph = CapturedGraph(stream, record)
    graph.launch()
    synchronize(stream)

    def velocity(x: np.ndarray, t: float) -> np.ndarray:
        return ref.time_embedding(np.float32(t), n).reshape(H, D).astype(np.float32)

    want = integrate(velocity, x0.astype(np.float64), f, steps)
    got = _host(bx, (H, D))
    ref.check_close(got, want, "fp32", "x after the captured chunk")
    ref.check_close(_host(bxin, (H, D)), want, "fp32", "x_in (next engine input)")
    frozen = x0 + steps * dt * velocity(x0, float(rows[0]))  # what a graph stuck on slot 0 would give
    assert np.abs(got - frozen).max() > 1e-2, "every step evaluated at the same t"

    # The slots are read at replay time, not baked by value: new rows change the next replay's result.
    bx.upload(x0)
    rows2 = rows[::-1].copy()
    padded[:, :rows.itemsize] = rows2.reshape(-1, 1).view(np.uint8)
    slots.upload(padded)
    graph.launch()
    synchronize(stream)
    want2 = x0.astype(np.float64)
    for i in range(steps):
        want2 = want2 + dt * velocity(want2, float(rows2[f.slot(i, 0)]))
    ref.check_close(_host(bx, (H, D)), want2, "fp32", "x after replay with new time rows")


ADALN_CASES = [(8, 128, 384, ref.ACT_NONE), (8, 128, 512, ref.ACT_GELU_TANH), (16, 512, 1536, ref.ACT_NONE),
               (16, 512, 2048, ref.ACT_GELU_TANH), (3, 36, 10, ref.ACT_SILU)]


@pytest.mark.parametrize(("T", "K", "N", "act"), ADALN_CASES)
@pytest.mark.parametrize("wdtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("fused", [True, False])
def test_adaln_linear_matches_reference(gpu_kernels, T: int, K: int, N: int, act: int, wdtype: str,
                                        fused: bool) -> None:
    from edge_vla.kernels.loader import synchronize

    rng = np.random.default_rng()
    x = (rng.standard_normal((T, K)) * 2 + 3).astype(np.float32)
    shift, scale = (rng.standard_normal((2, K)) * 0.2).astype(np.float32)
    w = (rng.standard_normal((N, K)) / np.sqrt(K)).astype(np.float32)
    b = (rng.standard_normal(N) * 0.1).astype(np.float32)
    bufs = [_dev(x), _dev(shift), _dev(scale), _dev(w, wdtype), _dev(b), _dev(np.zeros((T, N)))]
    if fused:
        gpu_kernels.adaln_linear(*bufs, T=T, K=K, N=N, act=act, wdtype=wdtype)
    else:
        gpu_kernels.adaln_linear_unfused(*bufs, _dev(np.zeros((T, K))), T=T, K=K, N=N, act=act, wdtype=wdtype)
    synchronize()
    got = _host(bufs[-1], (T, N))
    # Reference on the weights as stored: isolates kernel error from the weights' quantisation.
    ref.check_close(got, ref.adaln_linear(x, shift, scale, ref.round_to(w, wdtype), b, act), "fp32", "vs stored W")
    ref.check_close(got, ref.adaln_linear(x, shift, scale, w, b, act), wdtype, "vs fp32 W")


@pytest.mark.parametrize(("T", "K", "N", "act"), ADALN_CASES)
def test_fused_adaln_linear_matches_unfused_v1(gpu_kernels, T: int, K: int, N: int, act: int) -> None:
    """adaln_linear_v2 (one launch) against adaln_v1 + linear_v1 on the same device buffers (fp16 weights)."""
    from edge_vla.kernels.loader import synchronize

    rng = np.random.default_rng()
    x = (rng.standard_normal((T, K)) * 2 + 3).astype(np.float32)
    shift, scale = (rng.standard_normal((2, K)) * 0.2).astype(np.float32)
    w = (rng.standard_normal((N, K)) / np.sqrt(K)).astype(np.float32)
    b = (rng.standard_normal(N) * 0.1).astype(np.float32)
    ins = [_dev(x), _dev(shift), _dev(scale), _dev(w, "fp16"), _dev(b)]
    fused, unfused = _dev(np.zeros((T, N))), _dev(np.zeros((T, N)))
    gpu_kernels.adaln_linear(*ins, fused, T=T, K=K, N=N, act=act, wdtype="fp16")
    gpu_kernels.adaln_linear_unfused(*ins, unfused, _dev(np.zeros((T, K))), T=T, K=K, N=N, act=act, wdtype="fp16")
    synchronize()
    ref.check_close(_host(fused, (T, N)), _host(unfused, (T, N)), "fp32", "adaln_linear: fused vs unfused")


def test_adaln_linear_rejects_unsupported_shapes(gpu_kernels) -> None:
    from edge_vla.kernels.loader import KernelError

    with pytest.raises(KernelError, match="K % 4"):
        gpu_kernels.adaln_linear(0, 0, 0, 0, 0, 0, T=8, K=130, N=8)
    with pytest.raises(KernelError, match="T\\*K"):
        gpu_kernels.adaln_linear(0, 0, 0, 0, 0, 0, T=64, K=512, N=8)
