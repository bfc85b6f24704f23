"""Recognise and read a transformers π0 checkpoint directory (what `save_pretrained` writes).

Expected beside `config.json` (model_type "pi0") and the weights (`model.safetensors` or a sharded index):
`tokenizer.json` (the PI0Processor's tokenizer, with `<image>`), and usually `processor_config.json`
(PI0Processor: state/action statistics, padding sizes, and the image processor's settings).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_vla.bundle import sha256_file
from edge_vla.errors import CheckpointError

log = logging.getLogger(__name__)

TRANSFORMERS_SERIES = "5.23"  # the PI0 API names this importer uses (dit_config, pixel_attention_mask)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def read_config(path: Path) -> dict[str, Any]:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{path} has no config.json: not a checkpoint directory")
    try:
        return json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({exc})") from exc


def is_pi0_checkpoint(path: str | Path) -> bool:
    """True for a directory whose config.json says model_type "pi0" (the export CLI dispatches on this)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        return False
    try:
        return read_config(path).get("model_type") == "pi0"
    except CheckpointError:
        return False


@dataclass
class Pi0Source:
    """What the exporter needs from a π0 checkpoint directory, checked up front."""

    path: Path
    config: dict[str, Any]
    tokenizer_json: Path
    tokenizer_config: dict[str, Any]
    processor: dict[str, Any] = field(default_factory=dict)  # processor_config.json, {} when absent

    @property
    def image_processor(self) -> dict[str, Any]:
        return dict(self.processor.get("image_processor", {}))

    def stats(self, which: str) -> tuple[list[float], list[float]] | None:
        """(mean, std) of "state" or "actions" as PI0Processor saved them, or None."""
        mean, std = self.processor.get(f"{which}_mean"), self.processor.get(f"{which}_std")
        if mean is None or std is None:
            return None
        if len(mean) != len(std):
            raise CheckpointError(f"processor_config.json: {which}_mean and {which}_std differ in length "
                                  f"({len(mean)} vs {len(std)})")
        return [float(v) for v in mean], [float(v) for v in std]

    def weights_sha256(self) -> str:
        for name in WEIGHT_FILES:
            if (self.path / name).is_file():
                return sha256_file(self.path / name)
        return "unknown"

    def load_model(self):
        """PI0ForConditionalGeneration in float32, eval mode (transformers imported here, not at module load)."""
        try:
            import transformers
            from transformers import PI0ForConditionalGeneration
        except ImportError as exc:
            raise CheckpointError(f"importing a π0 checkpoint needs transformers {TRANSFORMERS_SERIES}.x ({exc}); "
                                  f"install it with: pip install 'edge-vla[pi0-export]'") from exc
        if not transformers.__version__.startswith(TRANSFORMERS_SERIES + "."):
            log.warning("transformers %s is installed; the π0 importer is checked against %s.x",
                        transformers.__version__, TRANSFORMERS_SERIES)
        import torch

        try:
            model = PI0ForConditionalGeneration.from_pretrained(self.path, dtype=torch.float32)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(f"cannot load the π0 checkpoint {self.path}: {exc}") from exc
        return model.eval()


def open_pi0(path: str | Path) -> Pi0Source:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory; pass the directory `save_pretrained` wrote")
    cfg = read_config(path)
    model_type = cfg.get("model_type")
    if model_type != "pi0":
        raise CheckpointError(
            f"{path}/config.json says model_type {model_type!r}: edge-vla imports transformers π0 checkpoints "
            "(model_type 'pi0', PI0ForConditionalGeneration) and its own checkpoints; other architectures are "
            "not supported")
    if not any((path / w).is_file() for w in WEIGHT_FILES):
        raise CheckpointError(f"{path} has no weights ({' or '.join(WEIGHT_FILES)}); save the model with "
                              "model.save_pretrained(dir)")
    tok = path / "tokenizer.json"
    if not tok.is_file():
        raise CheckpointError(
            f"{path} has no tokenizer.json: the robot tokenizes instructions with the checkpoint's own tokenizer. "
            "Save the processor beside the model: PI0Processor.from_pretrained(...).save_pretrained(dir)")
    tok_cfg = _json_or_empty(path / "tokenizer_config.json")
    processor = _json_or_empty(path / "processor_config.json")
    if not processor:
        log.warning("%s has no processor_config.json: image settings fall back to the π0 defaults and the "
                    "state/action statistics must come from the sidecar", path)
    return Pi0Source(path, cfg, tok, tok_cfg, processor)


def _json_or_empty(p: Path) -> dict[str, Any]:
    if not p.is_file():
        return {}
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{p} is not valid JSON ({exc})") from exc
    return data if isinstance(data, dict) else {}
