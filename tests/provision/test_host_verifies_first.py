"""Where a package is verified before any of its code runs as root on a robot.

install.sh builds its installer from the unpacked package and runs the package's own `edge-vla install`, which
then checks the package's signature: on the robot, a tampered package's code runs as root before any check. So
the checks that come first are these: `edge-vla install PKG --host` verifies the package on the workstation
(every hash, and both signatures with the --trusted-key given) before anything is copied, and an edge-vla already
installed on the robot verifies a package with `install PKG --rootfs / --dry-run` (its own code, the robot's
trusted keys) before the package's install.sh is run (docs/PROVISIONING.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from pathlib import Path

import pytest

from edge_vla.cli import main as cli
from edge_vla.provision.signing import generate_keypair
from edge_vla.provision.tarball import write_tarball


def _tamper_install_sh(pkg: Path, out: Path) -> Path:
    """`pkg` with its install.sh replaced and package.json's hashes recomputed to match (package.sig kept):
    every hash verifies, only the signature can tell."""
    with tarfile.open(pkg) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    files["install.sh"] = b"#!/bin/sh\ntouch /tmp/pwned-by-edge-vla-test\n"
    meta = json.loads(files["package.json"])
    meta["files"]["install.sh"] = hashlib.sha256(files["install.sh"]).hexdigest()
    files["package.json"] = (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()
    return write_tarball(out, files, executable=frozenset({"install.sh"}))


@pytest.fixture
def recorder(tmp_path: Path, monkeypatch) -> Path:
    """ssh, scp and rsync stood in for by scripts that log their arguments and succeed: what --host ran."""
    bin_dir, log = tmp_path / "bin", tmp_path / "remote.log"
    bin_dir.mkdir()
    for tool in ("ssh", "scp", "rsync"):
        script = bin_dir / tool
        script.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{log}"\n')
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return log


@pytest.fixture
def signed(build, bundle: Path, tmp_path: Path, keypair) -> Path:
    return build(bundle, tmp_path / "signed.tar.gz", "orin-nano", sign_key=keypair[0]).path


def test_host_refuses_a_tampered_or_foreign_package_before_copying(build, bundle: Path, signed: Path,
                                                                  tmp_path: Path, keypair, recorder: Path, capsys):
    _, pub = keypair
    other_priv, _, _ = generate_keypair(tmp_path / "other")
    cases = {
        "bad signature": _tamper_install_sh(signed, tmp_path / "tampered.tar.gz"),
        "signed by unknown key": build(bundle, tmp_path / "foreign.tar.gz", "orin-nano", sign_key=other_priv).path,
        "is unsigned": build(bundle, tmp_path / "unsigned.tar.gz", "orin-nano").path,
    }
    for why, pkg in cases.items():
        assert cli(["install", str(pkg), "--host", "nvidia@robot", "--trusted-key", str(pub)]) == 1
        err = capsys.readouterr().err
        assert why in err, (why, err)
        assert not recorder.exists(), f"{why}: commands ran before the package was refused: {recorder.read_text()}"


def test_host_control_a_signed_package_is_copied_and_installed(signed: Path, keypair, recorder: Path, capsys):
    """Control: the same command with a package signed by the trusted key runs ssh and the copy."""
    assert cli(["install", str(signed), "--host", "nvidia@robot", "--trusted-key", str(keypair[1])]) == 0
    ran = recorder.read_text().splitlines()
    assert [line.split()[0] for line in ran] == ["ssh", "rsync", "rsync", "ssh"] or \
        [line.split()[0] for line in ran] == ["ssh", "scp", "scp", "ssh"], ran
    assert "install.sh" in ran[-1]
    assert "warning" not in capsys.readouterr().err


def test_host_without_trusted_key_says_the_signature_was_not_checked_here(signed: Path, recorder: Path, capsys):
    """Without --trusted-key the workstation checks the hashes only; the robot checks the signature only after
    running the package's own installer as root. Said, not silent."""
    assert cli(["install", str(signed), "--host", "nvidia@robot", "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "--trusted-key" in err and "not checked" in err, err
    assert len([line for line in err.splitlines() if line.strip()]) == 1, err


def test_installed_release_verifies_a_package_before_its_install_sh_runs(build, bundle_factory, signed: Path,
                                                                        rootfs: Path, tmp_path: Path, keypair, capsys):
    """The documented check on the robot: the installed edge-vla's `install PKG --rootfs / --dry-run` uses the
    robot's trusted keys (none named on the command line), refuses a package whose install.sh was changed, and
    passes a signed one; it changes nothing either way."""
    priv, pub = keypair
    assert cli(["install", str(signed), "--rootfs", str(rootfs), "--trusted-key", str(pub)]) == 0
    before = sorted(str(p) for p in rootfs.rglob("*"))
    tampered = _tamper_install_sh(signed, tmp_path / "tampered.tar.gz")
    capsys.readouterr()
    assert cli(["install", str(tampered), "--rootfs", str(rootfs), "--dry-run"]) == 1
    assert "bad signature" in capsys.readouterr().err
    newer = build(bundle_factory(tmp_path / "b2", b"new weights"), tmp_path / "newer.tar.gz", "orin-nano",
                  sign_key=priv).path
    assert cli(["install", str(newer), "--rootfs", str(rootfs), "--dry-run"]) == 0
    assert "nothing changed" in capsys.readouterr().out
    assert sorted(str(p) for p in rootfs.rglob("*")) == before
