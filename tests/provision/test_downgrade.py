"""`edge-vla install` refuses to move `current` to a release of an older edge-vla unless --allow-downgrade.

An older signed release still verifies, so without this check an install (by --rootfs, by install.sh on the robot,
or by --host, which runs install.sh) silently brings back an older edge-vla and its known bugs. Releases are
ordered by the PEP 440 version of the edge-vla wheel they ship (release ids are content hashes: unordered). The
packages here are real: the older one ships an edge-vla wheel built from this checkout with its version set back.
"""

from __future__ import annotations

import re
import shlex
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_vla.cli import main as cli
from edge_vla.provision import install, wheelhouse
from edge_vla.provision.errors import InstallError

OLD = "0.0.9"


@pytest.fixture(scope="session")
def old_edge_vla_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The edge-vla wheel built from a copy of this checkout whose version is OLD."""
    src = tmp_path_factory.mktemp("old-src") / "edge-vla"
    shutil.copytree(wheelhouse.source_root(), src, ignore=wheelhouse._SOURCE_IGNORE)
    for rel, pattern in (("pyproject.toml", r'^version = "[^"]+"'), ("edge_vla/__init__.py", r'^__version__ = "[^"]+"')):
        text = (src / rel).read_text()
        new, n = re.subn(pattern, pattern.split(" = ")[0].lstrip("^") + f' = "{OLD}"', text, count=1, flags=re.M)
        assert n == 1, f"no version line in {rel}"
        (src / rel).write_text(new)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(wheelhouse, "source_root", lambda: src)
        wheel = wheelhouse.build_edge_vla_wheel(tmp_path_factory.mktemp("old-wheel"))
    assert wheel.name.startswith(f"edge_vla-{OLD}-")
    return wheel


@pytest.fixture
def packages(build, bundle_factory, old_edge_vla_wheel: Path, tmp_path: Path, monkeypatch) -> Iterator[dict[str, Path]]:
    """old: edge-vla OLD; new: this edge-vla; new_other: this edge-vla with another bundle (same version)."""
    from edge_vla import __version__
    from edge_vla.provision import package

    assert __version__ != OLD
    b1 = bundle_factory(tmp_path / "b1", b"weights one")
    b2 = bundle_factory(tmp_path / "b2", b"weights two")
    with monkeypatch.context() as mp:
        mp.setattr(package, "__version__", OLD)  # what `edge-vla package` of that edge-vla writes
        old = build(b1, tmp_path / "old.tar.gz", "orin-nano", edge_vla_wheel=old_edge_vla_wheel).path
    yield {"old": old,
           "new": build(b1, tmp_path / "new.tar.gz", "orin-nano").path,
           "new_other": build(b2, tmp_path / "new-other.tar.gz", "orin-nano").path}


def _current(rootfs: Path) -> str:
    return (rootfs / "opt/edge-vla/current").resolve().name


def test_older_release_is_refused_without_allow_downgrade(packages, rootfs: Path, capsys):
    from edge_vla import __version__

    assert cli(["install", str(packages["old"]), "--rootfs", str(rootfs)]) == 0
    assert cli(["install", str(packages["new"]), "--rootfs", str(rootfs)]) == 0  # an upgrade: allowed
    new_release = _current(rootfs)
    capsys.readouterr()

    assert cli(["install", str(packages["old"]), "--rootfs", str(rootfs)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"edge-vla {OLD}" in err and f"edge-vla {__version__}" in err and "--allow-downgrade" in err, err
    assert _current(rootfs) == new_release  # nothing switched
    assert cli(["install", str(packages["old"]), "--rootfs", str(rootfs), "--dry-run"]) == 1  # says so in advance
    assert _current(rootfs) == new_release


def test_allow_downgrade_installs_the_older_release(packages, rootfs: Path, capsys):
    """Control: the same downgrade with --allow-downgrade goes through, and says it is one."""
    assert install.install_rootfs(packages["new"], rootfs).changed
    new_release = _current(rootfs)
    capsys.readouterr()
    assert cli(["install", str(packages["old"]), "--rootfs", str(rootfs), "--allow-downgrade"]) == 0
    out = capsys.readouterr().out
    assert "downgrad" in out and OLD in out, out
    assert _current(rootfs) != new_release
    assert (rootfs / "opt/edge-vla/previous").resolve().name == new_release
    assert cli(["install", str(packages["new"]), "--rootfs", str(rootfs)]) == 0  # and forward again
    assert _current(rootfs) == new_release


def test_same_version_reinstall_and_rollback_stay_allowed(packages, rootfs: Path):
    first = install.install_rootfs(packages["new"], rootfs)
    other = install.install_rootfs(packages["new_other"], rootfs)  # same edge-vla, another bundle: not ordered
    assert other.changed and _current(rootfs) == other.release
    assert not install.install_rootfs(packages["new_other"], rootfs).changed  # the same package again
    assert install.install_rootfs(packages["new"], rootfs).changed  # back to the first: same version
    assert _current(rootfs) == first.release
    with pytest.raises(InstallError, match="refusing to downgrade"):
        install.install_rootfs(packages["old"], rootfs)
    older = install.install_rootfs(packages["old"], rootfs, allow_downgrade=True)
    assert not install.install_rootfs(packages["old"], rootfs).changed  # the current one again: not a downgrade
    assert cli(["install", "--rollback", "--rootfs", str(rootfs)]) == 0  # an explicit rollback is never refused
    assert _current(rootfs) == first.release
    assert cli(["install", "--rollback", "--rootfs", str(rootfs)]) == 0  # nor a rollback to the older one
    assert _current(rootfs) == older.release


@pytest.mark.parametrize(("older", "newer"), [("0.9.0", "0.10.0"), ("1.0.0rc1", "1.0.0"), ("1.0.0", "1.0.0.post1")])
def test_versions_compare_as_pep440_not_as_text(older: str, newer: str):
    assert install.is_downgrade(older, newer)  # installing `older` over `newer`
    assert not install.is_downgrade(newer, older)
    assert not install.is_downgrade(newer, newer)


def test_host_passes_allow_downgrade_to_the_robot(packages, capsys):
    """--host runs install.sh on the robot, whose `edge-vla install` makes the check: the flag must reach it."""
    for extra, expected in (([], False), (["--allow-downgrade"], True)):
        assert cli(["install", str(packages["old"]), "--host", "robot", "--dry-run", *extra]) == 0
        remote = shlex.split(capsys.readouterr().out.splitlines()[-1].removeprefix("would run: "))[-1]
        assert ("--allow-downgrade" in remote) is expected, remote
