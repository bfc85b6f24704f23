"""Roofline estimates: FLOP/byte counting on hand-built graphs, sane ordering across Jetson targets."""

from types import SimpleNamespace

import numpy as np
import pytest

from edge_vla.bundle import Bundle
from edge_vla.runtime import roofline as rl

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


def _save(tmp_path, nodes, inputs, outputs, inits, name="g.onnx"):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def _vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def test_matmul_gemm_conv_flops_and_bytes(tmp_path):
    w = numpy_helper.from_array(np.zeros((8, 16), np.float32), "w")
    g = numpy_helper.from_array(np.zeros((16, 4), np.float32), "g")
    k = numpy_helper.from_array(np.zeros((5, 3, 3, 3), np.float32), "k")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"]),            # [1,4,8]@[8,16]: 2*4*16*8
             helper.make_node("Reshape", ["y", "shape"], ["y2"]),
             helper.make_node("Gemm", ["y2", "g"], ["z"]),              # [4,16]@[16,4]: 2*4*4*16
             helper.make_node("Conv", ["img", "k"], ["c"], pads=[1, 1, 1, 1])]  # 2*(5*6*6)*(3*3*3)
    shape = numpy_helper.from_array(np.array([4, 16], np.int64), "shape")
    path = _save(tmp_path, nodes, [_vi("x", [1, 4, 8]), _vi("img", [1, 3, 6, 6])],
                 [_vi("z", [4, 4]), _vi("c", [1, 5, 6, 6])], [w, g, k, shape])
    cost = rl.graph_cost(path)
    assert cost.flops == 2 * 4 * 16 * 8 + 2 * 4 * 4 * 16 + 2 * (5 * 6 * 6) * 27
    assert cost.weight_bytes == 4 * (8 * 16 + 16 * 4 + 5 * 27) + 8 * 2
    assert cost.io_bytes == 4 * (1 * 4 * 8 + 3 * 36 + 16 + 5 * 36)
    assert cost.precision == "fp32"


def test_int8_weights_count_one_byte_and_use_the_int8_roof(tmp_path):
    wq = numpy_helper.from_array(np.zeros((8, 16), np.int8), "wq")
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    nodes = [helper.make_node("DequantizeLinear", ["wq", "s"], ["w"]), helper.make_node("MatMul", ["x", "w"], ["y"])]
    path = _save(tmp_path, nodes, [_vi("x", [1, 4, 8])], [_vi("y", [1, 4, 16])], [wq, scale])
    cost = rl.graph_cost(path)
    assert cost.weight_bytes == 8 * 16 + 4 and cost.precision == "int8"
    assert cost.flops == 2 * 4 * 16 * 8


def test_targets_are_ordered_in_every_roof():
    ts = [rl.TARGETS[k] for k in rl.TARGET_ORDER]
    for prec in ("fp32", "fp16", "int8"):
        peaks = [t.peak_flops(prec) for t in ts]
        assert all(p > 0 for p in peaks) and peaks == sorted(peaks)
    bws = [t.bandwidth_gbs for t in ts]
    assert bws == sorted(bws)
    for t in ts:  # lower precision is never slower on the same chip
        assert t.peak_flops("fp32") <= t.peak_flops("fp16") <= t.peak_flops("int8")


@pytest.mark.parametrize("flops", [1e3, 1e9, 1e13])
def test_faster_target_never_estimates_slower(flops):
    cost = rl.GraphCost(flops, 4_000_000, 100_000, "fp16")
    times = [rl.estimate(cost, rl.TARGETS[k]).ms for k in rl.TARGET_ORDER]
    assert all(t > 0 for t in times) and times == sorted(times, reverse=True)


def test_estimate_is_the_higher_roof_plus_launch():
    t = rl.TARGETS["agx-orin-64gb"]
    compute_bound = rl.estimate(rl.GraphCost(1e12, 1000, 0, "fp32"), t, launch_overhead_ms=0.0)
    assert compute_bound.bound == "compute" and compute_bound.ms == pytest.approx(1e3 * 1e12 / 5.32e12)
    memory_bound = rl.estimate(rl.GraphCost(1.0, 204_800_000, 0, "fp32"), t, runs=2, launch_overhead_ms=0.05)
    assert memory_bound.bound == "memory" and memory_bound.ms == pytest.approx(2 * (1.0 + 0.05))


def test_bundle_roofline_is_positive_and_ordered(tiny_bundle):
    costs = rl.bundle_costs(Bundle.open(tiny_bundle))
    assert costs["prefix"].flops > 0 and costs["denoise_step"].flops > 0
    assert costs["prefix"].weight_bytes > 0 and costs["prefix"].precision == "fp32"
    report = rl.roofline_report(costs, [1, 10])
    assert "ESTIMATE" in report["label"]
    totals = [report["targets"][k]["total_ms"] for k in rl.TARGET_ORDER]
    for n in ("1", "10"):
        seq = [t[n] for t in totals]
        assert all(v > 0 for v in seq) and seq == sorted(seq, reverse=True)
    assert all(t["10"] > t["1"] for t in totals)


def test_manifest_costs_used_when_onnx_is_missing(monkeypatch):
    import edge_vla.optional as optional

    monkeypatch.setattr(optional, "available", lambda name: False)
    cost = {"flops": 1e6, "weight_bytes": 1000, "io_bytes": 10, "precision": "int8"}
    fake = SimpleNamespace(precision="int8", manifest={"graphs": {"prefix": {"cost": cost}, "denoise_step": {"cost": cost}}})
    costs = rl.bundle_costs(fake)
    assert costs["prefix"] == rl.GraphCost(1e6, 1000, 10, "int8")
    fake.manifest = {"graphs": {"prefix": {}, "denoise_step": {}}}
    assert rl.bundle_costs(fake) is None


def test_symbolic_inner_dim_takes_k_from_the_weight(tmp_path):
    # The activation's last dim is symbolic (as after π0's Reshape(-1) chains); the weight initializer fixes K.
    w = numpy_helper.from_array(np.zeros((8, 16), np.float32), "w")
    path = _save(tmp_path, [helper.make_node("MatMul", ["x", "w"], ["y"])], [_vi("x", [1, 4, "k"])],
                 [_vi("y", [1, 4, 16])], [w])
    cost = rl.graph_cost(path)
    assert cost.flops == 2 * 4 * 16 * 8 and cost.approximate_nodes == 0


def test_heads_hidden_behind_a_computed_reshape_are_resolved(tmp_path):
    # π0's attention: Reshape(x, Concat(Shape(x)[:2], [-1, 4])) -> heads, with the batch dim of x made symbolic
    # by an Expand whose shape goes through Where (ONNX's data propagation stops there).
    nodes = [
        helper.make_node("Shape", ["x"], ["xs"]),
        helper.make_node("Equal", ["xs", "neg"], ["is_neg"]),
        helper.make_node("Where", ["is_neg", "xs", "xs"], ["ws"]),
        helper.make_node("Expand", ["x", "ws"], ["xe"]),                       # [?, 6, 8]
        helper.make_node("Shape", ["xe"], ["s"]),
        helper.make_node("Slice", ["s", "zero", "two"], ["s2"]),
        helper.make_node("Concat", ["s2", "tail"], ["target"], axis=0),
        helper.make_node("Reshape", ["xe", "target"], ["h"]),                   # [?, 6, ?=2, 4]
        helper.make_node("Transpose", ["h"], ["q"], perm=[0, 2, 1, 3]),         # [?, 2, 6, 4]
        helper.make_node("Transpose", ["h"], ["kt"], perm=[0, 2, 3, 1]),        # [?, 2, 4, 6]
        helper.make_node("MatMul", ["q", "kt"], ["scores"]),                    # 2 heads x 6 x 6 x K=4
    ]
    inits = [numpy_helper.from_array(np.array(v, np.int64), n)
             for n, v in [("neg", [-1, -1, -1]), ("zero", [0]), ("two", [2]), ("tail", [-1, 4])]]
    path = _save(tmp_path, nodes, [_vi("x", [1, 6, 8])], [_vi("scores", None)], inits)
    cost = rl.graph_cost(path)
    assert cost.flops == 2 * 2 * 6 * 6 * 4 and cost.approximate_nodes == 0


def test_unresolvable_dims_count_as_one_and_say_the_total_is_a_lower_bound(tmp_path, caplog):
    path = _save(tmp_path, [helper.make_node("MatMul", ["x", "y"], ["z"])], [_vi("x", [1, "m", 8]),
                 _vi("y", [8, "n"])], [_vi("z", [1, "m", "n"])], [])
    with caplog.at_level("WARNING", logger=rl.__name__):
        cost = rl.graph_cost(path)
    assert cost.flops == 2 * 8 and cost.approximate_nodes == 1
    assert "LOWER BOUND" in caplog.text
