"""The exported graphs' form: the same function as the PyTorch model, in few plain-ONNX nodes (issue 17)."""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx
import pytest
import torch

from edge_vla.export.model import fake_inputs
from edge_vla.export.onnx_graphs import FoldedStep, export_graphs, pairs, split_kv, time_rows


@pytest.fixture(scope="module")
def graphs(tmp_path_factory, tiny_model):
    return {g.name: g.path for g in export_graphs(tiny_model, tmp_path_factory.mktemp("graphs"), None, "table")}


def test_folded_step_is_the_models_velocity(tiny_model):
    x = fake_inputs(tiny_model.config, seed=3)
    step = FoldedStep(tiny_model)
    with torch.no_grad():
        kv = pairs(split_kv(tiny_model.prefix_kv(x["images"], x["tokens"], x["state"])))
        for t in (0.0, 0.37, 0.95):
            tt = torch.tensor([t])
            want = tiny_model.velocity(x["noise"], tt, kv)
            got = step(x["noise"], time_rows(tiny_model, tt)[0], kv)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_step_graph_has_no_shape_churn(graphs):
    """The t-only vectors broadcast as they come (no Unsqueeze/Slice), Linear layers are bare Gemms and the
    graph stays plain ONNX (TensorRT-lintable). Before issue 17: 303 nodes, 14 Unsqueeze, 23 Slice."""
    model = onnx.load(str(graphs["denoise_step"]))
    ops = collections.Counter(n.op_type for n in model.graph.node if n.op_type not in ("Constant", "Identity"))
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    assert ops["Unsqueeze"] == ops["Slice"] == ops["Tanh"] == 0, ops
    cfg_depth = 2
    assert ops["LayerNormalization"] == 3 * cfg_depth + 1
    assert sum(ops.values()) <= 40 * cfg_depth + 8, ops


def test_step_graph_runs_like_the_model_in_onnxruntime(graphs, tiny_model):
    import onnxruntime as ort

    x = fake_inputs(tiny_model.config, seed=4)
    with torch.no_grad():
        kv = split_kv(tiny_model.prefix_kv(x["images"], x["tokens"], x["state"]))
        tt = torch.tensor([0.6])
        want = tiny_model.velocity(x["noise"], tt, pairs(kv)).numpy()
        rows = time_rows(tiny_model, tt)[0].numpy()
    sess = ort.InferenceSession(str(graphs["denoise_step"]), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    feeds = dict(zip(names, [x["noise"].numpy(), rows, *(k.numpy() for k in kv)], strict=True))
    np.testing.assert_allclose(sess.run(None, feeds)[0], want, rtol=1e-4, atol=1e-5)


def test_prefix_graph_is_the_models_prefix_kv(tiny_model, graphs):
    from edge_vla.export.onnx_graphs import PrefixGraph

    x = fake_inputs(tiny_model.config, seed=5)
    with torch.no_grad():
        want = split_kv(tiny_model.prefix_kv(x["images"], x["tokens"], x["state"]))
        got = PrefixGraph(tiny_model)(x["images"], x["tokens"], x["state"])
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    # All expert layers' K/V from one Gemm + Reshape + Transpose + Split (before: 14 nodes per layer).
    model = onnx.load(str(graphs["prefix"]))
    ops = collections.Counter(n.op_type for n in model.graph.node)
    assert ops["Squeeze"] == ops["Tanh"] == 0 and ops["Split"] == 1 + tiny_model.config.depth, ops


def test_a_bundle_with_the_earlier_table_layout_still_runs(tiny_bundle, tiny_model, tmp_path):
    """Bundles exported before the folded layout carry [1, R] rows of raw adaLN scales and a step graph that
    adds the 1 itself; the runtime treats rows as opaque, so such a bundle loads and gives the same actions."""
    import io

    from edge_vla.bundle import Bundle, write_bundle
    from edge_vla.export.onnx_graphs import kv_names, time_row_width
    from edge_vla.runtime.policy import Policy
    from edge_vla.runtime.types import Observation

    e, depth = tiny_model.config.expert_width, tiny_model.config.expert_depth
    one = torch.cat([torch.cat([torch.zeros(e), torch.ones(e), torch.zeros(e)] * 2)] * depth
                    + [torch.zeros(e), torch.ones(e)])  # what time_rows adds to the raw adaLN vectors

    class EarlierStep(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.step = FoldedStep(tiny_model)

        def forward(self, x_t, time_cond, *kv):
            return self.step(x_t, time_cond[0] + one, pairs(kv))

    b = Bundle.open(tiny_bundle)
    files: dict = {rel: b.root / rel for rel in b.manifest["files"]}
    x = fake_inputs(tiny_model.config)
    with torch.no_grad():
        kv = split_kv(tiny_model.prefix_kv(x["images"], x["tokens"], x["state"]))
    step_path = tmp_path / "step.onnx"
    torch.onnx.export(EarlierStep(), (x["noise"], torch.zeros(1, time_row_width(tiny_model)), *kv), str(step_path),
                      input_names=["x_t", "time_cond", *kv_names(tiny_model)], output_names=["velocity"],
                      opset_version=17, dynamo=False)
    files["graphs/denoise_step.onnx"] = step_path
    manifest = json.loads(json.dumps(b.manifest))
    for spec in manifest["graphs"]["denoise_step"]["inputs"]:
        if spec["name"] == "time_cond":
            spec["shape"] = [1, time_row_width(tiny_model)]
    for rel in manifest["sampler"]["time_input"]["tables"].values():
        raw = (np.load(b.root / rel) - one.numpy())[:, None, :].astype(np.float32)
        buf = io.BytesIO()
        np.save(buf, raw, allow_pickle=False)
        files[rel] = buf.getvalue()
    earlier = write_bundle(tmp_path / "earlier", manifest, files)
    rng = np.random.default_rng(0)
    cfg = tiny_model.config
    obs = Observation(images=[rng.integers(0, 255, (cfg.image_size, cfg.image_size, 3), dtype=np.uint8)],
                      instruction="reach the red block", state=np.zeros(cfg.state_dim, np.float32))
    with Policy.load(tiny_bundle, seed=3) as now, Policy.load(earlier, seed=3) as before:
        np.testing.assert_allclose(before.infer(obs).actions, now.infer(obs).actions, rtol=1e-5, atol=1e-5)
