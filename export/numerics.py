"""Numerics check of exported graphs against the PyTorch model, always run by `edge-vla export`."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from edge_vla.runtime.ort_backend import OrtBackend, make_session
from edge_vla.runtime.solvers import OdeLoop

from .model import VLA

# Per precision: (max relative L2 error, min cosine similarity) of the normalized action chunk.
THRESHOLDS: dict[str, tuple[float, float]] = {
    "fp32": (1e-4, 0.99999),
    "fp16": (1e-2, 0.9995),
    "int8": (8e-2, 0.995),
}


@dataclass
class Metrics:
    max_abs: float
    rel_l2: float
    cosine: float

    @classmethod
    def of(cls, ref: np.ndarray, got: np.ndarray) -> Metrics:
        ref64, got64 = ref.astype(np.float64).ravel(), got.astype(np.float64).ravel()
        if not np.all(np.isfinite(got64)):
            return cls(float("inf"), float("inf"), -1.0)
        diff = got64 - ref64
        denom = max(np.linalg.norm(ref64), 1e-12)
        cos = float(ref64 @ got64 / max(np.linalg.norm(ref64) * np.linalg.norm(got64), 1e-12))
        return cls(float(np.abs(diff).max()), float(np.linalg.norm(diff) / denom), cos)

    def worst(self, other: Metrics) -> Metrics:
        return Metrics(max(self.max_abs, other.max_abs), max(self.rel_l2, other.rel_l2), min(self.cosine, other.cosine))


@dataclass
class NumericsReport:
    precision: str
    observations: int
    steps: int
    graphs: dict[str, dict]
    actions: dict
    threshold_rel_l2: float
    threshold_cosine: float
    passed: bool

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        a = self.actions
        return (f"{self.precision}: normalized action chunk max|err| {a['max_abs']:.2e}, rel L2 {a['rel_l2']:.2e}, "
                f"cosine {a['cosine']:.6f} over {self.observations} observations "
                f"(limits rel L2 <= {self.threshold_rel_l2:g}, cosine >= {self.threshold_cosine:g}): "
                + ("PASS" if self.passed else "FAIL"))


@torch.no_grad()
def check(model: VLA, precision: str, prefix_path: Path, step_path: Path, obs: dict[str, torch.Tensor],
          chunk_path: Path | None = None, chunk_steps: int | None = None, seed: int = 1234) -> NumericsReport:
    """Compare every graph, and the full sampler through the runtime's own ODE loop, with PyTorch."""
    cfg = model.config
    backend = OrtBackend(prefix_path, step_path, providers=["CPUExecutionProvider"])
    ode = OdeLoop(backend)
    g = torch.Generator().manual_seed(seed)
    n = len(obs["state"])
    worst = {name: Metrics(0.0, 0.0, 1.0) for name in ("prefix", "denoise_step", "chunk")}
    ref_all, got_all = [], []
    chunk_sess = make_session(chunk_path, None, ["CPUExecutionProvider"]) if chunk_path else None
    for i in range(n):
        images, tokens, state = (obs[k][i : i + 1] for k in ("images", "tokens", "state"))
        kv = model.prefix_kv(images, tokens, state)
        backend.buf["images"][...] = images.numpy()
        backend.buf["tokens"][...] = tokens.numpy()
        backend.buf["state"][...] = state.numpy()
        backend.run_prefix()
        worst["prefix"] = worst["prefix"].worst(Metrics.of(kv.numpy(), backend.buf["prefix_kv"]))
        # One denoise step from a random (x_t, t), on the reference prefix so errors don't compound.
        x = torch.randn(1, cfg.chunk_len, cfg.action_dim, generator=g)
        t = torch.rand(1, generator=g)
        ref_v = model.velocity(x, t, kv).numpy()
        saved_kv = backend.buf["prefix_kv"].copy()
        backend.buf["prefix_kv"][...] = kv.numpy()
        backend.buf["x_t"][...] = x.numpy()
        backend.buf["t"][...] = t.numpy()
        backend.run_step()
        worst["denoise_step"] = worst["denoise_step"].worst(Metrics.of(ref_v, backend.buf["velocity"]))
        backend.buf["prefix_kv"][...] = saved_kv
        # The whole chunk through the runtime's ODE loop, same noise as PyTorch.
        noise = torch.randn(1, cfg.chunk_len, cfg.action_dim, generator=g)
        # Compared in the normalized action space: in physical units a joint's offset (its mean)
        # would dilute the relative error and push the cosine towards 1 whatever the graph did.
        ref_actions = model.normalize_actions(model.sample(images, tokens, state, noise, steps=cfg.num_steps))
        got = ode.run(noise.numpy(), cfg.num_steps)
        ref_all.append(ref_actions.numpy())
        got_all.append(got.copy())
        if chunk_sess is not None:
            out = chunk_sess.run(None, {"images": images.numpy(), "tokens": tokens.numpy(), "state": state.numpy(),
                                        "noise": noise.numpy()})[0]
            ref_u = model.normalize_actions(model.sample(images, tokens, state, noise, steps=chunk_steps)).numpy()
            worst["chunk"] = worst["chunk"].worst(Metrics.of(ref_u, out))
    actions = Metrics.of(np.concatenate(ref_all), np.concatenate(got_all))
    rel_max, cos_min = THRESHOLDS[precision]
    passed = actions.rel_l2 <= rel_max and actions.cosine >= cos_min
    if chunk_sess is not None:
        passed = passed and worst["chunk"].rel_l2 <= rel_max and worst["chunk"].cosine >= cos_min
    graphs = {k: asdict(v) for k, v in worst.items() if k != "chunk" or chunk_sess is not None}
    return NumericsReport(precision, n, cfg.num_steps, graphs, asdict(actions), rel_max, cos_min, passed)
