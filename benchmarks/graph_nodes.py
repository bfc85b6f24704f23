"""Node counts of a bundle's graphs: as exported, after onnxruntime's optimizer, and after the runtime's
load-time fusions (issue 17). Reproduces the counts in README/docs/MANIFEST.md:

    .venv/bin/python benchmarks/graph_nodes.py BUNDLE [BUNDLE ...]
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort

from edge_vla.runtime.onnx_proto import load_model
from edge_vla.runtime.ort_fuse import fuse


def optimized_nodes(model: bytes) -> collections.Counter[str]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "opt.onnx"
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.optimized_model_filepath = str(out)
        opts.log_severity_level = 3
        ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        return collections.Counter(n.op_type for n in onnx.load(str(out)).graph.node)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="+", type=Path)
    args = parser.parse_args()
    for bundle in args.bundles:
        manifest = json.loads((bundle / "manifest.json").read_text())
        for name, g in manifest["graphs"].items():
            model = onnx.load(str(bundle / g["file"]))
            exported = sum(n.op_type not in ("Constant", "Identity") for n in model.graph.node)
            row = [f"{bundle} {name}: exported {exported} (+{len(model.graph.node) - exported} Constant/Identity)"]
            for label, kinds in (("onnxruntime-optimised", ()), ("+ FastGelu", ("gelu",)),
                                 ("+ FastGelu + MultiHeadAttention", ("gelu", "attention"))):
                data = model.SerializeToString()
                ops = optimized_nodes(fuse(load_model(data), kinds)[0].SerializeToString() if kinds else data)
                row.append(f"{label} {sum(ops.values())}")
            print(", ".join(row))
            print("   onnxruntime-optimised ops:", dict(optimized_nodes(model.SerializeToString()).most_common()))


if __name__ == "__main__":
    main()
