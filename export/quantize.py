"""FP16 and INT8 (explicit Q/DQ) versions of exported FP32 graphs.

FP16 uses onnxconverter-common: weights and activations in FP16, IO kept float32, and the
numerically sensitive ops (LayerNormalization, Softmax, and the sinusoidal time embedding) kept
float32. INT8 uses onnxruntime.quantization in the QDQ format that TensorRT accepts: symmetric,
zero points 0, per-channel weights, calibrated on observations.
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


def _time_embedding_nodes(model: onnx.ModelProto, input_name: str = "t") -> list[str]:
    """Nodes between the flow-time input and the first matrix multiply: t * 100 needs FP32 precision."""
    frontier, names = {input_name}, []
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    seen: set[str] = set()
    while frontier:
        tensor = frontier.pop()
        for node in consumers.get(tensor, []):
            if node.name in seen or node.op_type in ("MatMul", "Gemm"):
                continue
            seen.add(node.name)
            names.append(node.name)
            frontier.update(node.output)
    return names


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


def to_fp16(src: Path, dst: Path) -> Path:
    model = _unshare_initializers(_strip_identities(onnx.load(str(src))))
    block_nodes = _time_embedding_nodes(model) if any(i.name == "t" for i in model.graph.input) else []
    fp16 = float16.convert_float_to_float16(
        model, keep_io_types=True, op_block_list=FP16_KEEP_FP32_OPS + float16.DEFAULT_OP_BLOCK_LIST,
        node_block_list=block_nodes, disable_shape_infer=False,
    )
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


def to_int8(src: Path, dst: Path, feeds: list[dict[str, np.ndarray]], method: str = "minmax") -> Path:
    """Static INT8 QDQ quantization calibrated on `feeds` (graph inputs)."""
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
            reduce_range=True,  # 7-bit weights: see the module docstring
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
