"""onnxruntime-only graph fusions, applied to a bundle's graphs in memory when the CPU backend loads them.

The bundle's graphs stay plain opset-17 ONNX (TensorRT-lintable). On onnxruntime's CPU provider the step
graph's cost is mostly per-node overhead (16-row GEMMs), so at load time this module rewrites two
patterns the reference exporter emits (export/onnx_graphs.py) into com.microsoft contrib ops that
onnxruntime's own optimizer does not form from them:

- attention: MatMul(q, Transpose(k)) -> Softmax -> MatMul(., v) with the head split/merge around it
  (Reshape/Transpose/Split) -> one MultiHeadAttention (scale 1: the exporter folds 1/sqrt(d) into Q).
  Self-attention reads Q/K/V from one [T, 3E] projection; cross-attention reads the per-layer prefix K/V
  graph inputs [1, h, P, d] as they are (MultiHeadAttention's BNSH key/value form);
- GELU: u * Sigmoid(u * (A + B u^2)) (tanh-GELU's sigmoid form) -> FastGelu.

A pattern that is not there is left alone (older bundles load unchanged); anything unexpected makes the
caller fall back to the plain graph (OrtBackend logs a warning). The robot has no `onnx` package, so the
graph is edited through edge_vla.runtime.onnx_proto (protobuf only).

compose_chunk builds the whole Euler chunk as one graph (issue 28): the prefix graph, then N copies of the step
graph, each with its time row as a constant and followed by x <- x + dt * v, so that a chunk is one onnxruntime
call instead of 1 + N (the CPU counterpart of the TensorRT backend's one CUDA graph per chunk).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_vla.runtime import onnx_proto as pb
from edge_vla.runtime.onnx_proto import make_node

MS_DOMAIN = "com.microsoft"
# The sigmoid form of tanh-GELU that the exporter writes (export/onnx_graphs.py gelu_tanh_sigmoid):
# u * sigmoid(u * (GELU_A + GELU_B * u^2)); the pattern match below looks for these two constants.
GELU_A = 2.0 * math.sqrt(2.0 / math.pi)
GELU_B = GELU_A * 0.044715


@dataclass
class FuseReport:
    attention: int = 0
    gelu: int = 0
    nodes_before: int = 0
    nodes_after: int = 0

    @property
    def changed(self) -> bool:
        return bool(self.attention or self.gelu)


class _Graph:
    """Producer/consumer maps and constant lookup over a GraphProto, kept in sync by the rewrites."""

    def __init__(self, model: Any) -> None:
        self.model, self.g = model, model.graph
        self.inits = {i.name: i for i in self.g.initializer}
        self.consts = {n.output[0]: n for n in self.g.node if n.op_type == "Constant"}
        self.outputs = {o.name for o in self.g.output}
        self.inputs = {i.name for i in self.g.input}
        self.refresh()
        self._n = 0

    def refresh(self) -> None:
        self.producer = {o: n for n in self.g.node for o in n.output}
        self.consumers: dict[str, list[Any]] = {}
        for n in self.g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)

    def const(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return pb.to_array(self.inits[name])
        node = self.consts.get(name)
        if node is not None:
            for a in node.attribute:
                if a.name == "value" and a.type == pb.ATTR_TENSOR:
                    return pb.to_array(a.t)
        return None

    def prod(self, name: str, op: str) -> Any | None:
        n = self.producer.get(name)
        return n if n is not None and n.op_type == op else None

    def only_consumer(self, name: str, op: str) -> Any | None:
        cs = self.consumers.get(name, [])
        return cs[0] if len(cs) == 1 and cs[0].op_type == op and name not in self.outputs else None

    def perm(self, node: Any) -> list[int]:
        for a in node.attribute:
            if a.name == "perm":
                return list(a.ints)
        return []

    def fresh(self, stem: str) -> str:
        self._n += 1
        return f"ort_fuse/{stem}_{self._n}"

    def shape_const(self, shape: list[int]) -> str:
        name = self.fresh("shape")
        self.g.initializer.append(pb.from_array(np.asarray(shape, dtype=np.int64), name))
        return name


def _heads_of(g: _Graph, x: str) -> tuple[str, list[int]] | None:
    """x = Transpose(Reshape(lin, [T, n, d]), perm [1, 0, 2]) -> (lin, [T, n, d])."""
    tr = g.prod(x, "Transpose")
    if tr is None or g.perm(tr) != [1, 0, 2]:
        return None
    rs = g.prod(tr.input[0], "Reshape")
    shape = g.const(rs.input[1]) if rs is not None else None
    if shape is None or shape.ndim != 1 or len(shape) != 3 or np.any(shape <= 0):
        return None
    return rs.input[0], [int(s) for s in shape]


def _fuse_attention(g: _Graph, sm: Any, new_nodes: list[Any]) -> list[Any] | None:
    """The nodes one attention replaces (for removal), after appending its replacement to new_nodes."""
    mm1 = g.prod(sm.input[0], "MatMul")
    mm2 = g.only_consumer(sm.output[0], "MatMul")
    if mm1 is None or mm2 is None or mm2.input[0] != sm.output[0] or len(g.consumers[mm1.output[0]]) != 1:
        return None
    kt = g.prod(mm1.input[1], "Transpose")
    if kt is None or len(g.consumers[kt.output[0]]) != 1:
        return None
    kperm = g.perm(kt)
    if len(kperm) < 2 or kperm[-2:] != [len(kperm) - 1, len(kperm) - 2] or kperm[:-2] != list(range(len(kperm) - 2)):
        return None
    merge_tr = g.only_consumer(mm2.output[0], "Transpose")
    merge_rs = g.only_consumer(merge_tr.output[0], "Reshape") if merge_tr is not None else None
    if merge_rs is None or g.perm(merge_tr) not in ([1, 0, 2], [0, 2, 1, 3]):
        return None
    out_shape = g.const(merge_rs.input[1])
    if out_shape is None or len(out_shape) != 2:
        return None
    t, e = (int(s) for s in out_shape)
    q, k, v = mm1.input[0], kt.input[0], mm2.input[1]
    split = g.prod(q, "Split")
    if split is not None:  # self-attention: q, k, v = Split(Transpose(Reshape(lin, [T, 3h, d])))
        if list(split.output) != [q, k, v] or len(split.output) != 3:
            return None
        heads = _heads_of(g, split.input[0])
        if heads is None or any(len(g.consumers[o]) != 1 for o in split.output):
            return None
        lin, (t2, n3, d) = heads
        if t2 != t or n3 * d != 3 * e:
            return None
        h = n3 // 3
        lin3 = g.fresh("qkv")
        q3, k3, v3 = g.fresh("q"), g.fresh("k"), g.fresh("v")
        new_nodes += [
            make_node("Reshape", [lin, g.shape_const([1, t, 3 * e])], [lin3]),
            make_node("Split", [lin3, g.shape_const([e, e, e])], [q3, k3, v3], axis=2),
        ]
        removed = [g.producer[split.input[0]], g.producer[g.producer[split.input[0]].input[0]], split]
    else:  # cross-attention: q = heads of a [T, E] projection; k, v are [1, h, P, d] graph inputs
        heads = _heads_of(g, q)
        if heads is None or len(g.consumers[q]) != 1 or k not in g.inputs or v not in g.inputs:
            return None
        lin, (t2, h, d) = heads
        if t2 != t or h * d != e:
            return None
        q3, k3, v3 = g.fresh("q"), k, v
        new_nodes.append(make_node("Reshape", [lin, g.shape_const([1, t, e])], [q3]))
        removed = [g.producer[q], g.producer[g.producer[q].input[0]]]
    o3 = g.fresh("attn")
    new_nodes += [
        make_node("MultiHeadAttention", [q3, k3, v3], [o3], domain=MS_DOMAIN, num_heads=h, scale=1.0),
        make_node("Reshape", [o3, merge_rs.input[1]], [merge_rs.output[0]]),
    ]
    return [*removed, kt, mm1, sm, mm2, merge_tr, merge_rs]


def _scalar(g: _Graph, name: str) -> float | None:
    c = g.const(name)
    return float(c) if c is not None and c.size == 1 else None


def _fuse_gelu(g: _Graph, sig: Any, new_nodes: list[Any]) -> list[Any] | None:
    """u * Sigmoid(u * (A + B * (u * u))), operands in either order -> FastGelu(u)."""
    z = g.prod(sig.input[0], "Mul")
    out = g.only_consumer(sig.output[0], "Mul")
    if z is None or out is None:
        return None
    u = out.input[0] if out.input[1] == sig.output[0] else out.input[1]
    if u not in z.input:
        return None
    add = g.prod(z.input[1] if z.input[0] == u else z.input[0], "Add")
    if add is None:
        return None
    a_val = next((_scalar(g, i) for i in add.input if _scalar(g, i) is not None), None)
    mul_b = next((g.prod(i, "Mul") for i in add.input if g.prod(i, "Mul") is not None), None)
    if a_val is None or mul_b is None or not math.isclose(a_val, GELU_A, rel_tol=1e-5):
        return None
    b_val = next((_scalar(g, i) for i in mul_b.input if _scalar(g, i) is not None), None)
    sq = next((g.prod(i, "Mul") for i in mul_b.input if g.prod(i, "Mul") is not None), None)
    if b_val is None or sq is None or list(sq.input) != [u, u] or not math.isclose(b_val, GELU_B, rel_tol=1e-5):
        return None
    chain = [sq, mul_b, add, z, sig]
    if any(len(g.consumers[n.output[0]]) != 1 for n in chain):
        return None
    new_nodes.append(make_node("FastGelu", [u], [out.output[0]], domain=MS_DOMAIN))
    return [*chain, out]


KINDS = ("attention", "gelu")


def fuse(model: Any, kinds: tuple[str, ...] = KINDS, in_place: bool = False) -> tuple[Any, FuseReport]:
    """`model` (an onnx_proto.ModelProto) with the patterns above fused, and a report: a copy, unless
    `in_place` (no second copy of the weights in memory while a large graph loads)."""
    if in_place:
        work = model
    else:
        work = pb.ModelProto()
        work.CopyFrom(model)
    g = _Graph(work)
    report = FuseReport(nodes_before=sum(n.op_type != "Constant" for n in work.graph.node))
    removed: set[int] = set()
    replacements: dict[int, list[Any]] = {}  # index of the last removed node -> new nodes there
    for kind, op, fn in (("attention", "Softmax", _fuse_attention), ("gelu", "Sigmoid", _fuse_gelu)):
        if kind not in kinds:
            continue
        for node in list(work.graph.node):
            if id(node) in removed or node.op_type != op:
                continue
            new_nodes: list[Any] = []
            gone = fn(g, node, new_nodes)
            if gone is None:
                continue
            removed.update(id(n) for n in gone)
            last = max(i for i, n in enumerate(work.graph.node) if id(n) in {id(x) for x in gone})
            replacements.setdefault(last, []).extend(new_nodes)
            setattr(report, kind, getattr(report, kind) + 1)
    if not report.changed:
        report.nodes_after = report.nodes_before
        return model, report
    nodes = []
    for i, n in enumerate(work.graph.node):
        if id(n) not in removed:
            nodes.append(n)
        nodes.extend(replacements.get(i, []))
    del work.graph.node[:]
    work.graph.node.extend(nodes)
    _drop_dead(work)
    if not any(o.domain == MS_DOMAIN for o in work.opset_import):
        work.opset_import.add(domain=MS_DOMAIN, version=1)
    report.nodes_after = sum(n.op_type != "Constant" for n in work.graph.node)
    return work, report


def fuse_file(path: Path, kinds: tuple[str, ...] = KINDS) -> tuple[bytes | None, FuseReport]:
    """The fused model of the graph file `path` as bytes for onnxruntime, or None where nothing matched or the
    graph keeps its weights in external data (large models: left to onnxruntime as they are)."""
    model = pb.load_model(path.read_bytes())
    if any(t.data_location == pb.EXTERNAL for t in model.graph.initializer):
        return None, FuseReport()
    fused, report = fuse(model, kinds, in_place=True)
    return (fused.SerializeToString() if report.changed else None), report


def _drop_dead(model: Any) -> None:
    """Remove nodes whose outputs nothing reads (the shape constants the rewrites orphaned)."""
    g = model.graph
    outputs = {o.name for o in g.output}
    while True:
        used = Counter(i for n in g.node for i in n.input)
        dead = [n for n in g.node if not any(o in outputs or used[o] for o in n.output)]
        if not dead:
            return
        dead_ids = {id(n) for n in dead}
        keep = [n for n in g.node if id(n) not in dead_ids]
        del g.node[:]
        g.node.extend(keep)


# --- the whole Euler chunk as one graph ----------------------------------------------------------------------
CHUNK_NS = "ort_chunk/"  # every name the composition adds or renames starts with this
CHUNK_NOISE = CHUNK_NS + "noise"  # the chunk graph's input: the initial state x_0 (x_t's type and shape)
CHUNK_OUTPUT = CHUNK_NS + "x"  # its output: the state after N Euler steps (float32)
# Ops whose attributes hold subgraphs that would read the step's value names: renaming them is not done here.
_SUBGRAPH_OPS = frozenset({"If", "Loop", "Scan"})


@dataclass(frozen=True)
class ChunkReport:
    """What compose_chunk built: `steps` copies of the step graph after the prefix, `nodes` nodes in all."""

    steps: int
    nodes: int
    prefix_nodes: int
    step_nodes: int
    output: str = CHUNK_OUTPUT


def compose_chunk(prefix: Any, step: Any, *, steps: int, dt: float, time_name: str, time_rows: np.ndarray,
                  x_t: str, velocity: str, fixed: dict[str, np.ndarray] | None = None) -> tuple[Any, ChunkReport]:
    """One model computing a whole Euler chunk: the prefix graph, then for i < steps the step graph on x_i with
    time_rows[2 i] (the half-grid slot the sampler uses for Euler step i) as a constant, and
    x_{i+1} = x_i + (v_i * dt), the sampler's float32 operations in its order. `fixed`: step inputs that take one
    constant value for the whole chunk (the RTC prefix mask: zeros, no action prefix).

    Inputs: the prefix graph's inputs, the step graph's other inputs (an observation input only the step takes,
    such as pi0's state: constant over a chunk, as in the stepping path) and CHUNK_NOISE (x_0); output:
    CHUNK_OUTPUT. The step graph's inputs that the prefix produces (per-layer K/V) are wired by name; its weights
    appear once, shared by every copy. `prefix` is consumed (edited in place); `step` is only read. Raises
    ValueError for a graph this composition does not handle (the caller steps the ODE instead).
    """
    if steps < 1 or len(time_rows) < 2 * steps - 1:
        raise ValueError(f"{len(time_rows)} time rows cannot drive {steps} Euler steps (row 2i per step i)")
    g, sg = prefix.graph, step.graph
    for t in (*g.initializer, *sg.initializer):
        if t.data_location == pb.EXTERNAL:
            raise ValueError(f"initializer {t.name!r} keeps its data in an external file")
    bad = sorted({n.op_type for n in sg.node} & _SUBGRAPH_OPS)
    if bad:
        raise ValueError(f"the step graph has control-flow ops {bad}")
    opsets = {o.domain: o.version for o in prefix.opset_import}
    for o in step.opset_import:
        if opsets.setdefault(o.domain, o.version) != o.version:
            raise ValueError(f"opset {o.domain or 'ai.onnx'} is version {opsets[o.domain]} in the prefix graph and "
                             f"{o.version} in the step graph")
        if o.domain not in {x.domain for x in prefix.opset_import}:
            prefix.opset_import.add(domain=o.domain, version=o.version)
    fixed = fixed or {}
    step_in = {i.name: i for i in sg.input}
    step_out = {o.name: o for o in sg.output}
    for name, what in ((x_t, "x_t"), (time_name, "time")):
        if name not in step_in:
            raise ValueError(f"the step graph has no {what} input {name!r}")
    if velocity not in step_out:
        raise ValueError(f"the step graph has no output {velocity!r}")
    prefix_values = {i.name for i in g.input} | {o for n in g.node for o in n.output}
    inits = {t.name for t in sg.initializer}
    if any(v.startswith(CHUNK_NS) for v in prefix_values | {t.name for t in g.initializer}):
        raise ValueError(f"the prefix graph already uses names under {CHUNK_NS!r}")
    for name, info in step_in.items():  # inputs only the step graph takes become the chunk graph's inputs
        if name not in {x_t, time_name, *fixed} and name not in inits and name not in prefix_values:
            g.input.add().CopyFrom(info)

    prefix_nodes, step_nodes = len(g.node), len(sg.node)
    renamed = {name: f"{CHUNK_NS}step/{name}" for name in inits}
    for t in sg.initializer:  # the step's weights, once, shared by every copy
        copy = g.initializer.add()
        copy.CopyFrom(t)
        copy.name = renamed[t.name]
    for name, value in fixed.items():
        renamed[name] = CHUNK_NS + name
        g.initializer.append(pb.from_array(np.ascontiguousarray(value), renamed[name]))
    dt_name = CHUNK_NS + "dt"
    g.initializer.append(pb.from_array(np.asarray(dt, dtype=np.float32), dt_name))
    # I/O: the prefix's inputs and x_0 in; only the final state out (the per-layer K/V stay inside).
    noise = g.input.add()
    noise.CopyFrom(step_in[x_t])
    noise.name = CHUNK_NOISE
    out = step_out[velocity]
    del g.output[:]
    final = g.output.add()
    final.CopyFrom(out)
    final.name = CHUNK_OUTPUT

    x = CHUNK_NOISE
    for i in range(steps):
        tag = f"{CHUNK_NS}s{i}/"
        time_const = f"{tag}{time_name}"
        g.initializer.append(pb.from_array(np.ascontiguousarray(time_rows[2 * i]), time_const))
        own = {x_t: x, time_name: time_const}

        def name_of(v: str, own: dict[str, str] = own, tag: str = tag) -> str:
            if not v:
                return v  # an omitted optional input
            if v in own:
                return own[v]
            if v in renamed:
                return renamed[v]
            return v if v in step_in else tag + v  # a prefix output (K/V) or observation input, else internal

        for k, node in enumerate(sg.node):
            copy = g.node.add()
            copy.CopyFrom(node)
            copy.name = f"{tag}{node.name or k}"
            copy.input[:] = [name_of(v) for v in node.input]
            copy.output[:] = [name_of(v) for v in node.output]
        dv = f"{tag}dv"
        nxt = CHUNK_OUTPUT if i == steps - 1 else f"{CHUNK_NS}x_{i + 1}"
        g.node.extend([make_node("Mul", [name_of(velocity), dt_name], [dv]), make_node("Add", [x, dv], [nxt])])
        g.node[-2].name, g.node[-1].name = f"{tag}euler_mul", f"{tag}euler_add"
        x = nxt
    return prefix, ChunkReport(steps, len(g.node), prefix_nodes, step_nodes)
