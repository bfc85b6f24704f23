"""`edge-vla build-engines` refuses engines that disagree with the bundle's ONNX graphs.

The comparator runs on the CPU: onnxruntime against onnxruntime (must pass), against perturbed outputs
(must fail at FP32's limits and pass at FP16's), and the whole command through the recording fake of
TensorRT (tests/runtime/trt_fakes.py) whose "engines" compute the bundle's graphs.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_vla.bundle import Bundle
from edge_vla.export.engines import OrtGraphRunner, engine_graphs, verify

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
import trt_fakes as F


class Perturbed:
    """Another runner's outputs with relative Gaussian noise: an engine that lost precision."""

    def __init__(self, inner, scale: float) -> None:
        self.inner, self.scale, self.rng = inner, scale, np.random.default_rng(0)

    def run(self, graph, feeds):
        out = self.inner.run(graph, feeds)
        return {k: v + self.scale * np.abs(v).mean() * self.rng.standard_normal(v.shape).astype(v.dtype)
                for k, v in out.items()}


@pytest.fixture(scope="module")
def runners(tiny_bundle):
    b = Bundle.open(tiny_bundle)
    graphs = engine_graphs(b.contract)
    return b, OrtGraphRunner(b, graphs), OrtGraphRunner(b, graphs)


def test_identical_runners_pass(runners):
    b, ref, same = runners
    report = verify(b.contract, "fp32", ref, same, samples=2)
    assert report.passed and set(report.graphs) == {"prefix", "denoise_step"}
    assert all(m["rel_l2"] == 0.0 for m in report.graphs.values())


def test_perturbed_outputs_fail_fp32_limits_but_pass_fp16(runners):
    b, ref, other = runners
    noisy = Perturbed(other, 3e-3)
    fp32 = verify(b.contract, "fp32", ref, noisy, samples=2)
    assert not fp32.passed and "FAIL" in fp32.summary()
    assert 1e-4 < fp32.graphs["denoise_step"]["rel_l2"] < 1e-2
    assert verify(b.contract, "fp16", ref, Perturbed(other, 3e-3), samples=2).passed


def _engines(tmp_path, tiny_bundle, monkeypatch, perturb=0.0):
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    eng = b / "target" / "engines"
    eng.mkdir(parents=True)
    specs = {}
    for name in ("prefix", "denoise_step"):
        plan = f"{name}".encode()
        (eng / f"{name}.plan").write_bytes(plan)
        specs[plan] = F.onnx_engine(b / "graphs" / f"{name}.onnx", perturb if name == "denoise_step" else 0.0)
    fake = F.FakeTensorRT(specs, F.FakeCudart())
    F.install(monkeypatch, fake)
    return b, fake


def test_build_engines_marks_agreeing_engines_verified_and_the_tensorrt_policy_matches(tmp_path, tiny_bundle,
                                                                                      monkeypatch, capsys):
    from edge_vla.cli import main
    from edge_vla.runtime.policy import Policy
    from edge_vla.sim.env import ReachEnv

    b, fake = _engines(tmp_path, tiny_bundle, monkeypatch)
    assert main(["build-engines", str(b), "--index-only", "--verify-samples", "2", "--no-tune"]) == 0
    index = json.loads((b / "target" / "engines" / "index.json").read_text())
    assert index["verified"] is True and "PASS" in index["verification"]["summary"]
    obs = ReachEnv().reset(4)
    with Policy.load(b, backend="tensorrt", seed=2, steps=4) as trt_policy:
        assert trt_policy.backend.name == "tensorrt" and trt_policy._whole_chunk
        got = trt_policy.infer(obs).actions
    want = Policy.load(b, backend="onnxruntime", seed=2, steps=4).infer(obs).actions
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert fake.cudart.live() == {"device": 0, "pinned": 0, "streams": 0, "graphs": 0, "execs": 0}


def test_build_engines_refuses_engines_outside_the_thresholds(tmp_path, tiny_bundle, monkeypatch, capsys):
    from edge_vla.cli import main

    b, _ = _engines(tmp_path, tiny_bundle, monkeypatch, perturb=1e-2)
    assert main(["build-engines", str(b), "--index-only", "--verify-samples", "2", "--no-tune"]) == 1
    out = capsys.readouterr().out
    assert "NOT VERIFIED" in out and "denoise_step: rel L2" in out
    assert not (b / "target" / "engines" / "index.json").exists()
    assert not (b / "target" / "engines" / "denoise_step.plan").exists()


def test_allow_unverified_keeps_them_marked_and_the_runtime_warns(tmp_path, tiny_bundle, monkeypatch, caplog):
    from edge_vla.cli import main
    from edge_vla.runtime.trt_backend import TrtBackend

    b, _ = _engines(tmp_path, tiny_bundle, monkeypatch, perturb=1e-2)
    assert main(["build-engines", str(b), "--index-only", "--verify-samples", "2", "--allow-unverified", "--no-tune"]) == 0
    assert json.loads((b / "target" / "engines" / "index.json").read_text())["verified"] is False
    with TrtBackend.from_bundle(Bundle.open(b)):
        pass
    assert "UNVERIFIED" in caplog.text
