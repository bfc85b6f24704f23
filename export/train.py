"""Behaviour cloning with flow matching: progress bar, periodic checkpoints, resumption."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from edge_vla.config import VLAConfig
from edge_vla.sim.dataset import Dataset

from .checkpoint import load_checkpoint, load_training_state, save_checkpoint
from .data import TensorDataset
from .model import VLA

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    steps: int = 1500
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup: int = 100
    checkpoint_every: int = 500
    seed: int = 0
    threads: int | None = None


def set_normalization(model: VLA, ds: Dataset) -> None:
    a, s = ds.action_stats(), ds.state_stats()
    model.action_mean.copy_(torch.tensor(a["mean"]))
    model.action_std.copy_(torch.tensor(a["std"]))
    model.state_mean.copy_(torch.tensor(s["mean"]))
    model.state_std.copy_(torch.tensor(s["std"]))


def make_optimizer(model: VLA, tc: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)


def lr_at(step: int, tc: TrainConfig) -> float:
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    progress = (step - tc.warmup) / max(1, tc.steps - tc.warmup)
    return tc.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def train(config: VLAConfig, ds: Dataset, out: str | Path, tc: TrainConfig, resume: bool = False,
          progress: bool = True) -> VLA:
    """Train `config` on `ds`; checkpoints land in `out` (safetensors + config + optimizer state)."""
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    out = Path(out)
    data = TensorDataset(ds, config)
    start = 0
    if resume and (out / "train_state.json").is_file():
        model, _ = load_checkpoint(out)
        model.train()
        opt = make_optimizer(model, tc)
        state = load_training_state(out, model, opt)
        start = int(state["step"])
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
        log.info("resuming %s from step %d", out, start)
    else:
        model = VLA(config).train()
        set_normalization(model, ds)
        opt = make_optimizer(model, tc)
    meta = {"dataset": ds.meta, "samples": len(data), "train": tc.__dict__}
    t0 = time.perf_counter()
    losses: list[float] = []
    bar = tqdm(range(start, tc.steps), desc=f"train {config.preset}", disable=not progress, unit="step")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tc)
        idx = torch.randint(0, len(data), (tc.batch_size,))
        loss = model.flow_loss(*data.batch(idx))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
        done = step + 1
        if done % tc.checkpoint_every == 0 or done == tc.steps:
            state = {"step": done, "torch_rng": torch.get_rng_state().tolist(),
                     "loss": sum(losses[-50:]) / len(losses[-50:]), "seconds": time.perf_counter() - t0}
            save_checkpoint(model, out, meta=meta | {"step": done, "loss": state["loss"]}, optimizer=opt,
                            train_state=state)
    return model.eval()
