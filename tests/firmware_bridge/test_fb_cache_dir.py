"""The compiled firmware is loaded with ctypes: its fallback cache in a shared temp dir must be this user's alone."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pytest

from firmware_bridge import native
from firmware_bridge.errors import FirmwareBuildError


@pytest.fixture
def shared_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.delenv("EDGE_VLA_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # mkdir under a file fails: the temp-dir fallback
    shared = tmp_path / "tmp"
    shared.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(shared))
    return shared


def test_fallback_cache_is_private(shared_tmp: Path) -> None:
    d = native.cache_dir()
    assert d == shared_tmp / f"edge-vla-{os.getuid()}"
    assert stat.S_IMODE(d.stat().st_mode) & 0o022 == 0


def test_a_planted_writable_cache_is_refused(shared_tmp: Path) -> None:
    d = shared_tmp / f"edge-vla-{os.getuid()}"
    d.mkdir()
    os.chmod(d, 0o777)  # control: the same folder made private is accepted (previous test)
    with pytest.raises(FirmwareBuildError, match="only it can write"):
        native.cache_dir()
