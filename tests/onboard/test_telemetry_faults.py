"""Telemetry when the disk fails it, and telemetry files a run left behind cut short.

A full disk (/dev/full answers every write with ENOSPC, as a full filesystem does) must cost the run its
telemetry, not its motion: the loop goes on and stops the way it was asked to. A file cut mid-record (a run
killed, the power lost) must still give back every whole record before the cut."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from onboard_helpers import robot_users, service_run_dir

from edge_vla.onboard.telemetry import Telemetry, read_records
from edge_vla.optional import available

pytest.importorskip("firmware_bridge.emulator_process")

SINKS = [".jsonl", pytest.param(".mcap", marks=pytest.mark.skipif(not available("mcap"), reason="mcap not installed"))]
RECORDS = 2000  # ~150 kB: more than the file buffer (64 kB) and the MCAP chunk (64 kB), so writes reach the disk


def _fill(tel: Telemetry, n: int = RECORDS) -> None:
    for i in range(n):
        tel.record("/control/cycle", 1.0 + i * 0.01, {"n": i, "sent": [0.1, 0.2], "requested": [0.1, 0.2]})


def _full_disk(tmp_path: Path, suffix: str) -> Path:
    """A telemetry path with the given suffix whose writes fail with ENOSPC (a link to /dev/full)."""
    link = tmp_path / f"run{suffix}"
    link.symlink_to("/dev/full")
    return link


@pytest.mark.parametrize("suffix", SINKS)
def test_a_full_disk_stops_the_telemetry_not_the_caller(tmp_path, suffix, caplog) -> None:
    tel = Telemetry(_full_disk(tmp_path, suffix))
    _fill(tel)
    with caplog.at_level(logging.ERROR, logger="edge_vla.onboard.telemetry"):
        tel.drain(5.0)  # the control loop's call: it must not raise into the loop
        _fill(tel, 10)  # records after the failure are not queued (no memory growth, no retry storm)
        tel.drain(5.0)
        tel.close()
    assert tel.failed is not None and "No space left" in tel.failed
    assert not tel.enabled and tel.dropped > 0 and tel.written + tel.dropped >= RECORDS + 10
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and str(tel.path) in said[0] and "goes on without it" in said[0], said


@pytest.mark.parametrize("suffix", SINKS)
def test_control_a_writable_file_keeps_every_record(tmp_path, suffix) -> None:
    """The control: the same records to a real file are all written and nothing is reported failed."""
    tel = Telemetry(tmp_path / f"run{suffix}")
    _fill(tel)
    tel.drain(5.0)
    tel.close()
    assert tel.failed is None and tel.dropped == 0 and tel.written == RECORDS
    assert len(read_records(tel.path)) == RECORDS


def _run_expert(run_dir: Path, telemetry: str) -> subprocess.CompletedProcess[str]:
    """`edge-vla run` as the robot runs it (the service user), bench mode on the emulator, for 4 s."""
    users = robot_users()
    cmd = users.edge_vla(users.service, "run", "--expert", "--emulate", "--arm-on-start", "--rate-hz", "100",
                         "--duration", "4", "--telemetry", telemetry, "--control-socket", "none", "--json")
    return subprocess.run(cmd, cwd=run_dir, env=users.environ(), capture_output=True, text=True, timeout=90)


def test_a_run_whose_telemetry_disk_fills_ends_with_the_planned_stop() -> None:
    """Before the fix the ENOSPC escaped the loop's drain: the run ended in error with a category-0 stop
    (torque off mid-motion, ~2.7 s in). Now the run goes to its duration and stops the planned way."""
    run_dir = service_run_dir("edge-vla-telemetry-full-")
    proc = _run_expert(run_dir, "/dev/full")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert "error" not in summary and summary["trips"] == [] and summary["end"]["kind"] == "duration"
    assert summary["stop"]["category"] == 1 and not summary["armed_at_exit"]  # the planned stop, not torque off
    assert summary["duration_s"] > 3.5  # it ran to its duration
    lines = [ln for ln in proc.stderr.splitlines() if "telemetry to /dev/full stopped" in ln]
    assert len(lines) == 1 and "No space left on device" in lines[0], proc.stderr[-3000:]
    # the summary says so too, not just the path as if everything had been recorded
    assert summary["telemetry"].startswith("/dev/full (stopped mid-run: No space left on device"), summary["telemetry"]


# -- files cut short -----------------------------------------------------------------------------------------

def _written(tmp_path: Path, suffix: str) -> bytes:
    tel = Telemetry(tmp_path / f"whole{suffix}")
    _fill(tel)
    tel.drain(5.0)
    tel.close()
    return tel.path.read_bytes()


@pytest.mark.parametrize("suffix", SINKS)
@pytest.mark.parametrize("cut", [7, 40_000])  # bytes lost at the end: inside the last record / the MCAP summary
def test_a_file_cut_short_gives_back_every_whole_record(tmp_path, suffix, cut, caplog) -> None:
    whole = _written(tmp_path, suffix)
    cut_file = tmp_path / f"cut{suffix}"
    cut_file.write_bytes(whole[:-cut])
    with caplog.at_level(logging.WARNING, logger="edge_vla.onboard.telemetry"):
        recs = read_records(cut_file)
    assert recs, "nothing recovered"
    assert [r["n"] for r in recs] == list(range(len(recs)))  # a prefix of what was written, in order
    # JSON lines lose only the cut record; MCAP loses at most the chunk (64 kB) the cut went through.
    assert len(recs) >= RECORDS - (1 if suffix == ".jsonl" else 1000) - cut // 60
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and str(cut_file) in said[0] and "cut short" in said[0], said


@pytest.mark.parametrize("suffix", SINKS)
def test_control_a_whole_file_reads_back_without_a_warning(tmp_path, suffix, caplog) -> None:
    whole = tmp_path / f"again{suffix}"
    whole.write_bytes(_written(tmp_path, suffix))
    with caplog.at_level(logging.WARNING, logger="edge_vla.onboard.telemetry"):
        assert [r["n"] for r in read_records(whole)] == list(range(RECORDS))
    assert caplog.records == []


@pytest.mark.parametrize(("content", "says"), [
    (b'{"topic": "/control/cycle", "t": 1.0}\n[1, 2]\n{"topic": "/x", "t": 2.0}\n', "line 2: not a JSON object"),
    (b'{"topic": "/control/cycle", "t": 1.0}\n{"topic": \n{"topic": "/x", "t": 2.0}\n', "line 2: not JSON"),
    (b'{"topic": "/control/cycle", "t": 1.0}\n{"topic": "\xff\xfe"}\n', "line 2: not UTF-8"),
    (b"[" * 100_000 + b"\n", "line 1: nested too deeply"),
])
def test_a_corrupt_record_is_named_not_skipped(tmp_path, content, says) -> None:
    """Damage before the last line is not a cut: it is refused with the file and line, nothing silently skipped."""
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    with pytest.raises(ValueError, match=rf"{bad}: {says}"):
        read_records(bad)


def test_a_file_that_is_not_mcap_says_so(tmp_path) -> None:
    bad = tmp_path / "notes.mcap"
    bad.write_text("these are notes, not telemetry\n")
    with pytest.raises(ValueError, match=rf"{bad}: not an MCAP file"):
        read_records(bad)


def test_a_fifo_as_the_telemetry_file_is_refused_at_once(tmp_path: Path) -> None:
    """Opening a FIFO for writing waits for a reader: `edge-vla run --telemetry FIFO` sat in open() and then
    failed 30 s later with a misleading "no joint state". Refused in one line instead (in a child: the old code
    would hang this test). Control: a regular path in the same directory opens."""
    fifo = tmp_path / "run.jsonl"
    os.mkfifo(fifo)
    code = ("import sys\nfrom edge_vla.errors import ConfigError\nfrom edge_vla.onboard.telemetry import Telemetry\n"
            "try:\n    Telemetry(sys.argv[1])\nexcept ConfigError as exc:\n    print(exc)\n    sys.exit(3)\n")
    try:
        done = subprocess.run([sys.executable, "-c", code, str(fifo)], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("Telemetry() blocked opening a FIFO for writing")
    assert done.returncode == 3, done.stderr
    assert str(fifo) in done.stdout and "FIFO" in done.stdout
    t = Telemetry(tmp_path / "ok.jsonl")
    assert t.enabled
    t.close()
