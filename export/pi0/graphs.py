"""π0 as two static-shape ONNX graphs that reproduce `PI0ForConditionalGeneration.sample_actions`.

- prefix: images [1, C, 3, H, W], tokens [1, L] int32, token_mask [1, L] int32
          -> prefix_k_i, prefix_v_i [1, kv_heads, L, head_dim] for every layer the expert reads (after RoPE,
          exactly what π0's DynamicCache holds)
- step:   x_t [1, chunk, A], t [1], state [1, S], token_mask, prefix_k_i, prefix_v_i -> velocity [1, chunk, A]

The wrappers call the transformers modules for every weight-bearing piece (SigLIP tower, projector,
embed_prefix, RMSNorms, projections, RoPE, MLPs, embed_action_time, action_out_proj) and write out only the
attention, with π0's masks made explicit (MatMul + Softmax, which onnxruntime and TensorRT both take):

- prefix: bidirectional over the valid prompt tokens (PaliGemma with token_type_ids = 0),
  positions = cumsum(token_mask) - 1;
- expert: the state token sees the valid prefix and itself; action tokens see the valid prefix, the state and
  every action token; positions continue after the valid prefix.

Only the K/V of the first `dit.num_hidden_layers` language-model layers are used by π0, so the prefix graph
stops there and skips the last layer's attention output and MLP (they influence nothing).
"""

from __future__ import annotations

import io
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
import torch
from torch import Tensor, nn
from transformers.models.gemma.modeling_gemma import apply_rotary_pos_emb

log = logging.getLogger(__name__)

OPSET = 17
_NEG = -1e9  # additive mask value; exp() of it is exactly 0 in float32, and it stays finite in float16 as -inf only


def _attend(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scaling: float, groups: int) -> Tensor:
    """Eager attention as transformers' `eager_attention_forward` does it (GQA by repeating K/V)."""
    if groups > 1 and k.shape[1] > 1:  # one KV head (π0) broadcasts in MatMul without copies
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    w = torch.matmul(q, k.transpose(2, 3)) * scaling + bias
    w = torch.softmax(w.float(), dim=-1).to(q.dtype)
    return torch.matmul(w, v).transpose(1, 2)


def _qkv(layer: nn.Module, h: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    attn = layer.self_attn
    shape = (*h.shape[:-1], -1, attn.head_dim)
    q = attn.q_proj(h).view(shape).transpose(1, 2)
    k = attn.k_proj(h).view(shape).transpose(1, 2)
    v = attn.v_proj(h).view(shape).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q, k, v


def _finish_layer(layer: nn.Module, residual: Tensor, attn_out: Tensor) -> Tensor:
    h = residual + layer.self_attn.o_proj(attn_out.reshape(*residual.shape[:-1], -1))
    return h + layer.mlp(layer.post_attention_layernorm(h))


class Pi0Prefix(nn.Module):
    """images + prompt -> per-layer K/V of the PaliGemma language model."""

    def __init__(self, model: nn.Module, num_cameras: int) -> None:
        super().__init__()
        self.pi0 = model.model
        self.lm = model.model.vlm.language_model
        self.layers = int(model.config.dit_config.num_hidden_layers)
        self.num_cameras = num_cameras

    def forward(self, images: Tensor, tokens: Tensor, token_mask: Tensor) -> list[Tensor]:
        ids = tokens.long()
        mask = token_mask.long()
        h = self._embed_prefix(ids, images)
        pos = mask.cumsum(-1) - 1
        cos, sin = self.lm.rotary_emb(h, pos)
        bias = (1.0 - mask[:, None, None, :].to(h.dtype)) * _NEG
        out: list[Tensor] = []
        for i, layer in enumerate(self.lm.layers[: self.layers]):
            q, k, v = _qkv(layer, layer.input_layernorm(h), cos, sin)
            out += [k, v]
            if i == self.layers - 1:
                break  # the expert reads this layer's K/V only: its output feeds nothing
            a = _attend(q, k, v, bias, layer.self_attn.scaling, layer.self_attn.num_key_value_groups)
            h = _finish_layer(layer, h, a)
        return out


    def _embed_prefix(self, ids: Tensor, images: Tensor) -> Tensor:
        """`PI0Model.embed_prefix` with every camera present, in ops ONNX takes (no CumSum over bool).

        With all cameras present the k-th image token takes the k-th image feature (cameras in order).
        """
        vlm = self.pi0.vlm
        features = vlm.get_image_features(images.flatten(0, 1)).pooler_output  # [C, tokens, D]
        features = features.reshape(1, -1, features.shape[-1])
        is_image = ids == vlm.config.image_token_id
        rank = (is_image.long().cumsum(-1) - 1).clamp(min=0)
        image_embeds = features.gather(1, rank[..., None].expand(-1, -1, features.shape[-1]))
        text_embeds = vlm.get_input_embeddings()(ids.masked_fill(is_image, 0))
        return torch.where(is_image[..., None], image_embeds.to(text_embeds.dtype), text_embeds)


class Pi0Step(nn.Module):
    """One velocity evaluation of the action expert over [prefix K/V; state; actions]."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.embed = model.embed_action_time
        self.dit = model.model.dit
        self.out_proj = model.action_out_proj
        self.chunk = int(model.config.chunk_size)

    def forward(self, x_t: Tensor, t: Tensor, state: Tensor, token_mask: Tensor, *prefix: Tensor) -> Tensor:
        h = self.embed(state, x_t, t)  # [1, 1 + chunk, D]: the state token, then the action tokens
        s = h.shape[1]
        mask = token_mask.long()
        pos = mask.sum(-1, keepdim=True) + torch.arange(s)[None, :]
        cos, sin = self.dit.rotary_emb(h, pos)
        prefix_bias = (1.0 - mask[:, None, None, :].to(h.dtype)) * _NEG  # [1, 1, 1, L]
        # Block mask inside the suffix: the state row sees only itself, action rows see the whole suffix.
        idx = torch.arange(s)
        own = (idx[:, None] > 0) | (idx[None, :] == 0)
        own_bias = torch.where(own, 0.0, _NEG).to(h.dtype)[None, None]  # [1, 1, s, s]
        bias = torch.cat([prefix_bias.expand(-1, -1, s, -1), own_bias], dim=-1)
        for i, layer in enumerate(self.dit.layers):
            q, k, v = _qkv(layer, layer.input_layernorm(h), cos, sin)
            k = torch.cat([prefix[2 * i], k], dim=2)
            v = torch.cat([prefix[2 * i + 1], v], dim=2)
            a = _attend(q, k, v, bias, layer.self_attn.scaling, layer.self_attn.num_key_value_groups)
            h = _finish_layer(layer, h, a)
        h = self.dit.norm(h)
        return self.out_proj(h[:, -self.chunk :])


@dataclass(frozen=True)
class Pi0Shapes:
    num_cameras: int
    image_size: tuple[int, int]
    prompt_len: int
    chunk: int
    action_dim: int
    state_dim: int
    layers: int

    def kv_names(self) -> list[str]:
        return [f"prefix_{kv}_{i}" for i in range(self.layers) for kv in ("k", "v")]


def example_inputs(model: nn.Module, shapes: Pi0Shapes, image_token_id: int, image_seq_len: int
                   ) -> dict[str, Tensor]:
    """Static-shape example inputs (a prompt with the image tokens first, as PI0Processor lays it out)."""
    h, w = shapes.image_size
    tokens = torch.zeros(1, shapes.prompt_len, dtype=torch.int32)
    n_img = shapes.num_cameras * image_seq_len
    tokens[0, :n_img] = image_token_id
    mask = torch.zeros(1, shapes.prompt_len, dtype=torch.int32)
    mask[0, : n_img + 4] = 1
    return {
        "images": torch.zeros(1, shapes.num_cameras, 3, h, w),
        "tokens": tokens,
        "token_mask": mask,
        "x_t": torch.zeros(1, shapes.chunk, shapes.action_dim),
        "t": torch.ones(1),
        "state": torch.zeros(1, shapes.state_dim),
    }


def export_graphs(model: nn.Module, shapes: Pi0Shapes, example: dict[str, Tensor], out_dir: Path,
                  external_data: bool = False) -> dict[str, Path]:
    """Export the FP32 prefix and step graphs into out_dir; returns {"prefix": path, "denoise_step": path}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    prefix = Pi0Prefix(model, shapes.num_cameras).eval()
    step = Pi0Step(model).eval()
    kv_names = shapes.kv_names()
    paths = {"prefix": out_dir / "prefix.onnx", "denoise_step": out_dir / "denoise_step.onnx"}
    with torch.no_grad():
        p_args = (example["images"], example["tokens"], example["token_mask"])
        kv = prefix(*p_args)
        _export(prefix, p_args, ["images", "tokens", "token_mask"], kv_names, paths["prefix"], external_data)
        s_args = (example["x_t"], example["t"], example["state"], example["token_mask"], *kv)
        _export(step, s_args, ["x_t", "t", "state", "token_mask", *kv_names], ["velocity"], paths["denoise_step"],
                external_data)
    return paths


def _export(module: nn.Module, args: tuple, inputs: list[str], outputs: list[str], path: Path,
            external_data: bool) -> None:
    if external_data:
        # Over 2 GB (the full π0) the TorchScript exporter writes one file per tensor beside the graph (under
        # 2 GB it keeps them inline, whatever its external_data flag says); gather them into `<graph>.onnx.data`
        # (what the bundle ships), one tensor at a time. No constant
        # folding in the exporter: with the model alive it would add a transposed copy of nearly every weight
        # (+11 GB for π0's prefix); the gather folds those weight Transposes itself, tensor by tensor.
        scratch = path.parent / f".{path.stem}-tensors"
        scratch.mkdir(exist_ok=True)
        # A graph under 2 GB (π0's step: 1.26 GB) is still folded: the copies are affordable, and ONNX shape
        # inference resolves fewer dims in an unfolded graph (the roofline's FLOP count reads them).
        fold = sum(p.numel() * p.element_size() for p in _graph_params(module)) < FOLD_MAX_BYTES
        try:
            torch.onnx.export(module, args, str(scratch / path.name), input_names=inputs, output_names=outputs,
                              opset_version=OPSET, dynamo=False, do_constant_folding=fold, external_data=True)
            gather_external_data(scratch / path.name, path)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    else:
        torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs, opset_version=OPSET,
                          dynamo=False, do_constant_folding=True)
    onnx.checker.check_model(str(path))
    drop_noop_casts(path)
    separate_consumed_outputs(path)
    clamp_slice_bounds(path)
    log.info("exported %s (%.1f MB)", path, path.stat().st_size / 1e6)


FOLD_MAX_BYTES = 2_000_000_000  # external-data graphs with more weights than this skip the exporter's constant folding


def _graph_params(module: nn.Module) -> list[Tensor]:
    """The weights a wrapper's graph holds: Pi0Prefix keeps a handle on the whole π0 but reads no expert
    weight; the expert's token embedding (Gemma's default 256,000 x 1024, 1 GB at full size) feeds nothing."""
    unused = ("pi0.dit.",) if isinstance(module, Pi0Prefix) else ("dit.embed_tokens.",)
    return [p for n, p in module.named_parameters() if not n.startswith(unused)]


# onnx's allocation granularity for external data: onnxruntime maps a tensor stored at an aligned offset
# straight from the file instead of reading it into a heap buffer.
_ALIGN = 65536
_COPY_CHUNK = 64 << 20


def _foldable_transposes(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """{initializer name: its Transpose node} for weights read only by one Transpose (what the TorchScript
    exporter writes for `x @ W.T` when it does not fold constants)."""
    inits = {i.name for i in graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            if name in inits:
                readers.setdefault(name, []).append(node)
    graph_io = {v.name for v in [*graph.input, *graph.output]}
    return {name: nodes[0] for name, nodes in readers.items()
            if len(nodes) == 1 and nodes[0].op_type == "Transpose" and name not in graph_io
            and nodes[0].output[0] not in graph_io}


def gather_external_data(src: Path, dst: Path, min_bytes: int = 1024) -> int:
    """Write graph `src` as `dst` + `dst.onnx.data`, one tensor at a time (the model's weights are never all in
    memory), at 64 KiB-aligned offsets. Takes initializers stored in files beside `src` (torch writes one file
    per tensor when the graph is over 2 GB) or inline (under 2 GB torch keeps them in the graph; those of
    min_bytes or more move to the data file). A weight read only by a Transpose is written transposed and the
    Transpose dropped: the constant folding the exporter skipped. Returns the number of Transposes folded."""
    model = onnx.load(str(src), load_external_data=False)
    graph = model.graph
    fold = _foldable_transposes(graph)
    folded = 0
    data_name = dst.name + ".data"
    with open(dst.parent / data_name, "wb") as out:
        for tensor in graph.initializer:
            external = tensor.data_location == onnx.TensorProto.EXTERNAL
            if not external and (not tensor.HasField("raw_data") or len(tensor.raw_data) < min_bytes):
                continue
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
            info = {e.key: e.value for e in tensor.external_data}
            length = (int(info["length"]) if "length" in info else math.prod(tensor.dims) * dtype.itemsize) \
                if external else len(tensor.raw_data)
            out.write(b"\0" * ((-out.tell()) % _ALIGN))
            pos = out.tell()
            with open(src.parent / info["location"], "rb") if external else io.BytesIO(tensor.raw_data) as f:
                f.seek(int(info.get("offset", 0)))
                if tensor.name in fold:  # one weight matrix at a time (the largest: 134 MB at π0's widths)
                    node = fold[tensor.name]
                    perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
                    arr = np.frombuffer(f.read(length), dtype=dtype).reshape(tuple(tensor.dims))
                    arr = np.ascontiguousarray(arr.transpose(perm))
                    out.write(arr.tobytes())
                    del tensor.dims[:]
                    tensor.dims.extend(arr.shape)
                    tensor.name = node.output[0]  # readers of the Transpose now read the transposed weight
                    node.op_type = ""  # marked for removal
                    folded += 1
                    del arr
                else:
                    _copy(f, out, length, tensor.name)
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
            del tensor.external_data[:]
            for key, value in (("location", data_name), ("offset", str(pos)), ("length", str(length))):
                tensor.external_data.add(key=key, value=value)
    if folded:
        keep = [n for n in graph.node if n.op_type]
        del graph.node[:]
        graph.node.extend(keep)
    onnx.save(model, str(dst))
    return folded


def _copy(src: BinaryIO, dst: BinaryIO, length: int, what: str) -> None:
    left = length
    while left:
        chunk = src.read(min(left, _COPY_CHUNK))
        if not chunk:
            raise OSError(f"the data of tensor {what} ends {left} bytes early; re-export the graph")
        dst.write(chunk)
        left -= len(chunk)


def _load_graph(path: Path) -> onnx.ModelProto:
    """The graph without its external weights (they stay in their file; node edits do not touch them)."""
    return onnx.load(str(path), load_external_data=False)


def drop_noop_casts(path: Path) -> int:
    """Remove Cast nodes whose input already has the target type (the tracer records every `.to(dtype)` and
    `.float()`); onnxconverter-common would otherwise mistype them when converting to FP16. Returns the count."""
    model = _load_graph(path)
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in
             [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    outputs = {o.name for o in model.graph.output}
    rename: dict[str, str] = {}
    keep = []
    for node in model.graph.node:
        to = next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None
        src = rename.get(node.input[0], node.input[0]) if node.input else None
        if to is not None and types.get(src) == to and node.output[0] not in outputs:
            rename[node.output[0]] = src
            continue
        keep.append(node)
    for node in keep:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    dropped = len(model.graph.node) - len(keep)
    if dropped:
        del model.graph.node[:]
        model.graph.node.extend(keep)
        onnx.save(model, str(path))
        onnx.checker.check_model(str(path))
    return dropped


def to_fp16(src: Path, dst: Path) -> Path:
    """The project's FP16 conversion (export.quantize.to_fp16), then Cast nodes retargeted to the type the
    converter gave their outputs: onnxconverter-common turns a Cast's output to float16 (int64 positions ->
    float RoPE angles, kept in FP16) without changing its `to` attribute, which onnxruntime refuses."""
    from .. import quantize

    quantize.to_fp16(src, dst)
    model = onnx.load(str(dst))
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    changed = 0
    for node in model.graph.node:
        if node.op_type != "Cast" or node.output[0] not in types:
            continue
        for a in node.attribute:
            if a.name == "to" and a.i != types[node.output[0]]:
                a.i = types[node.output[0]]
                changed += 1
    if changed:
        onnx.save(model, str(dst))
    onnx.checker.check_model(str(dst))
    return dst


def separate_consumed_outputs(path: Path) -> int:
    """Give every graph output that other nodes also read its own Identity: the FP16 converter (keep_io_types)
    mistypes an output tensor that is consumed inside the graph (π0's K/V feed the next attention)."""
    model = _load_graph(path)
    outputs = {o.name for o in model.graph.output}
    consumed = {i for n in model.graph.node for i in n.input} & outputs
    for name in sorted(consumed):
        inner = f"{name}__inner"
        for node in model.graph.node:
            node.output[:] = [inner if o == name else o for o in node.output]
            node.input[:] = [inner if i == name else i for i in node.input]
        model.graph.node.append(onnx.helper.make_node("Identity", [inner], [name], name=f"{name}__out"))
    if consumed:
        onnx.save(model, str(path))
        onnx.checker.check_model(str(path))
    return len(consumed)


_I32 = (-(2**31), 2**31 - 1)


def clamp_slice_bounds(path: Path) -> int:
    """Clamp Slice starts/ends like `x[..., d:]` (end = INT64_MAX) into the INT32 range TensorRT takes; Slice
    clamps bounds to the dimension anyway, so the graph computes the same. Returns the count changed."""
    import numpy as np
    from onnx import numpy_helper

    model = _load_graph(path)
    consts = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}
    inits = {i.name: i for i in model.graph.initializer}
    changed = 0
    for node in model.graph.node:
        if node.op_type != "Slice":
            continue
        for name in node.input[1:3]:
            tensor = None
            if name in consts:
                tensor = next(a.t for a in consts[name].attribute if a.name == "value")
            elif name in inits:
                tensor = inits[name]
            if tensor is None:
                continue
            arr = numpy_helper.to_array(tensor)
            if arr.dtype == np.int64 and (arr.min() < _I32[0] or arr.max() > _I32[1]):
                tensor.CopyFrom(numpy_helper.from_array(np.clip(arr, *_I32).astype(np.int64), tensor.name))
                changed += 1
    if changed:
        onnx.save(model, str(path))
        onnx.checker.check_model(str(path))
    return changed
