"""The TensorRT path: its own tests need TensorRT and a GPU; around it, the errors must be clear."""

import pytest

from edge_vla.errors import BundleError, MissingDependencyError
from edge_vla.export.engines import build_script, trtexec_lines
from edge_vla.runtime.policy import Policy
from edge_vla.runtime.trt_backend import tensorrt_available


@pytest.mark.skipif(tensorrt_available(), reason="TensorRT is installed here")
def test_tensorrt_backend_without_tensorrt_names_the_extra(tiny_bundle):
    with pytest.raises(MissingDependencyError, match=r"edge-vla\[tensorrt\]"):
        Policy.load(tiny_bundle, backend="tensorrt")


def test_auto_backend_falls_back_to_onnxruntime(tiny_bundle):
    assert Policy.load(tiny_bundle).backend.name == "onnxruntime"


def test_build_engines_without_tensorrt_writes_trtexec_script(tiny_bundle, tmp_path, capsys):
    import shutil

    from edge_vla.bundle import Bundle
    from edge_vla.cli import main

    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    if tensorrt_available():
        pytest.skip("TensorRT is installed: the real build runs instead")
    # Nothing built: exit 1, saying so, with the trtexec lines written all the same; --script-only asks for just
    # the lines and succeeds.
    assert main(["build-engines", str(b)]) == 1
    assert (b / "target" / "build_engines.sh").is_file()
    said = capsys.readouterr()
    assert "no engines built" in said.out + said.err
    assert main(["build-engines", str(b), "--script-only"]) == 0
    script = (b / "target" / "build_engines.sh").read_text()
    assert "trtexec --onnx=$BUNDLE/graphs/prefix.onnx" in script and "--stronglyTyped" in script
    assert "--shapes=images:1x1x3x64x64,tokens:1x24,state:1x2" in script
    Bundle.open(b)  # target/ is outside the hashed files: the bundle still verifies


def test_trtexec_lines_cover_every_graph(tiny_bundle):
    from edge_vla.bundle import Bundle

    m = Bundle.open(tiny_bundle).manifest
    lines = trtexec_lines(m)
    assert len(lines) == len(m["graphs"])
    assert all("--timingCacheFile=$BUNDLE/target/timing.cache" in line for line in lines)
    assert build_script(m).startswith("#!/usr/bin/env bash")


def test_engine_index_with_wrong_hash_is_refused(tiny_bundle, tmp_path):
    import json
    import shutil

    from edge_vla.bundle import Bundle
    from edge_vla.runtime.trt_backend import TrtBackend

    if not tensorrt_available():
        pytest.skip("needs TensorRT and cuda-python: TrtBackend.from_bundle checks them first")
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    eng = b / "target" / "engines"
    eng.mkdir(parents=True)
    (eng / "prefix.plan").write_bytes(b"x")
    (eng / "index.json").write_text(json.dumps({"graphs": {"prefix": {"file": "prefix.plan", "sha256": "0" * 64}}}))
    with pytest.raises(BundleError, match="does not match"):
        TrtBackend.from_bundle(Bundle.open(b))


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_tensorrt_policy_matches_onnxruntime(tiny_bundle, tmp_path):
    import shutil

    import numpy as np

    from edge_vla.cli import main
    from edge_vla.sim.env import ReachEnv

    if not tensorrt_available():
        pytest.skip("TensorRT is not installed")
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    assert main(["build-engines", str(b), "--no-tune"]) == 0
    obs = ReachEnv().reset(1)
    trt_chunk = Policy.load(b, backend="tensorrt", seed=2).infer(obs).actions
    ort_chunk = Policy.load(b, backend="onnxruntime", seed=2).infer(obs).actions
    np.testing.assert_allclose(trt_chunk, ort_chunk, atol=5e-3)
