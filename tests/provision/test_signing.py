"""Signed bundles: what verifies, and every way a bundle is refused, with the reason."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest

from edge_vla.bundle import Bundle
from edge_vla.errors import BundleError
from edge_vla.provision import signing


def test_sign_then_verify_returns_key_id(bundle: Path, keypair):
    priv, pub = keypair
    kid = signing.sign_bundle(bundle, priv)
    assert signing.verify_bundle_signature(bundle, [pub]) == kid
    assert signing.verify_bundle_signature(bundle, [str(pub)]) == kid
    Bundle.open(bundle)  # the signature file is not a hashed member: the bundle still verifies


def test_signature_is_deterministic(bundle: Path, keypair):
    priv, _ = keypair
    signing.sign_bundle(bundle, priv)
    first = (bundle / "manifest.sig").read_bytes()
    signing.sign_bundle(bundle, priv)
    assert (bundle / "manifest.sig").read_bytes() == first


def test_unsigned_bundle_is_refused(bundle: Path, keypair):
    with pytest.raises(BundleError, match="unsigned"):
        signing.verify_bundle_signature(bundle, [keypair[1]])


def test_no_trusted_keys_is_refused(bundle: Path, keypair):
    signing.sign_bundle(bundle, keypair[0])
    with pytest.raises(BundleError, match="no trusted keys"):
        signing.verify_bundle_signature(bundle, [])


def test_unknown_key_is_refused(bundle: Path, keypair, tmp_path: Path):
    signing.sign_bundle(bundle, keypair[0])
    _, other_pub, _ = signing.generate_keypair(tmp_path / "other")
    with pytest.raises(BundleError, match="unknown key"):
        signing.verify_bundle_signature(bundle, [other_pub])


def test_tampered_manifest_is_refused(bundle: Path, keypair):
    signing.sign_bundle(bundle, keypair[0])
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["precision"] = "int8"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="bad signature"):
        signing.verify_bundle_signature(bundle, [keypair[1]])


def test_corrupt_signature_is_refused(bundle: Path, keypair):
    signing.sign_bundle(bundle, keypair[0])
    doc = json.loads((bundle / "manifest.sig").read_text())
    sig = bytearray(base64.b64decode(doc["signature"]))
    sig[0] ^= 1
    doc["signature"] = base64.b64encode(bytes(sig)).decode()
    (bundle / "manifest.sig").write_text(json.dumps(doc))
    with pytest.raises(BundleError, match="bad signature"):
        signing.verify_bundle_signature(bundle, [keypair[1]])
    (bundle / "manifest.sig").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        signing.verify_bundle_signature(bundle, [keypair[1]])


def test_tampered_graph_is_caught_by_the_signed_hashes(bundle: Path, keypair):
    signing.sign_bundle(bundle, keypair[0])
    (bundle / "graphs/prefix.onnx").write_bytes(b"evil weights")
    signing.verify_bundle_signature(bundle, [keypair[1]])  # the manifest itself is intact...
    with pytest.raises(BundleError, match="does not match its sha256"):
        Bundle.open(bundle)  # ...and it says the graph no longer matches


def test_raw_seed_and_text_public_keys(bundle: Path, tmp_path: Path):
    seed = tmp_path / "seed.key"
    seed.write_bytes(bytes(range(32)))
    kid = signing.sign_bundle(bundle, seed)
    raw = signing._raw_public(signing.load_private_key(seed).public_key())
    for spec in (raw.hex(), "ed25519:" + base64.b64encode(raw).decode(), base64.b64encode(raw).decode()):
        assert signing.verify_bundle_signature(bundle, [spec]) == kid
    raw_file = tmp_path / "raw.pub"
    raw_file.write_bytes(raw)
    assert signing.verify_bundle_signature(bundle, [raw_file]) == kid


def test_bad_key_files_say_what_is_wrong(tmp_path: Path):
    junk = tmp_path / "junk"
    junk.write_text("hello")
    with pytest.raises(Exception, match="neither an unencrypted PEM"):
        signing.load_private_key(junk)
    with pytest.raises(Exception, match="not a PEM, hex or base64"):
        signing.load_public_key("zz-not-a-key")


def test_keygen_refuses_to_overwrite(tmp_path: Path):
    signing.generate_keypair(tmp_path / "k")
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o600
    with pytest.raises(Exception, match="refusing to overwrite"):
        signing.generate_keypair(tmp_path / "k")


def test_helper_cli(bundle: Path, tmp_path: Path, capsys):
    assert signing.main(["keygen", str(tmp_path / "ci")]) == 0
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    assert signing.main(["sign", str(copy), str(tmp_path / "ci")]) == 0
    assert signing.main(["verify", str(copy), str(tmp_path / "ci.pub")]) == 0
    assert signing.main(["verify", str(bundle), str(tmp_path / "ci.pub")]) == 1
    assert "unsigned" in capsys.readouterr().err
