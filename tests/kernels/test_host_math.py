"""The `__host__ __device__` math, compiled for the CPU by g++ from the very .cu files the GPU runs,
agrees with the numpy references."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from edge_vla.kernels import reference as ref


def _ptr(a: np.ndarray | None) -> int | None:
    return None if a is None else a.ctypes.data


@pytest.fixture(scope="module")
def ode(ode_host: ctypes.CDLL) -> ctypes.CDLL:
    ode_host.ode_step_cpu.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int] * 3 + [ctypes.c_float] * 2 + [ctypes.c_int]
    ode_host.ode_step_cpu.restype = None
    ode_host.time_embed_cpu.argtypes = [ctypes.c_void_p, ctypes.c_float, ctypes.c_int]
    return ode_host


@pytest.fixture(scope="module")
def adaln(adaln_host: ctypes.CDLL) -> ctypes.CDLL:
    adaln_host.adaln_linear_cpu.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int] * 4 + [ctypes.c_float]
    adaln_host.adaln_linear_cpu.restype = None
    return adaln_host


def host_step(lib, x, v, v_prev, dt, t_next, mode, E, lo=None, hi=None):
    x = x.copy()
    v_prev = np.zeros_like(x) if v_prev is None else v_prev.copy()
    x_in = np.zeros_like(x)
    temb = np.zeros(E, np.float32)
    n, D = x.size, x.shape[-1]
    lib.ode_step_cpu(_ptr(x), _ptr(v), _ptr(v_prev), _ptr(x_in), _ptr(temb), _ptr(lo), _ptr(hi),
                     n, D, E, dt, t_next, mode)
    return x, x_in, v_prev, temb


@pytest.mark.parametrize("E", [2, 128, 512])
def test_time_embedding(ode: ctypes.CDLL, E: int) -> None:
    out = np.zeros(E, np.float32)
    for t in np.linspace(0, 1, 11, dtype=np.float32):
        ode.time_embed_cpu(out.ctypes.data, float(t), E)
        # argument up to 100 rad: fp32 rounding of the argument bounds the error (~100 * 2^-24 * few)
        np.testing.assert_allclose(out, ref.time_embedding(float(t), E), atol=3e-5)


@pytest.mark.parametrize("mode", [ref.MODE_INIT, ref.MODE_EULER, ref.MODE_HEUN_PREDICT, ref.MODE_HEUN_CORRECT])
@pytest.mark.parametrize("clamp", [False, True])
def test_ode_step_matches_reference(ode: ctypes.CDLL, mode: int, clamp: bool) -> None:
    rng = np.random.default_rng(mode)
    H, D, E = 16, 2, 128
    x = rng.standard_normal((H, D)).astype(np.float32)
    v = (rng.standard_normal((H, D)) * 3).astype(np.float32)
    vp = rng.standard_normal((H, D)).astype(np.float32)
    lo, hi = (np.array([-1.0, -0.5], np.float32), np.array([1.0, 0.8], np.float32)) if clamp else (None, None)
    got = host_step(ode, x, v, vp, 0.1, 0.3, mode, E, lo, hi)
    want = ref.ode_step(x, v, vp, 0.1, 0.3, mode, E, lo, hi)
    for g, w, name in zip(got, want, ("x", "x_in", "v_prev", "temb"), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=3e-5, err_msg=name)


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_host_loop_matches_reference_integrate(ode: ctypes.CDLL, method: str) -> None:
    rng = np.random.default_rng(7)
    a, b = rng.standard_normal((2, 8, 2)).astype(np.float32)
    vel = lambda x, t: (a * x + b * t).astype(np.float32)
    x0 = rng.standard_normal((8, 2)).astype(np.float32)
    lo, hi = np.array([-2, -2], np.float32), np.array([2, 2], np.float32)
    steps, dt = 10, 0.1
    x, x_in, vp, _ = host_step(ode, x0, np.zeros_like(x0), None, dt, 0.0, ref.MODE_INIT, 8)
    for k in range(steps):
        t = k * dt
        if method == "euler":
            x, x_in, vp, _ = host_step(ode, x, vel(x_in, t), vp, dt, t + dt, ref.MODE_EULER, 8, lo, hi)
        else:
            x, x_in, vp, _ = host_step(ode, x, vel(x_in, t), vp, dt, t + dt, ref.MODE_HEUN_PREDICT, 8, lo, hi)
            x, x_in, vp, _ = host_step(ode, x, vel(x_in, t + dt), vp, dt, t + dt, ref.MODE_HEUN_CORRECT, 8, lo, hi)
    np.testing.assert_allclose(x, ref.integrate(vel, x0, steps, method, lo, hi), rtol=1e-5, atol=1e-5)


def test_clamp_propagates_nan(ode: ctypes.CDLL) -> None:
    x = np.array([[np.nan, 5.0]], np.float32)
    lo, hi = np.array([-1, -1], np.float32), np.array([1, 1], np.float32)
    out, x_in, _, _ = host_step(ode, x, np.zeros_like(x), None, 0.1, 0.1, ref.MODE_EULER, 2, lo, hi)
    assert np.isnan(out[0, 0]) and np.isnan(x_in[0, 0]) and out[0, 1] == 1.0


@pytest.mark.parametrize("act", [ref.ACT_NONE, ref.ACT_GELU_TANH, ref.ACT_SILU])
@pytest.mark.parametrize(("T", "K", "N", "modulate"), [(8, 128, 384, True), (16, 512, 64, True), (3, 36, 10, False)])
def test_adaln_linear_matches_reference(adaln: ctypes.CDLL, act: int, T: int, K: int, N: int, modulate: bool) -> None:
    rng = np.random.default_rng(T * K + act)
    x = (rng.standard_normal((T, K)) * 2 + 5).astype(np.float32)  # large mean: tests the two-pass variance
    shift, scale = (rng.standard_normal((2, K)) * 0.2).astype(np.float32) if modulate else (None, None)
    w = (rng.standard_normal((N, K)) / np.sqrt(K)).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32)
    out = np.zeros((T, N), np.float32)
    adaln.adaln_linear_cpu(_ptr(x), _ptr(shift), _ptr(scale), _ptr(w), _ptr(b), _ptr(out), T, K, N, act, ref.LN_EPS)
    ref.check_close(out, ref.adaln_linear(x, shift, scale, w, b, act), "fp32", "adaln_linear_cpu")
