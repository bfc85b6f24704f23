"""A stop whose torque off a servo did not acknowledge (its data wire loose for a moment, bus noise) is not
forgotten: when the host closes the device afterwards, it turns torque off again, read back.

Without that, the servo keeps its torque for good once the wire is back: a Feetech STS (no device watchdog)
keeps driving to its last goal, a Dynamixel holds under torque after its Bus Watchdog expired. The backend runs
in its own process as the service user (scripted_host); the loose wire is injected into the emulated servo.
Control: the servos whose wire stayed connected read torque off right after the stop."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from motor_helpers import give_to_service_user
from scripted_host import ScriptedHost

from firmware_bridge.motors import dynamixel_emulator as dxl
from firmware_bridge.motors import feetech_emulator as sts

IDS = (1, 2, 3)
LOOSE = 2  # the servo whose data wire comes loose
LOOSE_S = 1.0  # long enough for the stop's three torque-off tries and its read-back to find it deaf


@contextmanager
def emulated_bus(scheme: str) -> Iterator[tuple[Any, str, int]]:
    """(the emulator, the backend's URL for it, its Torque Enable address)."""
    if scheme == "feetech":
        pytest.importorskip("scservo_sdk")
        bus: Any = sts.BusEmulator([sts.ServoConfig(servo_id=i, return_delay=0, min_angle=1024, max_angle=3072)
                                    for i in IDS])
        url, torque_addr = "feetech://{port}?ids=1-3", sts.TORQUE_ENABLE
    else:
        bus = dxl.BusEmulator([dxl.ServoConfig(dxl_id=i, return_delay=0, min_position=1024, max_position=3072)
                               for i in IDS])
        url, torque_addr = "dynamixel://{port}?ids=1-3&period_ms=20", dxl.TORQUE_ENABLE
    with bus as b:
        give_to_service_user(b.path)
        yield b, url.format(port=b.port), torque_addr


@pytest.fixture(params=["feetech", "dynamixel"])
def rig(request: pytest.FixtureRequest) -> Iterator[tuple[Any, str, int]]:
    with emulated_bus(request.param) as r:
        yield r


def torques(bus: Any, addr: int) -> list[int]:
    with bus.lock:
        return [bus.servo(i).get(addr) for i in IDS]


def test_close_after_an_unconfirmed_stop_turns_torque_off_once_the_servo_hears_again(rig: Any) -> None:
    bus, url, torque_addr = rig
    with ScriptedHost(url, len(IDS)) as h:
        assert h.do("arm")["ok"] and torques(bus, torque_addr) == [1, 1, 1]
        for _ in range(3):
            assert h.do("poll")["ok"] and h.do("write 0.3")["ok"]
        back_at = bus.disconnect(LOOSE, LOOSE_S)
        stop = h.do("stop")
        assert stop == {"ok": True, "did": "stop", "out": False}, stop  # not read back from the loose servo
        assert torques(bus, torque_addr) == [0, 1, 0]  # control: the connected servos took the torque off
        # the wire is back: the emulator's own deadline passed (its bus thread wakes waiters every tick)
        assert bus.wait_for(lambda: time.monotonic() >= back_at, LOOSE_S + 5.0)
        with bus.lock:
            assert bus.servo(LOOSE).get(torque_addr) == 1, "the loose servo lost its torque by itself"
        closed = h.do("close")
        assert closed["ok"], closed
        assert bus.wait_for(lambda: all(bus.servo(i).get(torque_addr) == 0 for i in IDS), 3.0), \
            f"close() left torque on: {torques(bus, torque_addr)}"


def test_feetech_sigterm_after_an_unconfirmed_stop_still_turns_torque_off() -> None:
    """Feetech has no device watchdog: its SIGTERM hook is the last host path. It stays on a device whose stop was
    not read back, and the process still dies by the signal."""
    with emulated_bus("feetech") as (bus, url, torque_addr), ScriptedHost(url, len(IDS)) as h:
        assert h.do("arm")["ok"] and h.do("write 0.3")["ok"]
        back_at = bus.disconnect(LOOSE, LOOSE_S)
        assert h.do("stop")["out"] is False and torques(bus, torque_addr) == [0, 1, 0]
        assert bus.wait_for(lambda: time.monotonic() >= back_at, LOOSE_S + 5.0)
        h.proc.send_signal(signal.SIGTERM)
        assert h.proc.wait(10.0) == -signal.SIGTERM  # died by the signal, as the host's own default would
        assert torques(bus, torque_addr) == [0, 0, 0], "SIGTERM left torque on"


def test_feetech_sigterm_after_an_arm_that_failed_with_a_servo_powered_still_turns_torque_off() -> None:
    """An arm can fail after torque on: a servo's wire comes loose between the torque-on write and its read-back,
    so arm() raises and its torque off is not read back from that servo either. The SIGTERM hook must already be
    on the device then (it used to be installed only after a successful arm). Control: the other servos read
    torque off right after the failed arm."""
    with emulated_bus("feetech") as (bus, url, torque_addr), ScriptedHost(url, len(IDS)) as h:
        bus.disconnect_after_torque_on(LOOSE, LOOSE_S)
        armed = h.do("arm")
        assert not armed["ok"], armed
        assert torques(bus, torque_addr) == [0, 1, 0]  # the loose servo kept its torque, the others are off
        back_at = time.monotonic() + LOOSE_S
        assert bus.wait_for(lambda: time.monotonic() >= back_at, LOOSE_S + 5.0)
        h.proc.send_signal(signal.SIGTERM)
        assert h.proc.wait(10.0) == -signal.SIGTERM
        assert torques(bus, torque_addr) == [0, 0, 0], "SIGTERM after a failed arm left torque on"
