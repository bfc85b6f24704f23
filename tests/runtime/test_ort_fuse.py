"""onnxruntime-only load-time fusions (edge_vla.runtime.ort_fuse): same outputs, fewer nodes, safe fallback."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edge_vla.errors import BundleError
from edge_vla.runtime import ort_backend
from edge_vla.runtime.onnx_proto import load_model
from edge_vla.runtime.ort_backend import OrtBackend, fuse_kinds
from edge_vla.runtime.ort_fuse import KINDS, fuse, fuse_file


def _feeds(sess: ort.InferenceSession, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for i in sess.get_inputs():
        if "int32" in i.type:
            out[i.name] = rng.integers(2, 200, i.shape).astype(np.int32)
        elif i.name == "images":
            out[i.name] = rng.random(i.shape).astype(np.float32)
        else:
            out[i.name] = (rng.standard_normal(i.shape) * 0.5).astype(np.float32)
    return out


@pytest.mark.parametrize("graph", ["prefix", "denoise_step"])
@pytest.mark.parametrize("kinds", [("gelu",), ("attention",), KINDS])
def test_fused_graph_computes_the_same(tiny_bundle, graph, kinds):
    path = tiny_bundle / "graphs" / f"{graph}.onnx"
    fused, report = fuse_file(path, kinds)
    assert fused is not None and report.nodes_after < report.nodes_before
    assert report.gelu == (2 if "gelu" in kinds else 0)
    assert report.attention == ((4 if graph == "denoise_step" else 2) if "attention" in kinds else 0)
    plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    sess = ort.InferenceSession(fused, providers=["CPUExecutionProvider"])
    feeds = _feeds(plain)
    for want, got in zip(plain.run(None, feeds), sess.run(None, feeds), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_a_graph_without_the_patterns_is_left_alone():
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])
    model = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Sigmoid", ["x"], ["s"]), onnx.helper.make_node("Mul", ["x", "s"], ["y"])],
        "silu", [x], [y]))  # SiLU: a Sigmoid and a Mul, but not the GELU pattern
    parsed = load_model(model.SerializeToString())
    out, report = fuse(parsed)
    assert out is parsed and not report.changed


def test_backend_fuses_by_default_and_matches_the_plain_graphs(tiny_bundle):
    paths = (tiny_bundle / "graphs/prefix.onnx", tiny_bundle / "graphs/denoise_step.onnx")
    results = []
    for fuse_arg in (None, "none"):
        with OrtBackend(*paths, threads=1, providers=["CPUExecutionProvider"], fuse=fuse_arg) as b:
            for name, value in _feeds(b.prefix_sess, 1).items():
                b.buffer(name)[...] = value
            b.run_prefix()
            b.buffer("x_t")[...] = 0.3
            b.buffer("time_cond")[...] = np.linspace(-1, 1, b.buffer("time_cond").size).astype(np.float32)
            b.run_step(None)
            results.append((b.fused, b.buffer("velocity").copy()))
    (fused, v_fused), (plain, v_plain) = results
    assert fused["step"] is not None and fused["step"].gelu == 2 and plain == {"prefix": None, "step": None}
    np.testing.assert_allclose(v_fused, v_plain, rtol=1e-5, atol=1e-6)


def test_a_failing_rewrite_falls_back_to_the_plain_graph(tiny_bundle, monkeypatch, caplog):
    def broken(path, kinds):
        raise ValueError("synthetic")

    monkeypatch.setattr(ort_backend, "fuse_file", broken)
    with caplog.at_level(logging.WARNING, logger="edge_vla.runtime.ort_backend"):
        b = OrtBackend(tiny_bundle / "graphs/prefix.onnx", tiny_bundle / "graphs/denoise_step.onnx", threads=1,
                       providers=["CPUExecutionProvider"], fuse="gelu")
    b.close()
    assert b.fused == {"prefix": None, "step": None}
    assert "running the plain graph" in caplog.text


def test_fusion_choice_from_the_environment(monkeypatch):
    monkeypatch.setenv("EDGE_VLA_ORT_FUSE", "gelu, attention")
    assert fuse_kinds() == ("gelu", "attention")
    monkeypatch.setenv("EDGE_VLA_ORT_FUSE", "none")
    assert fuse_kinds() == ()
    monkeypatch.delenv("EDGE_VLA_ORT_FUSE")
    assert fuse_kinds() == ("gelu",)
    with pytest.raises(BundleError, match="unknown onnxruntime fusion"):
        fuse_kinds("flash")
