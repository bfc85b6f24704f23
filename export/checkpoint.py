"""Checkpoints: safetensors weights + a JSON config (never pickles), with optional optimizer state."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from edge_vla.bundle import swap_in_dir
from edge_vla.config import VLAConfig
from edge_vla.errors import CheckpointError, ConfigError

from .model import VLA

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
OPTIMIZER = "optimizer.safetensors"
TRAIN_STATE = "train_state.json"


def save_checkpoint(model: VLA, path: str | os.PathLike[str], meta: dict[str, Any] | None = None,
                    optimizer: torch.optim.Optimizer | None = None, train_state: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint directory atomically (temp dir + rename). Non-finite weights are refused before
    anything is written: they would replace a good checkpoint with one that cannot act."""
    out = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    moments = _optimizer_tensors(model, optimizer) if optimizer is not None else {}
    bad = non_finite(tensors) + non_finite(moments)
    if bad:
        kept = f"{out} is left as it was" if out.exists() else f"nothing was written to {out}"
        raise CheckpointError(f"refusing to write a checkpoint with non-finite values in {_names(bad)} (the model "
                              f"diverged); {kept}")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(tensors, staging / WEIGHTS)
        doc = {"config": model.config.to_dict(), "meta": meta or {}}
        (staging / CONFIG).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        if optimizer is not None:
            save_file(moments, staging / OPTIMIZER)
        if train_state is not None:
            (staging / TRAIN_STATE).write_text(json.dumps(train_state, indent=2) + "\n")
        swap_in_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def read_config(path: str | os.PathLike[str]) -> tuple[VLAConfig, dict[str, Any]]:
    cpath = Path(path) / CONFIG
    if not cpath.is_file():
        raise CheckpointError(f"{path} is not a checkpoint directory (no {CONFIG}); train one with `edge-vla train`")
    try:
        doc = json.loads(cpath.read_text())
        return VLAConfig.from_dict(doc["config"]), doc.get("meta", {})
    except (json.JSONDecodeError, KeyError, TypeError, ConfigError) as exc:
        raise CheckpointError(f"{cpath} is not a valid checkpoint config: {exc}") from exc


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[VLA, dict[str, Any]]:
    """Load a checkpoint, failing with a message that names every mismatch between config and tensors."""
    config, meta = read_config(path)
    wpath = Path(path) / WEIGHTS
    if not wpath.is_file():
        raise CheckpointError(f"checkpoint {path} has no {WEIGHTS}")
    try:
        tensors = load_file(wpath)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{wpath} is not a readable safetensors file ({exc}); it may be truncated") from exc
    model = VLA(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(tensors[k].shape)} vs config {tuple(v.shape)}"
              for k, v in expected.items() if k in tensors and tensors[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:5]}{'...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        if shapes:
            parts.append("shape mismatches " + "; ".join(shapes[:5]))
        raise CheckpointError(
            f"checkpoint {path}: its config (preset {config.preset!r}) and tensors disagree: " + "; ".join(parts)
        )
    bad = non_finite(tensors)
    if bad:
        raise CheckpointError(f"checkpoint {path}: non-finite values in {_names(bad)}; it was written by a run that "
                              "diverged: retrain, or use an earlier checkpoint")
    model.load_state_dict(tensors)
    return model.eval(), meta


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding NaN or Inf."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def _names(names: list[str], shown: int = 5) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def load_training_state(path: str | os.PathLike[str], model: VLA, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore optimizer moments and the step counter for --resume."""
    opath, spath = Path(path) / OPTIMIZER, Path(path) / TRAIN_STATE
    if not (opath.is_file() and spath.is_file()):
        raise CheckpointError(f"{path} has no optimizer state to resume from; start a fresh run instead")
    tensors = load_file(opath)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            n = names[id(p)]
            if f"{n}.exp_avg" in tensors:
                optimizer.state[p] = {
                    "step": tensors[f"{n}.step"],
                    "exp_avg": tensors[f"{n}.exp_avg"],
                    "exp_avg_sq": tensors[f"{n}.exp_avg_sq"],
                }
    return json.loads(spath.read_text())


def _optimizer_tensors(model: VLA, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for n, p in model.named_parameters():
        st = optimizer.state.get(p)
        if st:
            out[f"{n}.step"] = torch.as_tensor(st["step"]).float().reshape(())
            out[f"{n}.exp_avg"] = st["exp_avg"].contiguous()
            out[f"{n}.exp_avg_sq"] = st["exp_avg_sq"].contiguous()
    return out
