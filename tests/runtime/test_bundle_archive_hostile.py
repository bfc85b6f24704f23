"""A bundle may be given as a .tar.gz (`Bundle.open`, `Policy.load`, `edge-vla export`/`package` inputs); it is
extracted before its manifest's hashes can be checked, so extraction must never write outside its temporary
directory, whatever the archive holds. A bundle archive holds only regular files and directories: anything else
is refused in one line."""

from __future__ import annotations

import tarfile
import tempfile
from pathlib import Path

import pytest
from hostile_tar import ESCAPED, add, archive, realpath_limit_escape

from edge_vla.bundle import Bundle
from edge_vla.errors import BundleError


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tempfile's directory moved under tmp_path: a bundle archive extracts to TMP/tmpXXXXXXXX (8 random
    characters), so an archive can aim exactly at tmp_path/ESCAPED, two levels up."""
    tmp = tmp_path / "t"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp


def test_a_realpath_limit_symlink_chain_writes_nothing_outside(private_tmp: Path, tmp_path: Path) -> None:
    evil = realpath_limit_escape(tmp_path / "evil.tar.gz", len(str(private_tmp / "tmpXXXXXXXX")), up=2)
    with pytest.raises(BundleError) as caught:
        Bundle.open(evil)
    assert not (tmp_path / ESCAPED).exists(), "a hostile bundle archive wrote outside its extraction directory"
    assert "\n" not in str(caught.value) and "symlink" in str(caught.value), caught.value


@pytest.mark.parametrize(("what", "build"), [
    ("symlink", lambda t: add(t, "bundle/manifest.json", tarfile.SYMTYPE, "/etc/passwd")),
    ("hard link", lambda t: add(t, "bundle/x", tarfile.LNKTYPE, "bundle/y")),
    ("fifo", lambda t: add(t, "bundle/pipe", tarfile.FIFOTYPE)),
    ("'..'", lambda t: add(t, "bundle/../../outside", data=b"x")),
])
def test_members_a_bundle_never_holds_are_refused_in_one_line(private_tmp: Path, tmp_path: Path, what: str,
                                                              build) -> None:
    with pytest.raises(BundleError) as caught:
        Bundle.open(archive(tmp_path / "evil.tar.gz", build))
    message = str(caught.value)
    assert "\n" not in message and what in message and "only regular files and directories" in message, message
    assert not (tmp_path / "outside").exists()


def test_a_well_formed_bundle_archive_opens(tiny_bundle: Path, tmp_path: Path) -> None:  # control
    good = tmp_path / "b.tar.gz"
    with tarfile.open(good, "w:gz") as tar:
        tar.add(tiny_bundle, arcname="bundle")
    assert (Bundle.open(good).root / "manifest.json").is_file()
