"""Recognise and read a transformers π0 checkpoint directory (what `save_pretrained` writes).

Expected beside `config.json` (model_type "pi0") and the weights (`model.safetensors` or a sharded index):
`tokenizer.json` (the PI0Processor's tokenizer, with `<image>`), and usually `processor_config.json`
(PI0Processor: state/action statistics, padding sizes, and the image processor's settings).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_vla.bundle import sha256_file
from edge_vla.errors import CheckpointError, EdgeVlaError
from edge_vla.files import one_line, read_bounded

log = logging.getLogger(__name__)

TRANSFORMERS_SERIES = "5.23"  # the PI0 API names this importer uses (dit_config, pixel_attention_mask)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")  # transformers' order of preference
# Weights neither π0's sampler nor the exported graphs read: the expert's token embedding (the expert takes
# embeddings, never token ids). A checkpoint converted without it is complete; anything else missing is not.
UNREAD_WEIGHTS = frozenset({"model.dit.embed_tokens.weight"})
_NAMES_SHOWN = 5
MAX_CONFIG_BYTES = 1 << 20  # a transformers config.json is a few kB
MAX_SIDE_JSON_BYTES = 16 << 20  # tokenizer_config.json, processor_config.json, the shard index: kB to a few MB
MAX_TOKENIZER_BYTES = 128 << 20  # Gemma's tokenizer.json (π0's) is 17 MB
# Sizes no tensor shape carries, so the weights cannot bound them: x_t is [1, chunk_size, max_action_dim] in every
# graph and the runtime's sampler takes 1..64 steps (the bundle's sampler.max_steps). π0 uses 50 and 10.
MAX_CHUNK_SIZE = 1024
MAX_STEPS = 64
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})  # safetensors' names; π0 is loaded in float32
_SIZE_FIELD = re.compile(r"size|dim|^num_|layers$|heads$")
_FINITE_CHUNK = 1 << 24  # elements per isfinite() pass: bounds the temporary mask on a full-size tensor
_SAVED_FIX = "give the file save_pretrained wrote"


def read_json_file(path: Path, max_bytes: int, error: type[EdgeVlaError] = CheckpointError,
                   what: str = "π0 checkpoint file", fix: str = _SAVED_FIX) -> Any:
    """A JSON document from a regular file of at most `max_bytes`; anything else is one `error` naming the file.

    Read by edge_vla.files.read_bounded, so a FIFO (which blocks an ordinary open until a writer comes) or a link to
    /dev/zero (which never ends) is refused at once; a document nested past the parser's recursion limit is an
    error too, not a traceback."""
    raw = read_bounded(path, max_bytes, what, error, fix=fix)
    try:
        return json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise error(f"{path} is not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise error(f"{path} is not valid JSON ({exc})") from None


def read_config(path: Path) -> dict[str, Any]:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{path} has no config.json: not a checkpoint directory")
    # Every `export`/`evaluate`/`distill` asks this first of any checkpoint (families.for_checkpoint): a list, a
    # document nested past the parser's recursion limit or a huge file must be a CheckpointError, not a traceback.
    doc = read_json_file(cfg_path, MAX_CONFIG_BYTES)
    if not isinstance(doc, dict):
        raise CheckpointError(f"{cfg_path} is not a JSON object (got {type(doc).__name__})")
    return doc


@dataclass(frozen=True)
class TensorHeader:
    """One tensor as a safetensors header declares it (read without loading any tensor)."""

    file: Path
    dtype: str
    shape: tuple[int, ...]


def weight_files(path: Path) -> list[Path]:
    """The safetensors files transformers would read: model.safetensors, else the shards the index names. A shard
    must be a regular file in the checkpoint directory (a link to one is fine: the Hugging Face cache links blobs)."""
    single = path / WEIGHT_FILES[0]
    if single.is_file():
        return [single]
    index_path = path / WEIGHT_FILES[1]
    index = read_json_file(index_path, MAX_SIDE_JSON_BYTES)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_path} has no weight_map of tensor names to shard files; save the model again "
                              "with model.save_pretrained(dir)")
    shards = []
    for name in sorted(set(weight_map.values())):
        if name in ("", ".", "..") or "/" in name or "\\" in name:
            raise CheckpointError(f"{index_path} names the shard {name!r} outside the checkpoint directory; shards are "
                                  "files beside the index")
        shard = path / name
        if not shard.exists():
            raise CheckpointError(f"{index_path} names the shard {name}, which is missing; download it again")
        if not shard.is_file():
            raise CheckpointError(f"the shard {shard} is not a regular file (a FIFO, device or directory)")
        shards.append(shard)
    return shards


def read_weight_headers(path: Path) -> dict[str, TensorHeader]:
    """Every tensor's dtype and shape from the safetensors headers, no tensor read. safetensors checks that each
    header is bounded (100 MB) and that the declared tensors exactly cover the file, so a truncated file, a header
    length of 2^63 or a shape bigger than its bytes stop here, naming the file."""
    from safetensors import SafetensorError, safe_open

    headers: dict[str, TensorHeader] = {}
    for file in weight_files(path):
        try:
            with safe_open(str(file), framework="pt") as f:
                names = f.keys()  # a safe_open handle is not iterable itself
                for name in names:
                    piece = f.get_slice(name)
                    headers[name] = TensorHeader(file, str(piece.get_dtype()), tuple(int(n) for n in piece.get_shape()))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{file} is not a readable safetensors file ({_one_line(exc)}): it is truncated or "
                                  "damaged; download or save it again") from None
    return headers


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
    def processor_path(self) -> Path:
        return self.path / "processor_config.json"

    @property
    def image_processor(self) -> dict[str, Any]:
        ip = self.processor.get("image_processor", {})
        if not isinstance(ip, dict):
            raise CheckpointError(f"{self.processor_path}: image_processor must be a JSON object of the image "
                                  f"settings, got {type(ip).__name__}; save the processor again")
        return dict(ip)

    def stats(self, which: str) -> tuple[list[float], list[float]] | None:
        """(mean, std) of "state" or "actions" as PI0Processor saved them, or None. They become the bundle's
        normalisation: each must be a list of finite numbers, std not negative (0 is a constant dimension)."""
        mean, std = self.processor.get(f"{which}_mean"), self.processor.get(f"{which}_std")
        if mean is None or std is None:
            return None
        mean_v = finite_numbers(mean, f"{self.processor_path}: {which}_mean")
        std_v = finite_numbers(std, f"{self.processor_path}: {which}_std")
        if len(mean_v) != len(std_v):
            raise CheckpointError(f"{self.processor_path}: {which}_mean and {which}_std differ in length "
                                  f"({len(mean_v)} vs {len(std_v)})")
        if any(v < 0 for v in std_v):
            raise CheckpointError(f"{self.processor_path}: {which}_std has a negative entry ({std_v}); recompute the "
                                  "dataset statistics")
        return mean_v, std_v

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
        # Read here, bounded (a 3 GB file took 3.5 GB and 10 s to be called unreadable), then parsed from memory.
        raw = read_bounded(self.tokenizer_json, MAX_TOKENIZER_BYTES, "tokenizer", CheckpointError, fix=_SAVED_FIX)
        try:
            return Tokenizer.from_str(raw.decode("utf-8"))
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
        from safetensors import SafetensorError

        config = self.checked_config()
        log.debug("loading the π0 weights from %s", self.path)
        try:
            with _quiet_transformers():  # its load report and progress bar: the check below says what matters
                # ignore_mismatched_sizes: transformers then reports a reshaped tensor by name (the check below
                # refuses it) instead of "look at the above report"; checked_config bounded the model's size.
                model, info = PI0ForConditionalGeneration.from_pretrained(
                    self.path, config=config, dtype=torch.float32, output_loading_info=True,
                    ignore_mismatched_sizes=True)
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
            raise CheckpointError(f"cannot load the π0 checkpoint {self.path}: {_one_line(exc)}") from exc
        self._check_loading_info(info)
        self._check_finite(model)
        return model.eval()

    def checked_config(self) -> Any:
        """The PI0Config, refused (one CheckpointError naming config.json) when transformers could not build it or
        when the weights cannot fill it: transformers builds every layer config.json declares and allocates every
        tensor the weights lack, so a config of a million layers or a 1e9-token vocabulary beside small weights hung
        or ran out of memory inside from_pretrained. Checked against the safetensors headers (no tensor read) and a
        model built on the meta device (no memory), before anything is allocated."""
        import torch
        from transformers import PI0Config, PI0ForConditionalGeneration

        cfg_path = self.path / "config.json"
        headers = read_weight_headers(self.path)
        if not headers:
            raise CheckpointError(f"the weights in {self.path} hold no tensors; save the model with "
                                  "model.save_pretrained(dir)")
        _check_dtypes(headers)
        try:
            config = PI0Config.from_dict(dict(self.config))
        except Exception as exc:  # huggingface_hub's StrictDataclassFieldValidationError, ValueError, TypeError
            raise CheckpointError(f"{cfg_path} is not a π0 config transformers can build ({_one_line(exc)}); save "
                                  "the checkpoint again with model.save_pretrained(dir)") from None
        negative = _negative_sizes(self.config)
        if negative:
            raise CheckpointError(f"{cfg_path}: {negative[0]} is {negative[1]}; a size or count cannot be negative")
        weights = _weights_named(headers, self.path)
        for name, value in _layer_counts(config).items():  # before any module is built: each layer is a module
            if not isinstance(value, int) or value < 0 or value > len(headers):
                raise CheckpointError(f"{cfg_path}: {name} is {value} but {weights} hold only {len(headers)} tensors "
                                      "(every layer has several): this config does not belong to these weights; save "
                                      "the checkpoint whole with model.save_pretrained(dir)")
        for name, value, top, usual in (("chunk_size", config.chunk_size, MAX_CHUNK_SIZE, 50),
                                        ("num_inference_steps", config.num_inference_steps, MAX_STEPS, 10)):
            if not isinstance(value, int) or not 1 <= value <= top:
                raise CheckpointError(f"{cfg_path}: {name} is {value}, outside 1..{top} (π0 uses {usual}); "
                                      "fix config.json")
        try:
            with torch.device("meta"):  # shapes only: no tensor is allocated
                skeleton = PI0ForConditionalGeneration(config)
        except (ValueError, TypeError, RuntimeError) as exc:
            raise CheckpointError(f"{cfg_path} is not a π0 config transformers can build ({_one_line(exc)}); save "
                                  "the checkpoint again with model.save_pretrained(dir)") from None
        params = dict(skeleton.named_parameters())
        declared = sum(p.numel() for p in params.values())
        may_lack = sum(params[n].numel() for n in UNREAD_WEIGHTS if n in params)
        stored = sum(math.prod(h.shape) for h in headers.values())
        if declared > stored + may_lack:
            raise CheckpointError(f"{cfg_path} describes a π0 of {declared:,} parameters but {weights} hold "
                                  f"{stored:,}: this config does not belong to these weights; save the checkpoint "
                                  "whole with model.save_pretrained(dir)")
        return config

    def _check_finite(self, model: Any) -> None:
        """A NaN or Inf weight makes every chunk NaN: refuse it by name rather than fail the numerics gate."""
        import torch

        bad = [name for name, p in model.named_parameters()
               if not all(bool(torch.isfinite(c).all()) for c in p.detach().reshape(-1).split(_FINITE_CHUNK))]
        if bad:
            raise CheckpointError(f"the weights in {self.path} hold NaN or Inf in {len(bad)} tensor(s) {_names(bad)}; "
                                  "the checkpoint is damaged or was saved from a diverged run: export another one")

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


def finite_numbers(value: Any, what: str, error: type[EdgeVlaError] = CheckpointError) -> list[float]:
    """A JSON list of finite numbers (not booleans, strings or nested lists) as floats; else one `error`."""
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if not isinstance(value, list):
        raise error(f"{what} must be a list of finite numbers, got {preview(value)}")
    for v in value:
        if not number(v):
            raise error(f"{what} must be a list of finite numbers, got the entry {preview(v)}")
    return [float(v) for v in value]


def preview(value: Any) -> str:
    """A short rendering that cannot recurse (a nested list from outside may be nested deeply)."""
    return repr(value)[:60] if isinstance(value, (int, float, str)) or value is None else f"a {type(value).__name__}"


def _check_dtypes(headers: dict[str, TensorHeader]) -> None:
    """transformers casts an integer tensor to float32 without a word: a quantized tensor without its scale (or a
    mislabelled one) would become the model the bundle is exported from, and the numerics gate would compare the
    bundle against that same wrong model."""
    wrong = {n: h for n, h in headers.items() if h.dtype not in FLOAT_DTYPES}
    if wrong:
        files = sorted({str(h.file) for h in wrong.values()})
        raise CheckpointError(
            f"{', '.join(files)}: {len(wrong)} tensor(s) are not floating point "
            f"{_names(f'{n} ({h.dtype})' for n, h in wrong.items())}; π0 is imported from float weights "
            f"({', '.join(sorted(FLOAT_DTYPES))}): export from the unquantized checkpoint")


def _negative_sizes(cfg: dict[str, Any]) -> tuple[str, int] | None:
    """The first negative size or count in config.json (dotted path, value): a field named like one (hidden_size,
    head_dim, num_hidden_layers, ...; not e.g. ignore_index, which may be -100). torch would otherwise refuse it
    without naming the field. Walked without recursion (the document may be nested as deep as the parser allowed)."""
    stack: list[tuple[str, Any]] = [("", cfg)]
    while stack:
        where, node = stack.pop()
        if isinstance(node, dict):
            stack.extend((f"{where}.{k}" if where else str(k), v) for k, v in node.items())
        elif type(node) is int and node < 0 and _SIZE_FIELD.search(where.rsplit(".", 1)[-1]):
            return where, node
    return None


def _weights_named(headers: dict[str, TensorHeader], path: Path) -> str:
    files = sorted({h.file.name for h in headers.values()})
    return f"{path}/{files[0]}" if len(files) == 1 else f"the {len(files)} shards in {path}"


def _layer_counts(config: Any) -> dict[str, Any]:
    vlm = config.vlm_config
    return {"vlm_config.text_config.num_hidden_layers": vlm.text_config.num_hidden_layers,
            "vlm_config.vision_config.num_hidden_layers": vlm.vision_config.num_hidden_layers,
            "dit_config.num_hidden_layers": config.dit_config.num_hidden_layers}


def _names(keys: Iterable[str]) -> str:
    names = sorted(keys)
    shown = ", ".join(names[:_NAMES_SHOWN])
    return f"({shown}{f', and {len(names) - _NAMES_SHOWN} more' if len(names) > _NAMES_SHOWN else ''})"


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line (transformers' and tokenizers' messages span several), or its type."""
    return one_line(exc, limit=300) or type(exc).__name__


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
    if not p.exists():
        return {}
    data = read_json_file(p, MAX_SIDE_JSON_BYTES)
    if not isinstance(data, dict):
        raise CheckpointError(f"{p} is not a JSON object (got {type(data).__name__}); save the processor again: "
                              "PI0Processor.from_pretrained(...).save_pretrained(dir)")
    return data
