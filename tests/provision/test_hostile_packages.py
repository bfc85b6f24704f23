"""Hostile robot packages: a tarball whose members would land outside the staging directory.

`edge-vla install` extracts a package before it can verify it (package.json, every hash and the
signature are inside), as root (install.sh), into the rootfs (/ on a live robot). So extraction
itself must never write outside the staging directory, whatever the archive holds, signed or not.
A package from `edge-vla package` holds only regular files and directories (tarball.write_tarball):
anything else is refused in one line, before anything lands outside staging.
"""

from __future__ import annotations

import hashlib
import os
import select
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from hostile_tar import ESCAPED, archive, realpath_limit_escape
from hostile_tar import add as _add

from edge_vla.cli import main as cli
from edge_vla.provision import install, rootfs
from edge_vla.provision.errors import PackageError
from edge_vla.provision.tarball import extract_tarball

REPO = Path(__file__).resolve().parents[2]


def _tree(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


def _staging_len(root: Path) -> int:
    """len(str(rootfs.staging_dir(root))): releases/.staging-XXXXXXXX (mkdtemp's 8 random characters)."""
    return len(str(rootfs.releases_dir(root))) + len("/.staging-") + 8


@pytest.fixture
def installed(build, bundle: Path, rootfs: Path, tmp_path: Path) -> Path:
    """A rootfs with a genuine release installed (the control: a real package goes through extraction)."""
    pkg = build(bundle, tmp_path / "robot-pkg.tar.gz", "orin-nano").path
    assert install.install_rootfs(pkg, rootfs).changed
    return rootfs


def test_a_realpath_limit_symlink_chain_writes_nothing_outside_staging(installed: Path, tmp_path: Path, capsys):
    current = os.readlink(installed / "opt/edge-vla/current")
    before = _tree(installed)
    # From releases/.staging-X, 4 levels up is the rootfs: the archive aims at <rootfs>/etc/cron.d.
    evil = realpath_limit_escape(tmp_path / "evil.tar.gz", _staging_len(installed), up=4)
    assert cli(["install", str(evil), "--rootfs", str(installed)]) == 1
    err = capsys.readouterr().err.strip()
    assert not (installed / ESCAPED).exists(), "a hostile package wrote into the rootfs's /etc before verification"
    assert _tree(installed) == before and os.readlink(installed / "opt/edge-vla/current") == current
    assert len(err.splitlines()) == 1 and "symlink" in err and str(evil) in err, err


@pytest.mark.parametrize(("what", "build"), [
    ("symlink", lambda t: _add(t, "bundle/graphs/prefix.onnx", tarfile.SYMTYPE, "../../package.json")),
    ("hard link", lambda t: (_add(t, "package.json", data=b"{}"), _add(t, "copy.json", tarfile.LNKTYPE, "package.json"))),
    ("character device", lambda t: _add(t, "dev-null", tarfile.CHRTYPE)),
    ("fifo", lambda t: _add(t, "pipe", tarfile.FIFOTYPE)),
    ("'..'", lambda t: _add(t, "bundle/../../outside", data=b"x")),
    ("absolute", lambda t: _add(t, "/tmp/edge-vla-absolute-member", data=b"x")),
])
def test_members_a_package_never_holds_are_refused_in_one_line(what: str, build, tmp_path: Path):
    evil = archive(tmp_path / "evil.tar.gz", build)
    dest = tmp_path / "staging"
    dest.mkdir()
    with pytest.raises(PackageError) as caught:
        extract_tarball(evil, dest)
    message = str(caught.value)
    assert "\n" not in message and what in message and "only regular files and directories" in message, message
    assert not Path("/tmp/edge-vla-absolute-member").exists() and not (tmp_path / "outside").exists()


def test_setuid_bits_do_not_survive_extraction(tmp_path: Path):
    """Modes are normalised (the "data" filter clears setuid/setgid/sticky and group/other write)."""
    evil = archive(tmp_path / "suid.tar.gz", lambda t: _add(t, "install.sh", data=b"#!/bin/sh\n", mode=0o6777))
    extract_tarball(evil, tmp_path / "out")
    mode = (tmp_path / "out/install.sh").stat().st_mode & 0o7777
    assert not mode & 0o7022, oct(mode)


# Install A, paused once its package is staged and verified (the longest part of an install on a robot: a
# package of wheels), until the test writes a line to its stdin. Run as root, as install.sh runs it.
PAUSED_INSTALL = r"""
import sys
from pathlib import Path
from edge_vla.provision import install, rootfs

real_plan = rootfs.plan_install

def paused(*args, **kwargs):
    print("staged", flush=True)
    sys.stdin.readline()
    return real_plan(*args, **kwargs)

rootfs.plan_install = paused
report = install.install_rootfs(Path(sys.argv[1]), Path(sys.argv[2]))
print("installed", report.release, flush=True)
"""


def _read_line(proc: subprocess.Popen[str], timeout: float = 60) -> str:
    """The next line of `proc`'s stdout, waiting at most `timeout` seconds."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no output from the install within {timeout} s"
    assert proc.stdout is not None
    return proc.stdout.readline().strip()


def test_a_second_install_at_the_same_time_is_refused_and_the_first_completes(build, bundle_factory, installed: Path,
                                                                              tmp_path: Path, capsys):
    pkg_a = build(bundle_factory(tmp_path / "a", b"weights a"), tmp_path / "a.tar.gz", "orin-nano")
    pkg_b = build(bundle_factory(tmp_path / "b", b"weights b"), tmp_path / "b.tar.gz", "orin-nano").path
    first = os.readlink(installed / "opt/edge-vla/current")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", PAUSED_INSTALL, str(pkg_a.path), str(installed)], cwd=REPO,
                            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert _read_line(proc) == "staged", proc.stderr.read() if proc.stderr else ""
        status_b = cli(["install", str(pkg_b), "--rootfs", str(installed)])  # while A is mid-way
        err_b = capsys.readouterr().err.strip()
        assert proc.stdin is not None
        proc.stdin.write("\n")
        proc.stdin.flush()
        out_a, err_a = proc.communicate(timeout=120)
    finally:
        proc.kill()
    # A was not disturbed: it completed, and the robot runs A's release.
    assert proc.returncode == 0, f"install A failed after install B ran beside it: {err_a.strip().splitlines()[-1:]}"
    assert f"installed {pkg_a.release}" in out_a
    assert os.readlink(installed / "opt/edge-vla/current") == f"releases/{pkg_a.release}"
    assert os.readlink(installed / "opt/edge-vla/previous") == first
    rootfs.verify_package_dir(installed / "opt/edge-vla/current")
    # B was refused in one line that says why and what to do, and left nothing behind.
    assert status_b == 1 and len(err_b.splitlines()) == 1 and "another edge-vla install" in err_b, err_b
    assert not list((installed / "opt/edge-vla/releases").glob(".staging-*"))
    # Once A is done, B goes through (the refusal was about the moment, not about B).
    assert install.install_rootfs(pkg_b, installed).changed


def test_a_package_declaring_more_than_the_disk_can_spare_is_refused_before_it_fills_it(tmp_path: Path, monkeypatch):
    """A few kB of gzip can declare gigabytes of zeros: extraction (as root, into the rootfs, before verification)
    stops at what the filesystem can spare, in one line, instead of filling the robot's disk. The budget is made
    small here (the filesystem's free space read as 300 MiB: 44 MiB above the margin) so that a real 64 MiB member
    exceeds it; control: the same archive extracts where the space is there."""
    from edge_vla import safe_tar

    big = archive(tmp_path / "big.tar.gz", lambda t: _add(t, "wheels/zeros.whl", data=bytes(64 << 20)))
    assert big.stat().st_size < 1 << 20  # what travels is small
    monkeypatch.setattr(safe_tar, "free_bytes", lambda path: safe_tar.FREE_MARGIN + (44 << 20))
    with pytest.raises(PackageError) as caught:
        extract_tarball(big, tmp_path / "staging")
    assert "\n" not in str(caught.value) and "filesystem can spare" in str(caught.value), caught.value
    assert not (tmp_path / "staging/wheels/zeros.whl").exists()
    monkeypatch.undo()
    extract_tarball(big, tmp_path / "roomy")
    assert (tmp_path / "roomy/wheels/zeros.whl").stat().st_size == 64 << 20
