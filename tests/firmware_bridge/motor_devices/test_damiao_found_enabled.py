"""A run that opens Damiao motors another host left enabled (LeRobot never writes TIMEOUT, so they keep driving the
dead host's last MIT command for good) must not report them as disarmed: the motors are latched `found_enabled`
at open, arm is refused, and the operator's clear faults disables them (read back) before anything else, as the
servo backends do for a servo found with torque on.

The backend runs in its own process as the service user (scripted_host); the previous host's frames are sent on the
emulator's bus from here. Control: motors nobody enabled open with nothing latched."""

from __future__ import annotations

from collections.abc import Iterator

import can
import pytest
from scripted_host import ScriptedHost

from firmware_bridge.motors import damiao as dm
from firmware_bridge.motors import damiao_emulator as emu
from firmware_bridge.motors.damiao_emulator import EmulatorProcess, MotorConfig

IDS = (1, 2, 3)
GOAL = 0.5  # rad: where the dead host last told the motors to go


@pytest.fixture
def emulator() -> Iterator[EmulatorProcess]:
    with EmulatorProcess([MotorConfig(esc_id=i) for i in IDS], interface="udp_multicast",
                         channel=emu.unique_udp_channel()) as e:
        yield e


def enable_and_leave(e: EmulatorProcess) -> None:
    """What a LeRobot-like host does before it dies: enable (TIMEOUT left 0), one MIT command; then it is gone."""
    group, _, udp_port = e.port.partition("/")[2].rpartition(":")
    with can.Bus(interface="udp_multicast", channel=group, port=int(udp_port)) as other:
        for i in IDS:
            other.send(can.Message(arbitration_id=i, data=dm.ENABLE, is_extended_id=False))
            other.send(can.Message(arbitration_id=i, is_extended_id=False,
                                   data=dm.encode_mit(GOAL, 0.0, 20.0, 1.0, 0.0, dm.MitRanges(12.5, 30.0, 10.0))))


def host(e: EmulatorProcess) -> ScriptedHost:
    return ScriptedHost(f"damiao://{e.port}?ids=1-3&period_ms=50", len(IDS))


def test_motors_a_dead_host_left_enabled_are_latched_at_open_and_disabled_by_the_operators_clear(
        emulator: EmulatorProcess) -> None:
    enable_and_leave(emulator)
    assert emulator.wait_until(lambda: all(emulator.snapshot(i)["enabled"] and emulator.snapshot(i)["position"] > 0.3
                                           for i in IDS), 5.0), "the previous host's command never took"
    with host(emulator) as h:
        faults = h.do("faults")["out"]
        assert [code for code, _ in faults] == ["found_enabled"] * len(IDS), faults
        assert all(f"motor id {i}" in reason for i, (_, reason) in zip(IDS, faults, strict=True)), faults
        armed = h.do("arm")
        assert not armed["ok"] and armed["type"] == "FaultLatchedError", armed
        assert all(emulator.snapshot(i)["enabled"] for i in IDS)  # open changed nothing: torque as found
        cleared = h.do("clear")
        assert cleared["ok"], cleared
        assert emulator.wait_until(lambda: not any(emulator.snapshot(i)["enabled"] for i in IDS), 2.0)
        assert [emulator.snapshot(i)["status"] for i in IDS] == [dm.STATUS_DISABLED] * len(IDS)
        assert h.do("faults")["out"] == []


def test_control_motors_nobody_enabled_open_with_nothing_latched(emulator: EmulatorProcess) -> None:
    with host(emulator) as h:
        assert h.do("faults")["out"] == []
        assert not any(emulator.snapshot(i)["enabled"] for i in IDS)
