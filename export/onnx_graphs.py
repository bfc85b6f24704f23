"""Split the policy into the graphs deployment needs, and export them to ONNX.

- prefix:       images, tokens, state -> prefix_kv (every expert layer's cross-attention K/V)
- denoise_step: x_t, t, prefix_kv -> velocity
- chunk:        (optional) images, tokens, state, noise -> normalized actions, with N Euler steps unrolled

Static shapes (batch 1) by default, because TensorRT builds its best engines for them. Opset 17 is
parsed by TensorRT 10.3 (JetPack 6) and 11 (JetPack 7) and has LayerNormalization; attention is
exported as MatMul + Softmax, which both onnxruntime and TensorRT's parser take.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import Tensor, nn

from .model import VLA, fake_inputs

log = logging.getLogger(__name__)

OPSET = 17


class PrefixGraph(nn.Module):
    def __init__(self, model: VLA) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor, tokens: Tensor, state: Tensor) -> Tensor:
        return self.model.prefix_kv(images, tokens, state)


class DenoiseStepGraph(nn.Module):
    def __init__(self, model: VLA) -> None:
        super().__init__()
        self.model = model

    def forward(self, x_t: Tensor, t: Tensor, prefix_kv: Tensor) -> Tensor:
        return self.model.velocity(x_t, t, prefix_kv)


class UnrolledChunkGraph(nn.Module):
    """The whole Euler loop in one graph: one call yields a chunk (normalized actions)."""

    def __init__(self, model: VLA, steps: int) -> None:
        super().__init__()
        self.model = model
        self.steps = steps

    def forward(self, images: Tensor, tokens: Tensor, state: Tensor, noise: Tensor) -> Tensor:
        kv = self.model.prefix_kv(images, tokens, state)
        x, dt = noise, 1.0 / self.steps
        for i in range(self.steps):
            t = torch.full((x.shape[0],), i * dt, dtype=x.dtype)
            x = x + dt * self.model.velocity(x, t, kv)
        return x


@dataclass(frozen=True)
class ExportedGraph:
    name: str
    path: Path
    inputs: list[dict]
    outputs: list[dict]


def graph_inputs(model: VLA) -> dict[str, tuple[tuple[Tensor, ...], list[str], list[str]]]:
    cfg = model.config
    x = fake_inputs(cfg)
    with torch.no_grad():
        kv = model.prefix_kv(x["images"], x["tokens"], x["state"])
    return {
        "prefix": ((x["images"], x["tokens"], x["state"]), ["images", "tokens", "state"], ["prefix_kv"]),
        "denoise_step": ((x["noise"], torch.zeros(1), kv), ["x_t", "t", "prefix_kv"], ["velocity"]),
        "chunk": ((x["images"], x["tokens"], x["state"], x["noise"]),
                  ["images", "tokens", "state", "noise"], ["actions"]),
    }


def export_graphs(model: VLA, out_dir: Path, unrolled_steps: int | None = None) -> list[ExportedGraph]:
    """Export the FP32 graphs into out_dir; returns their IO specs read back from the ONNX files."""
    model = model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    modules: dict[str, nn.Module] = {"prefix": PrefixGraph(model), "denoise_step": DenoiseStepGraph(model)}
    if unrolled_steps:
        modules["chunk"] = UnrolledChunkGraph(model, unrolled_steps)
    specs = graph_inputs(model)
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
