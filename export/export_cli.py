"""`edge-vla export CHECKPOINT -o BUNDLE [--precision fp32|fp16|int8] [--int8-range full|reduced] [--steps N]
[--calib DATA]`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from edge_vla.errors import EdgeVlaError

from .calibration import check_source
from .exporter import PRECISIONS
from .families import for_checkpoint
from .quantize import DEFAULT_INT8_RANGE, INT8_RANGES


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint directory (safetensors + config.json)")
    parser.add_argument("-o", "--output", required=True, help="bundle directory to write")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    parser.add_argument("--steps", type=int, default=None, help="default ODE steps in the bundle")
    parser.add_argument("--calib", default=None, help=".npz dataset or folder of them, or lerobot:PATH, for INT8 "
                        "calibration (default: the checkpoint's LeRobot training data, else fresh sim observations)")
    parser.add_argument("--calib-count", type=int, default=32, help="calibration observations")
    parser.add_argument("--numerics-count", type=numerics_count, default=None,
                        help=f"observations the numerics check compares the exported graphs on, 1 to {MAX_NUMERICS} "
                             "(default 8; π0: 3)")
    parser.add_argument("--int8-graphs", default="prefix,denoise_step,chunk",
                        help="with --precision int8: the graphs to quantize, comma-separated (others stay FP32); "
                        "'prefix' is often fastest on CPUs")
    parser.add_argument("--int8-range", choices=tuple(INT8_RANGES), default=DEFAULT_INT8_RANGE,
                        help="with --precision int8: weights in the full 8-bit range, or 'reduced' to 7 bits for "
                        "onnxruntime on an x86 CPU without VNNI (AVX2 u8s8 saturation); a choice for the machine "
                        f"that runs the bundle (default {DEFAULT_INT8_RANGE})")
    parser.add_argument("--time-input", choices=("table", "scalar"), default="table",
                        help="step graph time input: a precomputed time-conditioning table row (faster; step counts "
                        "limited to --table-steps) or the scalar t (any step count)")
    parser.add_argument("--table-steps", default=None,
                        help="comma-separated step counts that get a time table (default 1-6,8,10,12,16,20 + --steps)")
    parser.add_argument("--unrolled", action="store_true", help="also export the whole N-step loop as one graph")
    parser.add_argument("--allow-lint-errors", action="store_true", help="write the bundle despite TensorRT lint errors")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bundle (atomically)")
    pi0 = parser.add_argument_group("transformers π0 checkpoints (config.json model_type 'pi0'; docs/PI0.md)")
    pi0.add_argument("--sidecar", default=None, help="robot.json: action names, units, limits, kind, cameras")
    pi0.add_argument("--cameras", type=int, default=None, help="camera count (default: the sidecar's, else 1)")
    pi0.add_argument("--external-data", action="store_true",
                     help="write each graph's weights to <graph>.onnx.data (needed over 2 GB: the full π0)")
    pi0.add_argument("--skip-numerics", action="store_true",
                     help="do not compare with sample_actions (full-size π0 on a small machine); the bundle says so")


MAX_NUMERICS = 512  # each is a full chunk through PyTorch and the graphs (and, for MetaWorld, rendered frames)


def numerics_count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= n <= MAX_NUMERICS:
        raise argparse.ArgumentTypeError(f"{n} is outside 1..{MAX_NUMERICS}")
    return n


def main(args: argparse.Namespace) -> int:
    # Before any work (loading, ONNX export, calibration take tens of seconds): the output must be free.
    out = Path(args.output)
    if (out.exists() or out.is_symlink()) and not args.overwrite:
        raise EdgeVlaError(f"{out} already exists; pass --overwrite to replace it (atomically, once the new bundle "
                           "is complete), or choose another -o")
    check_checkpoint_path(Path(args.checkpoint))
    check_source(args.calib)  # inputs before any export work, for every model family
    report = for_checkpoint(args.checkpoint).export(args)  # the family registry (export/families.py)
    print_result(report.result, report.what)
    return 0


def check_checkpoint_path(path: Path) -> None:
    """The two slips a checkpoint loader reports as a bare "no config.json": a path that is not there (often a
    relative one typed from another directory), and a bundle (what `make demo` leaves at hand) instead of the
    training checkpoint it was exported from."""
    if not path.exists():
        where = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
        raise EdgeVlaError(f"checkpoint {path} does not exist{where}; pass the directory `edge-vla train -o` wrote "
                           "(the shipped one is export/assets/tiny-reach in the repository)")
    if path.is_file() and path.name.endswith((".tar.gz", ".tgz", ".tar")):
        raise EdgeVlaError(f"{path} is an archive (a bundle or a robot package), not a training checkpoint; export "
                           "reads the checkpoint directory `edge-vla train -o` wrote")
    manifest = path / "manifest.json"
    if manifest.is_file() and not (path / "config.json").exists():
        raise EdgeVlaError(f"{path} is an exported bundle, not a training checkpoint; export reads the checkpoint "
                           f"it came from{_source_hint(manifest)}, and run, profile, package and serve take the "
                           "bundle itself")


def _source_hint(manifest: Path) -> str:
    """` (here SOURCE)` where the bundle's manifest records its source checkpoint; '' when it cannot say."""
    try:
        source = json.loads(manifest.read_text())["provenance"]["source_checkpoint"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):  # only a hint: any damage means none
        return ""
    return f" (here {source})" if isinstance(source, str) and source else ""


def print_result(result: Any, what: str) -> None:
    """What every export prints: where the bundle went, the numerics gate, the lint, the graph sizes."""
    print(f"{what} written to {result.bundle} in {result.seconds:.1f} s")
    print("  numerics " + result.numerics.summary())
    print(f"  TensorRT lint: {result.lint['errors']} error(s), {result.lint['warnings']} warning(s)")
    for name, size in result.sizes.items():
        print(f"  graphs/{name}.onnx: {size / 1e6:.2f} MB")
