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
    # The nvpmodel power mode whose GPU clock the peaks above assume (a profile taken in another mode, or
    # without `jetson_clocks`, runs at lower clocks than this table). "" for a target without power modes.
    power_mode: str = ""

    def peak_flops(self, precision: str) -> float:
        tera = {"fp32": self.fp32_tflops, "fp16": self.fp16_tflops, "int8": self.int8_tops}[precision]
        return tera * 1e12


# Sources: NVIDIA Jetson Orin module datasheets / AGX Orin technical brief (sparse INT8 TOPS, GPU clocks,
# CUDA core counts, bandwidth); Jetson AGX Thor (T5000) product page (2070 FP4 TFLOPS sparse, 273 GB/s).
# Dense figures are derived: Ampere (GA10B) sparse INT8 / 2 = dense INT8, / 2 again = dense FP16;
# FP32 = CUDA cores * 2 * clock. Orin figures are the original (non-"Super") top modes: MAXN on Orin NX and
# AGX Orin (GPU 918 MHz / 1.3 GHz), 15W on the Orin Nano 8GB (mode 0, its highest before JetPack 6.1's "MAXN
# SUPER"; GPU 625 MHz), per the module datasheets' power-mode tables (Jetson Linux Developer Guide, "Power
# Management for Jetson Orin Devices"). Thor: MAXN, the mode its published figures are quoted in.
TARGETS: dict[str, Target] = {
    "orin-nano-8gb": Target(
        "Jetson Orin Nano 8GB", 1.28, 10.0, 20.0, 68.0,
        "1024 cores @ 625 MHz; 40 sparse INT8 TOPS (GPU). JetPack 6.1 'Super' mode: 1020 MHz, 67 TOPS, "
        "102 GB/s (not used here).", power_mode="15W"),
    "orin-nx-16gb": Target(
        "Jetson Orin NX 16GB", 1.88, 15.0, 30.0, 102.4,
        "1024 cores @ 918 MHz; 100 sparse INT8 TOPS total of which ~60 GPU (rest DLA): GPU split derived.",
        power_mode="MAXN"),
    "agx-orin-64gb": Target(
        "Jetson AGX Orin 64GB", 5.32, 42.5, 85.0, 204.8,
        "2048 cores @ 1.3 GHz; 275 sparse INT8 TOPS total of which 170 GPU (rest DLA).", power_mode="MAXN"),
    "thor": Target(
        "Jetson AGX Thor (T5000)", 8.0, 129.0, 258.0, 273.0,
        "UNCERTAIN compute: 2560 cores @ ~1.57 GHz (FP32 derived); NVIDIA quotes 2070 FP4 TFLOPS sparse. "
        "FP16/INT8 dense here assume FP4 sparse / 16 and / 8 (conservative; per-SM Blackwell tensor "
        "rates would give up to 2x more). INT8 on Thor is best run as FP8 in TensorRT.", power_mode="MAXN"),
}
# Ordered slowest to fastest in every column, so a faster target never estimates slower.
TARGET_ORDER = ("orin-nano-8gb", "orin-nx-16gb", "agx-orin-64gb", "thor")


@dataclass(frozen=True)
class GraphCost:
    flops: float
    weight_bytes: int
    io_bytes: int
    precision: str  # the compute precision the estimate uses: fp32, fp16 or int8
    # MatMul/Gemm/Conv nodes with a dim no shape inference resolved (counted as 1) or of unknown rank (left
    # out): when > 0, `flops` is a lower bound.
    approximate_nodes: int = 0

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
Dims = list[int | None]  # None: a dim shape inference left unknown


def graph_cost(path: str | Path) -> GraphCost:
    """FLOPs and bytes of a static-shape ONNX graph. Needs `onnx` (imported lazily: the robot may lack it).

    Shapes come from ONNX shape inference; where it leaves a MatMul/Gemm/Conv dim symbolic (π0's prefix: a
    Reshape fed by a shape computed through Where/Expand, which ONNX's data propagation does not follow),
    onnxruntime's symbolic shape inference is tried, then each dim is taken from whichever operand or output
    knows it (K from the weight, batch dims by broadcasting). A dim still unknown counts as 1: such nodes
    make the total a lower bound, are counted in `GraphCost.approximate_nodes` and logged."""
    from edge_vla.optional import require

    onnx = require("onnx")
    try:
        raw = onnx.load(str(path), load_external_data=False)  # dims suffice; the full π0 has 11 GB of weights
        model = onnx.shape_inference.infer_shapes(raw, data_prop=True)  # resolves Shape->Reshape chains
    except Exception as exc:  # onnx raises several unrelated types for bad files
        raise BundleError(f"could not read {path} for FLOP counting: {exc}") from exc
    graph = model.graph
    shapes = _value_shapes(graph)
    weight_bytes, weight_dtypes = 0, {}
    for init in graph.initializer:
        n = _DTYPE_BYTES.get(init.data_type, 4) * math.prod(init.dims)
        weight_bytes += n
        weight_dtypes[init.data_type] = weight_dtypes.get(init.data_type, 0) + n
    counted = [n for n in graph.node if n.op_type in _MATMUL_OPS | _CONV_OPS | {"Gemm"}]
    if any(not _known(shapes.get(x)) for n in counted for x in [*_operands(n), n.output[0]]):
        for name, dims in _symbolic_shapes(raw, path).items():
            shapes[name] = _merge(shapes.get(name), dims)
    init_names = {i.name for i in graph.initializer}
    io_bytes = 0
    for vi in [*graph.input, *graph.output]:
        if vi.name in init_names:
            continue
        dims = shapes.get(vi.name) or []  # graph inputs/outputs are static in bundles; unknown -> 1
        io_bytes += _DTYPE_BYTES.get(vi.type.tensor_type.elem_type, 4) * math.prod(d or 1 for d in dims)
    flops = 0.0
    approximate = 0
    for node in counted:
        f, exact = _node_flops(node, shapes)
        flops += f
        approximate += not exact
    if approximate:
        log.warning("%s: %d MatMul/Gemm/Conv node(s) had dims no shape inference resolved (taken as 1, or the "
                    "node left out): the FLOP count is a LOWER BOUND", path, approximate)
    return GraphCost(flops, weight_bytes, io_bytes, _precision(graph, weight_dtypes), approximate)


def _dims(tensor_type: Any) -> Dims | None:
    if not tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]


def _value_shapes(graph: Any) -> dict[str, Dims | None]:
    shapes: dict[str, Dims | None] = {}
    for vi in [*graph.input, *graph.output, *graph.value_info]:
        shapes[vi.name] = _dims(vi.type.tensor_type)
    for init in graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def _known(dims: Dims | None) -> bool:
    return dims is not None and all(d is not None for d in dims)


def _merge(a: Dims | None, b: Dims | None) -> Dims | None:
    """Dim by dim, the known one (the two inferences agree wherever both know a dim)."""
    if a is None or b is None or len(a) != len(b):
        return a if _known(a) or b is None else b
    return [x if x is not None else y for x, y in zip(a, b, strict=True)]


def _symbolic_shapes(model: Any, path: str | Path) -> dict[str, Dims | None]:
    """onnxruntime's symbolic shape inference (sympy arithmetic on dims: it follows the computed shapes ONNX's
    data propagation drops). {} when it is missing or fails: the per-node resolution then does what it can."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception as exc:  # ImportError (no onnxruntime/sympy) or an op it does not know
        log.info("%s: onnxruntime symbolic shape inference unavailable (%s); resolving dims per node", path, exc)
        return {}
    return _value_shapes(inferred.graph) if inferred is not None else {}


def _operands(node: Any) -> list[str]:
    ins = list(node.input)
    if node.op_type in ("QLinearMatMul", "QLinearConv"):  # a, a_scale, a_zp, b, ...
        return [ins[0], ins[3]]
    return ins[:2]


def _first(*dims: int | None) -> int | None:
    return next((d for d in dims if d is not None), None)


def _broadcast(*dims: int | None) -> int | None:
    """A broadcast batch dim: any known dim > 1 decides it; all known and 1 -> 1; else unknown."""
    big = [d for d in dims if d is not None and d != 1]
    if big:
        return big[0]
    return 1 if all(d == 1 for d in dims) else None


def _node_flops(node: Any, shapes: dict[str, Dims | None]) -> tuple[float, bool]:
    """(FLOPs, exact). Each dim comes from whichever of the operands and the output knows it; one still
    unknown counts as 1 (exact=False). A node with an operand of unknown rank is left out (0, False)."""
    op = node.op_type
    a_name, b_name = _operands(node)
    a, b, out = shapes.get(a_name), shapes.get(b_name), shapes.get(node.output[0])
    if a is None or b is None:
        return 0.0, False
    if op in _CONV_OPS:
        # weight [Cout, Cin/group, *kernel] (groups folded in); output [N, Cout, *spatial]
        if out is None or len(out) < 2:
            return 0.0, False
        dims = [_first(out[0], a[0]), _first(out[1], b[0]), *out[2:], *b[1:]]
    elif op == "Gemm":
        attr = {at.name: at.i for at in node.attribute}
        m_a, k_a = (a[1], a[0]) if attr.get("transA", 0) else (a[0], a[1])
        k_b, n_b = (b[1], b[0]) if attr.get("transB", 0) else (b[0], b[1])
        o = out if out is not None and len(out) == 2 else [None, None]
        dims = [_first(m_a, o[0]), _first(n_b, o[1]), _first(k_a, k_b)]
    else:  # MatMul semantics (numpy): a 1-D operand gains a dim that the output drops
        a2 = [1, *a] if len(a) == 1 else a
        b2 = [*b, 1] if len(b) == 1 else b
        rank = max(len(a2), len(b2))
        o2 = None  # the output with the dims a 1-D operand dropped put back as 1s
        if out is not None and len(out) == rank - (len(a) == 1) - (len(b) == 1):
            o2 = list(out)
            if len(a) == 1:
                o2.insert(len(o2) - (len(b) > 1), 1)
            if len(b) == 1:
                o2.append(1)
        pad_a, pad_b = [1] * (rank - len(a2)), [1] * (rank - len(b2))  # broadcasting pads with leading 1s
        a2, b2 = [*pad_a, *a2], [*pad_b, *b2]
        batch = [_first(_broadcast(x, y), o2[i] if o2 else None) for i, (x, y) in enumerate(zip(a2[:-2], b2[:-2]))]
        m = _first(a2[-2], o2[-2] if o2 else None)
        n = _first(b2[-1], o2[-1] if o2 else None)
        dims = [*batch, m, n, _first(a2[-1], b2[-2])]
    exact = all(d is not None for d in dims)
    return 2.0 * math.prod(d if d is not None else 1 for d in dims), exact


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
        "label": "ESTIMATE (roofline lower bound at published dense peaks in each target's top power mode, "
                 "clocks locked; not a measurement)",
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
            "name": t.name, "note": t.note, "power_mode": t.power_mode,
            "peak_tflops": t.peak_flops(prefix.precision) / 1e12, "bandwidth_gbs": t.bandwidth_gbs,
            "prefix": asdict(p), "step": asdict(s),
            "total_ms": {str(n): p.ms + n * s.ms for n in steps},
        }
    return out
