"""The residual risk of a servo bus with no device watchdog, measured: the backend runs in its own process as an
unprivileged user, the emulated STS3215 bus here.

`kill -9` mid-motion: nothing in the host can act, and the servos keep torque on and keep driving to the last
goal (the documented, expected behaviour; mitigations: a hardware E-stop on servo power, or an MCU running this
project's firmware reference between host and bus). Control: SIGTERM, interpreter exit and a host's own SIGTERM
handler all end with torque off on every id."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

pytest.importorskip("scservo_sdk", reason="feetech-servo-sdk is not installed (pip install 'edge-vla[feetech]')")

from motor_helpers import give_to_service_user, run_host, wait_line

from firmware_bridge.motors import feetech_emulator as emu
from firmware_bridge.motors.feetech_emulator import BusEmulator, ServoConfig

IDS = (1, 2, 3)
HOLD_OBSERVED_S = 1.0  # how long after kill -9 the test watches the servos keep torque

HOST = """
import math, signal, sys, time
from firmware_bridge.motors import open_device
mode = sys.argv[2]
stop = []
if mode == "host_handler":  # the host's own handler, installed before arm (as edge-vla run does)
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
dev = open_device(sys.argv[1], joint_limits=[(-1.6, 1.6)] * 3)
dev.arm()
print("armed", flush=True)
t0 = time.monotonic()
while not stop and not (mode == "atexit" and time.monotonic() - t0 > 0.3):
    dev.poll_state()
    dev.write_setpoints([0.8 * math.sin(3 * (time.monotonic() - t0))] * 3)
    time.sleep(0.005)
print("host handler ran" if stop else "fell off the end without close()", flush=True)
"""


@pytest.fixture
def bus():  # type: ignore[no-untyped-def]
    with BusEmulator([ServoConfig(servo_id=i, return_delay=0, min_angle=1024, max_angle=3072) for i in IDS]) as b:
        give_to_service_user(b.path)
        yield b


def _start_moving(bus: BusEmulator, mode: str) -> subprocess.Popen[str]:
    proc = run_host(HOST, f"feetech://{bus.port}?ids=1-3&latency_ms=100", mode)  # a reply may be late on a loaded box
    wait_line(proc, "armed", 20.0)
    assert bus.wait_for(lambda: all(abs(bus.servo(i).velocity) > 200 for i in IDS), 5.0), "never moved"
    return proc


def _torque_off_everywhere(bus: BusEmulator) -> bool:
    return all(bus.servo(i).table[emu.TORQUE_ENABLE] == 0 for i in IDS)


def test_kill_9_mid_motion_the_servos_keep_torque_and_drive_to_the_last_goal(bus: BusEmulator) -> None:
    proc = _start_moving(bus, "plain")
    try:
        killed_at = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(5.0) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    with bus.lock:
        last_goals = {i: bus.servo(i).value(emu.GOAL_POSITION) for i in IDS}
    # the documented residual risk: still powered, still driving, to the goal the dead host last sent
    assert bus.wait_for(lambda: all(abs(bus.servo(i).value(emu.PRESENT_POSITION) - last_goals[i]) <= 2
                                    for i in IDS), 5.0)
    assert not bus.wait_for(lambda: not all(bus.servo(i).torque for i in IDS),
                            max(0.0, killed_at + HOLD_OBSERVED_S - time.monotonic()))
    with bus.lock:
        assert all(bus.servo(i).torque and bus.servo(i).value(emu.GOAL_POSITION) == last_goals[i] for i in IDS)
    assert [e for e in bus.events_of("torque") if e.detail["value"] == 0] == []  # nobody turned it off


def test_control_sigterm_turns_torque_off_on_every_id_and_still_dies_by_the_signal(bus: BusEmulator) -> None:
    proc = _start_moving(bus, "plain")
    sent_at = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10.0) == -signal.SIGTERM  # the default action still happens after the torque off
    assert bus.wait_for(lambda: _torque_off_everywhere(bus), 1.0)
    offs = [e for e in bus.events_of("torque") if e.detail["value"] == 0]
    assert sorted(e.servo_id for e in offs) == list(IDS)  # one acknowledged write per id, read back by the host
    assert max(e.t for e in offs) - sent_at < 5.0  # loose: 2 shared cores; docs/motors.md quotes the measurement
    assert "torque off read back from every servo" in (proc.stderr.read() if proc.stderr else "")


def test_control_a_hosts_own_sigterm_handler_is_chained_after_the_torque_off(bus: BusEmulator) -> None:
    proc = _start_moving(bus, "host_handler")
    proc.send_signal(signal.SIGTERM)
    wait_line(proc, "host handler ran", 10.0)
    assert proc.wait(10.0) == 0
    assert _torque_off_everywhere(bus)


def test_control_interpreter_exit_without_close_turns_torque_off(bus: BusEmulator) -> None:
    proc = _start_moving(bus, "atexit")
    wait_line(proc, "fell off the end without close()", 10.0)
    assert proc.wait(10.0) == 0
    assert _torque_off_everywhere(bus)
    assert "interpreter exit: torque off" in (proc.stderr.read() if proc.stderr else "")
