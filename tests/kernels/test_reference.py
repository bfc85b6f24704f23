"""The numpy references agree with a plain numpy ODE loop and with the model conventions."""

from __future__ import annotations

import numpy as np
import pytest

from edge_vla.kernels import reference as ref


def plain_loop(velocity, x0, steps, method, lo=None, hi=None):
    """The textbook loop, written independently of ref.ode_step."""
    x = x0.astype(np.float64)
    dt = 1.0 / steps
    for k in range(steps):
        t = k * dt
        v0 = velocity(x, t)
        if method == "euler":
            x = x + dt * v0
        else:
            xp = x + dt * v0
            if lo is not None:
                xp = np.clip(xp, lo, hi)
            x = x + dt / 2 * (v0 + velocity(xp, t + dt))
        if lo is not None:
            x = np.clip(x, lo, hi)
    return x


def linear_field(a: np.ndarray, b: np.ndarray):
    return lambda x, t: (a * x + b * t).astype(np.float32)


@pytest.mark.parametrize("method", ["euler", "heun"])
@pytest.mark.parametrize("steps", [1, 2, 10])
@pytest.mark.parametrize("clamp", [False, True])
def test_integrate_matches_plain_loop(method: str, steps: int, clamp: bool) -> None:
    rng = np.random.default_rng(steps)
    x0 = rng.standard_normal((8, 2)).astype(np.float32)
    vel = linear_field(rng.standard_normal((8, 2)) * 0.5, rng.standard_normal((8, 2)))
    lo, hi = (np.array([-0.7, -1.0], np.float32), np.array([0.6, 1.2], np.float32)) if clamp else (None, None)
    got = ref.integrate(vel, x0, steps, method, lo, hi)
    want = plain_loop(vel, x0, steps, method, lo, hi)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    if clamp:
        assert np.all(got >= lo) and np.all(got <= hi)


def test_flow_convention_recovers_data_for_straight_paths() -> None:
    # For a straight (rectified) flow the exact velocity is x_1 - x_0, constant: one Euler step suffices.
    rng = np.random.default_rng(0)
    x0, x1 = rng.standard_normal((2, 16, 2)).astype(np.float32)
    for steps in (1, 2, 10):
        got = ref.integrate(lambda x, t: x1 - x0, x0, steps)
        np.testing.assert_allclose(got, x1, rtol=1e-5, atol=1e-5)


def test_heun_is_second_order() -> None:
    # dx/dt = x, x(0) = 1 -> e; Heun's error shrinks ~4x per halving of dt, Euler's ~2x.
    x0 = np.ones((1, 1), np.float32)
    err = {m: [abs(float(ref.integrate(lambda x, t: x, x0, n, m)[0, 0]) - np.e) for n in (4, 8)]
           for m in ("euler", "heun")}
    assert 1.8 < err["euler"][0] / err["euler"][1] < 2.2
    assert 3.5 < err["heun"][0] / err["heun"][1] < 4.5


def test_time_embedding_values() -> None:
    e = ref.time_embedding(0.0, 8)
    np.testing.assert_array_equal(e, [1, 1, 1, 1, 0, 0, 0, 0])
    t, dim = 0.37, 128
    half = dim // 2
    f = np.exp(-np.log(10000) * np.arange(half) / half)
    np.testing.assert_allclose(ref.time_embedding(t, dim), np.r_[np.cos(100 * t * f), np.sin(100 * t * f)],
                               atol=1e-6)
    assert ref.time_embedding(np.array([0.1, 0.2]), dim).shape == (2, dim)
    with pytest.raises(ValueError, match="even"):
        ref.time_embedding(0.1, 7)


def test_ode_step_modes_and_errors() -> None:
    x = np.array([[0.5, -0.5]], np.float32)
    v = np.array([[1.0, 2.0]], np.float32)
    xo, xin, vp, temb = ref.ode_step(x, v, None, 0.5, 0.5, ref.MODE_INIT, 4)
    np.testing.assert_array_equal(xo, x)
    np.testing.assert_array_equal(xin, x)
    np.testing.assert_allclose(temb, ref.time_embedding(0.5, 4))
    _, xin, vp, _ = ref.ode_step(x, v, None, 0.5, 0.5, ref.MODE_HEUN_PREDICT, 4)
    np.testing.assert_allclose(xin, [[1.0, 0.5]])
    xo, _, _, _ = ref.ode_step(x, 3 * v, vp, 0.5, 0.5, ref.MODE_HEUN_CORRECT, 4)
    np.testing.assert_allclose(xo, x + 0.25 * 4 * v)
    with pytest.raises(ValueError):
        ref.ode_step(x, v, None, 0.5, 0.5, ref.MODE_HEUN_CORRECT, 4)
    with pytest.raises(ValueError):
        ref.ode_step(x, v, None, 0.5, 0.5, 9, 4)


def test_nan_survives_clamp() -> None:
    x = np.array([[np.nan, 0.0]], np.float32)
    out = ref.clamp(x, np.array([-1, -1], np.float32), np.array([1, 1], np.float32))
    assert np.isnan(out[0, 0])


def test_adaln_linear_matches_direct_formula() -> None:
    rng = np.random.default_rng(1)
    T, K, N = 8, 128, 384
    x = (rng.standard_normal((T, K)) * 3 + 2).astype(np.float32)
    shift, scale = rng.standard_normal((2, K)).astype(np.float32) * 0.1
    w = rng.standard_normal((N, K)).astype(np.float32) / np.sqrt(K)
    b = rng.standard_normal(N).astype(np.float32)
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    y = (x - mu) / np.sqrt(var + 1e-6) * (1 + scale) + shift
    np.testing.assert_allclose(ref.adaln_linear(x, shift, scale, w, b), y @ w.T + b, rtol=1e-4, atol=1e-4)
    gelu = ref.adaln_linear(x, shift, scale, w, b, ref.ACT_GELU_TANH)
    np.testing.assert_allclose(gelu, ref.gelu_tanh(y @ w.T + b), rtol=1e-4, atol=1e-4)
    # Affine LN is the same op with scale = gamma - 1, shift = beta.
    gamma, beta = rng.standard_normal((2, K)).astype(np.float32)
    affine = (x - mu) / np.sqrt(var + 1e-6) * gamma + beta
    np.testing.assert_allclose(ref.adaln_linear(x, beta, gamma - 1, w, None), affine @ w.T, rtol=1e-4, atol=1e-4)


def test_precomputed_schedule_equals_per_step_evaluation() -> None:
    width, layers = 32, 2
    w = ref.TimeCondWeights.random(width, layers, seed=3)
    for method, steps in (("euler", 10), ("heun", 2)):
        ts = ref.schedule_times(steps, method)
        sched = ref.precompute_schedule(ts, w)
        assert sched.mod.shape == (len(ts), layers, 6, width)
        assert sched.final.shape == (len(ts), 2, width)
        for s, t in enumerate(ts):
            c = ref.time_conditioning(float(t), w)
            np.testing.assert_allclose(sched.cond[s], c, rtol=1e-5, atol=1e-6)
            for layer in range(layers):
                mod = w.wm[layer] @ ref.silu(c.astype(np.float64)) + w.bm[layer]
                np.testing.assert_allclose(sched.mod[s, layer].reshape(-1), mod, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(sched.final[s].reshape(-1), w.wf @ ref.silu(c) + w.bf, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ref.schedule_times(2, "heun"), [0, 0.5, 0.5, 1.0])


def test_round_to_and_check_close() -> None:
    x = np.array([1.0, 1 + 2**-9, 3.14159, -2.5e-3, np.nan], np.float32)
    bf = ref.round_to(x, "bf16")
    assert bf[0] == 1.0 and bf[1] == 1.0  # ties to even
    assert abs(bf[2] - 3.140625) < 1e-7 and np.isnan(bf[4])
    np.testing.assert_array_equal(ref.round_to(x[:4], "fp16"), x[:4].astype(np.float16).astype(np.float32))
    ref.check_close(x[:4], x[:4], "fp32")
    with pytest.raises(AssertionError, match="non-finite"):
        ref.check_close(x, x, "fp32")  # NaN never passes, even against itself
    with pytest.raises(AssertionError, match="scaled error"):
        ref.check_close(x[:4] + 0.1, x[:4], "fp16")
    with pytest.raises(ValueError):
        ref.round_to(x, "fp8")
