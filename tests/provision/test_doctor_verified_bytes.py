"""`edge-vla doctor`'s bundle verdict is about the manifest.json bytes it parsed, read once per report.

doctor opened the bundle (parsing manifest.json and checking every hash against it), then checked the signature
over a second read of manifest.json, and the int8 and tune checks opened the bundle again. A manifest swapped
between reads got "PASS bundle ... signed by trusted key" for a manifest that is not signed. The swap is made
deterministic as in test_verified_bytes.py: an audit hook sees every read-open of manifest.json and, at the second,
writes the signed copy in place (what anyone who can write the bundle directory could do between the reads).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from edge_vla.provision import doctor, signing
from edge_vla.provision.doctor import FAIL, PASS, Expectation, Machine


@dataclass
class SwapOnSecondRead:
    """While `armed`: record read-opens of files named `name`; at the second, write `signed` over the file first."""

    name: str = ""
    signed: bytes = b""
    armed: bool = False
    reads: list[str] = field(default_factory=list)
    readers: list[set[str]] = field(default_factory=list)  # per read: the names of the functions on the stack
    _busy: bool = False

    def arm(self, name: str, signed: bytes) -> None:
        self.name, self.signed, self.reads, self.readers, self.armed = name, signed, [], [], True

    def __call__(self, event: str, args: tuple) -> None:
        if not self.armed or self._busy or event != "open" or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        path, flags = os.fsdecode(args[0]), args[2]  # args: (path, mode or None, the open(2) flags)
        if flags & os.O_ACCMODE != os.O_RDONLY or os.path.basename(path) != self.name:
            return
        self.reads.append(path)
        self.readers.append(_stack_names())
        if len(self.reads) == 2:
            self._busy = True  # the write below opens the file too
            try:
                Path(path).write_bytes(self.signed)
            finally:
                self._busy = False


def _stack_names() -> set[str]:
    frame, names = sys._getframe(1), set()
    while frame is not None:
        names.add(frame.f_code.co_name)
        frame = frame.f_back
    return names


_HOOK = SwapOnSecondRead()
sys.addaudithook(_HOOK)  # audit hooks cannot be removed: one per session, re-armed per test


@pytest.fixture
def swap() -> Iterator[SwapOnSecondRead]:
    try:
        yield _HOOK
    finally:
        _HOOK.armed = False


@pytest.fixture
def machine(tmp_path: Path, keypair) -> Machine:
    """A machine that trusts `keypair` (its trusted-keys directory as the runtime wants it: 0755, key 0644)."""
    keys = tmp_path / "trusted-keys"
    keys.mkdir(mode=0o755)
    (keys / "robot.pub").write_bytes(keypair[1].read_bytes())
    (keys / "robot.pub").chmod(0o644)
    etc, proc = tmp_path / "etc", tmp_path / "proc"
    etc.mkdir()
    proc.mkdir()
    (proc / "cpuinfo").write_text("model name : test\nflags : avx2\n")
    return Machine(sys_root=tmp_path / "sys", proc_root=proc, etc_root=etc, trusted_keys=keys,
                   which=lambda cmd: None, run=lambda cmd: None)


@pytest.fixture
def signed_bundle(bundle: Path, keypair) -> Path:
    signing.sign_bundle(bundle, keypair[0])
    return bundle


def _widen_joint_limits(bundle: Path) -> bytes:
    """Rewrite manifest.json with +-100 rad joint limits (every file hash still matches; the signature does not).
    Returns the signed bytes it replaced."""
    signed = (bundle / "manifest.json").read_bytes()
    manifest = json.loads(signed)
    manifest["action_space"]["lower"] = [-100.0] * len(manifest["action_space"]["lower"])
    manifest["action_space"]["upper"] = [100.0] * len(manifest["action_space"]["upper"])
    (bundle / "manifest.json").write_bytes((json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return signed


def test_doctor_checks_the_signature_over_the_manifest_it_parsed(signed_bundle: Path, machine: Machine, swap):
    signed = _widen_joint_limits(signed_bundle)
    swap.arm("manifest.json", signed)
    check = doctor.check_bundle(Expectation(bundle_root=signed_bundle), machine)
    reads = list(swap.reads)
    swap.armed = False
    assert check.status == FAIL and "bad signature" in check.detail, check
    assert len(reads) == 1, f"manifest.json was read {len(reads)} times: {reads}"


def test_doctor_control_signed_passes_tampered_fails(signed_bundle: Path, machine: Machine, swap):
    """Control for the test above: the probe tells a checked signature from an ignored one."""
    swap.arm("manifest.json", (signed_bundle / "manifest.json").read_bytes())  # same bytes: counts the reads only
    check = doctor.check_bundle(Expectation(bundle_root=signed_bundle), machine)
    assert check.status == PASS and "signed by trusted key" in check.detail, check
    assert len(swap.reads) == 1
    swap.armed = False
    _widen_joint_limits(signed_bundle)
    check = doctor.check_bundle(Expectation(bundle_root=signed_bundle), machine)
    assert check.status == FAIL and "bad signature" in check.detail, check


def test_one_report_reads_the_manifest_once(signed_bundle: Path, machine: Machine, swap):
    """The bundle, int8 and tune lines of one report are about the same manifest: the bundle is opened (and every
    file hashed: gigabytes for a pi0 bundle) once, not once per check. (edge_vla.runtime.tune.bundle_hash reads
    the file again for the tune record's key: a separate finding, outside doctor, so not counted here.)"""
    swap.arm("manifest.json", (signed_bundle / "manifest.json").read_bytes())  # same bytes: counts the reads only
    checks = {c.name: c for c in doctor.run_checks(Expectation(bundle_root=signed_bundle), machine)}
    reads = [path for path, names in zip(swap.reads, swap.readers) if "bundle_hash" not in names]
    swap.armed = False
    assert checks["bundle"].status == PASS and "signed by trusted key" in checks["bundle"].detail, checks["bundle"]
    assert "tune" in checks
    assert len(reads) == 1, f"manifest.json was read {len(reads)} times in one report: {reads}"
