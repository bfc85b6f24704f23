"""Ctrl-C on `edge-vla run --emulate` is a controlled stop: the emulated firmware outlives the host's stop.

A terminal's Ctrl-C goes to the whole foreground process group, the emulator child included. When the emulator
died on it first, the host's category-1 stop lost its link mid-ramp and `run` ended in a category-0 trip (exit 3,
"link_stale"): seen in the README test under load."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from onboard_helpers import wait_for


def _emulator_children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"firmware_bridge.emulator.*--parent-pid {pid}"], capture_output=True,
                         text=True)
    return [int(p) for p in out.stdout.split()]


def test_ctrl_c_stops_the_loop_in_a_controlled_way_and_the_emulator_after_it(tmp_path: Path) -> None:
    log = tmp_path / "run.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edge_vla.cli", "run", "--expert", "--emulate", "--arm-on-start", "--duration", "60",
             "--control-socket", str(tmp_path / "control.sock")],
            stdout=sink, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path)
    try:
        wait_for(lambda: "control loop ready" in log.read_text(), 60, "the loop to run armed")
        emulators = _emulator_children(proc.pid)
        assert emulators, "control: the emulator child is found while the loop runs"
        # What a terminal does on Ctrl-C, with the emulator served first (the order that lost the race under load).
        os.kill(emulators[0], signal.SIGINT)
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out = log.read_text()
    assert proc.returncode == 0, out[-3000:]
    # The stop and the DISARM reached a live firmware (the old emulator was gone: "could not send DISARM on exit:
    # serial port ... is down", "DISARM on exit not confirmed", "link_dead True" in the summary).
    for symptom in ("link_stale", "could not send", "not confirmed", "link_dead"):
        assert symptom not in out, out[-3000:]
    wait_for(lambda: not _emulator_children(proc.pid), 10, "the emulator to end with the host")
