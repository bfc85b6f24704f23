"""Roofline ESTIMATES of per-stage latency on Jetson targets, from each graph's FLOPs and bytes.

    cost = graph_cost("bundle/graphs/denoise_step.onnx")   # needs `onnx` (the export extra)
    est = estimate(cost, TARGETS["agx-orin-64gb"])         # Estimate(ms=..., bound="memory", ...)

time = max(flops / peak_dense_compute, bytes / memory_bandwidth) + LAUNCH_OVERHEAD_MS per graph launch.
This is a lower bound on a perfectly fused engine at published peaks: real engines reach a fraction of
peak (often 30-70% on small batch-1 graphs), so treat it as "cannot be faster than", not a prediction.

FLOPs: 2*M*N*K for MatMul/Gemm (and their integer/QLinear forms), 2*out*Cin/g*kh*kw for Conv; other
ops are counted as memory traffic only. Bytes: every initializer at its stored dtype size (INT8
weights count 1 byte) plus the graph's inputs and outputs; intermediate activations are assumed to stay
on chip, which is optimistic for large graphs.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edge_vla.errors import BundleError

log = logging.getLogger(__name__)

# One enqueue of a TensorRT engine (or a CUDA graph replay) from a Jetson's ARM CPU: tens of microseconds.
# A stated assumption, not a measurement; pass launch_overhead_ms= to change it.
LAUNCH_OVERHEAD_MS = 0.03

_DTYPE_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2}  # onnx TensorProto
_MATMUL_OPS = {"MatMul", "MatMulInteger", "QLinearMatMul"}
_CONV_OPS = {"Conv", "ConvInteger", "QLinearConv"}


@dataclass(frozen=True)
class Target:
    """A target's GPU peaks (dense, no structured sparsity) and memory bandwidth."""

    name: str
    fp32_tflops: float  # CUDA cores, FMA = 2 FLOPs
    fp16_tflops: float  # tensor cores, dense
    int8_tops: float  # tensor cores, dense (GPU only: DLAs excluded)
    bandwidth_gbs: float  # LPDDR, shared with the CPU
    note: str

    def peak_flops(self, precision: str) -> float:
        tera = {"fp32": self.fp32_tflops, "fp16": self.fp16_tflops, "int8": self.int8_tops}[precision]
        return tera * 1e12


# Sources: NVIDIA Jetson Orin module datasheets / AGX Orin technical brief (sparse INT8 TOPS, GPU clocks,
# CUDA core counts, bandwidth); Jetson AGX Thor (T5000) product page (2070 FP4 TFLOPS sparse, 273 GB/s).
# Dense figures are derived: Ampere (GA10B) sparse INT8 / 2 = dense INT8, / 2 again = dense FP16;
# FP32 = CUDA cores * 2 * clock. Orin figures are the original (non-"Super") MAXN modes.
TARGETS: dict[str, Target] = {
    "orin-nano-8gb": Target(
        "Jetson Orin Nano 8GB", 1.28, 10.0, 20.0, 68.0,
        "1024 cores @ 625 MHz; 40 sparse INT8 TOPS (GPU). JetPack 6.1 'Super' mode: 1020 MHz, 67 TOPS, "
        "102 GB/s (not used here)."),
    "orin-nx-16gb": Target(
        "Jetson Orin NX 16GB", 1.88, 15.0, 30.0, 102.4,
        "1024 cores @ 918 MHz; 100 sparse INT8 TOPS total of which ~60 GPU (rest DLA): GPU split derived."),
    "agx-orin-64gb": Target(
        "Jetson AGX Orin 64GB", 5.32, 42.5, 85.0, 204.8,
        "2048 cores @ 1.3 GHz; 275 sparse INT8 TOPS total of which 170 GPU (rest DLA)."),
    "thor": Target(
        "Jetson AGX Thor (T5000)", 8.0, 129.0, 258.0, 273.0,
        "UNCERTAIN compute: 2560 cores @ ~1.57 GHz (FP32 derived); NVIDIA quotes 2070 FP4 TFLOPS sparse. "
        "FP16/INT8 dense here assume FP4 sparse / 16 and / 8 (conservative; per-SM Blackwell tensor "
        "rates would give up to 2x more). INT8 on Thor is best run as FP8 in TensorRT."),
}
# Ordered slowest to fastest in every column, so a faster target never estimates slower.
TARGET_ORDER = ("orin-nano-8gb", "orin-nx-16gb", "agx-orin-64gb", "thor")


@dataclass(frozen=True)
class GraphCost:
    flops: float
    weight_bytes: int
    io_bytes: int
    precision: str  # the compute precision the estimate uses: fp32, fp16 or int8

    @property
    def bytes(self) -> int:
        return self.weight_bytes + self.io_bytes

    @property
    def intensity(self) -> float:
        """FLOPs per byte moved: compare with peak/bandwidth to see which roof binds."""
        return self.flops / max(self.bytes, 1)


@dataclass(frozen=True)
class Estimate:
    ms: float
    compute_ms: float
    memory_ms: float
    bound: str  # "compute" or "memory"


def estimate(cost: GraphCost, target: Target, runs: int = 1,
             launch_overhead_ms: float = LAUNCH_OVERHEAD_MS) -> Estimate:
    """Roofline time of `runs` back-to-back runs of a graph on `target` (an ESTIMATE: see the module doc)."""
    compute = 1e3 * cost.flops / target.peak_flops(cost.precision)
    memory = 1e3 * cost.bytes / (target.bandwidth_gbs * 1e9)
    return Estimate(runs * (max(compute, memory) + launch_overhead_ms), runs * compute, runs * memory,
                    "compute" if compute >= memory else "memory")


# --- counting ----------------------------------------------------------------------------------------
def graph_cost(path: str | Path) -> GraphCost:
    """FLOPs and bytes of a static-shape ONNX graph. Needs `onnx` (imported lazily: the robot may lack it)."""
    from edge_vla.optional import require

    onnx = require("onnx")
    try:
        model = onnx.load(str(path), load_external_data=False)  # dims suffice; the full π0 has 11 GB of weights
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)  # resolves Shape->Reshape chains
    except Exception as exc:  # onnx raises several unrelated types for bad files
        raise BundleError(f"could not read {path} for FLOP counting: {exc}") from exc
    graph = model.graph
    shapes: dict[str, list[int]] = {}
    for vi in [*graph.input, *graph.output, *graph.value_info]:
        # A symbolic dim left by shape inference is the batch (Reshape(-1) chains): these graphs are batch 1.
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in vi.type.tensor_type.shape.dim]
        shapes[vi.name] = dims
    weight_bytes, weight_dtypes = 0, {}
    for init in graph.initializer:
        shapes[init.name] = list(init.dims)
        n = _DTYPE_BYTES.get(init.data_type, 4) * math.prod(init.dims)
        weight_bytes += n
        weight_dtypes[init.data_type] = weight_dtypes.get(init.data_type, 0) + n
    init_names = {i.name for i in graph.initializer}
    io_bytes = 0
    for vi in [*graph.input, *graph.output]:
        if vi.name in init_names:
            continue
        dims = shapes.get(vi.name, [])
        io_bytes += _DTYPE_BYTES.get(vi.type.tensor_type.elem_type, 4) * math.prod(dims)
    flops = 0.0
    unknown = 0
    for node in graph.node:
        f = _node_flops(node, shapes)
        if f is None:
            unknown += 1
        else:
            flops += f
    if unknown:
        log.warning("%s: %d MatMul/Gemm/Conv node(s) had unknown shapes and were not counted", path, unknown)
    return GraphCost(flops, weight_bytes, io_bytes, _precision(graph, weight_dtypes))


def _node_flops(node: Any, shapes: dict[str, list[int]]) -> float | None:
    op = node.op_type
    if op not in _MATMUL_OPS | _CONV_OPS | {"Gemm"}:
        return 0.0
    ins = list(node.input)
    if op in ("QLinearMatMul", "QLinearConv"):  # a, a_scale, a_zp, b, ...
        ins = [ins[0], ins[3]]
    out = shapes.get(node.output[0])
    a, b = shapes.get(ins[0]), shapes.get(ins[1])
    if out is None or a is None or b is None:
        return None
    if op in _MATMUL_OPS or op == "Gemm":
        if op == "Gemm":
            trans_a = next((at.i for at in node.attribute if at.name == "transA"), 0)
            k = a[0] if trans_a else a[-1]
        else:
            k = a[-1]
        # output holds every batch * M * N; each needs K multiply-adds
        return 2.0 * math.prod(out) * k
    c_in_per_group, kernel = b[1], math.prod(b[2:])  # weight is [Cout, Cin/group, kh, kw]: groups folded in
    return 2.0 * math.prod(out) * c_in_per_group * kernel


def _precision(graph: Any, weight_dtypes: dict[int, int]) -> str:
    """Which compute roof applies: INT8 for QDQ/integer graphs, FP16 for half weights, else FP32."""
    ops = {n.op_type for n in graph.node}
    if ops & {"QuantizeLinear", "DequantizeLinear", "MatMulInteger", "QLinearMatMul", "ConvInteger"}:
        return "int8"
    if weight_dtypes and max(weight_dtypes, key=weight_dtypes.get) == 10:  # FLOAT16 holds most weight bytes
        return "fp16"
    return "fp32"


# --- bundle level ------------------------------------------------------------------------------------
def bundle_costs(bundle: Any) -> dict[str, GraphCost] | None:
    """prefix / denoise_step costs: counted from the ONNX graphs when onnx is installed, else read from
    the manifest's `graphs.<name>.cost` ({flops, weight_bytes, io_bytes, precision}) if the exporter wrote
    it, else None (the caller skips the roofline and says why)."""
    from edge_vla.optional import available

    names = ("prefix", "denoise_step")
    if available("onnx"):
        return {n: graph_cost(bundle.root / bundle.graph(n).file) for n in names}
    costs = {}
    for n in names:
        c = bundle.manifest["graphs"].get(n, {}).get("cost")
        if not isinstance(c, dict):
            return None
        costs[n] = GraphCost(float(c["flops"]), int(c["weight_bytes"]), int(c["io_bytes"]),
                             str(c.get("precision", bundle.precision)))
    return costs


def roofline_report(costs: dict[str, GraphCost], steps: list[int], evals_per_step: int = 1,
                    launch_overhead_ms: float = LAUNCH_OVERHEAD_MS) -> dict[str, Any]:
    """Per target: prefix and per-step estimates, and prefix + N steps for each step count."""
    prefix, step = costs["prefix"], costs["denoise_step"]
    out: dict[str, Any] = {
        "label": "ESTIMATE (roofline lower bound at published dense peaks; not a measurement)",
        "launch_overhead_ms": launch_overhead_ms,
        "graphs": {n: {**asdict(c), "bytes": c.bytes, "intensity_flop_per_byte": c.intensity}
                   for n, c in costs.items()},
        "targets": {},
    }
    for key in TARGET_ORDER:
        t = TARGETS[key]
        p = estimate(prefix, t, launch_overhead_ms=launch_overhead_ms)
        s = estimate(step, t, runs=evals_per_step, launch_overhead_ms=launch_overhead_ms)  # heun: 2 evals
        out["targets"][key] = {
            "name": t.name, "note": t.note,
            "peak_tflops": t.peak_flops(prefix.precision) / 1e12, "bandwidth_gbs": t.bandwidth_gbs,
            "prefix": asdict(p), "step": asdict(s),
            "total_ms": {str(n): p.ms + n * s.ms for n in steps},
        }
    return out
