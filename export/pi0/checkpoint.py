"""Recognise and read a transformers π0 checkpoint directory (what `save_pretrained` writes).

Expected beside `config.json` (model_type "pi0") and the weights (`model.safetensors` or a sharded index):
`tokenizer.json` (the PI0Processor's tokenizer, with `<image>`), and usually `processor_config.json`
(PI0Processor: state/action statistics, padding sizes, and the image processor's settings).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_vla.bundle import sha256_file
from edge_vla.errors import CheckpointError

log = logging.getLogger(__name__)

TRANSFORMERS_SERIES = "5.23"  # the PI0 API names this importer uses (dit_config, pixel_attention_mask)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
# Weights neither π0's sampler nor the exported graphs read: the expert's token embedding (the expert takes
# embeddings, never token ids). A checkpoint converted without it is complete; anything else missing is not.
UNREAD_WEIGHTS = frozenset({"model.dit.embed_tokens.weight"})
_NAMES_SHOWN = 5
MAX_CONFIG_BYTES = 1 << 20  # a transformers config.json is a few kB


def read_config(path: Path) -> dict[str, Any]:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{path} has no config.json: not a checkpoint directory")
    # Every `export`/`evaluate`/`distill` asks this first of any checkpoint (families.for_checkpoint): a list, a
    # document nested past the parser's recursion limit or a huge file must be a CheckpointError, not a traceback.
    with cfg_path.open("rb") as f:
        raw = f.read(MAX_CONFIG_BYTES + 1)
    try:
        if len(raw) > MAX_CONFIG_BYTES:
            raise ValueError(f"larger than {MAX_CONFIG_BYTES} bytes")
        doc = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise CheckpointError(f"{cfg_path} is not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{cfg_path} is not valid JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise CheckpointError(f"{cfg_path} is not a JSON object (got {type(doc).__name__})")
    return doc


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

    def load_tokenizer(self) -> Any:
        """The checkpoint's `tokenizers.Tokenizer` (what the robot loads from the bundle); CheckpointError, one
        line, when the file cannot be read as one."""
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise CheckpointError(f"reading {self.tokenizer_json} needs the tokenizers library ({exc}); install "
                                  "it with: pip install 'edge-vla[pi0-export]'") from exc
        try:
            return Tokenizer.from_file(str(self.tokenizer_json))
        except Exception as exc:  # the Rust side raises plain Exception for unreadable, truncated or foreign JSON
            raise CheckpointError(
                f"{self.tokenizer_json} is not a readable tokenizer ({_one_line(exc)}); save the processor's "
                "tokenizer again: PI0Processor.from_pretrained(...).save_pretrained(dir)") from exc

    def load_model(self):
        """PI0ForConditionalGeneration in float32, eval mode (transformers imported here, not at module load).

        Refuses a checkpoint whose tensors do not match the architecture in config.json: transformers fills a
        missing tensor with a fresh random one (and the numerics gate would compare the bundle with that same
        random model) and drops an unexpected one."""
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

        log.debug("loading the π0 weights from %s", self.path)
        try:
            with _quiet_transformers():  # its load report and progress bar: the check below says what matters
                model, info = PI0ForConditionalGeneration.from_pretrained(self.path, dtype=torch.float32,
                                                                          output_loading_info=True)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(f"cannot load the π0 checkpoint {self.path}: {_one_line(exc)}") from exc
        self._check_loading_info(info)
        return model.eval()

    def _check_loading_info(self, info: dict[str, Any]) -> None:
        missing = set(info.get("missing_keys") or ())
        unread = missing & UNREAD_WEIGHTS
        if unread:
            log.warning("%s has no %s: π0 never reads it (random values are harmless)", self.path, sorted(unread))
        missing -= unread
        unexpected = set(info.get("unexpected_keys") or ())
        mismatched = {str(m[0]) if isinstance(m, tuple) else str(m) for m in info.get("mismatched_keys") or ()}
        problems = [f"{what} {_names(keys)}" for what, keys in (
            (f"missing {len(missing)} tensor(s)", missing), (f"{len(unexpected)} unexpected", unexpected),
            (f"{len(mismatched)} of another shape", mismatched)) if keys]
        if problems:
            raise CheckpointError(
                f"the weights in {self.path} do not fit the π0 architecture in its config.json: "
                + "; ".join(problems) + ". transformers would fill missing tensors with random values. Save the "
                "checkpoint whole (model.save_pretrained(dir)) with the config it was trained with")


def _names(keys: Iterable[str]) -> str:
    names = sorted(keys)
    shown = ", ".join(names[:_NAMES_SHOWN])
    return f"({shown}{f', and {len(names) - _NAMES_SHOWN} more' if len(names) > _NAMES_SHOWN else ''})"


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (transformers' and tokenizers' messages span several)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' warnings (its load report) and progress bars off for one call, then as they were."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


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
    src = Pi0Source(path, cfg, tok, tok_cfg, processor)
    src.load_tokenizer()  # before the (full-size: minutes long) model load: an unreadable tokenizer stops here
    return src


def _json_or_empty(p: Path) -> dict[str, Any]:
    if not p.is_file():
        return {}
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{p} is not valid JSON ({exc})") from exc
    return data if isinstance(data, dict) else {}
