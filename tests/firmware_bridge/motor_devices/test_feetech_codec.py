"""Feetech codec: sign-magnitude fields (both directions), checksum and parser, cross-checked against
scservo_sdk and between the backend's and the emulator's independent implementations."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

scs = pytest.importorskip("scservo_sdk", reason="feetech-servo-sdk is not installed (pip install 'edge-vla[feetech]')")

from firmware_bridge.motors import feetech  # noqa: E402
from firmware_bridge.motors import feetech_emulator as emu  # noqa: E402

SIGN_BITS = [15, 11, 10]  # position/speed/goal, homing offset, load


@pytest.mark.parametrize("impl", [feetech, emu])
@given(bit=st.sampled_from(SIGN_BITS), data=st.data())
def test_sign_magnitude_round_trips_and_matches_scservo_sdk(impl, bit: int, data: st.DataObject) -> None:  # type: ignore[no-untyped-def]
    value = data.draw(st.integers(-((1 << bit) - 1), (1 << bit) - 1))
    raw = impl.encode_sign_magnitude(value, bit)
    assert 0 <= raw < (1 << (bit + 1))
    assert impl.decode_sign_magnitude(raw, bit) == value
    assert raw == scs.SCS_TOSCS(value, bit) and scs.SCS_TOHOST(raw, bit) == value  # the vendor's own macros
    assert bool(raw >> bit) == (value < 0)  # the sign lives in exactly that bit


@given(bit=st.sampled_from(SIGN_BITS), raw=st.integers(0, 0xFFFF))
def test_backend_and_emulator_decoders_agree_on_any_register_value(bit: int, raw: int) -> None:
    assert feetech.decode_sign_magnitude(raw, bit) == emu.decode_sign_magnitude(raw, bit)


def test_sign_bits_are_where_the_table_says() -> None:
    assert feetech.encode_sign_magnitude(-5, 10) == 0x405  # Present Load: BIT10 = direction
    assert feetech.encode_sign_magnitude(-5, 15) == 0x8005  # Present Position / Speed: BIT15
    assert feetech.encode_sign_magnitude(-1470, 11) == 0x800 | 1470  # Homing Offset: BIT11 (LeRobot)
    assert feetech.decode_sign_magnitude(0x8000, 15) == 0  # negative zero reads as zero
    # two's complement would be wrong: -5 as int16 is 0xFFFB, which sign-magnitude reads as -32763
    assert feetech.decode_sign_magnitude(0xFFFB, 15) == -32763


@pytest.mark.parametrize(("value", "bit"), [(2048, 11), (-2048, 11), (1024, 10), (1 << 15, 15)])
def test_values_that_do_not_fit_are_refused_not_wrapped(value: int, bit: int) -> None:
    for impl in (feetech, emu):
        with pytest.raises(ValueError, match="does not fit"):
            impl.encode_sign_magnitude(value, bit)


def test_torque_enable_is_only_ever_built_as_0_or_1() -> None:
    assert feetech._torque_param(0) == [0] and feetech._torque_param(1) == [1]
    for bad in (2, 128):
        with pytest.raises(ValueError, match="only ever written 0 or 1"):
            feetech._torque_param(bad)


class _CapturePort:
    """Stands in for scservo_sdk's PortHandler: keeps what txPacket writes."""

    is_using = False

    def __init__(self) -> None:
        self.sent = b""

    def clearPort(self) -> None:
        pass

    def writePort(self, packet: list[int]) -> int:
        self.sent = bytes(packet)
        return len(packet)


@given(st.integers(0, 253), st.sampled_from([1, 2, 3, 0x82, 0x83]), st.binary(max_size=40))
def test_packets_match_scservo_sdk_byte_for_byte(servo_id: int, instruction: int, params: bytes) -> None:
    port = _CapturePort()
    tx = [0, 0, servo_id, len(params) + 2, instruction, *params, 0]
    assert scs.PacketHandler(0).txPacket(port, tx) == scs.COMM_SUCCESS
    assert emu.build_packet(servo_id, instruction, params) == port.sent
    (packet,) = emu.PacketParser().feed(port.sent, 0.0)
    assert packet.checksum_ok and (packet.servo_id, packet.instruction, packet.params) == (servo_id, instruction,
                                                                                           params)


def test_parser_survives_hostile_bytes_and_resyncs() -> None:
    parser = emu.PacketParser()
    good = emu.build_packet(1, emu.PING)
    corrupt = bytearray(good)
    corrupt[-1] ^= 0xFF
    junk = random.Random(24).randbytes(5000) + b"\xff\xff\xff\xff" + bytes(corrupt) + b"\xff\xff\x01\x00" + good[:4]
    packets = parser.feed(junk, 0.0)
    assert len(parser.buf) < 300  # never accumulates: a length byte caps a packet at 259 bytes
    assert any(not p.checksum_ok for p in packets)  # the corrupted one is seen as corrupt, not obeyed
    # a truncated packet is dropped after the partial timeout; the next good packet parses
    assert [p for p in parser.feed(good, 1.0) if p.checksum_ok and p.servo_id == 1 and p.instruction == emu.PING]
