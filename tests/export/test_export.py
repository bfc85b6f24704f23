import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edge_vla.bundle import Bundle
from edge_vla.config import preset
from edge_vla.errors import EdgeVlaError
from edge_vla.export import trt_lint
from edge_vla.export.exporter import ExportOptions, export_model
from edge_vla.export.model import VLA


@pytest.mark.parametrize(("fixture", "limit"), [("tiny_bundle", 1e-4), ("tiny_bundle_fp16", 1e-2),
                                                ("tiny_bundle_int8", 8e-2)])
def test_round_trip_within_tolerance(request, fixture, limit):
    bundle = Bundle.open(request.getfixturevalue(fixture))
    report = json.loads((bundle.root / "reports" / "numerics.json").read_text())
    assert report["passed"] and report["precision"] == bundle.precision
    assert report["actions"]["rel_l2"] <= limit
    assert report["actions"]["cosine"] > 0.99
    assert set(report["graphs"]) >= {"prefix", "denoise_step"}
    lint = json.loads((bundle.root / "reports" / "lint.json").read_text())
    assert lint["errors"] == 0


def test_int8_graph_is_explicit_symmetric_qdq(tiny_bundle_int8):
    b = Bundle.open(tiny_bundle_int8)
    model = onnx.load(str(b.root / b.graph("denoise_step").file))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert b.manifest["provenance"]["calibration"]["observations"] == 8
    assert not [f for f in trt_lint.lint_model(model, "denoise_step") if f.level == "error"]


def test_int8_keeps_the_proprioceptive_state_float(tiny_bundle_int8):
    """Quantizing the state projection's input rounds the joint angles to ~0.02 rad steps: a bias of a
    few cm at the end effector that an executes-4 evaluation hides and a replan-every-action robot
    loop does not (issue 13: 83% vs 100% at execute 1). The state path stays FP32."""
    b = Bundle.open(tiny_bundle_int8)
    model = onnx.load(str(b.root / b.graph("prefix").file))
    producer = {o: n for n in model.graph.node for o in n.output}
    state_proj = [n for n in model.graph.node if "/state_proj/" in n.name and n.op_type in ("Gemm", "MatMul")]
    assert state_proj, "the prefix graph has no state projection to check"
    for node in state_proj:
        feeding = [producer[i].op_type for i in node.input[:2] if i in producer]
        assert "DequantizeLinear" not in feeding, f"{node.name} reads quantized input ({feeding})"
    assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)  # the rest of the prefix is INT8


def test_fp16_keeps_io_float32_and_weights_half(tiny_bundle_fp16):
    b = Bundle.open(tiny_bundle_fp16)
    model = onnx.load(str(b.root / b.graph("prefix").file))
    assert all(i.type.tensor_type.elem_type != TensorProto.FLOAT16 for i in model.graph.input)
    assert any(i.data_type == TensorProto.FLOAT16 for i in model.graph.initializer)
    assert any(n.op_type == "LayerNormalization" for n in model.graph.node)


def _tiny_graph(nodes, inputs, outputs, inits=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_lint_catches_planted_unsupported_op():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    model = _tiny_graph([helper.make_node("StringNormalizer", ["x"], ["y"], name="planted"),
                         helper.make_node("MyOp", ["x"], ["z"], name="custom", domain="com.acme")], [x], [y])
    findings = trt_lint.lint_model(model, "g")
    assert {(f.op, f.target) for f in findings if f.level == "error"} >= {("StringNormalizer", "10.3"),
                                                                        ("StringNormalizer", "10.13"), ("MyOp", "10.13")}


def test_lint_catches_nonzero_zero_point_and_dynamic_loop_and_int64_io():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    n = helper.make_tensor_value_info("n", TensorProto.INT64, [])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    scale = helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])
    zp = helper.make_tensor("zp", TensorProto.INT8, [], [3])
    body = helper.make_graph([], "body", [], [])
    model = _tiny_graph([
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="q"),
        helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], name="dq"),
        helper.make_node("Loop", ["n", ""], [], name="loop", body=body),
    ], [x, n], [y], [scale, zp])
    messages = " ".join(f.message for f in trt_lint.lint_model(model, "g"))
    assert "non-zero Q/DQ zero point" in messages
    assert "dynamic trip count" in messages
    assert "INT64 graph IO" in messages


def test_attention_op_is_flagged_for_both_jetpack_rows():
    q = helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, 2, 4, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 8])
    model = _tiny_graph([helper.make_node("Attention", ["q", "q", "q"], ["y"], name="attn")], [q], [y])
    errors = [f for f in trt_lint.lint_model(model, "g") if f.level == "error"]
    assert {"10.3", "10.13"} <= {f.target for f in errors}
    assert any("from TensorRT 10.14" in f.message for f in errors)


def test_numerics_failure_writes_nothing(tmp_path, tiny_model, monkeypatch):
    from edge_vla.export import numerics

    monkeypatch.setitem(numerics.THRESHOLDS, "fp32", (-1.0, 2.0))  # a threshold no export can meet
    out = tmp_path / "b"
    with pytest.raises(EdgeVlaError, match="numerics check failed, no bundle written"):
        export_model(tiny_model, out, ExportOptions(numerics_count=2))
    assert not out.exists()


def test_user_calibration_file(tmp_path, tiny_model):
    from edge_vla.sim import dataset

    calib = dataset.save(dataset.generate(range(900_000, 900_002)), tmp_path / "calib.npz")
    res = export_model(tiny_model, tmp_path / "b", ExportOptions(precision="int8", calib=str(calib), calib_count=4,
                                                                 numerics_count=2))
    assert res.numerics.passed
    assert Bundle.open(res.bundle).manifest["provenance"]["calibration"]["source"] == str(calib)


@pytest.mark.slow
def test_base_preset_exports(tmp_path):
    model = VLA(preset("base")).eval()
    res = export_model(model, tmp_path / "base", ExportOptions(numerics_count=1))
    b = Bundle.open(res.bundle)
    assert b.config.preset == "base"
    assert b.manifest["graphs"]["prefix"]["inputs"][0]["shape"] == [1, 2, 3, 224, 224]
    assert res.sizes["prefix"] > 200e6  # FP32 weights of the ~95M-parameter trunk
    assert np.isfinite(res.numerics.actions["rel_l2"])


def test_int8_prefix_only_keeps_the_step_graph_fp32(tmp_path, tiny_model):
    res = export_model(tiny_model, tmp_path / "b", ExportOptions(precision="int8", int8_graphs=("prefix",),
                                                                 calib_count=4, numerics_count=2))
    b = Bundle.open(res.bundle)
    step = onnx.load(str(b.root / b.graph("denoise_step").file))
    prefix = onnx.load(str(b.root / b.graph("prefix").file))
    assert not any(n.op_type == "QuantizeLinear" for n in step.graph.node)
    assert any(n.op_type == "QuantizeLinear" for n in prefix.graph.node)
    assert b.manifest["graphs"]["denoise_step"]["precision"] == "fp32"
    assert b.manifest["graphs"]["prefix"]["precision"] == "int8"
    with pytest.raises(EdgeVlaError, match="unknown graph"):
        export_model(tiny_model, tmp_path / "c", ExportOptions(precision="int8", int8_graphs=("trunk",)))
