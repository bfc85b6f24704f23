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


def test_c_firmware_and_python_agree_on_the_1_1_and_1_2_layouts() -> None:
    """What the C firmware actually sends (SAFETY_CONFIG, SESSION, STATE with its status word) decodes in
    Python to the configured values and re-encodes to the same bytes; Python's session-bound ARM arms it."""
    import numpy as np

    from firmware_bridge import protocol as p
    from firmware_bridge.firmware import FirmwareRef

    safety = [p.JointSafety("joint", 0.25, 1.5, 0.0, 150.0, 7.5), p.JointSafety("gripper", 0.0, 0.0, 4.5, 80.0, 2.5)]
    fw = FirmwareRef([p.JointLimits("a", -1, 1, 2, 10), p.JointLimits("b", -2, 2, 3, 6)], state_rate_hz=100,
                     link_loss_category=0, link_error_category=1, enable_required=True, enable_category=1,
                     seq_window=77, error_leak_per_s=12, joint_safety=safety)
    fw.set_enable(True, 500)
    fw.rx(framing.encode(p.Hello(), 9), 1000)
    fw.rx(framing.encode(p.Stop(1), 10), 2000)
    frames = [framing.decode_raw(b) for b in framing.StreamDecoder().feed(fw.tx_take())]
    by_type = {f.type: f for f in frames}
    sc = p.SafetyConfig.decode(by_type[p.MsgType.SAFETY_CONFIG].payload)
    assert sc.encode() == by_type[p.MsgType.SAFETY_CONFIG].payload
    assert (sc.link_loss_category, sc.link_error_category, sc.enable_category, sc.enable_required,
            sc.enable_asserted, sc.seq_window, sc.error_leak_per_s, sc.link_error_limit) == (0, 1, 1, True, True, 77,
                                                                                           12, 4)
    assert sc.joints == tuple(safety)
    caps = p.Capabilities.decode(by_type[p.MsgType.CAPABILITIES].payload)
    assert (caps.protocol_major, caps.protocol_minor) == (1, 2)
    session = p.Session.decode(by_type[p.MsgType.SESSION].payload)
    assert session.encode() == by_type[p.MsgType.SESSION].payload
    assert session == p.Session(fw.session, 9) and session.session != 0
    fw.set_measured(np.array([0.5, -0.25]), np.zeros(2), np.array([0.0, 1.0]))
    fw.tick(20_000)
    states = [framing.decode_raw(b) for b in framing.StreamDecoder().feed(fw.tx_take())]
    raw = next(f for f in states if f.type == p.MsgType.STATE)
    st = p.State.decode(raw.payload)
    assert st.encode() == raw.payload
    assert st.status == p.Status.ENABLE_INPUT | p.Status.STOP_LATCHED | p.Status.ENABLE_REQUIRED
    fw.rx(framing.encode(p.ClearFaults(session.session), 11) + framing.encode(p.Arm(session.session), 12), 30_000)
    assert fw.mode == p.Mode.ARMED
