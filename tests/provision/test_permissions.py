"""The service user can read what `edge-vla install` put in place (issue 23, item 12).

edge-vla.service runs as an unprivileged user with WorkingDirectory=/opt/edge-vla/current: every
directory of a release must be traversable and every file readable by it, whatever the installer's
umask. These tests install as root (what install.sh and a flashing host do) and then read the result
as uid 65534 (setpriv), the way the service does.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from service_user import python_as_service_user, why_no_service_user

from edge_vla.provision import install
from edge_vla.provision.robot_config import RobotConfig

needs_service_user = pytest.mark.skipif(why_no_service_user() is not None, reason=str(why_no_service_user()))

# What the service does with its release, as the service user: enter it, read every file, open and
# verify the bundle with the robot's trusted keys, read robot.env (`edge-vla run` loads it).
ROBOT_READS = r"""
import json, os, sys
from pathlib import Path
current, etc = Path(sys.argv[1]), Path(sys.argv[2])
os.chdir(current)  # WorkingDirectory=/opt/edge-vla/current

def stop(exc):
    raise exc

n = 0
for d, _, files in os.walk(current, onerror=stop):
    for name in files:
        p = Path(d, name)
        if not p.is_symlink():
            p.read_bytes()
            n += 1
from edge_vla.bundle import Bundle
from edge_vla.provision.robot_config import RobotConfig
from edge_vla.provision.signing import trusted_keys_from_dir, verify_bundle_signature

bundle = Bundle.open(current / "bundle")
keys = trusted_keys_from_dir(etc / "trusted-keys")
print(json.dumps({"files": n, "uid": os.getuid(), "key": verify_bundle_signature(bundle.root, keys),
                  "rate_hz": RobotConfig.load(etc / "robot.env").rate_hz}))
"""


@pytest.fixture
def strict_umask() -> Iterator[None]:
    """A hardened root umask: modes of what is installed must not depend on it."""
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


def _assert_release_modes(release: Path) -> None:
    assert _mode(release) == 0o755, oct(_mode(release))
    for p in release.rglob("*"):
        if p.is_symlink():
            continue
        want = 0o755 if p.is_dir() or p.suffix == ".sh" else 0o644
        assert _mode(p) == want, f"{p.relative_to(release)} has mode {oct(_mode(p))}, want {oct(want)}"


def _robot_reads(root: Path) -> dict:
    proc = python_as_service_user(ROBOT_READS, str(root / "opt/edge-vla/current"), str(root / "etc/edge-vla"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_release_modes_are_set_whatever_the_umask(build, bundle: Path, rootfs: Path, tmp_path: Path,
                                                  strict_umask):
    pkg = build(bundle, tmp_path / "p.tar.gz", "x86-cpu").path
    report = install.install_rootfs(pkg, rootfs)
    _assert_release_modes(rootfs / "opt/edge-vla/releases" / report.release)
    for d in ("opt", "opt/edge-vla", "opt/edge-vla/releases", "etc/edge-vla"):
        assert _mode(rootfs / d) == 0o755, d
    assert _mode(rootfs / "etc/edge-vla/robot.env") == 0o644


@needs_service_user
def test_service_user_reads_its_release_bundle_keys_and_config(build, bundle: Path, rootfs: Path,
                                                               tmp_path: Path, keypair, strict_umask):
    priv, pub = keypair
    pkg = build(bundle, tmp_path / "p.tar.gz", "x86-cpu", sign_key=priv, config=RobotConfig(rate_hz=25))
    report = install.install_rootfs(pkg.path, rootfs, trusted_keys=[pub])
    got = _robot_reads(rootfs)
    assert got["uid"] == 65534 and got["key"] == pkg.key_id and got["rate_hz"] == 25
    assert got["files"] >= len(json.loads((rootfs / "opt/edge-vla/current/package.json").read_text())["files"])

    # Control: the probe really runs unprivileged; a release only root can enter fails it.
    release = rootfs / "opt/edge-vla/releases" / report.release
    release.chmod(0o700)
    proc = python_as_service_user(ROBOT_READS, str(rootfs / "opt/edge-vla/current"),
                                  str(rootfs / "etc/edge-vla"))
    assert proc.returncode != 0 and "PermissionError" in proc.stderr, proc.stderr[-2000:]

    # A release left unreadable (by an older edge-vla) is not "unchanged": installing again repairs it.
    again = install.install_rootfs(pkg.path, rootfs, trusted_keys=[pub])
    assert again.changed and any("damaged" in s for s in again.steps), again.steps
    _assert_release_modes(release)
    assert _robot_reads(rootfs)["key"] == pkg.key_id


@needs_service_user
def test_unreadable_trusted_keys_fail_closed(bundle: Path, rootfs: Path, keypair):
    """A trusted-keys directory the service cannot list must not read as "no keys" (run anything)."""
    keys = rootfs / "etc/edge-vla/trusted-keys"
    keys.mkdir(parents=True)
    shutil.copy(keypair[1], keys / "k.pub")
    keys.chmod(0o700)
    code = ("import sys\nfrom edge_vla.provision.signing import trusted_keys_from_dir\n"
            "print(trusted_keys_from_dir(sys.argv[1]))")
    proc = python_as_service_user(code, str(keys))
    assert proc.returncode != 0, proc.stdout
    last = proc.stderr.strip().splitlines()[-1]
    assert "cannot read trusted keys directory" in last and str(keys) in last, last
    keys.chmod(0o755)  # control: readable, the key is found
    proc = python_as_service_user(code, str(keys))
    assert proc.returncode == 0 and "k.pub" in proc.stdout, proc.stderr[-2000:]


def test_a_signature_written_in_place_is_readable_and_the_key_stays_private(bundle: Path, tmp_path: Path,
                                                                          strict_umask):
    """`sign_bundle` on a bundle already on the robot: the service reads manifest.sig; the private key
    from keygen stays 0600 whatever the umask."""
    from edge_vla.provision import signing

    priv, _pub, _ = signing.generate_keypair(tmp_path / "k")
    signing.sign_bundle(bundle, priv)
    assert _mode(bundle / "manifest.sig") == 0o644
    assert _mode(priv) == 0o600
