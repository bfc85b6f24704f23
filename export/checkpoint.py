"""Checkpoints: safetensors weights + a JSON config (never pickles), with optional optimizer state."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
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


# Upper bounds for a config read from a file: far above any model these tools train or export (base: width 768,
# depth 8, 224-pixel images), there only so that a corrupt or hostile config.json is refused before anything is
# built from it (a depth of 10**9 is 10**9 modules even on the meta device).
_MAX_COUNT = 1024  # layers, heads, cameras, ODE steps, keypoints, ratios
_MAX_SIZE = 1 << 16  # widths, image and patch sizes, token and action lengths
_COUNTS = ("depth", "expert_depth", "heads", "expert_heads", "num_cameras", "num_steps", "keypoints", "mlp_ratio")
_MAY_BE_ZERO = ("keypoints", "rtc_max_delay")


def _field_problem(name: str, kind: str, value: Any) -> str | None:
    """Why `value` cannot be VLAConfig field `name` (declared `kind`), or None. JSON has no int/float/bool
    distinction a dataclass would enforce: 128.0 or "2" only fail deep inside torch, and "no" is a true bool."""
    if kind in ("bool", bool):
        return None if isinstance(value, bool) else f"{name} must be true or false, got {value!r}"
    if kind in ("str", str):
        return None if isinstance(value, str) else f"{name} must be a string, got {value!r}"
    if kind in ("int", int):
        if type(value) is not int:
            return f"{name} must be a whole number, got {value!r}"
        low, high = (0 if name in _MAY_BE_ZERO else 1), (_MAX_COUNT if name in _COUNTS else _MAX_SIZE)
        return None if low <= value <= high else f"{name} must be {low}..{high}, got {value}"
    return None


def read_config(path: str | os.PathLike[str]) -> tuple[VLAConfig, dict[str, Any]]:
    cpath = Path(path) / CONFIG
    if not cpath.is_file():
        raise CheckpointError(f"{path} is not a checkpoint directory (no {CONFIG}); train one with `edge-vla train`")
    advice = "re-save it with `edge-vla train`, or restore it from where the checkpoint came from"

    def invalid(reason: str) -> CheckpointError:
        return CheckpointError(f"{cpath} is not a valid checkpoint config: {reason}; {advice}")

    doc = read_json(cpath, invalid)
    if not isinstance(doc, dict):
        raise invalid("not a JSON object")
    config, meta = doc.get("config"), doc.get("meta", {})
    for key, value in (("config", config), ("meta", meta)):
        if not isinstance(value, dict):
            raise invalid(f"{key!r} must be a JSON object, got {type(value).__name__}")
    types = {f.name: f.type for f in dataclasses.fields(VLAConfig)}
    problems = [p for k, v in config.items() if k in types and (p := _field_problem(k, str(types[k]), v))]
    if problems:
        raise invalid("; ".join(problems))
    try:
        return VLAConfig.from_dict(config), meta
    except ConfigError as exc:
        raise invalid(str(exc)) from exc


def _header_shapes(wpath: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from a safetensors header, reading no tensor data."""
    try:
        with safe_open(wpath, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{wpath} is not a readable safetensors file ({exc}); it may be truncated") from exc


def _expected_shapes(config: VLAConfig) -> dict[str, tuple[int, ...]]:
    """The state dict's shapes for `config`, from a model on the meta device (no memory behind any tensor)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in VLA(config).state_dict().items()}


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[VLA, dict[str, Any]]:
    """Load a checkpoint, failing with a message that names every mismatch between config and tensors. The
    config is checked against the file's header before a real model is built or a tensor is read: a config
    that says width 10**9 next to 128-wide tensors is refused, not allocated."""
    config, meta = read_config(path)
    wpath = Path(path) / WEIGHTS
    if not wpath.is_file():
        raise CheckpointError(f"checkpoint {path} has no {WEIGHTS}")
    found, expected = _header_shapes(wpath), _expected_shapes(config)
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = [f"{k}: checkpoint {found[k]} vs config {v}" for k, v in expected.items() if k in found and found[k] != v]
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
    try:
        tensors = load_file(wpath)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{wpath} is not a readable safetensors file ({exc}); it may be truncated") from exc
    bad = non_finite(tensors)
    if bad:
        raise CheckpointError(f"checkpoint {path}: non-finite values in {_names(bad)}; it was written by a run that "
                              "diverged: retrain, or use an earlier checkpoint")
    model = VLA(config)
    model.load_state_dict(tensors)
    return model.eval(), meta


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding NaN or Inf."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def _names(names: list[str], shown: int = 5) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


# What a run needs besides its weights to continue where it stopped (`edge-vla train --resume`).
MOMENTS = ("step", "exp_avg", "exp_avg_sq")


def _cannot_resume(path: str | os.PathLike[str]) -> str:
    return (f"the run cannot be resumed: continue from its weights with `--init {path} -o NEW_DIR`, or start a "
            "fresh run")


def read_json(path: Path, fail: Callable[[str], CheckpointError], max_bytes: int = 1 << 20) -> Any:
    """A small JSON file written by edge-vla, read as untrusted bytes: too big, not UTF-8, not JSON or nested
    past the parser's recursion limit is `fail(why)`, one CheckpointError naming the file (never a traceback)."""
    try:
        with path.open("rb") as f:
            raw = f.read(max_bytes + 1)
        if len(raw) > max_bytes:
            raise ValueError(f"larger than {max_bytes} bytes")
        return json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise fail("not valid JSON (nested too deeply)") from None
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise fail(f"not valid JSON ({exc})") from None


def read_training_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """train_state.json of a run, checked: a JSON object with the step reached and the CPU generator's state."""
    spath, opath = Path(path) / TRAIN_STATE, Path(path) / OPTIMIZER
    if not (spath.is_file() and opath.is_file()):
        raise CheckpointError(f"{path} has no training state ({TRAIN_STATE} and {OPTIMIZER}, written only by "
                              f"`edge-vla train`); {_cannot_resume(path)}")
    state = read_json(spath, lambda why: CheckpointError(f"{spath} is {why}; {_cannot_resume(path)}"))
    if not isinstance(state, dict):
        raise CheckpointError(f"{spath} is not a JSON object; {_cannot_resume(path)}")
    step = state.get("step")
    if type(step) is not int or step < 0:
        raise CheckpointError(f"{spath}: 'step' must be a whole number >= 0, got {step!r}; {_cannot_resume(path)}")
    rng, size = state.get("torch_rng"), torch.get_rng_state().numel()
    if not (isinstance(rng, list) and len(rng) == size and all(type(v) is int and 0 <= v < 256 for v in rng)):
        raise CheckpointError(f"{spath}: 'torch_rng' must be the {size} bytes of torch's generator state; "
                              f"{_cannot_resume(path)}")
    return state


def load_training_state(path: str | os.PathLike[str], model: VLA, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore optimizer moments and the step counter for --resume. A parameter has either all of its moments,
    with its shape, or none (AdamW keeps none for one that never had a gradient); anything between is a partial or
    foreign optimizer file, which would otherwise restart some moments at zero without a word (or fail at the
    first step)."""
    state = read_training_state(path)
    opath = Path(path) / OPTIMIZER
    try:
        tensors = load_file(opath)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{opath} is not a readable safetensors file ({exc}); {_cannot_resume(path)}") from None
    restored: dict[torch.nn.Parameter, dict[str, torch.Tensor]] = {}
    for name, p in model.named_parameters():
        found = {m: tensors[f"{name}.{m}"] for m in MOMENTS if f"{name}.{m}" in tensors}
        if not found:
            continue
        want = {"step": torch.Size(()), "exp_avg": p.shape, "exp_avg_sq": p.shape}
        wrong = [f"{name}.{m} missing" if m not in found else f"{name}.{m} {tuple(found[m].shape)} vs {tuple(want[m])}"
                 for m in MOMENTS if m not in found or found[m].shape != want[m]]
        if wrong:
            raise CheckpointError(f"{opath} does not fit the model in {path}: {', '.join(wrong)}; "
                                  f"{_cannot_resume(path)}")
        restored[p] = found
    bad = non_finite(tensors)
    if bad:
        raise CheckpointError(f"{opath}: non-finite values in {_names(bad)}; {_cannot_resume(path)}")
    optimizer.state.update(restored)
    return state


def _optimizer_tensors(model: VLA, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for n, p in model.named_parameters():
        st = optimizer.state.get(p)
        if st:
            out[f"{n}.step"] = torch.as_tensor(st["step"]).float().reshape(())
            out[f"{n}.exp_avg"] = st["exp_avg"].contiguous()
            out[f"{n}.exp_avg_sq"] = st["exp_avg_sq"].contiguous()
    return out
