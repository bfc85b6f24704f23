"""The bytes a signature is checked over are the bytes that are parsed and used (manifest.json, package.json).

A loader that parses a file, then opens it again to check its signature, verifies one thing and uses another: a
file swapped between the two reads passes with the signed copy while the unsigned one is used. The swap here is
deterministic, not a race: a Python audit hook sees every open of the file and, at the second read-open, puts the
signed copy in place (exactly what an attacker who can write the directory would do between the reads). A loader
that reads the file once never triggers it and checks its signature over what it parsed.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from edge_vla.errors import BundleError, EdgeVlaError
from edge_vla.provision import install, signing
from edge_vla.provision.tarball import write_tarball
from edge_vla.runtime.policy import Policy


@dataclass
class SwapOnSecondRead:
    """While `armed`: count read-opens of files named `name`; at the second, replace the file's content with
    `signed` (before the open happens, so the second reader gets it). Audit hooks cannot be removed, so one
    instance is installed per session and re-armed per test."""

    name: str = ""
    signed: bytes = b""
    armed: bool = False
    reads: list[str] = field(default_factory=list)
    _busy: bool = False

    def arm(self, name: str, signed: bytes) -> None:
        self.name, self.signed, self.reads, self.armed = name, signed, [], True

    def __call__(self, event: str, args: tuple) -> None:
        if not self.armed or self._busy or event != "open" or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        path, flags = os.fsdecode(args[0]), args[2]  # args: (path, mode or None, the open(2) flags)
        if flags & os.O_ACCMODE != os.O_RDONLY or os.path.basename(path) != self.name:
            return
        self.reads.append(path)
        if len(self.reads) == 2:
            self._busy = True  # the write below opens the file too
            try:
                Path(path).write_bytes(self.signed)
            finally:
                self._busy = False


_HOOK = SwapOnSecondRead()
sys.addaudithook(_HOOK)


@pytest.fixture
def swap() -> Iterator[SwapOnSecondRead]:
    try:
        yield _HOOK
    finally:
        _HOOK.armed = False


# --- Policy.load: bundle manifest.json ----------------------------------------------------------------------------

@pytest.fixture
def signed_bundle(tiny_bundle: Path, tmp_path: Path, keypair) -> Path:
    b = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, b)
    signing.sign_bundle(b, keypair[0])
    return b


def _widen_joint_limits(bundle: Path) -> tuple[bytes, bytes]:
    """Rewrite manifest.json with wider joint limits (every file hash still matches; the signature does not).
    Returns (signed bytes, unsigned bytes)."""
    signed = (bundle / "manifest.json").read_bytes()
    manifest = json.loads(signed)
    manifest["action_space"]["lower"] = [-100.0] * len(manifest["action_space"]["lower"])
    manifest["action_space"]["upper"] = [100.0] * len(manifest["action_space"]["upper"])
    unsigned = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    (bundle / "manifest.json").write_bytes(unsigned)
    return signed, unsigned


def test_policy_load_checks_the_signature_over_the_manifest_it_uses(signed_bundle: Path, keypair, swap):
    _, public = keypair
    signed, _ = _widen_joint_limits(signed_bundle)
    swap.arm("manifest.json", signed)
    with pytest.raises(BundleError, match="bad signature"):
        Policy.load(signed_bundle, backend="onnxruntime", trusted_keys=[public])
    assert len(swap.reads) == 1, f"manifest.json was read {len(swap.reads)} times: {swap.reads}"


def test_policy_load_controls_signed_loads_tampered_is_refused(signed_bundle: Path, keypair, swap):
    """Control for the test above: the probe tells a checked signature from an ignored one."""
    _, public = keypair
    swap.arm("manifest.json", (signed_bundle / "manifest.json").read_bytes())  # same bytes: counts the reads only
    with Policy.load(signed_bundle, backend="onnxruntime", trusted_keys=[public]) as policy:
        assert policy.action_space.upper[0] < 100.0
    assert len(swap.reads) == 1
    swap.armed = False
    _widen_joint_limits(signed_bundle)
    with pytest.raises(BundleError, match="bad signature"):
        Policy.load(signed_bundle, backend="onnxruntime", trusted_keys=[public])


# --- install: package.json ----------------------------------------------------------------------------------------

def _with_package_json(pkg: Path, out: Path, mutate) -> tuple[Path, bytes]:
    """`pkg` with package.json changed by `mutate(meta)` and package.sig kept (so it no longer covers it).
    Returns the new package and the signed package.json."""
    with tarfile.open(pkg) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    signed = files["package.json"]
    meta = json.loads(signed)
    mutate(meta)
    files["package.json"] = (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()
    return write_tarball(out, files, executable=frozenset({"install.sh"})), signed


def test_install_checks_the_signature_over_the_package_json_it_uses(build, bundle: Path, rootfs: Path,
                                                                   tmp_path: Path, keypair, swap):
    """An unsigned package.json that adds the service user to group root, with the signed one swapped in for the
    signature check, must be refused: nothing in the rootfs changes."""
    priv, pub = keypair
    good = build(bundle, tmp_path / "good.tar.gz", "orin-nano", sign_key=priv).path
    bad, signed = _with_package_json(good, tmp_path / "bad.tar.gz",
                                     lambda meta: meta["config"]["groups"].append("root"))
    group_before = (rootfs / "etc/group").read_bytes()
    swap.arm("package.json", signed)
    with pytest.raises(EdgeVlaError, match="bad signature"):
        install.install_rootfs(bad, rootfs, trusted_keys=[pub])
    swap.armed = False
    assert (rootfs / "etc/group").read_bytes() == group_before
    assert not (rootfs / "opt/edge-vla/current").exists()


def test_install_control_signed_installs_tampered_is_refused(build, bundle: Path, rootfs: Path, tmp_path: Path,
                                                             keypair, swap):
    priv, pub = keypair
    good = build(bundle, tmp_path / "good.tar.gz", "orin-nano", sign_key=priv).path
    bad, _ = _with_package_json(good, tmp_path / "bad.tar.gz", lambda meta: meta["config"]["groups"].append("root"))
    with pytest.raises(EdgeVlaError, match="bad signature"):
        install.install_rootfs(bad, rootfs, trusted_keys=[pub])
    with tarfile.open(good) as tar:
        signed = tar.extractfile("package.json").read()
    swap.arm("package.json", signed)  # swaps in the same bytes: counts the reads only
    report = install.install_rootfs(good, rootfs, trusted_keys=[pub])
    assert report.changed and (rootfs / "opt/edge-vla/current").is_symlink()
    root_group = next(line for line in (rootfs / "etc/group").read_text().splitlines() if line.startswith("root:"))
    assert root_group == "root:x:0:"
    staged_reads = [p for p in swap.reads if ".staging-" in p]
    assert len(staged_reads) == 1, f"the staged package.json was read {len(staged_reads)} times"


# --- package: the manifest that is signed is the one whose hashes were checked -----------------------------------

def test_package_signs_the_manifest_it_verified(build, bundle: Path, tmp_path: Path, keypair, swap):
    """`edge-vla package --sign` checks the bundle's hashes against manifest.json, then signs a manifest: the same
    bytes. A manifest swapped in after the check (here one naming other graph bytes) must not be signed and shipped."""
    priv, pub = keypair
    verified = (bundle / "manifest.json").read_bytes()
    other = json.loads(verified)
    other["files"]["graphs/prefix.onnx"] = "0" * 64
    swap.arm("manifest.json", (json.dumps(other, indent=2, sort_keys=True) + "\n").encode())
    pkg = build(bundle, tmp_path / "pkg.tar.gz", "orin-nano", sign_key=priv).path
    swap.armed = False
    with tarfile.open(pkg) as tar:
        shipped = tar.extractfile("bundle/manifest.json").read()
    assert shipped == verified
    install_dir = tmp_path / "check"
    install_dir.mkdir()
    with tarfile.open(pkg) as tar:
        tar.extractall(install_dir, filter="data")
    assert signing.verify_bundle_signature(install_dir / "bundle", [pub])


def test_package_refuses_a_graph_that_changed_after_its_hash_was_checked(build, bundle: Path, tmp_path: Path, swap):
    """The graph bytes shipped are hashed as they are read: a graph changed after Bundle.open checked it is refused
    in one line, not shipped to fail (or worse) on the robot. Control: the same package builds untouched."""
    graph = bundle / "graphs/prefix.onnx"
    original = graph.read_bytes()
    swap.arm("prefix.onnx", b"changed after the check")
    with pytest.raises(EdgeVlaError, match=r"graphs/prefix\.onnx changed while it was being packaged"):
        build(bundle, tmp_path / "pkg.tar.gz", "orin-nano")
    assert not (tmp_path / "pkg.tar.gz").exists()
    swap.armed = False
    graph.write_bytes(original)
    assert build(bundle, tmp_path / "pkg.tar.gz", "orin-nano").path.is_file()
