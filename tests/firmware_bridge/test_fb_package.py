"""Package boundaries and the emulator's command line."""

from __future__ import annotations

import argparse
import subprocess
import sys

from firmware_bridge import emulator


def test_firmware_bridge_imports_neither_edge_vla_nor_torch() -> None:
    code = ("import sys, firmware_bridge.link, firmware_bridge.serial_link, firmware_bridge.can_link, "
            "firmware_bridge.emulator; bad = [m for m in sys.modules if m.split('.')[0] in ('edge_vla', 'torch')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


def test_emulator_cli_contract() -> None:
    parser = argparse.ArgumentParser()
    emulator.configure(parser)
    args = parser.parse_args(["--pty", "--joints", "3", "--heartbeat-timeout-ms", "50", "--drop", "0.1",
                              "--events", "x.jsonl", "--print-path"])
    cfg = emulator.config_from_args(args)
    assert len(cfg.joints) == 3 and cfg.heartbeat_timeout_ms == 50 and cfg.faults.drop == 0.1


def test_emulator_module_runs_and_prints_its_port(tmp_path) -> None:
    events = tmp_path / "ev.jsonl"
    run = subprocess.run([sys.executable, "-m", "firmware_bridge.emulator", "--print-path", "--duration", "0.3",
                          "--joints", "2", "--events", str(events)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[0].startswith("/dev/")
    assert [e["event"] for e in emulator.read_events(events)] == ["started", "exit"]
