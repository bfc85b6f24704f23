"""`edge-vla export PI0_DIR ...`: the π0 branch of the export command (dispatched on config.json's model_type)."""

from __future__ import annotations

import argparse

from edge_vla.errors import EdgeVlaError

from .exporter import Pi0ExportOptions, export_pi0


def main(args: argparse.Namespace) -> int:
    graphs = tuple(g.strip() for g in args.int8_graphs.split(",") if g.strip() and g.strip() != "chunk")
    if args.unrolled:
        raise EdgeVlaError("--unrolled is not available for π0 bundles (prefix + step graphs only); drop it")
    opts = Pi0ExportOptions(precision=args.precision, steps=args.steps, cameras=args.cameras, sidecar=args.sidecar,
                            calib=args.calib, calib_count=min(args.calib_count, 16), int8_graphs=graphs,
                            allow_lint_errors=args.allow_lint_errors, overwrite=args.overwrite,
                            external_data=args.external_data, check_numerics=not args.skip_numerics)
    from ..export_cli import print_result

    print_result(export_pi0(args.checkpoint, args.output, opts), "π0 bundle")
    return 0
