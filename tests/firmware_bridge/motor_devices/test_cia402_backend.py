"""The cia402:// backend against the emulated drive (its own process, on python-can's udp_multicast interface: the
virtual bus is per process; a unique group and port per test).

Open configures and reads back the watchdog objects (control: the drive's own values differ), open leaves the
drive disabled and only arm() enables it (target = actual first), setpoints move the joint, stop(0) and stop(1)
end with the drive disabled (read back), a stalled control loop lets the drive's heartbeat consumer expire (no
background sender feeds it), a device fault latches until the operator's clear_faults (the only place a fault
reset is sent), PP where CSP is absent, one-line refusals, and hostile frames on the bus."""

from __future__ import annotations

import threading
import time

import can
import numpy as np
import pytest

pytest.importorskip("canopen", reason="canopen is not installed (pip install 'edge-vla[cia402]')")

from cia402_helpers import JOINT_LIMITS, LIMIT_COUNTS, counts, device_from_url, drive, wait_for

from firmware_bridge.motors import registry
from firmware_bridge.motors.base import (
    ArmRefusedError,
    FaultLatchedError,
    MotorError,
    MotorUrlError,
    StopCategory,
)
from firmware_bridge.motors.cia402 import Cia402Device
from firmware_bridge.motors.cia402_emulator import CSP, PP, SUPPORTS_PP, DriveConfig, EmulatorProcess

PERIOD_MS = 50  # heartbeat consumer 100 ms: a 2-core CI box shared by the suite stalls a test process for 40 ms
SOD, OE, QSA, FAULT = "SWITCH ON DISABLED", "OPERATION ENABLED", "QUICK STOP ACTIVE", "FAULT"


def _drives(*nodes: int, **kw: object) -> list[DriveConfig]:
    return [DriveConfig(node=n, soft_limits=(-LIMIT_COUNTS, LIMIT_COUNTS), **kw) for n in nodes]  # type: ignore[arg-type]


@pytest.fixture
def emu():  # type: ignore[no-untyped-def]
    with EmulatorProcess(_drives(1, 2)) as e:
        yield e


def _open(e: EmulatorProcess, nodes: str = "1-2", **params: object) -> Cia402Device:
    url = e.url(nodes, period_ms=params.pop("period_ms", PERIOD_MS), **params)
    n = len(registry.parse_ids(nodes))
    return device_from_url(url, joint_limits=[JOINT_LIMITS] * n).open()


def test_open_configures_and_reads_back_the_watchdog_objects(emu: EmulatorProcess) -> None:
    before = emu.snapshot(1)  # control: the drive's own settings are not what the backend writes
    assert (before["objects"]["1016:1"], before["objects"]["6007"], before["objects"]["605A"]) == (0, 0, 6)
    dev = _open(emu)
    try:
        for node in (1, 2):
            snap = emu.snapshot(node)
            assert snap["objects"]["1016:1"] == (127 << 16) | 2 * PERIOD_MS  # host node 127, two periods
            assert snap["objects"]["6007"] == 3  # abort connection: quick stop command
            assert snap["objects"]["605A"] == 2  # quick stop ramp, then Switch On Disabled
            assert snap["objects"]["6060"] == snap["objects"]["6061"] == CSP
            assert snap["nmt"] == "OPERATIONAL"
            assert snap["rpdo"][0] == {"valid": True, "cob_id": 0x200 + node, "type": 255, "map": [0x6040, 0x607A]}
            assert snap["tpdo"][0] == {"valid": True, "cob_id": 0x180 + node, "type": 1, "map": [0x6041, 0x6064]}
            assert snap["tpdo"][1] == {"valid": True, "cob_id": 0x280 + node, "type": 1, "map": [0x606C, 0x6078]}
            assert not any(p["valid"] for p in snap["rpdo"][1:] + snap["tpdo"][2:])  # the drive's defaults are off
        caps = dev.capabilities
        assert caps.has_device_watchdog and caps.watchdog_period_s == pytest.approx(2 * PERIOD_MS / 1000)
        assert "quick stop" in caps.on_watchdog_expiry and "Switch On Disabled" in caps.on_watchdog_expiry
    finally:
        dev.close()
    assert emu.snapshot(1)["objects"]["1016:1"] == 0  # close: disabled, consumer off, pre-operational
    assert emu.snapshot(1)["nmt"] == "PRE-OPERATIONAL"


def test_open_leaves_the_drive_disabled_and_only_arm_enables_it(emu: EmulatorProcess) -> None:
    dev = _open(emu)
    try:
        for _ in range(25):  # control: the loop polls, nothing is armed
            dev.poll_state()
            time.sleep(0.005)
        assert not dev.armed
        assert all(emu.snapshot(n)["state"] == SOD and not emu.snapshot(n)["torque"] for n in (1, 2))
        with pytest.raises(MotorError, match="not armed"):
            dev.write_setpoints([0.0, 0.0])
        emu.set_position(2, 3000)
        dev.poll_state()
        dev.arm()
        assert dev.armed
        for node in (1, 2):
            snap = emu.snapshot(node)
            assert snap["state"] == OE and snap["torque"]
            assert snap["target"] == snap["position"]  # target = actual before enable: no jump
            seen = [ev.detail["transition"] for ev in emu.events_of("state", node)]
            assert seen[-3:] == [2, 3, 4]
        assert dev.stop(StopCategory.TORQUE_OFF)
    finally:
        dev.close()


def test_setpoints_move_the_joints_and_stop_0_disables_at_once(emu: EmulatorProcess) -> None:
    dev = _open(emu)
    try:
        dev.arm()
        positions = drive(dev, 0.5, 60, 0.005)
        assert np.allclose(positions, 0.5, atol=0.02)
        drive(dev, -0.5, 8, 0.005)  # moving
        assert abs(emu.snapshot(1)["velocity"]) > 1000
        t0 = time.monotonic()
        assert dev.stop(StopCategory.TORQUE_OFF) is True  # statusword read back: Switch On Disabled
        took = time.monotonic() - t0
        assert not dev.armed and took < 0.5
        for node in (1, 2):
            snap = emu.snapshot(node)
            assert snap["state"] == SOD and not snap["torque"]
            assert emu.events_of("state", node)[-1].detail["transition"] == 9, (
                emu.events_of("state", node)[-3:], emu.events_of("heartbeat_expired"), dev.faults)
    finally:
        dev.close()


def test_stop_1_quick_stops_on_the_ramp_then_disables(emu: EmulatorProcess) -> None:
    dev = _open(emu)
    try:
        dev.arm()
        drive(dev, 1.4, 12, 0.005)
        assert abs(emu.snapshot(1)["velocity"]) > 1000
        t0 = time.monotonic()
        assert dev.stop(StopCategory.CONTROLLED) is True
        assert time.monotonic() - t0 < dev.stop_timeout_s + 0.5
        for node in (1, 2):
            snap = emu.snapshot(node)
            assert snap["state"] == SOD and not snap["torque"]
            seen = [(ev.detail["to"], ev.detail["transition"]) for ev in emu.events_of("state", node)]
            assert seen[-2:] == [(QSA, 11), (SOD, 12)]  # the drive's ramp, ended by 0x605A = 2
    finally:
        dev.close()


def test_a_stalled_control_loop_lets_the_drive_stop_itself(emu: EmulatorProcess) -> None:
    threads_before = set(threading.enumerate())
    dev = _open(emu)
    try:
        dev.arm()
        started = {t.name for t in set(threading.enumerate()) - threads_before}
        assert all(name.startswith("Notifier for bus") for name in started), started  # receive only
        assert not dev._net.bus._periodic_tasks  # nothing handed to python-can's send_periodic
        drive(dev, 0.8, 10, 0.005)
        beats = emu.snapshot(1)["heartbeats"]
        stalled_at = time.monotonic()
        time.sleep(0.4)  # the loop stalls: no thread of canopen or python-can may keep the drive's consumer fed
        assert emu.snapshot(1)["heartbeats"] == beats
        for node in (1, 2):
            expired = emu.events_of("heartbeat_expired", node)
            assert len(expired) == 1 and expired[0].t - stalled_at <= 2 * PERIOD_MS / 1000 + 0.25
            assert emu.snapshot(node)["state"] == SOD and not emu.snapshot(node)["torque"]
        dev.poll_state()  # the loop comes back: the drive's EMCY 0x8130 is latched, the arm is not resumed
        assert any(f.code == "heartbeat_lost" for f in dev.faults) and not dev.armed
        with pytest.raises(FaultLatchedError):
            dev.arm()
        dev.clear_faults()  # operator: NMT start again
        assert emu.snapshot(1)["nmt"] == "OPERATIONAL"
        dev.arm()
        assert emu.snapshot(1)["state"] == OE
    finally:
        dev.close()


def test_a_device_fault_latches_until_the_operators_clear_faults(emu: EmulatorProcess) -> None:
    dev = _open(emu)
    try:
        dev.arm()
        drive(dev, 0.3, 5, 0.005)
        emu.inject_fault(2, 0x4310)  # excess temperature
        assert wait_for(lambda: (dev.poll_state() is not None) and bool(dev.faults), 2.0)
        assert (dev.faults[0].joint, dev.faults[0].code) == ("joint2", "drive_fault")
        assert "0x4310" in str(dev.faults[0])
        assert not dev.armed  # fault stop: every drive disabled
        assert emu.snapshot(1)["state"] == SOD and emu.snapshot(2)["state"] == FAULT
        with pytest.raises(FaultLatchedError):
            dev.arm()
        for _ in range(10):
            dev.poll_state()
        assert dev.stop(StopCategory.TORQUE_OFF)
        assert emu.snapshot(2)["state"] == FAULT  # nothing but clear_faults resets it
        assert not [ev for ev in emu.events_of("controlword") if ev.detail["value"] & 0x80]
        dev.clear_faults()
        assert emu.snapshot(2)["state"] == SOD and not dev.faults
        assert [ev.servo_id for ev in emu.events_of("controlword") if ev.detail["value"] & 0x80] == [2]
        dev.arm()
        assert emu.snapshot(2)["state"] == OE
    finally:
        dev.close()


def test_profile_position_where_csp_is_absent() -> None:
    with EmulatorProcess(_drives(4, supported_modes=SUPPORTS_PP)) as e:
        dev = _open(e, "4")
        try:
            assert e.snapshot(4)["objects"]["6061"] == PP
            dev.arm()
            positions = drive(dev, 0.6, 80, 0.005)
            assert abs(positions[0] - 0.6) < 0.03
            assert abs(e.snapshot(4)["position"] - counts(0.6)) < 400
        finally:
            dev.close()


@pytest.mark.parametrize(("config", "says"), [
    ({"device_type": 0x00000191}, "device profile 401"),
    ({"supported_modes": 0x04}, "neither cyclic synchronous position"),
])
def test_open_refuses_a_drive_it_cannot_drive_in_one_line(config: dict, says: str) -> None:
    with EmulatorProcess(_drives(5, **config)) as e:
        dev = device_from_url(e.url("5", period_ms=PERIOD_MS), joint_limits=[JOINT_LIMITS])
        with pytest.raises(MotorError) as err:
            dev.open()
        assert says in str(err.value) and "\n" not in str(err.value)
        assert e.snapshot(5)["state"] == SOD


def test_arm_refuses_drive_limits_wider_than_the_configuration() -> None:
    with EmulatorProcess([DriveConfig(node=1, soft_limits=(-30000, 30000))]) as e:
        dev = device_from_url(e.url("1", period_ms=PERIOD_MS), joint_limits=[(-1.0, 1.0)]).open()
        try:
            with pytest.raises(ArmRefusedError) as err:
                dev.arm()
            assert "0x607D" in str(err.value) and "joint1" in str(err.value) and "\n" not in str(err.value)
            assert e.snapshot(1)["state"] == SOD
        finally:
            dev.close()


def test_hostile_frames_on_the_bus(emu: EmulatorProcess) -> None:
    dev = _open(emu)
    intruder = can.Bus(interface="udp_multicast", channel=emu.group, port=emu.udp_port)
    try:
        dev.arm()
        drive(dev, 0.4, 5, 0.005)
        frames = [
            (0x000, b"\x02\x05"),            # NMT stop to node 5 (not ours)
            (0x000, b"\x02"),                # truncated NMT
            (0x205, b"\x00\x00\x00\x00"),    # an RPDO for node 5
            (0x605, b"\x2b\x40\x60\x00\x00\x00\x00\x00"),  # controlword 0 to node 5
            (0x601, b"\x2b\x40"),            # truncated SDO to our node
            (0x601, b"\xe0" + bytes(7)),     # bad command specifier
            (0x601, b"\x40\x99\x99\x00" + bytes(4)),  # read of an object that does not exist
            (0x77F, b"\x05\x05"),            # a 'heartbeat' of two bytes
            (0x7FF, bytes(8)),
        ]
        for can_id, data in frames:
            intruder.send(can.Message(arbitration_id=can_id, data=data, is_extended_id=False))
        # 29-bit and FD frames are no CANopen frames, whatever their id: an extended "NMT stop node 1" and an
        # oversize FD "SDO" must not be read as 11-bit frames
        intruder.send(can.Message(arbitration_id=0x000, data=b"\x02\x01", is_extended_id=True))
        intruder.send(can.Message(arbitration_id=0x601, data=bytes(64), is_fd=True, is_extended_id=False))
        drive(dev, 0.4, 20, 0.005)
        assert dev.armed and not dev.faults
        assert all(emu.snapshot(n)["state"] == OE and emu.snapshot(n)["nmt"] == "OPERATIONAL" for n in (1, 2))
        assert len(emu.events_of("sdo_malformed", 1)) == 1
        # a truncated RPDO addressed to our drive: the drive refuses it (EMCY 0x8210) and the host stops on it
        intruder.send(can.Message(arbitration_id=0x201, data=b"\x0f\x00", is_extended_id=False))
        assert wait_for(lambda: (dev.poll_state() is not None) and bool(dev.faults), 2.0)
        assert "0x8210" in str(dev.faults[0]) and not dev.armed
        assert emu.snapshot(1)["state"] == SOD
    finally:
        intruder.shutdown()
        dev.close()


@pytest.mark.parametrize(("url", "says"), [
    ("cia402://socketcan/can0", "needs node="),
    ("cia402://socketcan/can0?node=0", "1..127"),
    ("cia402://socketcan/can0?node=128", "1..127"),
    ("cia402://socketcan/can0?node=1,1", "twice"),
    ("cia402://socketcan?node=1", "interface and a channel"),
    ("cia402://nosuchbus/can0?node=1", "unknown python-can interface 'nosuchbus'"),
    ("cia402://socketcan/can0?node=1&udp_port=4000", "udp_port= applies only"),
    ("cia402://socketcan/can0?node=1&host_node=1", "host_node=1 is also a drive"),
    ("cia402://socketcan/can0?node=1&period_ms=2", "below this backend's floor"),
    ("cia402://socketcan/can0?node=1&counts_per_turn=0", "counts_per_turn"),
    ("cia402://socketcan/can0?node=1-6&period_ms=5&bitrate=125000", "bus load"),
])
def test_bad_urls_get_one_line_errors(url: str, says: str) -> None:
    with pytest.raises(MotorUrlError) as err:
        device_from_url(url)
    assert says in str(err.value) and "\n" not in str(err.value)


def test_the_backend_fits_the_motor_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry.BACKENDS, "cia402", ("firmware_bridge.motors.cia402:Cia402Device", "CiA 402"))
    dev = registry.open_device("cia402://socketcan/can0?node=1-3&period_ms=10", open_now=False,
                               joint_limits=[(-1, 1)] * 3, names=["a", "b", "c"])
    assert isinstance(dev, Cia402Device) and dev.nodes == (1, 2, 3) and dev.closed
    assert dev.capabilities.joint_names == ("a", "b", "c")
    with pytest.raises(MotorUrlError, match="unknown query parameter"):
        registry.open_device("cia402://socketcan/can0?node=1&ids=1", open_now=False)


def test_sdo_abort_from_the_drive_is_one_line(emu: EmulatorProcess) -> None:
    emu.set_object(1, 0x6007, 0, 0, read_only=True)  # a drive whose abort connection option cannot be written
    dev = device_from_url(emu.url("1", period_ms=PERIOD_MS), joint_limits=[JOINT_LIMITS])
    with pytest.raises(MotorError) as err:
        dev.open()
    assert "0x6007" in str(err.value) and "\n" not in str(err.value)
    assert emu.snapshot(1)["objects"]["6007"] == 0


def test_a_drive_found_enabled_at_open_is_disabled(emu: EmulatorProcess) -> None:
    import canopen

    other = canopen.Network()
    other.NOTIFIER_CYCLE = 0.05
    other.connect(interface="udp_multicast", channel=emu.group, port=emu.udp_port)
    try:  # another tool left drive 1 enabled in CSP
        node = other.add_node(1, canopen.ObjectDictionary())
        other.send_message(0, [0x01, 1])
        node.sdo.download(0x6060, 0, bytes([CSP]))
        for cw in (0x06, 0x07, 0x0F):
            node.sdo.download(0x6040, 0, cw.to_bytes(2, "little"))
    finally:
        other.disconnect()
    assert emu.snapshot(1)["state"] == OE and emu.snapshot(1)["torque"]  # control
    dev = _open(emu)
    try:
        assert emu.snapshot(1)["state"] == SOD and not emu.snapshot(1)["torque"] and not dev.armed
    finally:
        dev.close()


def test_behind_the_motor_device_link(emu: EmulatorProcess) -> None:
    """The Controller the control loop drives (what `edge-vla run` will use once the lead registers the scheme)."""
    from firmware_bridge.motors.link_adapter import MotorDeviceLink

    url = emu.url("1-2", period_ms=PERIOD_MS)
    link = MotorDeviceLink(url, device=device_from_url(url, joint_limits=[JOINT_LIMITS] * 2, names=["a", "b"]))
    link.open()
    try:
        caps = link.hello()
        assert caps.heartbeat_timeout_s == pytest.approx(2 * PERIOD_MS / 1000)
        assert [j.name for j in caps.joints] == ["a", "b"]
        assert link.ack_result(link.send_clear_faults()) is True
        assert link.ack_result(link.send_arm()) is True
        for _ in range(40):
            link.poll()
            link.send_setpoints([0.3, -0.3])
            time.sleep(0.005)
        assert np.allclose(link.latest_state.positions, [0.3, -0.3], atol=0.02)
        assert link.ack_result(link.send_stop(1)) is True
        assert all(emu.snapshot(n)["state"] == SOD for n in (1, 2))
    finally:
        link.close()
