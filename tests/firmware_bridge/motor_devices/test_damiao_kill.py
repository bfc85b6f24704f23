"""Host `kill -9` mid-motion: the damiao:// backend runs in its own process as the service user, the emulated
motors in another (python-can's udp_multicast bus between them).

With the backend, each motor's own TIMEOUT (written at arm, RAM) expires and the motor takes the documented action
(the facts table's choice: disable, status LOST_COMM 0xD) within the timeout plus slack. Control: a host that enables
the motors the way LeRobot does (TIMEOUT never written, so it stays 0) leaves them enabled and driving to the last
command forever."""

from __future__ import annotations

import signal
import time

import pytest
from motor_helpers import run_host, wait_line

from firmware_bridge.motors import damiao as dm
from firmware_bridge.motors import damiao_emulator as emu
from firmware_bridge.motors.damiao_emulator import EmulatorProcess, MotorConfig

IDS = (1, 2, 3)
PERIOD_MS = 25  # TIMEOUT 2 periods = 50 ms = 1000 units of 50 us
TIMEOUT_S = 2 * PERIOD_MS / 1000
SLACK_S = 0.5  # the emulator process shares 2 cores with the suite: never early, at most this late

BACKEND_HOST = """
import math, sys, time
from urllib.parse import parse_qsl
from firmware_bridge.motors.damiao import DamiaoDevice
port, _, query = sys.argv[1].removeprefix("damiao://").partition("?")
dev = DamiaoDevice.from_url(port, dict(parse_qsl(query)), joint_limits=[(-1.6, 1.6)] * 3).open()
dev.arm()
print("armed", flush=True)
t0 = time.monotonic()
while True:
    dev.poll_state()
    dev.write_setpoints([1.2 * math.sin(4 * (time.monotonic() - t0))] * 3)
    time.sleep(0.004)
"""

LEROBOT_LIKE_HOST = """
import math, sys, time
import can
from firmware_bridge.motors import damiao as dm
interface, _, channel = sys.argv[1].partition("/")
group, _, port = channel.rpartition(":")
bus = can.Bus(interface=interface, channel=group, port=int(port))
ranges = dm.MitRanges(12.5, 30.0, 10.0)
for i in (1, 2, 3):
    bus.send(can.Message(arbitration_id=i, data=dm.ENABLE, is_extended_id=False))  # TIMEOUT (RID 9) never written
print("armed", flush=True)
t0 = time.monotonic()
while True:
    goal = 1.2 * math.sin(4 * (time.monotonic() - t0))
    for i in (1, 2, 3):
        bus.send(can.Message(arbitration_id=i, data=dm.encode_mit(goal, 0.0, 20.0, 1.0, 0.0, ranges),
                             is_extended_id=False))
    time.sleep(0.004)
"""


@pytest.fixture
def emulator():  # type: ignore[no-untyped-def]
    with EmulatorProcess([MotorConfig(esc_id=i) for i in IDS], interface="udp_multicast",
                         channel=emu.unique_udp_channel()) as e:
        yield e


def _kill_mid_motion(e: EmulatorProcess, code: str, arg: str) -> float:
    proc = run_host(code, arg)
    try:
        wait_line(proc, "armed", 30.0)
        assert e.wait_until(lambda: all(abs(e.snapshot(i)["velocity"]) > 0.5 for i in IDS), 5.0), "never moved"
        killed_at = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        proc.wait(5.0)
        return killed_at
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_kill_9_mid_motion_the_motor_timeout_disables_every_motor(emulator: EmulatorProcess) -> None:
    killed_at = _kill_mid_motion(emulator, BACKEND_HOST, f"damiao://{emulator.port}?ids=1-3&period_ms={PERIOD_MS}")
    assert emulator.wait_until(lambda: len(emulator.events_of("timeout_expired")) == len(IDS), 5.0)
    for event in emulator.events_of("timeout_expired"):
        assert event.detail["timeout_s"] == pytest.approx(TIMEOUT_S)
        assert TIMEOUT_S <= event.detail["since_last_command"] <= TIMEOUT_S + SLACK_S  # never early
        assert killed_at <= event.t <= killed_at + TIMEOUT_S + SLACK_S
    for i in IDS:
        snap = emulator.snapshot(i)
        assert not snap["enabled"] and snap["status"] == dm.STATUS_LOST_COMM  # the documented action
    # no torque any more: the joints coast to rest
    assert emulator.wait_until(lambda: all(abs(emulator.snapshot(i)["velocity"]) < 0.05 for i in IDS), 3.0)
    assert not emulator.events_of("save")


def test_control_with_timeout_left_0_the_motors_keep_driving_after_kill_9(emulator: EmulatorProcess) -> None:
    killed_at = _kill_mid_motion(emulator, LEROBOT_LIKE_HOST, emulator.port)
    assert not emulator.wait_until(lambda: bool(emulator.events_of("timeout_expired")), 10 * TIMEOUT_S)
    # still enabled, still driving to the dead host's last command under torque
    assert emulator.wait_until(lambda: all(abs(emulator.snapshot(i)["position"] - emulator.snapshot(i)["recent"][-1]["p"])
                                           < 0.02 for i in IDS), 2.0)
    for i in IDS:
        snap = emulator.snapshot(i)
        assert snap["enabled"] and snap["status"] == dm.STATUS_ENABLED and snap["recent"][-1]["kp"] > 19
    assert time.monotonic() - killed_at > 10 * TIMEOUT_S
