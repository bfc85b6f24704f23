"""Helpers for the onboard tests that run the real control process against the emulator on a pty."""

from __future__ import annotations

import time

import pytest

from edge_vla.onboard.drill import EMULATOR_LIMITS

emulator_process = pytest.importorskip("firmware_bridge.emulator_process")


def start_emulator(**options):
    """The emulator with a 300 ms heartbeat timeout (a shared 2-core box can starve a process for 100 ms)."""
    options.setdefault("heartbeat_timeout_ms", 300)
    return emulator_process.EmulatorProcess(joints=2, limits=EMULATOR_LIMITS, **options)


def events(emu, name: str | None = None, since: float = 0.0) -> list[dict]:
    return [e for e in emu.events() if (name is None or e["event"] == name) and e["t"] >= since]


def wait_for(pred, timeout: float, what: str, step: float = 0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
