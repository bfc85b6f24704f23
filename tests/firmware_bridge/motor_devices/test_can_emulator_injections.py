"""The fault injections the CAN fault campaign (edge_vla.onboard.motor_campaign) uses on the Damiao and CiA 402
emulators, each against a host driving them (the emulator in its own process, driven through its pipe):

- `cut_bus(True)`: the bus between host and devices is gone (a cable cut, the host's CAN interface down): the
  devices hear nothing and nothing they send arrives, while their own timers run on, so each device's own watchdog
  (Damiao TIMEOUT, CiA 402 heartbeat consumer) expires. Control: the same host and devices without the cut stay
  enabled; after `cut_bus(False)` the devices answer again.
- `block_joint(id, True)`: the joint cannot move (a collision); control: unblocked, the same command moves it.
"""

from __future__ import annotations

import math
import time
from urllib.parse import parse_qsl

import numpy as np
import pytest
from cia402_helpers import drive as drive_drives
from cia402_helpers import wait_for
from motor_helpers import drive

from firmware_bridge.motors import FaultLatchedError
from firmware_bridge.motors import damiao as dm
from firmware_bridge.motors import damiao_emulator as dme
from firmware_bridge.motors.damiao import DamiaoDevice

PERIOD_MS = 50  # device watchdogs at 100 ms: room for a loaded 2-core box
CYCLE_S = PERIOD_MS / 1000 / 2


@pytest.fixture
def damiao():  # type: ignore[no-untyped-def]
    with dme.EmulatorProcess([dme.MotorConfig(esc_id=1)], interface="udp_multicast",
                             channel=dme.unique_udp_channel()) as e:
        dev = DamiaoDevice.from_url(e.port, dict(parse_qsl(f"ids=1&period_ms={PERIOD_MS}")),
                                    joint_limits=[(-1.6, 1.6)]).open()
        try:
            yield e, dev
        finally:
            dev.close()


def test_damiao_cut_bus_the_motor_hears_nothing_and_its_timeout_expires(damiao) -> None:  # type: ignore[no-untyped-def]
    e, dev = damiao
    dev.arm()
    drive(dev, 0.3, 10, CYCLE_S)  # control: fed by the host, enabled, no expiry
    assert e.snapshot(1)["enabled"] and not e.events_of("timeout_expired")
    frames = e.counters()["frames"]
    # Taken before the cut: the emulator process applies it before cut_bus() returns, so a time taken after the
    # call, by a test thread descheduled meanwhile (a loaded 2-core box), can be later than the expiry it bounds.
    cut_at = time.monotonic()
    e.cut_bus(True)
    with pytest.raises(FaultLatchedError):  # the host keeps sending; nothing arrives, nothing answers
        for _ in range(20):
            dev.poll_state()
            dev.write_setpoints([0.3])
            time.sleep(CYCLE_S)
    assert e.wait_until(lambda: bool(e.events_of("timeout_expired")), 2.0)
    expired = e.events_of("timeout_expired")[0]
    assert expired.detail["since_last_command"] >= 2 * PERIOD_MS / 1000 and expired.t >= cut_at
    assert e.counters()["frames"] == frames  # not one frame dispatched during the cut
    assert e.counters()["cut"] > 0  # but they reached the emulator's end of the bus and were dropped there
    assert not e.snapshot(1)["enabled"] and e.snapshot(1)["status"] == dm.STATUS_LOST_COMM
    assert dev.counters["missed"] >= dev.max_missed and "no_reply" in {f.code for f in dev.faults}
    e.cut_bus(False)
    dev.stop()  # answered again once the bus is back
    assert e.events_of("disable")


def test_damiao_a_blocked_joint_does_not_move_and_its_torque_saturates(damiao) -> None:  # type: ignore[no-untyped-def]
    e, dev = damiao
    dev.arm()
    e.block_joint(1, True)
    start = e.snapshot(1)["position"]
    drive(dev, 1.0, 10, CYCLE_S)
    blocked = e.snapshot(1)
    assert blocked["position"] == start and blocked["velocity"] == 0.0
    assert abs(blocked["torque"]) == pytest.approx(10.0)  # kp 20 x 1 rad = 20 Nm, clamped to TMAX
    e.block_joint(1, False)  # control: the same command moves it
    drive(dev, 1.0, 10, CYCLE_S)
    assert e.snapshot(1)["position"] > start + 0.3
    assert [ev.detail["blocked"] for ev in e.events_of("block_joint")] == [True, False]


@pytest.fixture
def cia402():  # type: ignore[no-untyped-def]
    pytest.importorskip("canopen", reason="canopen is not installed (pip install 'edge-vla[cia402]')")
    from cia402_helpers import JOINT_LIMITS, LIMIT_COUNTS, device_from_url

    from firmware_bridge.motors.cia402_emulator import DriveConfig, EmulatorProcess

    with EmulatorProcess([DriveConfig(node=1, soft_limits=(-LIMIT_COUNTS, LIMIT_COUNTS))]) as e:
        dev = device_from_url(e.url("1", period_ms=PERIOD_MS), joint_limits=[JOINT_LIMITS]).open()
        try:
            yield e, dev
        finally:
            dev.close()


def test_cia402_cut_bus_the_drive_hears_nothing_and_its_heartbeat_consumer_expires(cia402) -> None:  # type: ignore[no-untyped-def]
    from firmware_bridge.motors.base import MotorError

    e, dev = cia402
    dev.arm()
    drive_drives(dev, 0.3, 10, CYCLE_S)  # control: fed by the host's heartbeat, Operation Enabled, no expiry
    assert e.snapshot(1)["state"] == "OPERATION ENABLED" and not e.events_of("heartbeat_expired")
    beats = e.snapshot(1)["heartbeats"]
    cut_at = time.monotonic()  # before the cut, as in the Damiao test above
    e.cut_bus(True)
    assert wait_for(lambda: bool(e.events_of("heartbeat_expired")), 2.0)
    expired = e.events_of("heartbeat_expired")[0]
    assert expired.detail["since_last"] >= 2 * PERIOD_MS / 1000 and expired.t >= cut_at
    with pytest.raises(MotorError):  # the host's SYNC is unanswered; after 3 periods its SDO read times out
        for _ in range(20):
            dev.poll_state()
            time.sleep(CYCLE_S)
    assert e.snapshot(1)["heartbeats"] == beats  # the host kept beating; nothing arrived
    assert wait_for(lambda: e.snapshot(1)["state"] == "SWITCH ON DISABLED", 2.0)  # quick stop, then torque off
    e.cut_bus(False)
    assert e.snapshot(1)["nmt"] == "PRE-OPERATIONAL"  # 0x1029:1 = 0 on the communication error
    dev.poll_state()  # by SDO now (a pre-operational drive sends no PDO): latches pdo_silent
    codes = {f.code for f in dev.faults}
    assert "pdo_silent" in codes and "heartbeat_lost" not in codes  # its EMCY 0x8130 went out during the cut
    dev.clear_faults()  # answered again: NMT start and a fault reset, read back
    assert e.snapshot(1)["nmt"] == "OPERATIONAL"


def test_cia402_a_blocked_joint_does_not_move(cia402) -> None:  # type: ignore[no-untyped-def]
    e, dev = cia402
    dev.arm()
    e.block_joint(1, True)
    start = e.snapshot(1)["position"]
    drive_drives(dev, 1.0, 10, CYCLE_S)
    blocked = e.snapshot(1)
    assert blocked["position"] == start and blocked["velocity"] == 0
    e.block_joint(1, False)  # control: the same command moves it
    drive_drives(dev, 1.0, 10, CYCLE_S)
    assert e.snapshot(1)["position"] > start + 0.3 * 65536 / (2 * math.pi)
    assert [ev.detail["blocked"] for ev in e.events_of("block_joint")] == [True, False]
    assert np.isfinite(dev.poll_state().positions).all()
