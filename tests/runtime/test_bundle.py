import json
import os
import shutil
import stat
import tarfile
import tempfile
from pathlib import Path

import pytest
from service_user import needs_service_user, python_as_service_user

from edge_vla.bundle import SCHEMA_VERSION, Bundle, write_bundle, write_json_atomic
from edge_vla.errors import BundleError


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(tiny_bundle, dst)
    return dst


def test_exported_bundle_verifies(tiny_bundle):
    b = Bundle.open(tiny_bundle)
    assert b.config.preset == "tiny"
    assert b.action_space.dim == 2
    m = b.manifest
    for key in ("schema_version", "model", "graphs", "normalization", "action_space", "sampler", "tokenizer",
                "files", "provenance", "control"):
        assert key in m
    assert set(m["graphs"]) == {"prefix", "denoise_step", "chunk"}
    assert m["graphs"]["prefix"]["inputs"][0] == {"name": "images", "shape": [1, 1, 3, 64, 64], "dtype": "float32",
                                                  "role": "images"}
    assert m["family"] == "edge-vla-reference" and m["schema_version"] == SCHEMA_VERSION == 2
    assert all(len(h) == 64 for h in m["files"].values())
    assert m["provenance"]["torch"] and m["provenance"]["onnx"]


def test_tampered_graph_is_rejected(bundle_copy):
    g = bundle_copy / "graphs" / "denoise_step.onnx"
    data = bytearray(g.read_bytes())
    data[len(data) // 2] ^= 0xFF
    g.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"denoise_step.onnx does not match its sha256"):
        Bundle.open(bundle_copy)


def test_truncated_graph_is_rejected(bundle_copy):
    g = bundle_copy / "graphs" / "prefix.onnx"
    g.write_bytes(g.read_bytes()[:1000])
    with pytest.raises(BundleError, match="tampered with or truncated"):
        Bundle.open(bundle_copy)


def test_missing_file_is_rejected(bundle_copy):
    (bundle_copy / "reports" / "numerics.json").unlink()
    with pytest.raises(BundleError, match="missing file reports/numerics.json"):
        Bundle.open(bundle_copy)


def test_unlisted_file_is_rejected_but_target_dir_is_free(bundle_copy):
    (bundle_copy / "target").mkdir()
    (bundle_copy / "target" / "profile.json").write_text("{}")
    Bundle.open(bundle_copy)  # target/ is made on the robot and not hashed
    (bundle_copy / "graphs" / "evil.onnx").write_bytes(b"x")
    with pytest.raises(BundleError, match="unexpected file graphs/evil.onnx"):
        Bundle.open(bundle_copy)


def test_newer_schema_is_refused(bundle_copy):
    mpath = bundle_copy / "manifest.json"
    m = json.loads(mpath.read_text())
    m["schema_version"] = SCHEMA_VERSION + 1
    mpath.write_text(json.dumps(m))
    with pytest.raises(BundleError, match="newer than this edge-vla supports"):
        Bundle.open(bundle_copy)


def test_corrupt_manifest_and_missing_bundle(bundle_copy, tmp_path):
    (bundle_copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        Bundle.open(bundle_copy)
    with pytest.raises(BundleError, match="does not exist"):
        Bundle.open(tmp_path / "nope")


def test_tarball_bundle_opens(tiny_bundle, tmp_path):
    archive = tmp_path / "b.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tiny_bundle, arcname="bundle")
    b = Bundle.open(archive)
    assert (b.root / "manifest.json").is_file()


def test_write_bundle_is_atomic_and_refuses_overwrite(tmp_path, tiny_bundle):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    out = tmp_path / "new"
    write_bundle(out, manifest, {"graphs/prefix.onnx": tiny_bundle / "graphs" / "prefix.onnx"})
    with pytest.raises(BundleError, match="already exists"):
        write_bundle(out, manifest, {"a.txt": b"x"})
    with pytest.raises(BundleError, match="invalid bundle member"):
        write_bundle(tmp_path / "other", manifest, {"../escape": b"x"})
    assert not (tmp_path / "other").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind


def test_graph_outside_hashed_files_is_rejected(bundle_copy):
    mpath = bundle_copy / "manifest.json"
    m = json.loads(mpath.read_text())
    (bundle_copy / "target").mkdir()
    shutil.copy(bundle_copy / "graphs" / "prefix.onnx", bundle_copy / "target" / "prefix.onnx")
    m["graphs"]["prefix"]["file"] = "target/prefix.onnx"
    mpath.write_text(json.dumps(m))
    with pytest.raises(BundleError, match="not among the hashed files"):
        Bundle.open(bundle_copy)


def test_escaping_file_entries_are_rejected(bundle_copy):
    mpath = bundle_copy / "manifest.json"
    m = json.loads(mpath.read_text())
    m["files"]["../outside.txt"] = "0" * 64
    mpath.write_text(json.dumps(m))
    with pytest.raises(BundleError, match="points outside"):
        Bundle.open(bundle_copy)


# --- modes: a bundle is read by the robot's unprivileged service user, not by whoever exported it ------

def _mode(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


def test_write_bundle_sets_modes_whatever_the_umask(tmp_path, tiny_bundle):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    src = tmp_path / "src.onnx"
    src.write_bytes(b"graph")
    src.chmod(0o600)  # a private source file does not make a private bundle member
    old = os.umask(0o077)
    try:
        out = write_bundle(tmp_path / "b", manifest, {"graphs/prefix.onnx": src, "reports/numerics.json": b"{}",
                                                      "build_engines.sh": b"#!/bin/sh\n"})
        write_json_atomic(out / "target" / "profile.json", {})  # written on the robot after export
    finally:
        os.umask(old)
    want = {".": 0o755, "graphs": 0o755, "reports": 0o755, "graphs/prefix.onnx": 0o644,
            "reports/numerics.json": 0o644, "manifest.json": 0o644, "build_engines.sh": 0o755,
            "target/profile.json": 0o644}
    assert {rel: oct(_mode(out / rel)) for rel in want} == {rel: oct(m) for rel, m in want.items()}


_LOAD = """
import os, sys
from edge_vla.runtime.policy import Policy
policy = Policy.load(sys.argv[1], backend="onnxruntime", trusted_keys=[])
print(os.getuid(), policy.bundle.config.preset)
"""


@needs_service_user
def test_exported_bundle_loads_as_the_service_user():
    from edge_vla.cli import main as cli
    from edge_vla.export.assets import shipped_checkpoint

    base = Path(tempfile.mkdtemp(prefix="edge-vla-export-"))  # tmp_path's parents are 0700
    try:
        base.chmod(0o755)
        out = base / "bundle"
        assert cli(["export", str(shipped_checkpoint()), "-o", str(out), "--table-steps", "10",
                    "--calib-count", "2"]) == 0
        proc = python_as_service_user(_LOAD, str(out))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.split() == ["65534", "tiny"]
        out.chmod(0o700)  # control: the same load fails when only root may enter the bundle
        proc = python_as_service_user(_LOAD, str(out))
        assert proc.returncode != 0 and "Permission" in proc.stderr, proc.stderr[-2000:]
    finally:
        shutil.rmtree(base, ignore_errors=True)
