"""Open-loop quality check on recorded data, for users without a simulator.

On held-out episodes, a bundle (or checkpoint) predicts each recorded observation's action chunk; its
error is reported against the recorded actions and, when a teacher is given, against the teacher run
from the same noise: per action dimension (physical units), per chunk step, and overall in units of the
recording's action std, with a bootstrap 95 % CI (episodes resampled when there are >= 5, else chunks).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_vla.config import VLAConfig
from edge_vla.runtime.types import Observation

from .errors import LeRobotDatasetError
from .reader import load_dataset

log = logging.getLogger(__name__)

# (images uint8 [C, S, S, 3], instruction, state [Ds], noise [H, D]) -> actions [H, D] in physical units
Actor = Callable[[np.ndarray, str, np.ndarray, np.ndarray], np.ndarray]
MIN_EPISODES_FOR_CLUSTER_BOOTSTRAP = 5


@dataclass
class PairError:
    name: str
    rmse_std: float                 # overall RMSE / recorded action std (1.0 = one std of the recording)
    ci95: tuple[float, float]
    rmse_per_dim: list[float]       # physical units
    rmse_std_per_step: list[float]  # per chunk step, in units of the action std


@dataclass
class OpenLoopReport:
    target: str
    teacher: str | None
    source: str
    codebase_version: str
    episodes: list[int]
    samples: int
    chunk_len: int
    action_period_s: float
    action_names: list[str]
    bootstrap_unit: str
    pairs: list[PairError]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        against = f" against teacher {self.teacher}" if self.teacher else ""
        episodes = f"{self.episodes[:8]}{'...' if len(self.episodes) > 8 else ''}"
        errors = [["", "RMSE/std", "95% CI", *self.action_names]]
        errors += [[p.name, f"{p.rmse_std:.4g}", f"[{p.ci95[0]:.4g}, {p.ci95[1]:.4g}]",
                    *(f"{v:.4g}" for v in p.rmse_per_dim)] for p in self.pairs]
        steps = [["RMSE/std per chunk step", *(str(k + 1) for k in range(self.chunk_len))]]
        steps += [[p.name, *(f"{v:.3g}" for v in p.rmse_std_per_step)] for p in self.pairs]
        return "\n".join([
            f"open-loop check of {self.target}{against} on {self.source} ({self.codebase_version}): "
            f"{len(self.episodes)} held-out episode(s) {episodes}, {self.samples} chunks of {self.chunk_len} actions "
            f"every {self.action_period_s:.3f} s",
            "RMSE of the predicted chunks: overall in units of the recording's action std (RMSE/std, with its 95% CI), "
            "then per action dimension in physical units",
            *aligned(errors), "", *aligned(steps), f"(CI: bootstrap over {self.bootstrap_unit})"])


def aligned(rows: list[list[str]], gap: int = 2) -> list[str]:
    """Rows of cells as text columns, each as wide as its widest cell (names, CIs or numbers of any length):
    the first column left-aligned, the numbers right-aligned, columns `gap` spaces apart."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    sep = " " * gap
    return [sep.join([row[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True))]).rstrip()
            for row in rows]


def load_actor(path: str, steps: int | None = None, solver: str | None = None) -> tuple[VLAConfig, Actor, str]:
    """A bundle (runs on the runtime's Policy) or a checkpoint (PyTorch), driven with given noise."""
    if (Path(path) / "manifest.json").is_file():
        from edge_vla.runtime.policy import Policy

        policy = Policy.load(path, steps=steps, solver=solver)
        feed = _GivenNoise()
        policy.rng = feed  # the Policy draws its chunk noise from .rng: hand it ours

        def act_bundle(images: np.ndarray, instruction: str, state: np.ndarray, noise: np.ndarray) -> np.ndarray:
            feed.next = noise
            return policy.infer(Observation(list(images), instruction, state)).actions.copy()

        return policy.config, act_bundle, f"bundle {path} ({policy.precision})"
    import torch

    from ..checkpoint import load_checkpoint
    from ..data import images_to_float
    from ..teacher import Tokens

    model, _ = load_checkpoint(path)
    cfg = model.config
    tokens = Tokens(cfg.max_text_len)

    def act_checkpoint(images: np.ndarray, instruction: str, state: np.ndarray, noise: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = model.sample(images_to_float(torch.from_numpy(np.ascontiguousarray(images[None]))),
                               tokens([instruction]), torch.from_numpy(state[None].astype(np.float32)),
                               torch.from_numpy(noise[None]), steps=steps, solver=solver or "euler")
        return out[0].numpy()

    return cfg, act_checkpoint, f"checkpoint {path}"


class _GivenNoise:
    """Stands in for the Policy's numpy Generator so that bundle and teacher start from the same noise."""

    next: np.ndarray | None = None

    def standard_normal(self, size: Any = None, dtype: Any = np.float32, out: np.ndarray | None = None) -> np.ndarray:
        if self.next is None or out is None:
            raise RuntimeError("open-loop noise feed used outside open_loop()")
        out[...] = self.next.reshape(out.shape)
        return out


def open_loop(target: str, source: str, teacher: str | None = None, max_samples: int = 256, seed: int = 0,
              steps: int | None = None, solver: str | None = None, n_boot: int = 1000,
              split: str = "val") -> OpenLoopReport:
    cfg, act, name = load_actor(target, steps, solver)
    t_cfg, t_act, t_name = load_actor(teacher) if teacher else (None, None, None)
    cams = cfg.num_cameras
    if t_cfg is not None:
        mismatch = [f"{k} {getattr(cfg, k)} vs {getattr(t_cfg, k)}" for k in
                    ("chunk_len", "action_dim", "state_dim", "image_size") if getattr(cfg, k) != getattr(t_cfg, k)]
        if mismatch:
            raise LeRobotDatasetError(f"{name} and teacher {t_name} disagree ({'; '.join(mismatch)}); compare a "
                                      "student with the teacher it was distilled from")
        cams = max(cams, t_cfg.num_cameras)
    text_limits = {name: cfg.max_text_len} | ({t_name: t_cfg.max_text_len} if t_cfg is not None and t_name else {})
    ds = load_dataset(source, cfg.image_size, cams, cfg.chunk_len, split=split, state_dim=cfg.state_dim,
                      action_dim=cfg.action_dim, max_samples=max_samples, text_limits=text_limits)
    rng = np.random.default_rng(seed)
    pred, ref = [], []
    for i in range(len(ds)):
        noise = rng.standard_normal((cfg.chunk_len, cfg.action_dim), dtype=np.float32)
        pred.append(act(ds.images[i, : cfg.num_cameras], str(ds.instructions[i]), ds.states[i], noise))
        if t_act is not None and t_cfg is not None:
            ref.append(t_act(ds.images[i, : t_cfg.num_cameras], str(ds.instructions[i]), ds.states[i], noise))
    recorded = ds.actions[:, : cfg.chunk_len].astype(np.float64)
    std = np.asarray(ds.action_stats()["std"], dtype=np.float64)
    p = np.stack(pred).astype(np.float64)
    pairs_in = [("model vs recorded", p, recorded)]
    if ref:
        r = np.stack(ref).astype(np.float64)
        pairs_in += [("teacher vs recorded", r, recorded), ("model vs teacher", p, r)]
    units = ds.episodes if len(set(ds.episodes.tolist())) >= MIN_EPISODES_FOR_CLUSTER_BOOTSTRAP else np.arange(len(ds))
    pairs = [_pair(n, a, b, std, units, n_boot, seed) for n, a, b in pairs_in]
    return OpenLoopReport(
        target=name, teacher=t_name, source=str(ds.meta["source"]), codebase_version=ds.meta["codebase_version"],
        episodes=list(ds.meta["episodes"]), samples=len(ds), chunk_len=cfg.chunk_len,
        action_period_s=float(ds.meta["action_period_s"]), action_names=list(ds.meta["action_names"]),
        bootstrap_unit="episodes" if units is ds.episodes else "chunks", pairs=pairs)


def _pair(name: str, a: np.ndarray, b: np.ndarray, std: np.ndarray, units: np.ndarray, n_boot: int,
          seed: int) -> PairError:
    diff = a - b                                  # [N, H, D] physical
    z2 = (diff / std) ** 2                        # in units of the recording's std
    per_sample = z2.sum((1, 2))
    count = z2[0].size
    uniq, inv = np.unique(units, return_inverse=True)
    sse = np.bincount(inv, weights=per_sample, minlength=len(uniq))
    cnt = np.bincount(inv, minlength=len(uniq)).astype(np.float64) * count
    rng = np.random.default_rng(seed + 1)
    w = rng.multinomial(len(uniq), np.full(len(uniq), 1.0 / len(uniq)), size=n_boot).astype(np.float64)
    boot = np.sqrt((w @ sse) / np.maximum(w @ cnt, 1.0))
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return PairError(name=name, rmse_std=float(np.sqrt(z2.mean())), ci95=(float(lo), float(hi)),
                     rmse_per_dim=np.sqrt((diff ** 2).mean((0, 1))).tolist(),
                     rmse_std_per_step=np.sqrt(z2.mean((0, 2))).tolist())


