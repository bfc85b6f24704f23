"""The Feetech emulator against scservo_sdk (an independent implementation of the same protocol) on a real pty
at 1 Mbaud: ping, read, write, sync read/write, the EEPROM lock, and the Torque_Enable 128 re-centre event."""

from __future__ import annotations

import time

import pytest

scs = pytest.importorskip("scservo_sdk", reason="feetech-servo-sdk is not installed (pip install 'edge-vla[feetech]')")

from motor_helpers import sdk_session  # noqa: E402

from firmware_bridge.motors import feetech_emulator as emu  # noqa: E402
from firmware_bridge.motors.feetech_emulator import BusEmulator, ServoConfig  # noqa: E402


@pytest.fixture
def bus():  # type: ignore[no-untyped-def]
    cfgs = [ServoConfig(servo_id=1, return_delay=0), ServoConfig(servo_id=2, return_delay=0, homing_offset=-100)]
    with sdk_session(BusEmulator(cfgs), scs, 0) as session:
        yield session


def test_sdk_ping_read_write_sync(bus) -> None:  # type: ignore[no-untyped-def]
    b, port, ph = bus
    assert ph.ping(port, 1) == (emu.STS3215_MODEL, scs.COMM_SUCCESS, 0)
    assert ph.ping(port, 9)[1] == scs.COMM_RX_TIMEOUT  # no such servo: silence, the host times out
    assert ph.read2ByteTxRx(port, 2, emu.HOMING_OFFSET) == (0x800 | 100, scs.COMM_SUCCESS, 0)  # sign-magnitude
    assert ph.write2ByteTxRx(port, 1, emu.GOAL_POSITION, 3000) == (scs.COMM_SUCCESS, 0)
    assert b.register(1, emu.GOAL_POSITION) == 3000
    writer = scs.GroupSyncWrite(port, ph, emu.GOAL_POSITION, 2)
    assert writer.addParam(1, [0x10, 0x08]) and writer.addParam(2, [0x20, 0x08])
    assert writer.txPacket() == scs.COMM_SUCCESS
    assert b.wait_for(lambda: b.servo(2).value(emu.GOAL_POSITION) == 0x820, 1.0)
    reader = scs.GroupSyncRead(port, ph, emu.PRESENT_POSITION, 6)
    assert reader.addParam(1) and reader.addParam(2)
    assert reader.txRxPacket() == scs.COMM_SUCCESS
    assert reader.getData(1, emu.PRESENT_POSITION, 2) == 2048 and reader.getData(2, emu.PRESENT_POSITION, 2) == 2048


def test_error_byte_is_the_status_register(bus) -> None:  # type: ignore[no-untyped-def]
    b, port, ph = bus
    assert ph.read1ByteTxRx(port, 1, emu.STATUS) == (0, scs.COMM_SUCCESS, 0)  # control: no error
    b.inject_error(1, emu.ERR_OVERLOAD)
    value, result, error = ph.read1ByteTxRx(port, 1, emu.STATUS)
    assert (value, result, error) == (32, scs.COMM_SUCCESS, 32)
    assert "Overload" in ph.getRxPacketError(error)  # the SDK reads the same bit as overload


def test_eeprom_writes_survive_a_power_cycle_only_while_unlocked(bus) -> None:  # type: ignore[no-untyped-def]
    b, port, ph = bus
    assert b.register(1, emu.LOCK) == 1  # locked at power-on
    assert ph.write2ByteTxRx(port, 1, emu.MAX_ANGLE_LIMIT, 3000)[0] == scs.COMM_SUCCESS
    assert b.register(1, emu.MAX_ANGLE_LIMIT) == 3000  # takes effect now...
    b.power_cycle(1)
    assert b.wait_for(lambda: b.servo(1).offline_until <= time.monotonic(), 1.0)
    assert b.register(1, emu.MAX_ANGLE_LIMIT) == 4095  # ...but was not saved
    assert ph.write1ByteTxRx(port, 1, emu.LOCK, 0)[0] == scs.COMM_SUCCESS
    assert ph.write2ByteTxRx(port, 1, emu.MAX_ANGLE_LIMIT, 3000)[0] == scs.COMM_SUCCESS
    b.power_cycle(1)
    assert b.register(1, emu.MAX_ANGLE_LIMIT) == 3000 and b.register(1, emu.LOCK) == 1  # saved; Lock back to 1
    assert [e.detail["saved"] for e in b.events_of("eeprom_write", 1)] == [False, True]


def test_torque_enable_128_recentres_and_is_flagged(bus) -> None:  # type: ignore[no-untyped-def]
    b, port, ph = bus
    b.set_register(1, emu.HOMING_OFFSET, 0)
    with b.lock:
        b.servo(1).actual = 3000.0
    assert ph.write1ByteTxRx(port, 1, emu.TORQUE_ENABLE, 0)[0] == scs.COMM_SUCCESS  # torque off: it stays put
    assert b.events_of("recentre") == [] and b.events_of("torque", 1)  # control: 0 is seen, not flagged
    assert ph.write1ByteTxRx(port, 1, emu.TORQUE_ENABLE, 128)[0] == scs.COMM_SUCCESS
    (event,) = b.events_of("recentre", 1)
    assert event.detail["homing_offset"] == 952 and b.register(1, emu.HOMING_OFFSET) == 952
    assert b.wait_for(lambda: b.servo(1).value(emu.PRESENT_POSITION) == 2048, 1.0)  # the zero moved
    assert b.register(1, emu.TORQUE_ENABLE) == 0  # a calibration command, not a torque change


def test_corrupt_checksum_gets_no_answer(bus) -> None:  # type: ignore[no-untyped-def]
    b, port, _ph = bus
    packet = bytearray(emu.build_packet(1, emu.WRITE, bytes((emu.GOAL_POSITION, 0x00, 0x0C))))
    packet[-1] ^= 0x01
    port.ser.write(bytes(packet))
    assert b.wait_for(lambda: bool(b.events_of("checksum_error")), 1.0)
    assert b.register(1, emu.GOAL_POSITION) == 2048  # not obeyed
