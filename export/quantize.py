"""FP16 and INT8 (explicit Q/DQ) versions of exported FP32 graphs.

FP16 uses onnxconverter-common: weights and activations in FP16, IO kept float32, and the
numerically sensitive ops (LayerNormalization, Softmax, and the sinusoidal time embedding with its
frequency table, from the time input to the first matrix multiply) kept float32. INT8 uses onnxruntime.quantization in the QDQ format that TensorRT accepts: symmetric,
zero points 0, per-channel weights, calibrated on observations; weights in the full 8-bit range or a reduced
7-bit one (INT8_RANGES).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnxconverter_common import float16
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from edge_vla.errors import EdgeVlaError

log = logging.getLogger(__name__)

FP16_KEEP_FP32_OPS = ["LayerNormalization", "Softmax", "Cos", "Sin", "Exp", "Pow", "ReduceMean", "Sqrt"]
INT8_OPS = ["MatMul", "Gemm", "Conv"]
# The conv stem stays float: its first conv sees raw pixels under an instruction FiLM, and its keypoint
# logits go through a spatial softmax that turns small logit errors into coordinate errors. Quantizing it
# took a trained tiny's INT8 chunk error to rel L2 0.075 (gate 0.08); the stem is a small share of the
# prefix's MACs. The state projection (edge-vla's prefix, π0's step embedding) stays float too: an INT8
# input rounds normalized joint angles to ~0.02 rad steps, a few cm at the end effector. The shipped tiny
# held 100% when it replanned every 4 actions but fell to 83% replanning every action, as the onboard
# loop does; with the state float, 100% at both (issue 13). It is one (state_dim x width) GEMM.
INT8_EXCLUDE_SCOPES = ("/stem/", "/state_proj/")


# INT8 weight range: {name: bits}. "reduced" (onnxruntime's reduce_range) puts the weights in [-64, 64] instead of
# [-127, 127] (quantization/quant_utils.py ONNX_INT_TYPE_REDUCED_RANGE). Only one kind of machine needs it: an x86
# CPU with AVX2 (or AVX-512) but no VNNI, running the graph on onnxruntime. On x86 onnxruntime turns the QDQ
# graph's int8 activations into uint8 with zero point 128 (QDQIsInt8Allowed() is false there,
# core/optimizer/qdq_transformer/selectors_actions/qdq_selector_action_transformer.h; QDQS8ToU8Transformer) and
# runs u8 x s8 QGemm. Without VNNI that kernel is VPMADDUBSW (MultiplyAccumulateRowU8S8Avx2 in
# core/mlas/lib/x86_64/QgemmU8X8KernelAvx2.S), which adds each pair of adjacent products into an int16 with
# saturation: 2 x 255 x 127 = 64770 can clip at 32767, 2 x 255 x 64 = 32640 cannot. onnxruntime's docs say so:
# "Reduce-range will quantize the weights to 7 bits. It is designed for the U8S8 format on AVX2 and AVX512
# (non-VNNI) machines to mitigate saturation issues. This is not needed on machines supporting VNNI."
# (https://onnxruntime.ai/docs/performance/model-optimizations/quantization.html, FAQ "When to use reduce-range
# and per-channel quantization?"). With AVX512-VNNI or AVX-VNNI (VPDPBUSD: int32 sums; core/mlas/lib/platform.cpp
# picks MlasGemmU8S8KernelAvx512Vnni / ...AvxVnni), AMX (TDPBUSD: what this project's Xeon runs, seen in perf),
# ARM (Jetson's CPU: int8 activations stay int8, sdot/smmla) or TensorRT there is no int16 step. Not the export
# machine's property but the target's: an exporter cannot know where a bundle will run, so the default is the
# range that is right everywhere. Measured on the shipped tiny (docs/QUALITY.md "INT8 weight range"): on a VNNI
# CPU full range is no better (chunk rel L2 0.0258 vs 0.0265, both 100% closed loop); on onnxruntime's AVX2
# kernels full range doubles the chunk error (0.052) and reduced is unchanged. `--int8-range full` is for
# targets known to be safe; Policy.load and `edge-vla doctor` warn when a full-range bundle meets a CPU that is not.
INT8_RANGES = {"full": 8, "reduced": 7}
INT8_RANGE_NOTES = {
    "full": "8-bit weights: for TensorRT, ARM CPUs (Jetson) and x86 with AVX512-VNNI or AVX-VNNI; onnxruntime's u8s8 "
            "GEMM can saturate on x86 with AVX2/AVX-512 but no VNNI (Policy.load and edge-vla doctor warn there)",
    "reduced": "7-bit weights (reduce_range): right on every target; needed by onnxruntime on x86 with AVX2/AVX-512 "
               "but no VNNI, where u8s8 pairs of products saturate in int16",
}
DEFAULT_INT8_RANGE = "reduced"


# Graph inputs that carry flow time. Everything they reach before the first matrix multiply (the sinusoidal
# time embedding: frequency x t, Sin, Cos) stays float32, and so do the constants feeding those nodes (the
# frequency table): π0's highest frequency is 2 pi / 0.004 = 1571 rad per unit of t, and FP16's spacing at
# 1024-2048 is 1, so a rounded argument is off by up to 0.5 rad near t = 1. A per-position time input (e.g. for
# real-time chunking) only has to be named here or passed to `to_fp16`.
TIME_INPUTS = ("t",)
_MATMULS = ("MatMul", "Gemm")


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def _constant_nodes(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """{output name: node} for nodes computed from constants only (Constant nodes, initializers, and any node
    whose inputs are all such), in topological order: the exporter's folded tables and what it left unfolded."""
    known = ({i.name for i in graph.initializer} - {i.name for i in graph.input}) | {""}  # "": optional input left out
    out: dict[str, onnx.NodeProto] = {}
    for node in graph.node:  # ONNX graphs are topologically sorted
        if all(i in known or i in out for i in node.input):
            for name in node.output:
                out[name] = node
    return out


def _time_embedding_nodes(model: onnx.ModelProto, input_names: tuple[str, ...] = TIME_INPUTS) -> list[str]:
    """Names of the nodes that must compute in float32: those between a flow-time input and the first matrix
    multiply, plus the constant-only nodes that feed them (e.g. the sinusoid frequency table, a Constant node
    with no inputs that a walk from the time inputs alone never reaches)."""
    graph = model.graph
    consumers, constants = _consumers(graph), _constant_nodes(graph)
    frontier = {i.name for i in graph.input if i.name in input_names}
    seen: set[str] = set()
    names: list[str] = []
    path: list[onnx.NodeProto] = []
    while frontier:
        tensor = frontier.pop()
        for node in consumers.get(tensor, []):
            if node.name in seen or node.op_type in _MATMULS:
                continue
            seen.add(node.name)
            names.append(node.name)
            path.append(node)
            frontier.update(node.output)
    # Constant-only producers of the time path's inputs, and their own constant inputs, recursively.
    pending = [i for node in path for i in node.input]
    while pending:
        producer = constants.get(pending.pop())
        if producer is None or producer.name in seen:
            continue
        seen.add(producer.name)
        names.append(producer.name)
        pending.extend(producer.input)
    return names


def _drop_fp16_round_trips(model: onnx.ModelProto) -> int:
    """Remove float32 -> float16 -> float32 Cast pairs: the converter puts one between two float32 nodes it
    keeps (a cast to float16 after the first, a cast back before the second) and its own clean-up
    (`remove_unnecessary_cast_node`, onnxconverter-common 1.16) misses the pair when the float16 tensor has
    several readers (π0's frequency x t feeds both Sin and Cos). The round trip rounds a value meant to
    stay float32. Returns the number of float32 Casts bypassed."""
    graph = model.graph
    fp32 = {v.name for v in [*graph.value_info, *graph.input, *graph.output]
            if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    fp32 |= {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT}

    def cast_to(node: onnx.NodeProto) -> int | None:
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    half_of = {n.output[0]: n.input[0] for n in graph.node
               if cast_to(n) == onnx.TensorProto.FLOAT16 and n.input[0] in fp32}
    rename = {n.output[0]: half_of[n.input[0]] for n in graph.node
              if cast_to(n) == onnx.TensorProto.FLOAT and n.input[0] in half_of}
    outputs = {o.name for o in graph.output}
    rename = {k: v for k, v in rename.items() if k not in outputs}
    if not rename:
        return 0
    keep = [n for n in graph.node if not (n.output and n.output[0] in rename)]
    for node in keep:
        node.input[:] = [rename.get(i, i) for i in node.input]
    read = {i for n in keep for i in n.input} | outputs
    keep = [n for n in keep if not (n.output and n.output[0] in half_of and n.output[0] not in read)]
    del graph.node[:]
    graph.node.extend(keep)
    live = {o for n in keep for o in n.output}
    stale = [v for v in graph.value_info if v.name not in live and v.name not in outputs]
    for v in stale:
        graph.value_info.remove(v)
    return len(rename)


def _strip_identities(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove Identity nodes (the exporter emits them for shared weights); the FP16 converter mistypes them."""
    graph_outputs = {o.name for o in model.graph.output}
    rename: dict[str, str] = {}
    keep = []
    for node in model.graph.node:
        if node.op_type == "Identity" and node.output[0] not in graph_outputs:
            rename[node.output[0]] = rename.get(node.input[0], node.input[0])
        else:
            keep.append(node)
    for node in keep:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return model


def _unshare_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give each consumer its own copy of a shared initializer.

    The exporter dedupes equal tensors (e.g. all-zero biases), so one initializer can feed both an FP32
    LayerNormalization and an FP16 Gemm; it can only have one type, so it must be split first.
    """
    inits = {i.name: i for i in model.graph.initializer}
    seen: set[str] = set()
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            if name not in inits:
                continue
            if name in seen:
                copy = onnx.TensorProto()
                copy.CopyFrom(inits[name])
                copy.name = f"{name}__{node.name or node.op_type}_{k}"
                model.graph.initializer.append(copy)
                node.input[k] = copy.name
            else:
                seen.add(name)
    return model


def to_fp16(src: Path, dst: Path, time_inputs: tuple[str, ...] = TIME_INPUTS) -> Path:
    """FP16 weights and activations, IO float32; the time path from `time_inputs` (and its constants) and the
    ops in FP16_KEEP_FP32_OPS stay float32, with no float16 round trip between them."""
    model = _unshare_initializers(_strip_identities(onnx.load(str(src))))
    fp16 = float16.convert_float_to_float16(
        model, keep_io_types=True, op_block_list=FP16_KEEP_FP32_OPS + float16.DEFAULT_OP_BLOCK_LIST,
        node_block_list=_time_embedding_nodes(model, time_inputs), disable_shape_infer=False,
    )
    dropped = _drop_fp16_round_trips(fp16)
    log.debug("%s: %d float16 round trips between float32 nodes removed", dst.name, dropped)
    onnx.save(fp16, str(dst))
    return dst


class FeedReader(CalibrationDataReader):
    """Feeds a list of input dicts to the calibrator."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._feeds = feeds
        self._it: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._feeds)


def to_int8(src: Path, dst: Path, feeds: list[dict[str, np.ndarray]], method: str = "minmax",
            weight_range: str = DEFAULT_INT8_RANGE) -> Path:
    """Static INT8 QDQ quantization calibrated on `feeds` (graph inputs); `weight_range` one of INT8_RANGES."""
    if weight_range not in INT8_RANGES:
        raise EdgeVlaError(f"unknown INT8 weight range {weight_range!r}; choose one of {', '.join(INT8_RANGES)}")
    pre = dst.with_suffix(".pre.onnx")
    try:
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        excluded = [n.name for n in onnx.load(str(pre)).graph.node if any(s in n.name for s in INT8_EXCLUDE_SCOPES)]
        quantize_static(
            str(pre), str(dst), FeedReader(feeds),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            reduce_range=weight_range == "reduced",  # why a target may need it: INT8_RANGES
            op_types_to_quantize=INT8_OPS,
            nodes_to_exclude=excluded,
            calibrate_method={"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                              "percentile": CalibrationMethod.Percentile}[method],
            extra_options={
                "ActivationSymmetric": True,  # zero points 0: what TensorRT's explicit quantization takes
                "WeightSymmetric": True,
                "QDQKeepRemovableActivations": False,
            },
        )
    finally:
        pre.unlink(missing_ok=True)
    return dst
