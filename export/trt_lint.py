"""Lint ONNX graphs against what TensorRT's ONNX parser takes (10.3 on JetPack 6, 10.13 on JetPack 7).

Also the `edge-vla lint BUNDLE` subcommand. The op lists follow onnx-tensorrt's operator support
table; "restricted" ops parse only in some forms, which the checks below look for.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

TARGETS = ("10.3", "10.13")  # the JetPack rows in edge_vla/provision/platforms.py

# Ops TensorRT 10.3's ONNX parser supports (opset <= 20 forms), from onnx-tensorrt's operators table.
_TRT10_OPS = frozenset(["Abs", "Acos", "Acosh", "Add", "And", "ArgMax", "ArgMin", "Asin", "Asinh", "Atan", "Atanh", "AveragePool", "BatchNormalization", "Bernoulli", "BitShift", "Cast", "CastLike", "Ceil", "Celu", "Clip", "Compress", "Concat", "ConcatFromSequence", "Constant", "ConstantOfShape", "Conv", "ConvTranspose", "Cos", "Cosh", "CumSum", "DeformConv", "DepthToSpace", "DequantizeLinear", "Div", "Dropout", "DynamicQuantizeLinear", "Einsum", "Elu", "Equal", "Erf", "Exp", "Expand", "EyeLike", "Flatten", "Floor", "GRU", "Gather", "GatherElements", "GatherND", "Gelu", "Gemm", "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "Greater", "GreaterOrEqual", "GridSample", "GroupNormalization", "HammingWindow", "HannWindow", "HardSigmoid", "HardSwish", "Hardmax", "Identity", "If", "ImageScaler", "InstanceNormalization", "IsInf", "IsNaN", "LRN", "LSTM", "LayerNormalization", "LeakyRelu", "Less", "LessOrEqual", "Log", "LogSoftmax", "Loop", "LpNormalization", "LpPool", "MatMul", "MatMulInteger", "Max", "MaxPool", "MaxRoi", "MaxUnpool", "Mean", "MeanVarianceNormalization", "Min", "Mish", "Mod", "Mul", "Multinomial", "Neg", "NonMaxSuppression", "NonZero", "Not", "OneHot", "Or", "PRelu", "Pad", "ParametricSoftplus", "Pow", "QLinearConv", "QLinearMatMul", "QuantizeLinear", "RNN", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Range", "Reciprocal", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare", "Relu", "Reshape", "Resize", "ReverseSequence", "RoiAlign", "Round", "STFT", "ScaledTanh", "Scan", "Scatter", "ScatterElements", "ScatterND", "Selu", "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert", "SequenceLength", "Shape", "Shrink", "Sigmoid", "Sign", "Sin", "Sinh", "Size", "Slice", "Softmax", "Softplus", "Softsign", "SpaceToDepth", "Split", "SplitToSequence", "Sqrt", "Squeeze", "Sub", "Sum", "Tan", "Tanh", "ThresholdedRelu", "Tile", "TopK", "Transpose", "Trilu", "Unique", "Unsqueeze", "Upsample", "Where", "Xor"])
# 10.13 adds no op our exporters emit. Its parser does not take opset-23 Attention (onnx-tensorrt: from
# 10.14) nor RMSNormalization / RotaryEmbedding (from 10.15), so neither JetPack row may see them.
_TRT10_13_OPS = _TRT10_OPS
SUPPORTED = {"10.3": _TRT10_OPS, "10.13": _TRT10_13_OPS}


@dataclass
class Finding:
    level: str  # "error" or "warning"
    graph: str
    node: str
    op: str
    target: str
    message: str


def lint_model(model: onnx.ModelProto, graph_name: str, targets: tuple[str, ...] = TARGETS) -> list[Finding]:
    findings: list[Finding] = []
    inits = {i.name: i for i in model.graph.initializer}
    consts = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}

    def const_value(name: str) -> np.ndarray | None:
        if name in inits:
            return numpy_helper.to_array(inits[name])
        if name in consts:
            for a in consts[name].attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
        return None

    for node in _all_nodes(model.graph):
        for target in targets:
            if node.domain not in ("", "ai.onnx"):
                findings.append(Finding("error", graph_name, node.name, node.op_type, target,
                                        f"custom-domain op {node.domain}::{node.op_type} needs a TensorRT plugin"))
            elif node.op_type not in SUPPORTED[target]:
                findings.append(Finding("error", graph_name, node.name, node.op_type, target,
                                        f"{node.op_type} is not supported by TensorRT {target}'s ONNX parser"))
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            zp = const_value(node.input[2])
            if zp is not None and np.any(zp != 0):
                findings.append(Finding("error", graph_name, node.name, node.op_type, "all",
                                        "non-zero Q/DQ zero point: TensorRT's explicit quantization is symmetric only"))
            if zp is not None and zp.dtype == np.uint8:
                findings.append(Finding("error", graph_name, node.name, node.op_type, "all",
                                        f"Q/DQ zero point of type {zp.dtype}: TensorRT takes INT8 (or FP8), not UINT8"))
        if node.op_type == "Loop":
            trip = node.input[0] if node.input else ""
            if not trip or const_value(trip) is None:
                findings.append(Finding("error", graph_name, node.name, node.op_type, "all",
                                        "Loop with a dynamic trip count: unroll it or make the count a constant"))
        if node.op_type == "Attention":
            findings.append(Finding("error", graph_name, node.name, node.op_type, "all",
                                    "Attention (opset 23) is parsed from TensorRT 10.14 on, after both JetPack rows "
                                    "(10.3, 10.13); export attention as MatMul + Softmax"))
    for vi in list(model.graph.input) + list(model.graph.output):
        if vi.type.tensor_type.elem_type == onnx.TensorProto.INT64:
            findings.append(Finding("warning", graph_name, vi.name, "io", "all",
                                    f"INT64 graph IO {vi.name!r}: TensorRT casts it to INT32; export INT32 instead"))
    for name, init in inits.items():
        if init.data_type == onnx.TensorProto.INT64:
            arr = numpy_helper.to_array(init)
            if arr.size and (arr.max() > np.iinfo(np.int32).max or arr.min() < np.iinfo(np.int32).min):
                findings.append(Finding("error", graph_name, name, "initializer", "all",
                                        "INT64 initializer outside INT32 range: TensorRT cannot represent it"))
    return findings


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            for g in attr.graphs:
                yield from _all_nodes(g)


def lint_files(graphs: dict[str, Path], targets: tuple[str, ...] = TARGETS) -> list[Finding]:
    out = []
    for name, path in graphs.items():
        out += lint_model(onnx.load(str(path), load_external_data=False), name, targets)
    return out


def report(findings: list[Finding]) -> dict:
    return {
        "targets": list(TARGETS),
        "errors": sum(f.level == "error" for f in findings),
        "warnings": sum(f.level == "warning" for f in findings),
        "findings": [asdict(f) for f in findings],
    }


def format_findings(findings: list[Finding]) -> str:
    if not findings:
        return "TensorRT lint: no findings for TensorRT " + " and ".join(TARGETS)
    return "\n".join(f"  {f.level.upper():7} [{f.graph}] {f.op} {f.node!r} (TensorRT {f.target}): {f.message}"
                     for f in findings)


# --- `edge-vla lint BUNDLE` ---------------------------------------------------------------------------
def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle directory")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def main(args: argparse.Namespace) -> int:
    from edge_vla.bundle import Bundle

    b = Bundle.open(args.bundle)
    graphs = {name: b.root / g["file"] for name, g in b.manifest["graphs"].items()}
    findings = lint_files(graphs)
    print(json.dumps(report(findings), indent=2) if args.json else format_findings(findings))
    return 1 if any(f.level == "error" for f in findings) else 0
