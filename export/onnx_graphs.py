"""Split the policy into the graphs deployment needs, and export them to ONNX (docs/MANIFEST.md).

- prefix:       images, tokens, state -> prefix_k_i, prefix_v_i for every expert layer i (cross-attention K/V)
- denoise_step: x_t, t (or time_cond, a row of the time-conditioning table), prefix_k_i, prefix_v_i -> velocity
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edge_vla.runtime.flow import REFERENCE_FLOW, integrate

from .model import VLA, attention, fake_inputs, merge_heads, modulate, split_heads

log = logging.getLogger(__name__)

OPSET = 17
TIME_KINDS = ("scalar", "table")
TIME_INPUT = {"scalar": "t", "table": "time_cond"}
IO_ROLES = {"images": "images", "tokens": "tokens", "state": "state", "x_t": "x_t", "t": "time",
            "time_cond": "time_cond", "noise": "noise", "velocity": "velocity", "actions": "actions"}
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
    """t [S] -> [S, L*6E + 2E]: every expert block's adaLN vectors, then the final adaLN (t-only work)."""
    sc = F.silu(model.time_condition(t))
    return torch.cat([blk.mod(sc) for blk in model.expert] + [model.final_mod(sc)], dim=-1)


def time_row_width(model: VLA) -> int:
    e = model.config.expert_width
    return model.config.expert_depth * 6 * e + 2 * e


def velocity_from_rows(model: VLA, x_t: Tensor, rows: Tensor, kv: list[tuple[Tensor, Tensor]]) -> Tensor:
    """VLA.velocity with the t-only part given as `rows` (see time_rows); same block math."""
    e = model.config.expert_width
    h = model.action_in(x_t) + model.action_pos
    for i, blk in enumerate(model.expert):
        shift1, scale1, gate1, shift2, scale2, gate2 = rows[:, 6 * e * i: 6 * e * (i + 1)].chunk(6, dim=-1)
        h = h + gate1.unsqueeze(1) * blk.attn(modulate(h, shift1, scale1))
        q = split_heads(blk.cross_q(blk.cross_norm(h)), blk.heads)
        h = h + blk.cross_out(merge_heads(attention(q, kv[i][0], kv[i][1], blk.scale)))
        h = h + gate2.unsqueeze(1) * blk.mlp(modulate(h, shift2, scale2))
    end = 6 * e * len(model.expert)  # explicit slice ends: an open end exports INT64_MAX, which TensorRT rejects
    shift, scale = rows[:, end: end + 2 * e].chunk(2, dim=-1)
    return model.action_out(modulate(h, shift, scale))


class PrefixGraph(nn.Module):
    def __init__(self, model: VLA) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor, tokens: Tensor, state: Tensor) -> tuple[Tensor, ...]:
        prefix = self.model.embed_prefix(images, tokens, state)
        kv = [blk.prefix_kv(prefix) for blk in self.model.expert]  # each [2, B, h, P, d]
        return tuple(t for layer in kv for t in (layer[0], layer[1]))


class DenoiseStepGraph(nn.Module):
    """x_t, (t [1] | time_cond [1, R]), prefix_k_0, prefix_v_0, ... -> velocity."""

    def __init__(self, model: VLA, time_input: str = "scalar") -> None:
        super().__init__()
        self.model = model
        self.time_input = time_input

    def forward(self, x_t: Tensor, time: Tensor, *kv: Tensor) -> Tensor:
        if self.time_input == "table":
            return velocity_from_rows(self.model, x_t, time, pairs(kv))
        return self.model.velocity(x_t, time, pairs(kv))


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
        return torch.zeros(1) if self.kind == "scalar" else torch.zeros(1, time_row_width(self.model))

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
    return {
        "prefix": ((x["images"], x["tokens"], x["state"]), ["images", "tokens", "state"], names),
        "denoise_step": ((x["noise"], step_time.example(), *kv), ["x_t", step_time.input, *names], ["velocity"]),
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
        if name.startswith("prefix_"):
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
