"""The C firmware reference: its own unit tests under -Werror, and byte-for-byte agreement with Python."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from fb_vectors_gen import VECTORS, build

from firmware_bridge import framing, native
from firmware_bridge.firmware import c_crc32c, c_frame_decode, c_frame_encode

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed")
FW = native.FIRMWARE_DIR


def test_vectors_file_is_what_the_python_codec_produces() -> None:
    assert VECTORS.read_text() == build(), "codec changed: regenerate with tests/firmware_bridge/fb_vectors_gen.py"


FLAGS = ["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-Wshadow", "-Wconversion", "-Wno-sign-conversion",
         '-DFW_PORT_HEADER="test_port.h"']


def _build_c_tests(out: Path, *extra: str) -> Path:
    run = subprocess.run(["gcc", *FLAGS, *extra, *(str(FW / f) for f in ("test_fw.c", "fw_core.c", "fw_codec.c")),
                          "-o", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return out


def test_c_unit_tests_pass_with_warnings_as_errors(tmp_path: Path) -> None:
    """Includes the interrupt injector: a timer interrupt at every preemption point of the RX path."""
    exe = _build_c_tests(tmp_path / "test_fw")
    run = subprocess.run([str(exe), str(VECTORS)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 failures" in run.stdout
    assert "0 runs with a corrupted, lost or misapplied frame" in run.stdout


def test_interrupt_injector_detects_missing_critical_sections(tmp_path: Path) -> None:
    """Negative control: the same injector on a build without critical sections finds broken runs,
    so the test above could fail."""
    exe = _build_c_tests(tmp_path / "test_fw_nocrit", "-DFW_TEST_NO_CRITICAL")
    run = subprocess.run([str(exe), "--injector-only"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 3, run.stdout + run.stderr
    broken = int(run.stdout.split(" runs with")[0].rsplit(", ", 1)[1])
    assert broken > 0


def test_c_and_python_agree_on_shared_vectors() -> None:
    data = json.loads(VECTORS.read_text())
    assert c_crc32c(b"123456789") == int(data["crc32c_check"]["crc"], 16)
    for v in data["frames"]:
        payload, frame = bytes.fromhex(v["payload"]), bytes.fromhex(v["frame"])
        assert c_frame_encode(v["version"], v["type"], v["seq"], payload) == frame, v["name"]
        assert framing.encode_raw(v["type"], v["seq"], payload, v["version"]) == frame, v["name"]
        assert c_frame_decode(frame[:-1]) == (0, v["version"], v["type"], v["seq"], payload), v["name"]
        raw = framing.decode_raw(frame[:-1])
        assert (raw.version, raw.type, raw.seq, raw.payload) == (v["version"], v["type"], v["seq"], payload)
    for v in data["rejects"]:
        assert c_frame_decode(bytes.fromhex(v["block"]))[0] == v["status"], v["name"]


def test_library_is_cached_by_source_hash(tmp_path: Path) -> None:
    first = native.build_library(tmp_path)
    mtime = first.stat().st_mtime_ns
    assert native.build_library(tmp_path) == first and first.stat().st_mtime_ns == mtime
    assert native.source_hash() in str(first)
    assert not list(first.parent.glob(".libfwref-*"))  # no temporary left behind


def test_missing_compiler_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    with pytest.raises(native.FirmwareBuildError, match="install gcc"):
        native.build_library(tmp_path)
