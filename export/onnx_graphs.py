"""Split the policy into the graphs deployment needs, and export them to ONNX (docs/MANIFEST.md).

- prefix:       images, tokens, state -> prefix_k_i, prefix_v_i for every expert layer i (cross-attention K/V)
- denoise_step: x_t, t (or time_cond, a row of the time-conditioning table), [prefix_mask,] prefix_k_i, prefix_v_i
                -> velocity (prefix_mask only for a model trained for real-time chunking: config.rtc_max_delay > 0)
- chunk:        (optional) images, tokens, state, noise -> normalized actions, with N Euler steps unrolled

Per-layer K/V are separate graph outputs and inputs (bound by name, never sliced out of one tensor).
With `time_input="table"`, everything in the step that depends only on t (time embedding, time MLP,
every block's adaLN vectors and the final adaLN) is precomputed per step count at export and fed as
one row per evaluation; the step graph keeps only the x-dependent work.

Static shapes (batch 1) by default, because TensorRT builds its best engines for them. Opset 17 is
parsed by TensorRT 10.x (JetPack 6: 10.3, JetPack 7: 10.13) and has LayerNormalization; attention is
exported as MatMul + Softmax, which both onnxruntime and TensorRT's parser take.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edge_vla.runtime.flow import REFERENCE_FLOW, integrate
from edge_vla.runtime.ort_fuse import GELU_A, GELU_B

from .model import LN_EPS, VLA, fake_inputs

log = logging.getLogger(__name__)

OPSET = 17
TIME_KINDS = ("scalar", "table")
TIME_INPUT = {"scalar": "t", "table": "time_cond"}
IO_ROLES = {"images": "images", "tokens": "tokens", "state": "state", "x_t": "x_t", "t": "time",
            "time_cond": "time_cond", "noise": "noise", "velocity": "velocity", "actions": "actions",
            "prefix_mask": "prefix_mask"}
PREFIX_MASK = "prefix_mask"  # RTC: [1, H] float, 1 on the frozen prefix's positions (docs/MANIFEST.md "rtc")
GRAPH_ROLES = {"prefix": "prefix", "denoise_step": "step", "chunk": "chunk"}


def kv_names(model: VLA) -> list[str]:
    """prefix_k_0, prefix_v_0, prefix_k_1, ...: the prefix graph's outputs and the step graph's inputs."""
    return [f"prefix_{kv}_{i}" for i in range(model.config.expert_depth) for kv in ("k", "v")]


def split_kv(prefix_kv: Tensor) -> list[Tensor]:
    """VLA.prefix_kv's stacked [L, 2, B, h, P, d] -> [k_0, v_0, k_1, v_1, ...]."""
    return [prefix_kv[i, j] for i in range(prefix_kv.shape[0]) for j in range(2)]


def pairs(flat: tuple[Tensor, ...] | list[Tensor]) -> list[tuple[Tensor, Tensor]]:
    return [(flat[2 * i], flat[2 * i + 1]) for i in range(len(flat) // 2)]


def time_rows(model: VLA, t: Tensor) -> Tensor:
    """t [S] -> [S, L*6E + 2E]: every expert block's adaLN vectors (shift1, 1 + scale1, gate1, shift2,
    1 + scale2, gate2), then the final adaLN (shift, 1 + scale): all the t-only work. The "1 +" is folded in
    so that a modulated LayerNorm in the step graph is one LayerNormalization with the row's slices as its
    scale and bias (FoldedStep)."""
    sc = F.silu(model.time_condition(t))
    e = model.config.expert_width
    one = torch.zeros(2 * e)
    one[e:] = 1.0  # per (shift, scale) pair: + 0 on shift, + 1 on scale
    block_one = torch.cat([one, torch.zeros(e), one, torch.zeros(e)])
    return torch.cat([blk.mod(sc) + block_one for blk in model.expert] + [model.final_mod(sc) + one], dim=-1)


def time_row_width(model: VLA) -> int:
    e = model.config.expert_width
    return model.config.expert_depth * 6 * e + 2 * e


def gelu_tanh_sigmoid(u: Tensor) -> Tensor:
    """tanh-GELU as u * sigmoid(u * (A + B u^2)) (A = 2 sqrt(2/pi), B = A * 0.044715), since
    0.5 * (1 + tanh(z)) = sigmoid(2z): 6 nodes instead of 9, same function; the runtime's FastGelu fusion
    matches these constants (edge_vla.runtime.ort_fuse)."""
    return u * torch.sigmoid(u * (GELU_A + GELU_B * (u * u)))


class FoldedStep(nn.Module):
    """The step graph for a time table, written for few, cheap nodes (batch 1, static shapes).

    Same function as VLA.velocity (tests/export: allclose); what differs is only the graph's form:
    - activations are 2-D [T, C]: every Linear is one Gemm (weights pre-transposed, no Reshape around it);
    - the time row [R] is cut by one Split into [E] vectors that broadcast as they are (no Unsqueeze), and
      a modulated LayerNorm is one LayerNormalization with (1 + scale, shift) as its scale and bias;
    - the softmax scale 1/sqrt(d) is folded into the Q weights and bias;
    - heads come out of one Reshape + Transpose (+ one Split for Q/K/V) in the [h, T, d] layout the
      per-layer prefix K/V already have; tanh-GELU is its sigmoid form.
    Everything is plain opset-17 ONNX (TensorRT-lintable); weights are copied at construction.
    """

    def __init__(self, model: VLA) -> None:
        super().__init__()
        cfg = model.config
        self.e, self.heads, self.depth = cfg.expert_width, cfg.expert_heads, cfg.expert_depth
        self.t, self.d = cfg.chunk_len, cfg.action_dim
        self.head_dim = self.e // self.heads
        scale = 1.0 / math.sqrt(self.head_dim)
        e = self.e

        def wt(lin: nn.Linear, mult: Tensor | float = 1.0) -> nn.Parameter:
            return _frozen((lin.weight * mult).t())

        def bias(lin: nn.Linear, mult: Tensor | float = 1.0) -> nn.Parameter:
            return _frozen(lin.bias * mult)

        with torch.no_grad():
            self.w_in = wt(model.action_in)
            self.b_in = bias(model.action_in)
            # Not folded into the Gemm's bias: a [T, E] Gemm bias breaks onnxruntime's INT8 bias quantizer.
            self.pos = _frozen(model.action_pos[0])
            q_mult = torch.ones(3 * e, 1)
            q_mult[:e] = scale
            self.blocks = nn.ModuleList()
            for blk in model.expert:
                b = nn.Module()
                b.w_qkv, b.b_qkv = wt(blk.attn.qkv, mult=q_mult), bias(blk.attn.qkv, q_mult[:, 0])
                b.w_o, b.b_o = wt(blk.attn.out), bias(blk.attn.out)
                b.ln_w, b.ln_b = _frozen(blk.cross_norm.weight), _frozen(blk.cross_norm.bias)
                b.w_q, b.b_q = wt(blk.cross_q, mult=scale), bias(blk.cross_q, scale)
                b.w_co, b.b_co = wt(blk.cross_out), bias(blk.cross_out)
                b.w_1, b.b_1 = wt(blk.mlp[0]), bias(blk.mlp[0])
                b.w_2, b.b_2 = wt(blk.mlp[2]), bias(blk.mlp[2])
                self.blocks.append(b)
            self.w_out, self.b_out = wt(model.action_out), bias(model.action_out)
            self.prefix_emb = None if model.prefix_emb is None else _frozen(model.prefix_emb[0, 0])

    def _heads(self, x: Tensor, n: int) -> Tensor:
        """[T, n*h*d] -> [n*h, T, d]."""
        return x.reshape(self.t, n * self.heads, self.head_dim).transpose(0, 1)

    def _merge(self, y: Tensor) -> Tensor:
        """[h, T, d] or [1, h, T, d] -> [T, h*d]."""
        return y.transpose(-3, -2).reshape(self.t, self.e)

    def forward(self, x_t: Tensor, rows: Tensor, kv: list[tuple[Tensor, Tensor]],
                prefix_mask: Tensor | None = None) -> Tensor:
        e, eps = self.e, LN_EPS
        v = rows.split(e)  # [E] each: per block shift1, scale1, gate1, shift2, scale2, gate2; then shift, scale
        h = torch.addmm(self.b_in, x_t.reshape(self.t, self.d), self.w_in) + self.pos
        if prefix_mask is not None and self.prefix_emb is not None:  # RTC: mark the frozen prefix (VLA.velocity)
            h = h + prefix_mask.reshape(self.t, 1) * self.prefix_emb
        for i, b in enumerate(self.blocks):
            shift1, scale1, gate1, shift2, scale2, gate2 = v[6 * i: 6 * i + 6]
            a = F.layer_norm(h, (e,), scale1, shift1, eps)
            q, k, vv = self._heads(torch.addmm(b.b_qkv, a, b.w_qkv), 3).split(self.heads)
            y = torch.matmul(torch.softmax(torch.matmul(q, k.transpose(1, 2)), dim=-1), vv)
            h = h + gate1 * torch.addmm(b.b_o, self._merge(y), b.w_o)
            c = F.layer_norm(h, (e,), b.ln_w, b.ln_b, eps)
            q = self._heads(torch.addmm(b.b_q, c, b.w_q), 1)
            y = torch.matmul(torch.softmax(torch.matmul(q, kv[i][0].transpose(-2, -1)), dim=-1), kv[i][1])
            h = h + torch.addmm(b.b_co, self._merge(y), b.w_co)
            a = F.layer_norm(h, (e,), scale2, shift2, eps)
            h = h + gate2 * torch.addmm(b.b_2, gelu_tanh_sigmoid(torch.addmm(b.b_1, a, b.w_1)), b.w_2)
        shift, scale = v[6 * self.depth], v[6 * self.depth + 1]
        out = torch.addmm(self.b_out, F.layer_norm(h, (e,), scale, shift, eps), self.w_out)
        return out.reshape(1, self.t, self.d)


def _frozen(t: Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().clone().contiguous(), requires_grad=False)


class PrefixGraph(nn.Module):
    """images, tokens, state -> prefix_k_0, prefix_v_0, ...: VLA.prefix_kv in few plain nodes.

    The observation embedding is the model's own code; the trunk runs on 2-D [P, C] activations (every
    Linear one Gemm, softmax scale folded into Q, heads from one Reshape + Transpose + Split, sigmoid-form
    GELU, as FoldedStep), and every expert layer's cross-attention K/V come out of one Gemm, one Reshape,
    one Transpose and one Split, already in the [1, h, P, d] layout the step graph reads.
    """

    def __init__(self, model: VLA) -> None:
        super().__init__()
        self.model = model
        cfg = model.config
        self.p, self.w, self.heads = cfg.prefix_len, cfg.width, cfg.heads
        self.head_dim = self.w // self.heads
        self.e_heads, self.e_head_dim, self.depth = cfg.expert_heads, cfg.expert_width // cfg.expert_heads, \
            cfg.expert_depth
        scale = 1.0 / math.sqrt(self.head_dim)
        q_mult = torch.ones(3 * self.w)
        q_mult[: self.w] = scale
        with torch.no_grad():
            self.blocks = nn.ModuleList()
            for blk in model.trunk:
                b = nn.Module()
                b.n1_w, b.n1_b = _frozen(blk.norm1.weight), _frozen(blk.norm1.bias)
                b.w_qkv = _frozen((blk.attn.qkv.weight * q_mult[:, None]).t())
                b.b_qkv = _frozen(blk.attn.qkv.bias * q_mult)
                b.w_o, b.b_o = _frozen(blk.attn.out.weight.t()), _frozen(blk.attn.out.bias)
                b.n2_w, b.n2_b = _frozen(blk.norm2.weight), _frozen(blk.norm2.bias)
                b.w_1, b.b_1 = _frozen(blk.mlp[0].weight.t()), _frozen(blk.mlp[0].bias)
                b.w_2, b.b_2 = _frozen(blk.mlp[2].weight.t()), _frozen(blk.mlp[2].bias)
                self.blocks.append(b)
            self.nf_w, self.nf_b = _frozen(model.trunk_norm.weight), _frozen(model.trunk_norm.bias)
            self.w_kv = _frozen(torch.cat([blk.cross_kv.weight for blk in model.expert]).t())  # [w, L * 2E]
            self.b_kv = _frozen(torch.cat([blk.cross_kv.bias for blk in model.expert]))

    def forward(self, images: Tensor, tokens: Tensor, state: Tensor) -> tuple[Tensor, ...]:
        p, w, nh, hd, eps = self.p, self.w, self.heads, self.head_dim, LN_EPS
        h = self.model.prefix_tokens(images, tokens, state).reshape(p, w)
        for b in self.blocks:
            a = F.layer_norm(h, (w,), b.n1_w, b.n1_b, eps)
            q, k, v = torch.addmm(b.b_qkv, a, b.w_qkv).reshape(p, 3 * nh, hd).transpose(0, 1).split(nh)
            y = torch.matmul(torch.softmax(torch.matmul(q, k.transpose(1, 2)), dim=-1), v)
            h = h + torch.addmm(b.b_o, y.transpose(0, 1).reshape(p, w), b.w_o)
            a = F.layer_norm(h, (w,), b.n2_w, b.n2_b, eps)
            h = h + torch.addmm(b.b_2, gelu_tanh_sigmoid(torch.addmm(b.b_1, a, b.w_1)), b.w_2)
        h = F.layer_norm(h, (w,), self.nf_w, self.nf_b, eps)
        kv = torch.addmm(self.b_kv, h, self.w_kv).reshape(1, p, 2 * self.depth * self.e_heads, self.e_head_dim)
        return tuple(kv.transpose(1, 2).split(self.e_heads, dim=1))


class DenoiseStepGraph(nn.Module):
    """x_t, (t [1] | time_cond [R]), [prefix_mask [1, H],] prefix_k_0, prefix_v_0, ... -> velocity."""

    def __init__(self, model: VLA, time_input: str = "scalar") -> None:
        super().__init__()
        self.model = model
        self.time_input = time_input
        self.folded = FoldedStep(model) if time_input == "table" else None
        self.rtc = model.prefix_emb is not None

    def forward(self, x_t: Tensor, time: Tensor, *rest: Tensor) -> Tensor:
        mask, kv = (rest[0], rest[1:]) if self.rtc else (None, rest)
        if self.folded is not None:
            return self.folded(x_t, time, pairs(kv), mask)
        return self.model.velocity(x_t, time, pairs(kv), mask)


class UnrolledChunkGraph(nn.Module):
    """The whole Euler loop in one graph: one call yields a chunk (normalized actions)."""

    def __init__(self, model: VLA, steps: int) -> None:
        super().__init__()
        self.model = model
        self.steps = steps

    def forward(self, images: Tensor, tokens: Tensor, state: Tensor, noise: Tensor) -> Tensor:
        kv = self.model.prefix_kv(images, tokens, state)

        def velocity(x: Tensor, t: float) -> Tensor:
            return self.model.velocity(x, torch.full((x.shape[0],), t, dtype=x.dtype), kv)

        return integrate(velocity, noise, REFERENCE_FLOW, self.steps, "euler")


class StepTime:
    """How the step graph is fed its time: the scalar t, or the row of the time table for t."""

    def __init__(self, model: VLA, kind: str = "scalar") -> None:
        if kind not in TIME_KINDS:
            raise ValueError(f"time input must be one of {TIME_KINDS}, got {kind!r}")
        self.model, self.kind, self.input = model, kind, TIME_INPUT[kind]

    @torch.no_grad()
    def value(self, t: Tensor) -> Tensor:
        """t [S] -> the step input for each t: [S] (scalar) or [S, R] (table)."""
        return t.float() if self.kind == "scalar" else time_rows(self.model, t.float())

    def feed(self, t: float) -> dict[str, np.ndarray]:
        return {self.input: self.value(torch.tensor([t])).numpy().reshape(self.example().shape)}

    def example(self) -> Tensor:
        return torch.zeros(1) if self.kind == "scalar" else torch.zeros(time_row_width(self.model))

    @torch.no_grad()
    def table(self, steps: int) -> np.ndarray:
        """[2N + 1, R] float32: the row for every half-grid time of an N-step schedule (docs/MANIFEST.md)."""
        grid = torch.from_numpy(REFERENCE_FLOW.half_grid(steps)).float()
        return time_rows(self.model, grid).numpy().astype(np.float32)


@dataclass(frozen=True)
class ExportedGraph:
    name: str
    path: Path
    inputs: list[dict]
    outputs: list[dict]


def graph_inputs(model: VLA, time_input: str = "scalar") -> dict[str, tuple[tuple[Tensor, ...], list[str], list[str]]]:
    cfg = model.config
    x = fake_inputs(cfg)
    with torch.no_grad():
        kv = split_kv(model.prefix_kv(x["images"], x["tokens"], x["state"]))
    names = kv_names(model)
    step_time = StepTime(model, time_input)
    # RTC: an example mask with a prefix, so the exporter traces the mask's path (a zero mask would fold away).
    mask = ((torch.arange(cfg.chunk_len) < max(1, cfg.rtc_max_delay)).float().unsqueeze(0),) \
        if model.prefix_emb is not None else ()
    mask_names = [PREFIX_MASK] if mask else []
    return {
        "prefix": ((x["images"], x["tokens"], x["state"]), ["images", "tokens", "state"], names),
        "denoise_step": ((x["noise"], step_time.example(), *mask, *kv), ["x_t", step_time.input, *mask_names, *names],
                         ["velocity"]),
        "chunk": ((x["images"], x["tokens"], x["state"], x["noise"]),
                  ["images", "tokens", "state", "noise"], ["actions"]),
    }


def export_graphs(model: VLA, out_dir: Path, unrolled_steps: int | None = None,
                  time_input: str = "scalar") -> list[ExportedGraph]:
    """Export the FP32 graphs into out_dir; returns their IO specs read back from the ONNX files."""
    model = model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    modules: dict[str, nn.Module] = {"prefix": PrefixGraph(model), "denoise_step": DenoiseStepGraph(model, time_input)}
    if unrolled_steps:
        modules["chunk"] = UnrolledChunkGraph(model, unrolled_steps)
    specs = graph_inputs(model, time_input)
    exported = []
    for name, module in modules.items():
        args, in_names, out_names = specs[name]
        path = out_dir / f"{name}.onnx"
        with torch.no_grad():
            torch.onnx.export(module, args, str(path), input_names=in_names, output_names=out_names,
                              opset_version=OPSET, dynamo=False, do_constant_folding=True)
        onnx.checker.check_model(str(path))
        ins, outs = io_specs(onnx.load(str(path)))
        exported.append(ExportedGraph(name, path, ins, outs))
        log.info("exported %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return exported


def with_roles(graph: str, ios: list[dict]) -> list[dict]:
    """The manifest's IO entries: each with its role; per-layer K/V are role 'prefix' with layer and kv."""
    out = []
    for io in ios:
        name = io["name"]
        if name.startswith("prefix_") and name not in IO_ROLES:
            _, kind, layer = name.split("_")
            out.append(io | {"role": "prefix", "layer": int(layer), "kv": {"k": "key", "v": "value"}[kind]})
        elif name in IO_ROLES:
            out.append(io | {"role": IO_ROLES[name]})
        else:
            raise ValueError(f"graph {graph!r} has IO {name!r} without a known role")
    return out


_DTYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.INT8: "int8",
}


def io_specs(model: onnx.ModelProto) -> tuple[list[dict], list[dict]]:
    def spec(v: onnx.ValueInfoProto) -> dict:
        t = v.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim]
        return {"name": v.name, "shape": shape, "dtype": _DTYPES.get(t.elem_type, str(t.elem_type))}

    inits = {i.name for i in model.graph.initializer}
    return [spec(v) for v in model.graph.input if v.name not in inits], [spec(v) for v in model.graph.output]
