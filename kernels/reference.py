"""NumPy CPU references for the CUDA kernels in this folder (the ground truth the GPU tests compare to).

Conventions (shared with the export side and the runtime's solvers):

- flow: x_0 = noise, x_1 = data, x_t = (1 - t) x_0 + t x_1, velocity target v = x_1 - x_0;
  integrate t from 0 to 1 in N steps with dt = 1/N (Euler or Heun);
- time embedding: half = E/2, f_i = exp(-ln(10000) i / half), temb(t) = [cos(100 t f), sin(100 t f)];
- conditioning: c = W2 @ silu(W1 @ temb + b1) + b2; per block mod = Wm @ silu(c) + bm split in 6;
- LayerNorm without affine, eps = 1e-6; weights row-major [out, in].

Everything that depends only on t (temb, c, every modulation vector) is a pure function of the step
schedule, so `precompute_schedule` evaluates it once per schedule; the per-step work then only
indexes a table (see NOTES.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

LN_EPS = 1e-6
TIME_SCALE = 100.0

MODE_INIT, MODE_EULER, MODE_HEUN_PREDICT, MODE_HEUN_CORRECT = 0, 1, 2, 3
ACT_NONE, ACT_GELU_TANH, ACT_SILU = 0, 1, 2

VelocityFn = Callable[[np.ndarray, float], np.ndarray]


def time_embedding(t: float | np.ndarray, dim: int) -> np.ndarray:
    """temb(t) of length `dim` (float32); a 1-D array of t gives [len(t), dim]."""
    if dim % 2:
        raise ValueError(f"time embedding width must be even, got {dim}")
    half = dim // 2
    freqs = np.exp(-np.log(10000.0) * np.arange(half, dtype=np.float64) / half)
    arg = TIME_SCALE * np.asarray(t, dtype=np.float64)[..., None] * freqs
    return np.concatenate([np.cos(arg), np.sin(arg)], axis=-1).astype(np.float32)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def activation(x: np.ndarray, act: int) -> np.ndarray:
    if act == ACT_GELU_TANH:
        return gelu_tanh(x)
    if act == ACT_SILU:
        return silu(x)
    if act != ACT_NONE:
        raise ValueError(f"unknown activation code {act}")
    return x


def layernorm(x: np.ndarray, eps: float = LN_EPS) -> np.ndarray:
    """LayerNorm over the last axis, no affine (two-pass, in float64 for a reference)."""
    x64 = np.asarray(x, dtype=np.float64)
    mean = x64.mean(axis=-1, keepdims=True)
    var = ((x64 - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x64 - mean) / np.sqrt(var + eps)


def adaln_linear(
    x: np.ndarray,
    shift: np.ndarray | None,
    scale: np.ndarray | None,
    w: np.ndarray,
    b: np.ndarray | None,
    act: int = ACT_NONE,
    eps: float = LN_EPS,
) -> np.ndarray:
    """act(W @ (LN(x) * (1 + scale) + shift) + b) per row of x [T, K]; W is [N, K]. Returns float32."""
    y = layernorm(x, eps)
    if scale is not None:
        y = y * (1.0 + np.asarray(scale, np.float64)) + np.asarray(shift, np.float64)
    out = y @ np.asarray(w, np.float64).T
    if b is not None:
        out = out + np.asarray(b, np.float64)
    return activation(out, act).astype(np.float32)


def clamp(x: np.ndarray, lo: np.ndarray | None, hi: np.ndarray | None) -> np.ndarray:
    """Clamp [..., D] to per-dim bounds; NaN stays NaN (np.clip propagates it)."""
    if lo is None or hi is None:
        return x
    return np.clip(x, lo, hi)


def ode_step(
    x: np.ndarray,
    v: np.ndarray,
    v_prev: np.ndarray | None,
    dt: float,
    t_next: float,
    mode: int,
    emb_dim: int,
    lo: np.ndarray | None = None,
    hi: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """One call of the fused step kernel: returns (x, x_in, v_prev, temb(t_next)); inputs untouched.

    x_in is what the next model evaluation consumes (the Heun predictor for MODE_HEUN_PREDICT).
    """
    x = np.asarray(x, np.float32)
    v = np.asarray(v, np.float32)
    dt32 = np.float32(dt)
    if mode == MODE_INIT:
        x_in = x.copy()
    elif mode == MODE_EULER:
        x = clamp(x + dt32 * v, lo, hi).astype(np.float32)
        x_in = x
    elif mode == MODE_HEUN_PREDICT:
        v_prev = v.copy()
        x_in = clamp(x + dt32 * v, lo, hi).astype(np.float32)
    elif mode == MODE_HEUN_CORRECT:
        if v_prev is None:
            raise ValueError("Heun corrector needs the predictor's slope v_prev")
        x = clamp(x + np.float32(0.5) * dt32 * (v_prev + v), lo, hi).astype(np.float32)
        x_in = x
    else:
        raise ValueError(f"unknown integrator mode {mode}")
    return x, x_in, v_prev, time_embedding(t_next, emb_dim)


def integrate(
    velocity: VelocityFn,
    x0: np.ndarray,
    steps: int = 10,
    method: str = "euler",
    lo: np.ndarray | None = None,
    hi: np.ndarray | None = None,
    emb_dim: int = 2,
) -> np.ndarray:
    """Integrate dx/dt = velocity(x, t) from t = 0 to 1 through `ode_step`, the way the runtime drives
    the kernel: velocity is evaluated on x_in, never on the master state directly."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if method not in ("euler", "heun"):
        raise ValueError(f"method must be 'euler' or 'heun', got {method!r}")
    dt = 1.0 / steps
    x, x_in, v_prev, _ = ode_step(x0, np.zeros_like(x0), None, dt, 0.0, MODE_INIT, emb_dim)
    for k in range(steps):
        t = k * dt
        v = velocity(x_in, t)
        if method == "euler":
            x, x_in, v_prev, _ = ode_step(x, v, v_prev, dt, t + dt, MODE_EULER, emb_dim, lo, hi)
        else:
            x, x_in, v_prev, _ = ode_step(x, v, v_prev, dt, t + dt, MODE_HEUN_PREDICT, emb_dim, lo, hi)
            v = velocity(x_in, t + dt)
            x, x_in, v_prev, _ = ode_step(x, v, v_prev, dt, t + dt, MODE_HEUN_CORRECT, emb_dim, lo, hi)
    return x


@dataclass(frozen=True)
class TimeCondWeights:
    """The t-only part of the action expert: time MLP, per-block adaLN and the final adaLN."""

    w1: np.ndarray  # [E, E]
    b1: np.ndarray  # [E]
    w2: np.ndarray  # [E, E]
    b2: np.ndarray  # [E]
    wm: np.ndarray  # [L, 6E, E]
    bm: np.ndarray  # [L, 6E]
    wf: np.ndarray  # [2E, E]
    bf: np.ndarray  # [2E]

    @classmethod
    def random(cls, width: int, layers: int, seed: int = 0) -> TimeCondWeights:
        rng = np.random.default_rng(seed)
        s = 1.0 / np.sqrt(width)

        def mat(*shape: int) -> np.ndarray:
            return (rng.standard_normal(shape) * s).astype(np.float32)

        return cls(
            w1=mat(width, width), b1=mat(width), w2=mat(width, width), b2=mat(width),
            wm=mat(layers, 6 * width, width), bm=mat(layers, 6 * width),
            wf=mat(2 * width, width), bf=mat(2 * width),
        )


def time_conditioning(t: float | np.ndarray, w: TimeCondWeights) -> np.ndarray:
    """c(t) = W2 @ silu(W1 @ temb(t) + b1) + b2 (batched over a leading axis of t)."""
    temb = time_embedding(t, w.w1.shape[1]).astype(np.float64)
    h = silu(temb @ w.w1.T.astype(np.float64) + w.b1)
    return (h @ w.w2.T.astype(np.float64) + w.b2).astype(np.float32)


@dataclass(frozen=True)
class Schedule:
    """Everything t-dependent for a fixed schedule of model evaluations."""

    ts: np.ndarray  # [S] times at which the model is evaluated
    temb: np.ndarray  # [S, E]
    cond: np.ndarray  # [S, E]
    mod: np.ndarray  # [S, L, 6, E]: shift1, scale1, gate1, shift2, scale2, gate2
    final: np.ndarray  # [S, 2, E]: shift, scale


def schedule_times(steps: int, method: str = "euler") -> np.ndarray:
    """The t of every model evaluation: Euler k/N; Heun k/N and (k+1)/N per step."""
    dt = 1.0 / steps
    if method == "euler":
        return np.arange(steps, dtype=np.float64) * dt
    if method == "heun":
        return np.stack([np.arange(steps) * dt, (np.arange(steps) + 1) * dt], axis=1).reshape(-1)
    raise ValueError(f"method must be 'euler' or 'heun', got {method!r}")


def precompute_schedule(ts: np.ndarray, w: TimeCondWeights) -> Schedule:
    """Evaluate temb, c and all modulation vectors once for every t in the schedule."""
    ts = np.asarray(ts, dtype=np.float64)
    layers, _, width = w.wm.shape
    cond = time_conditioning(ts, w)
    sc = silu(cond.astype(np.float64))
    mod = np.einsum("se,lfe->slf", sc, w.wm.astype(np.float64)) + w.bm[None]
    final = sc @ w.wf.T.astype(np.float64) + w.bf
    return Schedule(
        ts=ts.astype(np.float32),
        temb=time_embedding(ts, width),
        cond=cond,
        mod=mod.reshape(len(ts), layers, 6, width).astype(np.float32),
        final=final.reshape(len(ts), 2, width).astype(np.float32),
    )


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """Round float32 values through a storage type and back ('fp32', 'fp16', 'bf16', round-to-nearest-even)."""
    x = np.asarray(x, np.float32)
    if dtype == "fp32":
        return x.copy()
    if dtype == "fp16":
        return x.astype(np.float16).astype(np.float32)
    if dtype == "bf16":
        return bf16_bits_to_f32(f32_to_bf16_bits(x))
    raise ValueError(f"dtype must be fp32, fp16 or bf16, got {dtype!r}")


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even, NaN kept NaN."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded = np.where(nan, np.uint16(0x7FC0), rounded)
    return rounded


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, np.uint16).astype(np.uint32) << 16).view(np.float32)


# Relative tolerances by storage precision: |got - ref| <= tol * (1 + |ref|). fp32 leaves room for
# accumulation order over K <= 2048; fp16/bf16 for one rounding of inputs (2^-11, 2^-8) times a
# modest accumulation growth.
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}


def check_close(got: np.ndarray, ref: np.ndarray, precision: str, what: str = "output") -> float:
    """Raise AssertionError unless got ~= ref at the precision's tolerance; NaN/inf never pass."""
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    if got.shape != ref.shape:
        raise AssertionError(f"{what}: shape {got.shape} != reference {ref.shape}")
    if not np.all(np.isfinite(got)):
        raise AssertionError(f"{what}: {int((~np.isfinite(got)).sum())} non-finite values")
    tol = TOLERANCE[precision]
    err = np.abs(got - ref) / (1.0 + np.abs(ref))
    worst = float(err.max()) if err.size else 0.0
    if not worst <= tol:
        idx = np.unravel_index(int(np.argmax(err)), err.shape)
        raise AssertionError(
            f"{what}: scaled error {worst:.3e} > {tol:.0e} ({precision}) at {idx}: got {got[idx]}, ref {ref[idx]}"
        )
    return worst
