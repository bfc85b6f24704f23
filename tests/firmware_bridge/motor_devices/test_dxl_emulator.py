"""The Dynamixel emulator against the e-manual's packets and against dynamixel_sdk (an independent check)."""

from __future__ import annotations

import os
import time

import dynamixel_sdk as dxl
import pytest
import serial
from hypothesis import given
from hypothesis import strategies as st
from motor_helpers import sdk_session

from firmware_bridge.motors import dynamixel_emulator as emu
from firmware_bridge.motors.dynamixel_emulator import BusEmulator, PacketParser, ServoConfig, build_packet, crc16

# Packets printed in the ROBOTIS e-manual, Protocol 2.0 (instruction and status examples)
MANUAL_PACKETS = [
    "FF FF FD 00 01 03 00 01 19 4E",  # ping id 1
    "FF FF FD 00 01 07 00 55 00 06 04 26 65 5D",  # its status: model 1030, firmware 38
    "FF FF FD 00 01 07 00 02 84 00 04 00 1D 15",  # read present position
    "FF FF FD 00 01 08 00 55 00 A6 00 00 00 8C C0",  # its status: 166
    "FF FF FD 00 01 09 00 03 74 00 00 02 00 00 CA 89",  # write goal position 512
    "FF FF FD 00 01 03 00 08 2F 4E",  # reboot
    "FF FF FD 00 FE 09 00 82 84 00 04 00 01 02 CE FA",  # sync read ids 1, 2
    "FF FF FD 00 FE 11 00 83 74 00 04 00 01 96 00 00 00 02 AA 00 00 00 82 87",  # sync write
]


@pytest.mark.parametrize("hexed", MANUAL_PACKETS)
def test_codec_reproduces_the_manuals_packets(hexed: str) -> None:
    raw = bytes.fromhex(hexed)
    assert build_packet(raw[4], raw[7:-2]) == raw
    (packet,) = PacketParser().feed(raw, 0.0)
    assert packet.crc_ok and packet.instruction == raw[7]


@given(st.binary(max_size=300))
def test_crc_agrees_with_dynamixel_sdk(data: bytes) -> None:
    assert crc16(data) == dxl.Protocol2PacketHandler().updateCRC(0, list(data), len(data))


@given(st.integers(0, 252), st.lists(st.sampled_from([0x00, 0xFF, 0xFD, 0x01]), min_size=1, max_size=64))
def test_stuffing_round_trips_and_hides_headers(dxl_id: int, body: list[int]) -> None:
    raw = build_packet(dxl_id, bytes(body))
    assert emu.HEADER not in raw[4:]  # no header can appear inside a packet
    (packet,) = PacketParser().feed(b"\x00\xff" + raw, 0.0)
    assert packet.crc_ok and (packet.dxl_id, bytes((packet.instruction,)) + packet.params) == (dxl_id, bytes(body))


def test_parser_survives_hostile_bytes() -> None:
    parser = PacketParser()
    good = build_packet(1, b"\x01")
    junk = (os.urandom(5000) + emu.HEADER + b"\x01\xff\xff" + emu.HEADER + b"\x01\x02" + good[:6])
    assert all(not p.crc_ok or p.raw_length <= emu.MAX_PACKET_LENGTH + 7 for p in parser.feed(junk, 0.0))
    # a truncated packet is dropped after the partial timeout; the next good packet parses
    packets = parser.feed(good, 1.0)
    assert [p for p in packets if p.crc_ok and p.dxl_id == 1 and p.instruction == 1]


@pytest.fixture
def bus():  # type: ignore[no-untyped-def]
    cfgs = [ServoConfig(dxl_id=1, return_delay=0), ServoConfig(dxl_id=2, return_delay=0, operating_mode=4,
                                                               firmware_version=41)]
    with sdk_session(BusEmulator(cfgs), dxl, 2.0) as session:
        yield session


def test_sdk_ping_read_write_and_sync(bus) -> None:  # type: ignore[no-untyped-def]
    b, port, ph = bus
    assert ph.ping(port, 1) == (1020, dxl.COMM_SUCCESS, 0)
    assert ph.read1ByteTxRx(port, 2, 6) == (41, dxl.COMM_SUCCESS, 0)
    assert ph.write4ByteTxRx(port, 1, 116, 3000) == (dxl.COMM_SUCCESS, 0)
    reader = dxl.GroupSyncRead(port, ph, 126, 10)
    assert reader.addParam(1) and reader.addParam(2)
    assert reader.txRxPacket() == dxl.COMM_SUCCESS
    assert reader.getData(1, 132, 4) == 2048 and reader.getData(2, 132, 4) == 2048
    writer = dxl.GroupSyncWrite(port, ph, 116, 4)
    writer.addParam(1, [0x10, 0x08, 0, 0])
    writer.addParam(2, list((0x00FDFFFF).to_bytes(4, "little")))  # FF FF FD in the data: stuffed on the wire
    assert writer.txPacket() == dxl.COMM_SUCCESS
    assert b.wait_for(lambda: b.servo(2).get(emu.GOAL_POSITION) == 0x00FDFFFF, 1.0)
    assert b.register(1, emu.GOAL_POSITION) == 0x0810


def test_access_rules_and_error_numbers(bus) -> None:  # type: ignore[no-untyped-def]
    b, port, ph = bus
    assert ph.write1ByteTxRx(port, 1, 64, 1) == (dxl.COMM_SUCCESS, 0)
    assert ph.write1ByteTxRx(port, 1, 11, 4) == (dxl.COMM_SUCCESS, emu.ERR_ACCESS)  # EEPROM locked by torque
    assert ph.write4ByteTxRx(port, 1, 132, 5) == (dxl.COMM_SUCCESS, emu.ERR_ACCESS)  # read-only
    assert ph.write2ByteTxRx(port, 1, 116, 5) == (dxl.COMM_SUCCESS, emu.ERR_DATA_LENGTH)  # half an item
    assert ph.write4ByteTxRx(port, 1, 116, 5000) == (dxl.COMM_SUCCESS, emu.ERR_DATA_LIMIT)  # outside 0..4095
    assert ph.write1ByteTxRx(port, 1, 98, 200) == (dxl.COMM_SUCCESS, emu.ERR_DATA_RANGE)
    assert ph.write1ByteTxRx(port, 1, 64, 0) == (dxl.COMM_SUCCESS, 0)
    assert ph.write1ByteTxRx(port, 1, 11, 4) == (dxl.COMM_SUCCESS, 0)  # control: EEPROM writable torque off
    assert b.register(1, emu.OPERATING_MODE) == 4


def test_crc_error_is_answered_and_not_applied(bus) -> None:  # type: ignore[no-untyped-def]
    b, _, _ = bus
    bad = bytearray(build_packet(1, bytes((emu.WRITE, 64, 0, 1))))
    bad[-1] ^= 0xFF
    with serial.Serial(b.port, 1_000_000, timeout=0.5) as ser:
        ser.write(bad)
        answer = ser.read(11)
    assert answer == emu.status_packet(1, emu.ERR_CRC)
    assert b.register(1, emu.TORQUE_ENABLE) == 0


def test_wrong_host_baud_is_noise(bus) -> None:  # type: ignore[no-untyped-def]
    b, port, ph = bus
    assert port.setBaudRate(57600)
    _, result, _ = ph.ping(port, 1)
    assert result == dxl.COMM_RX_TIMEOUT and b.events_of("baud_mismatch")
    assert port.setBaudRate(1_000_000)
    assert ph.ping(port, 1)[1] == dxl.COMM_SUCCESS  # control: the right baud answers


def test_hardware_error_sets_alert_and_only_reboot_restores_torque(bus) -> None:  # type: ignore[no-untyped-def]
    b, port, ph = bus
    assert ph.write1ByteTxRx(port, 1, 64, 1) == (dxl.COMM_SUCCESS, 0)
    b.inject_hardware_error(1, emu.HW_OVERLOAD)
    value, result, error = ph.read1ByteTxRx(port, 1, 70)
    assert (value, result, error) == (1 << emu.HW_OVERLOAD, dxl.COMM_SUCCESS, emu.ALERT)
    assert b.register(1, emu.TORQUE_ENABLE) == 0  # Shutdown: overload is in the default mask (52)
    assert ph.write1ByteTxRx(port, 1, 64, 1) == (dxl.COMM_SUCCESS, emu.ALERT | emu.ERR_RESULT_FAIL)
    assert ph.reboot(port, 1) == (dxl.COMM_SUCCESS, emu.ALERT)
    assert b.wait_for(lambda: time.monotonic() >= b.servo(1).offline_until, 1.0)
    assert ph.read1ByteTxRx(port, 1, 70) == (0, dxl.COMM_SUCCESS, 0)
    assert ph.write1ByteTxRx(port, 1, 64, 1) == (dxl.COMM_SUCCESS, 0)


def test_reboot_in_extended_mode_loses_the_turn_count(bus) -> None:  # type: ignore[no-untyped-def]
    b, port, ph = bus
    b.set_position(2, 3 * 4096 + 100)
    assert ph.reboot(port, 2) == (dxl.COMM_SUCCESS, 0)
    assert b.wait_for(lambda: time.monotonic() >= b.servo(2).offline_until, 1.0)
    assert ph.read4ByteTxRx(port, 2, 132)[0] == 100


def test_bus_watchdog_as_documented(bus) -> None:  # type: ignore[no-untyped-def]
    b, port, ph = bus
    assert ph.write1ByteTxRx(port, 1, 98, 1) == (dxl.COMM_SUCCESS, 0)  # 20 ms, torque still off
    assert not b.wait_for(lambda: b.servo(1).watchdog_error, 0.1)  # control: inactive while torque off
    assert ph.write4ByteTxRx(port, 1, 116, 3000) == (dxl.COMM_SUCCESS, 0)
    assert ph.write1ByteTxRx(port, 1, 64, 1) == (dxl.COMM_SUCCESS, 0)
    assert b.wait_for(lambda: b.servo(1).watchdog_error, 1.0)
    (event,) = b.events_of("watchdog_expired", 1)
    assert 0.020 <= event.detail["since_last_instruction"] <= 0.020 + 0.5  # never early; loose above (shared cores)
    with b.lock:
        servo = b.servo(1)
        assert servo.torque and servo.hold_target is not None  # stopped with torque on, holding
        held = servo.hold_target
    assert abs(held - 3000) > 50  # it stopped short of the goal it was driving to
    assert ph.read1ByteTxRx(port, 1, 98)[0] == 0xFF  # reads -1
    assert ph.write4ByteTxRx(port, 1, 116, 1000) == (dxl.COMM_SUCCESS, emu.ERR_DATA_RANGE)
    assert ph.write1ByteTxRx(port, 1, 64, 0) == (dxl.COMM_SUCCESS, 0)
    assert ph.read1ByteTxRx(port, 1, 98)[0] == 0xFF  # torque off does not clear it
    assert ph.write1ByteTxRx(port, 1, 98, 0) == (dxl.COMM_SUCCESS, 0)
    assert ph.write4ByteTxRx(port, 1, 116, 1000) == (dxl.COMM_SUCCESS, 0)
