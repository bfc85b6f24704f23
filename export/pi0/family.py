"""transformers π0 as a model family (export/families.py): the hooks the commands call.

Everything here imports transformers lazily, so listing or dispatching families stays cheap."""

from __future__ import annotations

import argparse
from pathlib import Path

from edge_vla.errors import EdgeVlaError

from ..families import CheckpointPolicy, ExportReport
from .checkpoint import is_pi0_checkpoint

NAME = "pi0"


def is_checkpoint(path: str | Path) -> bool:
    """config.json says model_type "pi0"."""
    return is_pi0_checkpoint(path)


def check_export_args(args: argparse.Namespace) -> None:
    if args.unrolled:
        raise EdgeVlaError("--unrolled is not available for π0 bundles (prefix + step graphs only); drop it")


def export(args: argparse.Namespace) -> ExportReport:
    from .exporter import Pi0ExportOptions, export_pi0

    check_export_args(args)
    graphs = tuple(g.strip() for g in args.int8_graphs.split(",") if g.strip() and g.strip() != "chunk")
    opts = Pi0ExportOptions(precision=args.precision, steps=args.steps, cameras=args.cameras, sidecar=args.sidecar,
                            calib=args.calib, calib_count=min(args.calib_count, 16), int8_graphs=graphs,
                            allow_lint_errors=args.allow_lint_errors, overwrite=args.overwrite,
                            external_data=args.external_data, check_numerics=not args.skip_numerics,
                            **({"numerics_count": args.numerics_count} if args.numerics_count else {}))
    return ExportReport(export_pi0(args.checkpoint, args.output, opts), "π0 bundle")


def export_bundle(checkpoint: str, out: Path, precision: str, calib: str | None) -> Path:
    from .exporter import Pi0ExportOptions, export_pi0

    return Path(export_pi0(checkpoint, out, Pi0ExportOptions(precision=precision, calib=calib, overwrite=True)).bundle)


def load_teacher(path: str, steps: int | None = None):  # -> Pi0Teacher (annotated lazily: torch import)
    from .teacher import load_pi0_teacher

    return load_pi0_teacher(path, steps=steps)


def torch_policy(path: str, steps: int | None, solver: str) -> CheckpointPolicy:
    """transformers' own sampler; noise drawn as the π0 bundle's Policy draws it, so checkpoint and bundle pair."""
    from .checkpoint import open_pi0
    from .teacher import Pi0Teacher, Pi0TorchPolicy

    if solver != "euler":
        raise EdgeVlaError(f"{path} is a π0 checkpoint: it runs transformers' Euler sampler; for --solver "
                           f"{solver} evaluate its exported bundle (`edge-vla export {path} -o BUNDLE`)")
    src = open_pi0(path)
    pi0 = Pi0TorchPolicy(Pi0Teacher(src, src.load_model(), steps), steps)
    return CheckpointPolicy(f"π0 checkpoint {path} ({pi0.steps} steps)", pi0, pi0.reset, pi0.teacher.num_cameras)
