import json
import shutil
import tarfile

import pytest

from edge_vla.bundle import SCHEMA_VERSION, Bundle, write_bundle
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
