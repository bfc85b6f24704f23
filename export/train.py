"""Behaviour cloning with flow matching: progress bar, periodic checkpoints, resumption."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edge_vla.config import VLAConfig
from edge_vla.errors import ConfigError, EdgeVlaError
from edge_vla.progress import progress as progress_bar
from edge_vla.sim.dataset import Dataset

from .checkpoint import TRAIN_STATE, load_checkpoint, load_training_state, save_checkpoint
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
    val_fraction: float = 0.05  # of the layouts (episodes), held out for a validation loss
    goal_weight: float = 0.5  # auxiliary goal-location loss, where the model has a goal head and the data goals
    # RTC training: the share of examples whose prefix is "hold still" (VLA.prefix_flow_loss), where the data's
    # actions are joint-position targets of the state's joints.
    rtc_hold_fraction: float = 0.25


def default_threads(window_s: float = 0.5) -> int:
    """Intra-op threads for the cores that are actually free: torch with 2 threads on a 2-core box runs
    ~10x slower when another process holds a core, while 1 thread loses only ~1.6x when the box is idle.

    Busy cores are sampled from /proc/stat over a short window while this process sleeps, so its own
    earlier work (e.g. generating the data just before training) does not count, as it would in the
    load average. Elsewhere the 1-minute load average stands in."""
    cores = os.cpu_count() or 1
    busy = busy_cores(window_s)
    return max(1, min(cores, cores - round(busy)))


def busy_cores(window_s: float = 0.5) -> float:
    """Cores busy with other processes over `window_s` (this one sleeps meanwhile)."""
    def sample() -> tuple[int, int] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle

    first = sample()
    if first is None:
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    time.sleep(window_s)
    second = sample()
    assert second is not None
    total, idle = second[0] - first[0], second[1] - first[1]
    return 0.0 if total <= 0 else (os.cpu_count() or 1) * (1 - idle / total)


def split_episodes(episodes, val_fraction: float, groups=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) sample indices; whole episodes (and every variant of a layout) stay together: the
    highest episode ids are held out. `groups` (one label per sample, e.g. a multi-task dataset's instruction): a
    group none of whose episodes is among them also gives its own highest ids. With `--data ALL.npz,EXTRA.npz` the
    highest ids are all the last file's, which may hold only some of the tasks; a single make-data file numbers
    its episodes across tasks, so its split (and every shipped checkpoint's) is the plain one."""
    ids = torch.as_tensor(episodes)
    val_ids = _highest_ids(torch.unique(ids), val_fraction)
    if groups is not None and len(val_ids):
        labels = np.asarray(groups)
        covered = set(np.unique(labels[torch.isin(ids, val_ids).numpy()]).tolist())
        missed = [_highest_ids(torch.unique(ids[torch.from_numpy(labels == g)]), val_fraction)
                  for g in np.unique(labels) if g not in covered]
        val_ids = torch.cat([val_ids, *missed])
    is_val = torch.isin(ids, val_ids)
    return torch.nonzero(~is_val).flatten(), torch.nonzero(is_val).flatten()


def task_groups(ds: Dataset) -> np.ndarray | None:
    """Per-sample task labels where a dataset holds several tasks episode by episode (MetaWorld: the instruction
    names the task); None for the project's sim, whose layouts give one episode per instruction."""
    return np.asarray(ds.instructions) if ds.meta.get("task") == "metaworld" else None


def _highest_ids(unique: torch.Tensor, val_fraction: float) -> torch.Tensor:
    n_val = int(len(unique) * val_fraction) if len(unique) > 1 else 0
    return unique[len(unique) - n_val:] if n_val else unique[:0]


@torch.no_grad()
def validation_loss(model: VLA, data: TensorDataset, idx: torch.Tensor, seed: int = 1234, max_samples: int = 512) -> float:
    """Flow loss on held-out samples at fixed noise and t (comparable between checkpoints)."""
    if len(idx) == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    idx = idx[torch.randperm(len(idx), generator=g)[:max_samples]]
    total = 0.0
    for part in idx.split(128):
        images, tokens, state, actions = data.batch(part)
        noise = torch.randn(actions.shape, generator=g)
        t = torch.rand(len(part), generator=g)
        total += float(model.flow_loss(images, tokens, state, actions, noise=noise, t=t)) * len(part)
    model.train(was_training)
    return total / len(idx)


@torch.no_grad()
def goal_error_cm(model: VLA, data: TensorDataset, idx: torch.Tensor, max_samples: int = 512,
                 seed: int = 1234) -> float | None:
    """Median distance (cm) between the goal head's estimate and the named block on held-out samples (a fixed
    random sample of the whole split, so every task of a per-task split counts and checkpoints compare)."""
    if model.goal is None or data.goals is None or len(idx) == 0:
        return None
    was_training = model.training
    model.eval()
    idx = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))[:max_samples]]
    errs = []
    for part in idx.split(128):
        images, tokens, state, _ = data.batch(part)
        pred = model.goal_xy(model.embed_prefix(images, tokens, state))
        errs.append(torch.linalg.vector_norm(pred - data.goals[part], dim=-1))
    model.train(was_training)
    return float(torch.cat(errs).median()) * 100


class NonFiniteLossError(EdgeVlaError):
    """Training or distillation met a NaN/Inf loss or gradient; nothing non-finite was written."""


def non_finite_message(where: str, loss: torch.Tensor, grad_norm: torch.Tensor, batch: str, saved: str,
                       advice: str) -> str:
    """One line: where it stopped, which quantity went non-finite, the batch, what was kept, what to do."""
    what = (f"the loss is {float(loss):g}" if not torch.isfinite(loss)
            else f"the gradient norm is {float(grad_norm):g} (loss {float(loss):.4g})")
    return f"{where}: {what} on a {batch}; {saved}. {advice[0].upper()}{advice[1:]}"


def describe_batch(rows: torch.Tensor | np.ndarray, episodes: np.ndarray | None, states: torch.Tensor,
                   actions: torch.Tensor | None, noun: str, shown: int = 16) -> str:
    """The batch's row indices (and episodes), and which rows hold non-finite states or actions."""
    ids = [int(i) for i in np.asarray(rows).reshape(-1)]
    text = f"batch of {len(ids)} {noun} {ids[:shown]}{'...' if len(ids) > shown else ''}"
    if episodes is not None:
        eps = sorted({int(episodes[i]) for i in ids})
        text += f" (episodes {eps[:shown]}{'...' if len(eps) > shown else ''})"
    for name, values in (("state", states), ("action", actions)):
        if values is None:
            continue
        bad = ~torch.isfinite(values.reshape(len(ids), -1)).all(dim=1)
        if bad.any():
            text += f"; {noun} {[ids[i] for i in torch.nonzero(bad).flatten().tolist()][:shown]} hold a non-finite {name}"
    return text


def _diverged(step: int, steps: int, loss: torch.Tensor, grad_norm: torch.Tensor, idx: torch.Tensor, ds: Dataset,
              batch: tuple[torch.Tensor, ...], out: Path) -> NonFiniteLossError:
    try:  # what the failed run leaves in `out`: the last checkpoint it wrote, or an earlier run's
        kept = f"the checkpoint in {out} stays at step {int(json.loads((out / TRAIN_STATE).read_text())['step'])}"
    except (OSError, ValueError, KeyError, TypeError):
        kept = f"no checkpoint was written to {out}"
    return NonFiniteLossError(non_finite_message(
        f"training stopped at step {step} of {steps}", loss, grad_norm,
        describe_batch(idx, ds.episodes, batch[2], batch[3], "samples"), kept,
        "lower --lr, or check the data for NaN/Inf"))


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


# Fields a fine-tune may change: the parameters they add start fresh (prefix_emb, the goal head).
INIT_MAY_DIFFER = ("rtc_max_delay", "goal_head")


def from_init(config: VLAConfig, init: VLA) -> VLA:
    """A model of `config` holding `init`'s weights and normalization; refuses any other config difference."""
    theirs = dataclasses.replace(init.config, **{k: getattr(config, k) for k in INIT_MAY_DIFFER})
    if theirs != config:
        diff = [f"{f.name} {getattr(theirs, f.name)} vs {getattr(config, f.name)}"
                for f in dataclasses.fields(config) if getattr(theirs, f.name) != getattr(config, f.name)]
        raise ConfigError(f"--init checkpoint (preset {init.config.preset!r}) differs from the model to train: "
                          f"{'; '.join(diff)}; only {', '.join(INIT_MAY_DIFFER)} may change in a fine-tune")
    model = VLA(config)
    ours = model.state_dict()
    weights = {k: v for k, v in init.state_dict().items() if k in ours}
    missing = sorted(set(ours) - set(weights))
    fresh = [k for k in missing if not k.startswith(("prefix_emb", "goal."))]
    if fresh:
        raise ConfigError(f"--init checkpoint lacks {fresh[:5]}; it is not a checkpoint of this model")
    model.load_state_dict(weights, strict=False)
    if missing:
        log.info("fine-tuning from --init; new parameters start fresh: %s", ", ".join(missing))
    return model


def train(config: VLAConfig, ds: Dataset, out: str | Path, tc: TrainConfig, resume: bool = False,
          progress: bool = True, init: VLA | None = None) -> VLA:
    """Train `config` on `ds`; checkpoints land in `out` (safetensors + config + optimizer state). `init`: start
    from these weights and their normalization (fine-tuning, e.g. adding real-time chunking to a trained model)."""
    threads = tc.threads or default_threads()
    torch.set_num_threads(threads)
    log.info("training with %d torch thread(s)", threads)
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
    elif init is not None:
        model = from_init(config, init).train()
        opt = make_optimizer(model, tc)
    else:
        model = VLA(config).train()
        set_normalization(model, ds)
        opt = make_optimizer(model, tc)
    train_idx, val_idx = split_episodes(ds.episodes, tc.val_fraction, groups=task_groups(ds))
    meta = {"dataset": ds.meta, "samples": len(data), "train_samples": len(train_idx),
            "val_samples": len(val_idx), "train": tc.__dict__}
    # RTC: hold prefixes need the action that keeps the arm still; with joint-position actions that is the state.
    hold_prefixes = (config.rtc_max_delay > 0 and tc.rtc_hold_fraction > 0 and config.state_dim == config.action_dim
                     and ds.meta.get("action_space", {}).get("kind", "absolute_joint_position")
                     == "absolute_joint_position")
    t0 = time.perf_counter()
    losses: list[float] = []
    bar = progress_bar(range(start, tc.steps), desc=f"train {config.preset}", unit="step", initial=start,
                       enabled=progress)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tc)
        idx = train_idx[torch.randint(0, len(train_idx), (tc.batch_size,))]
        goals = None if data.goals is None else data.goals[idx]
        batch = data.batch(idx)
        hold = batch[2] if hold_prefixes else None  # joint positions: the action that holds the arm still
        loss = model.flow_loss(*batch, goals=goals, goal_weight=tc.goal_weight, hold=hold,
                               hold_fraction=tc.rtc_hold_fraction)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):  # before the step: the weights stay finite
            bar.close()
            raise _diverged(step + 1, tc.steps, loss, grad_norm, idx, ds, batch, out)
        opt.step()
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
        done = step + 1
        if done % tc.checkpoint_every == 0 or done == tc.steps:
            rng = torch.get_rng_state()  # the validation pass must not perturb training (exact resume)
            # Tiny data can hold out no episode at all: say so rather than print "validation loss nan".
            val = validation_loss(model, data, val_idx) if len(val_idx) else None
            goal_cm = goal_error_cm(model, data, val_idx) if len(val_idx) else None
            state = {"step": done, "torch_rng": rng.tolist(),
                     "loss": sum(losses[-50:]) / len(losses[-50:]), "val_loss": val,
                     "seconds": time.perf_counter() - t0}
            probe = "" if goal_cm is None else f", goal probe median error {goal_cm:.1f} cm"
            # Logged once (on a terminal the progress bar redraws below it); no print beside it.
            val_text = "no validation split (too few episodes to hold one out)" if val is None else \
                f"validation loss {val:.4f}"
            log.info("step %d: train loss %.4f, %s%s", done, state["loss"], val_text, probe)
            save_checkpoint(model, out, meta=meta | {"step": done, "loss": state["loss"], "val_loss": val},
                            optimizer=opt, train_state=state)
    return model.eval()
