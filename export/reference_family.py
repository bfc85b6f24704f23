"""edge-vla's own reference VLA as a model family (export/families.py): the hooks the commands call."""

from __future__ import annotations

import argparse
from pathlib import Path

from edge_vla.errors import EdgeVlaError
from edge_vla.runtime.contract import REFERENCE_FAMILY

from .families import CheckpointPolicy, ExportReport
from .teacher import VLATeacher

NAME = REFERENCE_FAMILY


def is_checkpoint(path: str | Path) -> bool:
    """A directory from `edge-vla train` (config.json + safetensors); the registry's fallback family."""
    return (Path(path) / "config.json").is_file()


def check_export_args(args: argparse.Namespace) -> None:
    if args.external_data or args.skip_numerics:
        raise EdgeVlaError("--external-data and --skip-numerics are for transformers π0 checkpoints only; drop them")


def export(args: argparse.Namespace) -> ExportReport:
    from .checkpoint import read_config
    from .exporter import ExportOptions, export_checkpoint
    from .lerobot.hooks import export_defaults

    check_export_args(args)
    action_space, calib = export_defaults(read_config(args.checkpoint)[1], args.calib)
    opts = ExportOptions(precision=args.precision, steps=args.steps, unrolled=args.unrolled, calib=calib,
                         action_space=action_space,
                         calib_count=args.calib_count, allow_lint_errors=args.allow_lint_errors,
                         int8_graphs=tuple(g.strip() for g in args.int8_graphs.split(",") if g.strip()),
                         int8_range=args.int8_range,
                         **({"numerics_count": args.numerics_count} if args.numerics_count else {}),
                         overwrite=args.overwrite, time_input=args.time_input,
                         table_steps=tuple(int(n) for n in args.table_steps.split(",")) if args.table_steps else None)
    return ExportReport(export_checkpoint(args.checkpoint, args.output, opts), "bundle")


def export_bundle(checkpoint: str, out: Path, precision: str, calib: str | None) -> Path:
    from .exporter import ExportOptions, export_checkpoint

    opts = ExportOptions(precision=precision, calib=calib if precision == "int8" else None, overwrite=True)
    return Path(export_checkpoint(checkpoint, out, opts).bundle)


def load_teacher(path: str, steps: int | None = None) -> VLATeacher:
    from .checkpoint import load_checkpoint

    model, _ = load_checkpoint(path)
    return VLATeacher(model, steps=steps)


def torch_policy(path: str, steps: int | None, solver: str) -> CheckpointPolicy:
    from .checkpoint import load_checkpoint
    from .torch_policy import TorchPolicy

    model, _ = load_checkpoint(path)
    policy = TorchPolicy(model, steps=steps, solver=solver)
    cfg = model.config
    return CheckpointPolicy(f"checkpoint {path} ({policy.steps} steps)", policy, policy.reset, cfg.num_cameras,
                            cfg.image_size, (cfg.state_dim, cfg.action_dim))
