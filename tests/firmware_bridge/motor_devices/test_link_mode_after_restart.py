"""The word for a run restarted over devices a dead host left in a fault: tripped, everywhere.

The project's words (firmware_bridge/PROTOCOL.md and the firmware's fw_core): mode DISARMED is torque off with
nothing latched, TRIPPED is torque off with a trip latched until the operator's clear faults and arm (DISARM: "mode
TRIPPED if trip bits are latched, else DISARMED"); the host's own phase stays "disarmed" until an operator arms
(edge_vla/onboard/watchdog.py), which is a different thing. A restarted Damiao run whose motors report LOST_COMM
(their TIMEOUT expired when the dead host fell silent) latched the fault at open but reported mode DISARMED in
every state while its fault report said TRIPPED. Checked here through the control loop's link for Damiao (in one
process on python-can's virtual bus) and for the servo backends' same state (Feetech servos found with torque on,
on the emulated STS bus): the state and the fault report say TRIPPED, the backend's open says "starts tripped", the
operator's clear faults makes it DISARMED, arm ARMED. Control: devices left clean open DISARMED with no report."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from firmware_bridge.motors import damiao as dm
from firmware_bridge.motors import damiao_emulator as dme
from firmware_bridge.motors.damiao import DamiaoDevice
from firmware_bridge.motors.link_adapter import DEVICE_FAULT, MotorDeviceLink
from firmware_bridge.protocol import Mode

PERIOD_MS = 50
LIMITS = [(-1.5, 1.5)]


@pytest.fixture
def damiao_bus() -> Iterator[Any]:
    channel = f"damiao-restart-{uuid.uuid4().hex[:8]}"
    emu = dme.DamiaoBusEmulator([dme.MotorConfig(esc_id=1)], interface="virtual", channel=channel).start()
    try:
        yield emu, channel
    finally:
        emu.stop()


def _damiao_link(channel: str) -> MotorDeviceLink:
    url = f"damiao://virtual/{channel}?ids=1&period_ms={PERIOD_MS}"
    dev = DamiaoDevice.from_url(f"virtual/{channel}", {"ids": "1", "period_ms": str(PERIOD_MS)}, joint_limits=LIMITS)
    dev.url = url
    link = MotorDeviceLink(url, device=dev).open()
    link.hello()
    link.poll()
    return link


def _operator_clears_then_arms(link: MotorDeviceLink) -> None:
    """The operator's act: clear faults (then DISARMED, nothing latched), arm (then ARMED)."""
    assert link.ack_result(link.send_clear_faults()) is True
    link.poll()
    assert link.latest_state.mode == Mode.DISARMED and int(link.latest_state.fault_bits) == 0
    assert link.ack_result(link.send_arm()) is True
    link.poll()
    assert link.latest_state.mode == Mode.ARMED


def _reported_modes(link: MotorDeviceLink) -> tuple[Mode, list[Mode]]:
    return Mode(link.latest_state.mode), [Mode(f.mode) for f in link.faults]


def test_a_restarted_damiao_run_over_lost_comm_motors_says_tripped_everywhere(
        damiao_bus: Any, caplog: pytest.LogCaptureFixture) -> None:
    emu, channel = damiao_bus
    emu.inject_fault(1, dm.STATUS_LOST_COMM)  # what the dead host's TIMEOUT left behind
    with caplog.at_level(logging.WARNING, logger="firmware_bridge.motors.damiao"):
        link = _damiao_link(channel)
    try:
        assert int(link.latest_state.fault_bits) == DEVICE_FAULT
        assert _reported_modes(link) == (Mode.TRIPPED, [Mode.TRIPPED])  # one word for one state
        opened = [r.getMessage() for r in caplog.records if r.name == "firmware_bridge.motors.damiao"]
        assert any("starts tripped" in m and "lost_comm" in m for m in opened), opened
        assert not any("disarmed" in m.lower() for m in opened), opened
        assert link.ack_result(link.send_disarm()) is True  # a disarm leaves a latched trip latched
        link.poll()
        assert link.latest_state.mode == Mode.TRIPPED
        _operator_clears_then_arms(link)
    finally:
        link.close()


def test_control_clean_damiao_motors_open_disarmed_with_no_report(damiao_bus: Any) -> None:
    _, channel = damiao_bus
    link = _damiao_link(channel)
    try:
        assert _reported_modes(link) == (Mode.DISARMED, [])
        assert int(link.latest_state.fault_bits) == 0
    finally:
        link.close()


def test_the_servo_backends_same_state_says_tripped_too() -> None:
    """Feetech servos a dead host left with torque on (found_torque_on at open): the same state, the same word."""
    pytest.importorskip("scservo_sdk", reason="feetech-servo-sdk is not installed (pip install 'edge-vla[feetech]')")
    from firmware_bridge.motors import feetech_emulator as femu

    with femu.BusEmulator([femu.ServoConfig(servo_id=1, return_delay=0, min_angle=1024, max_angle=3072)]) as bus:
        bus.set_register(1, femu.TORQUE_ENABLE, 1)
        link = MotorDeviceLink(f"feetech://{bus.port}?ids=1&latency_ms=50", joint_limits=LIMITS).open()
        try:
            link.hello()
            link.poll()
            assert _reported_modes(link) == (Mode.TRIPPED, [Mode.TRIPPED])
            assert link.ack_result(link.send_clear_faults()) is True
            link.poll()
            assert link.latest_state.mode == Mode.DISARMED and bus.register(1, femu.TORQUE_ENABLE) == 0
        finally:
            link.close()


def test_a_host_stop_latches_through_disarm_and_arm_until_the_operators_clear_faults(damiao_bus: Any) -> None:
    """PROTOCOL.md: a host STOP latches HOST_STOP_CAT0/1 (trip bits); DISARM does not clear them and ARM is refused
    (FAULTS_LATCHED) while they are latched: re-arming is an operator act, clear faults then arm. The motor link
    cleared the stop on DISARM and took ARM straight after a STOP. Control: after clear faults, arm is taken."""
    from firmware_bridge.errors import NackError
    from firmware_bridge.protocol import Fault, NackCode

    _, channel = damiao_bus
    link = _damiao_link(channel)
    try:
        assert link.ack_result(link.send_arm()) is True
        assert link.ack_result(link.send_stop(0)) is True
        link.poll()
        assert link.latest_state.mode == Mode.TRIPPED and link.latest_state.fault_bits & Fault.HOST_STOP_CAT0
        refused = link.ack_result(link.send_arm())  # no operator clear: refused
        assert isinstance(refused, NackError) and refused.code == NackCode.FAULTS_LATCHED, refused
        assert link.ack_result(link.send_disarm()) is True
        link.poll()
        assert link.latest_state.mode == Mode.TRIPPED and link.latest_state.fault_bits & Fault.HOST_STOP_CAT0
        refused = link.ack_result(link.send_arm())
        assert isinstance(refused, NackError) and refused.code == NackCode.FAULTS_LATCHED, refused
        link.poll()
        assert link.latest_state.mode == Mode.TRIPPED and not link.device.armed
        _operator_clears_then_arms(link)
    finally:
        link.close()
