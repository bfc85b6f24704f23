"""π0 graphs with external data (the full 3.3B π0 path, docs/PI0.md), checked on the tiny π0: the streaming
gather, the weight-Transpose folding it does instead of the exporter, and a bundle exported without the
numerics comparison."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from edge_vla.bundle import Bundle  # noqa: E402
from edge_vla.export.pi0 import graphs as pi0_graphs  # noqa: E402
from edge_vla.export.pi0.checkpoint import open_pi0  # noqa: E402
from edge_vla.export.pi0.exporter import Pi0ExportOptions, make_plan  # noqa: E402
from edge_vla.export.pi0.graphs import _ALIGN, example_inputs, export_graphs  # noqa: E402
from edge_vla.export.pi0.testing import make_checkpoint  # noqa: E402
from edge_vla.runtime import roofline  # noqa: E402


@pytest.fixture(scope="module")
def pi0_dir(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return make_checkpoint(tmp_path_factory.mktemp("pi0") / "ckpt", num_cameras=1, state_dim=3, action_dim=3,
                           max_shard_size="200KB")


@pytest.fixture(scope="module")
def graphs(pi0_dir, tmp_path_factory) -> dict[str, dict[str, Path]]:
    """inline; external (small graphs: folded by the exporter, then gathered); unfolded (the full π0's prefix
    path: no exporter folding, the gather folds the weight Transposes)."""
    src = open_pi0(pi0_dir)
    model = src.load_model()
    plan = make_plan(src, model, Pi0ExportOptions())
    example = example_inputs(model, plan.shapes, int(model.config.vlm_config.image_token_id),
                             plan.layout.image_seq_len)
    root = tmp_path_factory.mktemp("graphs")
    out = {"inline": export_graphs(model, plan.shapes, example, root / "inline"),
           "external": export_graphs(model, plan.shapes, example, root / "external", external_data=True)}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pi0_graphs, "FOLD_MAX_BYTES", 0)
        out["unfolded"] = export_graphs(model, plan.shapes, example, root / "unfolded", external_data=True)
    return out


def _run(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})


def test_sharded_checkpoint_loads(pi0_dir):
    assert (pi0_dir / "model.safetensors.index.json").is_file()


@pytest.mark.parametrize("kind", ["external", "unfolded"])
def test_external_graphs_compute_what_inline_graphs_compute(graphs, kind):
    g = np.random.default_rng(0)
    inline, external = graphs["inline"], graphs[kind]
    prefix_in = onnx.load(str(inline["prefix"]), load_external_data=False).graph.input
    feeds = {}
    for v in prefix_in:
        shape = [d.dim_value for d in v.type.tensor_type.shape.dim]
        feeds[v.name] = (g.standard_normal(shape).astype(np.float32) if v.name == "images"
                         else np.ones(shape, np.int32))
    feeds["tokens"][:] = 5
    kv_in, kv_ex = _run(inline["prefix"], feeds), _run(external["prefix"], feeds)
    for a, b in zip(kv_in, kv_ex, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    kv_names = [o.name for o in onnx.load(str(inline["prefix"]), load_external_data=False).graph.output]
    step = dict(feeds, **dict(zip(kv_names, kv_in, strict=True)),
                x_t=g.standard_normal((1, 8, 8)).astype(np.float32), t=np.full((1,), 0.7, np.float32),
                state=g.standard_normal((1, 8)).astype(np.float32))
    np.testing.assert_allclose(_run(external["denoise_step"], step)[0], _run(inline["denoise_step"], step)[0],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["external", "unfolded"])
def test_gather_writes_one_aligned_data_file_and_removes_the_scratch(graphs, kind):
    for name, path in graphs[kind].items():
        data = path.with_name(path.name + ".data")
        assert data.is_file() and data.stat().st_size > 0
        assert sorted(p.name for p in path.parent.iterdir()) == sorted(
            f"{n}.onnx{ext}" for n in graphs[kind] for ext in ("", ".data"))  # no scratch left
        model = onnx.load(str(path), load_external_data=False)
        external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        assert external, name
        for t in external:
            info = {e.key: e.value for e in t.external_data}
            assert info["location"] == data.name and int(info["offset"]) % _ALIGN == 0
        # Folded by the exporter or, with its folding off, by the gather: no Transpose reads a weight.
        inits = {t.name for t in model.graph.initializer}
        assert not [n for n in model.graph.node if n.op_type == "Transpose" and n.input[0] in inits], name


@pytest.mark.parametrize("name", ["prefix", "denoise_step"])
def test_roofline_counts_external_graphs_without_their_weights(graphs, name):
    inline = roofline.graph_cost(graphs["inline"][name])
    external = roofline.graph_cost(graphs["external"][name])
    # The same weights (the inline graph also holds a few small constants the exporter folded).
    assert external.flops == pytest.approx(inline.flops)
    assert external.weight_bytes == pytest.approx(inline.weight_bytes, rel=0.01)


def test_cli_external_data_without_numerics_check_says_so_and_runs(pi0_dir, tmp_path, capsys):
    from edge_vla.cli import main
    from edge_vla.runtime.policy import Policy
    from edge_vla.runtime.types import Observation

    out = tmp_path / "bundle"
    assert main(["export", str(pi0_dir), "-o", str(out), "--external-data", "--skip-numerics"]) == 0
    assert "numerics fp32: SKIPPED" in capsys.readouterr().out
    manifest = Bundle.open(out).manifest  # hashes check out
    assert manifest["numerics"]["passed"] is None
    assert "graphs/prefix.onnx.data" in manifest["files"] and "graphs/denoise_step.onnx.data" in manifest["files"]
    g = np.random.default_rng(1)
    obs = Observation([g.integers(0, 256, (60, 80, 3), dtype=np.uint8)], "pick up the red block",
                      np.zeros(3, np.float32))
    with Policy.load(out, backend="onnxruntime", threads=1) as policy:
        chunk = policy.infer(obs)
    assert chunk.actions.shape == (8, 3) and np.isfinite(chunk.actions).all()


def test_cli_pi0_only_flags_are_refused_for_other_checkpoints(tmp_path, capsys):
    from edge_vla.cli import main

    assert main(["export", str(tmp_path), "-o", str(tmp_path / "b"), "--skip-numerics"]) == 1
    assert "for transformers π0 checkpoints only" in capsys.readouterr().err


def test_gather_folds_weight_transposes_the_exporter_left(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 16)).eval()
    x = torch.randn(1, 5, 64)
    src = tmp_path / "src.onnx"
    torch.onnx.export(net, (x,), str(src), input_names=["x"], output_names=["y"], opset_version=17, dynamo=False,
                      do_constant_folding=False)
    assert [n.op_type for n in onnx.load(str(src)).graph.node].count("Transpose") == 2
    dst = tmp_path / "dst.onnx"
    assert pi0_graphs.gather_external_data(src, dst) == 2
    model = onnx.load(str(dst), load_external_data=False)
    assert "Transpose" not in [n.op_type for n in model.graph.node]
    assert sorted(list(t.dims) for t in model.graph.initializer if len(t.dims) == 2) == [[64, 128], [128, 16]]
    with torch.no_grad():
        want = net(x).numpy()
    np.testing.assert_allclose(_run(dst, {"x": x.numpy()})[0], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["inline", "external", "unfolded"])
def test_roofline_flops_match_torch_flop_counter(pi0_dir, graphs, kind):
    """graph_cost of the exported π0 graphs = torch's FlopCounterMode on the wrapped modules (matmuls and the
    patch conv). Before symbolic dims were resolved, the prefix's o_proj K and attention head counts were
    taken as 1 (the full π0's prefix was counted ~5% low)."""
    from torch.utils.flop_counter import FlopCounterMode

    src = open_pi0(pi0_dir)
    model = src.load_model()
    model.set_attn_implementation("eager")  # FlopCounterMode does not count CPU SDPA (SigLIP's attention)
    plan = make_plan(src, model, Pi0ExportOptions())
    ex = example_inputs(model, plan.shapes, int(model.config.vlm_config.image_token_id), plan.layout.image_seq_len)
    with torch.no_grad(), FlopCounterMode(display=False) as prefix_count:
        kv = pi0_graphs.Pi0Prefix(model, plan.shapes.num_cameras).eval()(ex["images"], ex["tokens"], ex["token_mask"])
    with torch.no_grad(), FlopCounterMode(display=False) as step_count:
        pi0_graphs.Pi0Step(model).eval()(ex["x_t"], ex["t"], ex["state"], ex["token_mask"], *kv)
    # The last prefix layer's q_proj runs in torch, but feeds nothing: the exporter drops it.
    q = model.model.vlm.language_model.layers[plan.shapes.layers - 1].self_attn.q_proj
    dead_q = 2 * ex["tokens"].shape[1] * q.in_features * q.out_features
    expected = {"prefix": prefix_count.get_total_flops() - dead_q, "denoise_step": step_count.get_total_flops()}
    for name, flops in expected.items():
        cost = roofline.graph_cost(graphs[kind][name])
        assert cost.approximate_nodes == 0, name
        assert cost.flops == flops, name
