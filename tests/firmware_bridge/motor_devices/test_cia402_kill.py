"""Host `kill -9` mid-motion: the cia402:// backend runs in its own process as the service user, the emulated drive
(its own process) here.

With the backend, the drive's heartbeat consumer (0x1016, two control periods) expires, the drive applies its abort
connection option (0x6007 = 3: quick stop) and its quick stop option (0x605A = 2) takes it to Switch On Disabled:
torque off. Control: a host that enables the drive without setting 0x1016 (the drive's consumer off) leaves it
driving to the dead host's last target under torque."""

from __future__ import annotations

import signal
import time

import pytest

pytest.importorskip("canopen", reason="canopen is not installed (pip install 'edge-vla[cia402]')")

from cia402_helpers import LIMIT_COUNTS, wait_for
from motor_helpers import run_host, wait_line

from firmware_bridge.motors.cia402_emulator import DriveConfig, EmulatorProcess

PERIOD_MS = 20
CONSUMER_S = 2 * PERIOD_MS / 1000
SLACK_S = 0.25  # the emulator's tick thread shares 2 loaded cores with the suite; docs/motors.md has measured times

BACKEND_HOST = """
import math, sys, time
sys.path.insert(0, "tests/firmware_bridge/motor_devices")
from cia402_helpers import device_from_url
dev = device_from_url(sys.argv[1], joint_limits=[(-1.6, 1.6)]).open()
dev.arm()
print("armed", flush=True)
t0 = time.monotonic()
while True:
    dev.poll_state()
    dev.write_setpoints([1.2 * math.sin(4 * (time.monotonic() - t0))])
    time.sleep(0.005)
"""

CONSUMER_OFF_HOST = """
import math, struct, sys, time
import canopen
net = canopen.Network()
net.connect(interface="udp_multicast", channel=sys.argv[1], port=int(sys.argv[2]))
node = net.add_node(1, canopen.ObjectDictionary())
net.send_message(0, [0x01, 1])
node.sdo.download(0x6060, 0, struct.pack("<b", 8))
for cw in (0x06, 0x07, 0x0F):
    node.sdo.download(0x6040, 0, struct.pack("<H", cw))
print("armed", flush=True)
t0 = time.monotonic()
while True:  # heartbeats too, but the drive was never told to watch them (0x1016 left 0)
    net.send_message(0x77F, b"\\x05")
    node.sdo.download(0x607A, 0, struct.pack("<i", int(14000 * math.sin(4 * (time.monotonic() - t0)))))
    time.sleep(0.005)
"""


@pytest.fixture
def emu():  # type: ignore[no-untyped-def]
    with EmulatorProcess([DriveConfig(node=1, soft_limits=(-LIMIT_COUNTS, LIMIT_COUNTS))]) as e:
        yield e


def _kill_mid_motion(e: EmulatorProcess, *argv: str) -> float:
    proc = run_host(*argv)
    try:
        wait_line(proc, "armed", 20.0)
        assert wait_for(lambda: abs(e.snapshot(1)["velocity"]) > 3000, 5.0), "never moved"
        killed_at = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        proc.wait(5.0)
        return killed_at
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_kill_9_mid_motion_the_drive_quick_stops_and_disables_itself(emu: EmulatorProcess) -> None:
    killed_at = _kill_mid_motion(emu, BACKEND_HOST, emu.url("1", period_ms=PERIOD_MS))
    assert wait_for(lambda: bool(emu.events_of("heartbeat_expired")), 5.0)
    expired = emu.events_of("heartbeat_expired")[0]
    assert CONSUMER_S <= expired.detail["since_last"] <= CONSUMER_S + SLACK_S  # never early
    assert expired.t - killed_at <= CONSUMER_S + SLACK_S
    assert wait_for(lambda: emu.snapshot(1)["state"] == "SWITCH ON DISABLED", 2.0)
    seen = [(ev.detail["to"], ev.detail["transition"], ev.detail["cause"]) for ev in emu.events_of("state")]
    assert seen[-2] == ("QUICK STOP ACTIVE", 11, "abort connection (0x6007 = 3)")
    assert seen[-1][:2] == ("SWITCH ON DISABLED", 12)
    snap = emu.snapshot(1)
    assert not snap["torque"] and snap["nmt"] == "PRE-OPERATIONAL"
    assert 0x8130 in [ev.detail["code"] for ev in emu.events_of("emcy")]
    disabled = [ev.t for ev in emu.events_of("state") if ev.detail["to"] == "SWITCH ON DISABLED"][-1]
    print(f"kill -9: consumer expired {1000 * expired.detail['since_last']:.1f} ms after the last heartbeat "
          f"({1000 * (expired.t - killed_at):.0f} ms after the kill), torque off {1000 * (disabled - killed_at):.0f} "
          "ms after the kill")


def test_control_with_the_consumer_left_off_the_drive_keeps_driving(emu: EmulatorProcess) -> None:
    killed_at = _kill_mid_motion(emu, CONSUMER_OFF_HOST, emu.group, str(emu.udp_port))
    time.sleep(10 * CONSUMER_S)
    snap = emu.snapshot(1)
    assert not emu.events_of("heartbeat_expired")
    assert snap["state"] == "OPERATION ENABLED" and snap["torque"]  # still powered, at the dead host's target
    assert abs(snap["position"] - snap["target"]) < 100
    assert time.monotonic() - killed_at > 10 * CONSUMER_S
