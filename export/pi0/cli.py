"""`edge-vla export PI0_DIR ...`: the π0 branch of the export command (dispatched on config.json's model_type)."""

from __future__ import annotations

import argparse

from .exporter import Pi0ExportOptions, export_pi0


def main(args: argparse.Namespace) -> int:
    graphs = tuple(g.strip() for g in args.int8_graphs.split(",") if g.strip() and g.strip() != "chunk")
    if args.unrolled:
        raise SystemExit("error: --unrolled is not available for π0 bundles (prefix + step graphs only)")
    opts = Pi0ExportOptions(precision=args.precision, steps=args.steps, cameras=args.cameras, sidecar=args.sidecar,
                            calib=args.calib, calib_count=min(args.calib_count, 16), int8_graphs=graphs,
                            allow_lint_errors=args.allow_lint_errors, overwrite=args.overwrite)
    result = export_pi0(args.checkpoint, args.output, opts)
    print(f"π0 bundle written to {result.bundle} in {result.seconds:.1f} s")
    print("  numerics " + result.numerics.summary())
    print(f"  TensorRT lint: {result.lint['errors']} error(s), {result.lint['warnings']} warning(s)")
    for name, size in result.sizes.items():
        print(f"  graphs/{name}.onnx: {size / 1e6:.2f} MB")
    return 0
