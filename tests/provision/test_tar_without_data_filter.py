"""Extraction on a Python whose tarfile predates PEP 706 (no `filter=`, no `tarfile.data_filter`).

Debian 12's /usr/bin/python3 (3.11.2) is one (PEP 706 came with 3.12 and was backported to 3.8.17, 3.9.17, 3.10.12
and 3.11.4): every extraction (a robot package in install and doctor, a bundle .tar.gz in Bundle.open) failed there
with "TypeError: TarFile.extractall() got an unexpected keyword argument 'filter'". On such a Python, edge-vla's own
member checks (edge_vla.safe_tar: regular files and directories only, relative paths without '..', a disk budget)
still run, and the data filter's changes are made by edge-vla itself: modes without setuid/setgid/sticky or
group/other write, no owner from the archive, no path that leads outside the destination.

`old_tarfile` simulates such a tarfile deterministically on this Python: extract/extractall take no `filter=`
(a TypeError, as there), extract what the archive says (fully trusted, as there), and tarfile has no data_filter.
The last test runs the real old interpreter where there is one.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from hostile_tar import ESCAPED, add, archive, realpath_limit_escape

from edge_vla.bundle import Bundle
from edge_vla.errors import BundleError
from edge_vla.provision.errors import PackageError
from edge_vla.provision.tarball import extract_tarball

REPO = Path(__file__).resolve().parents[2]
OLD_PYTHON = Path("/usr/bin/python3")  # Debian 12's 3.11.2, without PEP 706

# Members with every mode bit the data filter strips or adds: (name, tar type, mode, data).
MEMBERS = [
    ("dir-world-writable-sticky", tarfile.DIRTYPE, 0o1777, b""),
    ("dir-world-writable-sticky/setuid-exec", tarfile.REGTYPE, 0o4777, b"#!/bin/sh\n"),
    ("dir-world-writable-sticky/setgid-group-writable", tarfile.REGTYPE, 0o2775, b"#!/bin/sh\n"),
    ("dir-private", tarfile.DIRTYPE, 0o500, b""),
    ("dir-private/not-executable-by-owner", tarfile.REGTYPE, 0o077, b"data\n"),
    ("dir-private/owner-only", tarfile.REGTYPE, 0o400, b"secret\n"),
    ("plain.json", tarfile.REGTYPE, 0o644, b"{}\n"),
]


def _modes_archive(out: Path) -> Path:
    def build(tar: tarfile.TarFile) -> None:
        for name, kind, mode, data in MEMBERS:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.size = kind, mode, len(data)
            info.uid = info.gid = 4242  # an owner the data filter does not keep
            info.uname = info.gname = "root"  # by name, an old tarfile running as root would chown to root
            tar.addfile(info, io.BytesIO(data))

    return archive(out, build)


def _tree(root: Path) -> dict[str, tuple[str, int, int, int]]:
    """{relative path: (kind, mode bits, uid, gid)} plus file contents checked by the caller."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        kind = "dir" if p.is_dir() else "file" if p.is_file() else "other"
        out[p.relative_to(root).as_posix()] = (kind, st.st_mode & 0o7777, st.st_uid, st.st_gid)
    return out


@pytest.fixture
def old_tarfile(monkeypatch: pytest.MonkeyPatch) -> None:
    """tarfile as on Python 3.11.2: no data_filter (or the other PEP 706 names), and extract/extractall without
    a `filter` parameter, extracting as the archive says (what "fully_trusted" is on this Python)."""
    real_extractall, real_extract = tarfile.TarFile.extractall, tarfile.TarFile.extract

    def extractall(self, path=".", members=None, *, numeric_owner=False):
        return real_extractall(self, path, members, numeric_owner=numeric_owner, filter="fully_trusted")

    def extract(self, member, path="", set_attrs=True, *, numeric_owner=False):
        return real_extract(self, member, path, set_attrs, numeric_owner=numeric_owner, filter="fully_trusted")

    monkeypatch.setattr(tarfile.TarFile, "extractall", extractall)
    monkeypatch.setattr(tarfile.TarFile, "extract", extract)
    for name in ("data_filter", "tar_filter", "fully_trusted_filter"):
        monkeypatch.delattr(tarfile, name)


def test_the_simulation_is_the_old_tarfile(old_tarfile, tmp_path: Path) -> None:
    """Control for the fixture: what edge-vla met there (the old code's failure on 3.11.2, word for word)."""
    assert not hasattr(tarfile, "data_filter")
    with tarfile.open(_modes_archive(tmp_path / "a.tar.gz")) as tar, \
            pytest.raises(TypeError, match="unexpected keyword argument 'filter'"):
        tar.extractall(tmp_path / "out", filter=lambda member, dest: member)


def test_a_package_extracts_with_the_data_filters_modes(old_tarfile, tmp_path: Path, monkeypatch) -> None:
    """Old code: TypeError: TarFile.extractall() got an unexpected keyword argument 'filter'. Now the same files,
    with the modes the data filter gives them (compared with a real data-filter extraction: the control)."""
    pkg = _modes_archive(tmp_path / "pkg.tar.gz")
    extract_tarball(pkg, tmp_path / "old")
    monkeypatch.undo()  # the real tarfile, with its data filter
    assert hasattr(tarfile, "data_filter")
    extract_tarball(pkg, tmp_path / "new")
    old, new = _tree(tmp_path / "old"), _tree(tmp_path / "new")
    assert sorted(old) == sorted(new) == sorted(name for name, *_ in MEMBERS)
    for name, kind, mode, data in MEMBERS:
        got = old[name]
        assert got[2:] == (os.geteuid(), os.getegid()), f"{name}: owner {got[2:]} came from the archive"
        assert not got[1] & 0o7022, f"{name}: mode {got[1]:o} has setuid/setgid/sticky or group/other write"
        if kind == tarfile.REGTYPE:
            assert got == new[name], f"{name}: {got[1]:o} here, {new[name][1]:o} with the data filter"
            assert (tmp_path / "old" / name).read_bytes() == data
        else:
            assert got[1] == (mode & 0o755) | 0o700, f"{name}: {got[1]:o}"
    assert old["dir-world-writable-sticky/setuid-exec"][1] == 0o755  # what the data filter keeps of 4777
    assert old["dir-private/not-executable-by-owner"][1] == 0o644  # 077: no x without the owner's, owner rw


def test_a_bundle_archive_opens(old_tarfile, bundle: Path, tmp_path: Path) -> None:
    """Old code: the same TypeError from Bundle.open. Now it opens and verifies."""
    packed = tmp_path / "b.tar.gz"
    with tarfile.open(packed, "w:gz") as tar:
        tar.add(bundle, arcname="bundle")
    opened = Bundle.open(packed)
    assert opened.manifest["files"] and (opened.root / "graphs/prefix.onnx").is_file()


HOSTILE = [
    ("symlink", lambda t: add(t, "bundle/graphs/prefix.onnx", tarfile.SYMTYPE, "../../package.json")),
    ("hard link", lambda t: (add(t, "package.json", data=b"{}"), add(t, "copy.json", tarfile.LNKTYPE, "package.json"))),
    ("character device", lambda t: add(t, "dev-null", tarfile.CHRTYPE)),
    ("fifo", lambda t: add(t, "pipe", tarfile.FIFOTYPE)),
    ("'..'", lambda t: add(t, "bundle/../../outside", data=b"x")),
    ("absolute", lambda t: add(t, "/tmp/edge-vla-absolute-member-old-tarfile", data=b"x")),
]


@pytest.mark.parametrize(("what", "build"), HOSTILE, ids=[what for what, _ in HOSTILE])
def test_hostile_members_are_still_refused(old_tarfile, what: str, build, tmp_path: Path) -> None:
    evil = archive(tmp_path / "evil.tar.gz", build)
    dest = tmp_path / "staging"
    dest.mkdir()
    with pytest.raises(PackageError) as caught:
        extract_tarball(evil, dest)
    message = str(caught.value)
    assert "\n" not in message and what in message and "only regular files and directories" in message, message
    assert not Path("/tmp/edge-vla-absolute-member-old-tarfile").exists() and not (tmp_path / "outside").exists()
    assert not any(p.is_symlink() or not (p.is_file() or p.is_dir()) for p in dest.rglob("*"))


def test_the_realpath_limit_symlink_chain_writes_nothing_outside(old_tarfile, tmp_path: Path) -> None:
    """CVE-2025-4517's chain (which a pre-3.11.13 data filter lets through) is refused at its first symlink."""
    dest = tmp_path / "s" / "staging"
    dest.mkdir(parents=True)
    evil = realpath_limit_escape(tmp_path / "evil.tar.gz", len(str(dest)), up=2)
    with pytest.raises(PackageError, match="symlink"):
        extract_tarball(evil, dest)
    assert not (tmp_path / ESCAPED).exists()


def test_a_link_already_in_the_destination_is_not_followed_out(old_tarfile, tmp_path: Path, monkeypatch) -> None:
    """The data filter's last check: a member whose path resolves outside the destination (through a link that
    was there before) is refused. Without the data filter edge-vla makes that check; control: the real filter."""
    outside = tmp_path / "outside"
    outside.mkdir()
    evil = archive(tmp_path / "evil.tar.gz", lambda t: add(t, "lib/planted", data=b"x"))
    for label in ("old tarfile", "data filter"):
        dest = tmp_path / label
        dest.mkdir()
        (dest / "lib").symlink_to(outside)
        with pytest.raises(PackageError) as caught:
            extract_tarball(evil, dest)
        assert "\n" not in str(caught.value) and "outside" in str(caught.value), (label, caught.value)
        assert not (outside / "planted").exists(), label
        monkeypatch.undo()


def test_a_bundle_archive_with_a_symlink_is_refused(old_tarfile, tmp_path: Path) -> None:
    evil = archive(tmp_path / "evil.tar.gz", lambda t: add(t, "bundle/manifest.json", tarfile.SYMTYPE, "/etc/passwd"))
    with pytest.raises(BundleError, match="symlink"):
        Bundle.open(evil)


EXTRACT_AND_LIST = """
import json, os, sys
from pathlib import Path
from edge_vla.provision.errors import PackageError
from edge_vla.provision.tarball import extract_tarball
dest = Path(sys.argv[2])
try:
    extract_tarball(Path(sys.argv[1]), dest)
except PackageError as exc:
    print(json.dumps({"refused": str(exc)}))
    raise SystemExit(0)
print(json.dumps({p.relative_to(dest).as_posix(): os.lstat(p).st_mode & 0o7777 for p in sorted(dest.rglob("*"))}))
"""


@pytest.mark.skipif(not OLD_PYTHON.is_file(), reason=f"{OLD_PYTHON} is not here")
def test_the_real_old_interpreter(tmp_path: Path) -> None:
    """The real thing: OLD_PYTHON extracts a package (as root, as install.sh does: the branch where tarfile sets
    owners) with the data filter's modes, and refuses a symlink in one line."""
    probe = subprocess.run([str(OLD_PYTHON), "-c", "import tarfile; print(hasattr(tarfile, 'data_filter'))"],
                           capture_output=True, text=True, check=True)
    if probe.stdout.strip() != "False":
        pytest.skip(f"{OLD_PYTHON} has PEP 706: nothing old to test")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO)}  # stdlib only: no venv

    def run(pkg: Path, dest: Path) -> dict:
        done = subprocess.run([str(OLD_PYTHON), "-c", EXTRACT_AND_LIST, str(pkg), str(dest)], capture_output=True,
                              text=True, env=env, timeout=60)
        assert done.returncode == 0, done.stderr.strip().splitlines()[-1:]
        return json.loads(done.stdout)

    pkg = _modes_archive(tmp_path / "pkg.tar.gz")
    got = run(pkg, tmp_path / "old")
    extract_tarball(pkg, tmp_path / "new")  # this Python, with its data filter: the control
    want = {name: mode for name, (kind, mode, *_) in _tree(tmp_path / "new").items() if kind == "file"}
    assert {name: got[name] for name in want} == want
    assert all(not mode & 0o7022 for mode in got.values()), got
    assert all((tmp_path / "old" / name).stat().st_uid == os.geteuid() for name in got)
    evil = archive(tmp_path / "evil.tar.gz", HOSTILE[0][1])
    refused = run(evil, tmp_path / "evil")["refused"]
    assert "\n" not in refused and "symlink" in refused, refused
    shutil.rmtree(tmp_path / "old")
