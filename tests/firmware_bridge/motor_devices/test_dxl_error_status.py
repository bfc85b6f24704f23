"""A Dynamixel that answers a read with an error status packet and no data (what Protocol 2.0 sends for a read the
servo cannot serve: Result Fail, Data Range, Access Error) must be a one-line bus error naming the servo, never
positions decoded from missing bytes, and never an arm that leaves torque on.

The backend runs in its own process as the service user (scripted_host); the fault is injected into the emulated
servo between its commands. Each fault case has a control: the same step without the fault, read on the bus."""

from __future__ import annotations

import math

import pytest
from motor_helpers import give_to_service_user
from scripted_host import ScriptedHost

from firmware_bridge.motors import dynamixel_emulator as emu
from firmware_bridge.motors.dynamixel_emulator import BusEmulator, ServoConfig

IDS = (1, 2, 3)
TICK = 2 * math.pi / 4096
STATE_ADDR = 126  # Present Current .. Present Position: what poll_state sync-reads every cycle


@pytest.fixture
def bus():  # type: ignore[no-untyped-def]
    with BusEmulator([ServoConfig(dxl_id=i, return_delay=0, min_position=1024, max_position=3072,
                                  initial_position=2048 + 300 * i) for i in IDS]) as b:
        give_to_service_user(b.path)
        yield b


def host(bus: BusEmulator) -> ScriptedHost:
    return ScriptedHost(f"dynamixel://{bus.port}?ids=1-3&period_ms=100&latency_ms=100", len(IDS))


def torques(bus: BusEmulator) -> list[int]:
    with bus.lock:
        return [bus.servo(i).get(emu.TORQUE_ENABLE) for i in IDS]


def test_a_state_read_answered_with_an_error_status_is_a_bus_error_not_positions(bus: BusEmulator) -> None:
    with host(bus) as h:
        control = h.do("poll")  # control: the positions the servos report, decoded
        assert control["ok"], control
        assert control["out"] == pytest.approx([300 * i * TICK for i in IDS], abs=1.5 * TICK)
        bus.fail_reads(2, STATE_ADDR)
        got = h.do("poll")
        assert not got["ok"], f"positions decoded from a status packet without data: {got['out']}"
        assert got["type"] == "MotorBusError", got
        assert "servo id 2" in got["error"] and "result fail" in got["error"] and "\n" not in got["error"], got
        bus.fail_reads(2, STATE_ADDR, 0)  # the servo serves its reads again: so does the backend
        again = h.do("poll")
        assert again["ok"] and again["out"] == pytest.approx(control["out"], abs=1.5 * TICK), again


def test_an_arm_whose_torque_read_back_fails_ends_with_torque_off(bus: BusEmulator) -> None:
    with host(bus) as h:
        control = h.do("arm")  # control: the probe sees torque on after a good arm, and off after a stop
        assert control["ok"] and torques(bus) == [1, 1, 1], (control, torques(bus))
        assert h.do("stop")["out"] is True and torques(bus) == [0, 0, 0]
        # the arm's read-back of Torque Enable (64) .. Bus Watchdog (98) from servo 2 comes back as an error status
        bus.fail_reads(2, emu.TORQUE_ENABLE)
        got = h.do("arm")
        assert not got["ok"], got
        assert got["type"] in ("MotorBusError", "ArmRefusedError"), got  # a MotorError: the link NACKs it
        assert "servo id 2" in got["error"] and "\n" not in got["error"], got
        # the backend turned torque off again (its read-back of servo 2 fails, the write does not)
        assert bus.wait_for(lambda: all(bus.servo(i).get(emu.TORQUE_ENABLE) == 0 for i in IDS), 2.0), torques(bus)
        assert [e.detail["value"] for e in bus.events_of("torque", 2)][-2:] == [1, 0]  # it was on, then off
