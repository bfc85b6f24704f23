"""The Damiao MIT-mode frame codec and the bus-load budget, against the documented bit layout (no bus).

The layout vectors are packed by hand from the byte maps in the module docstring's facts table (F2, F6, F10), so a
layout bug shared by the backend and its emulator still fails here."""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware_bridge.motors import damiao as dm
from firmware_bridge.motors import damiao_emulator as emu

J4310 = dm.MitRanges(pmax=12.5, vmax=30.0, tmax=10.0)


def test_mit_bit_layout_matches_the_documented_byte_map() -> None:
    # p = 0x1234 (16 bit), v = 0xABC, kp = 0x123, kd = 0x456, t = 0x789 (12 bit each)
    assert dm.pack_mit_uints(0x1234, 0xABC, 0x123, 0x456, 0x789) == bytes.fromhex("1234abc123456789")
    assert dm.unpack_mit_uints(bytes.fromhex("1234abc123456789")) == (0x1234, 0xABC, 0x123, 0x456, 0x789)


def test_reply_bit_layout_matches_the_documented_byte_map() -> None:
    # status 0xB, id nibble 3, p = 0xCAFE, v = 0x9A5, t = 0x3C7, MOS 61 degC, rotor 47 degC
    frame = bytes([0xB3, 0xCA, 0xFE, 0x9A, 0x53, 0xC7, 61, 47])
    reply = dm.decode_reply(frame, dm.MitRanges(1.0, 1.0, 1.0))
    assert (reply.status, reply.id_nibble, reply.t_mos, reply.t_rotor) == (0xB, 3, 61, 47)
    assert reply.raw == (0xCAFE, 0x9A5, 0x3C7)
    assert emu.encode_reply_word(0xB, 3, 0xCAFE, 0x9A5, 0x3C7, 61, 47) == frame  # the emulator's own packing


def test_special_and_register_frames_are_the_documented_bytes() -> None:
    assert bytes.fromhex("fffffffffffffffc") == dm.ENABLE
    assert bytes.fromhex("fffffffffffffffd") == dm.DISABLE
    assert bytes.fromhex("fffffffffffffffb") == dm.CLEAR_ERROR
    assert dm.register_frame(0x102, dm.REG_WRITE, dm.RID_TIMEOUT, 8000) == bytes([0x02, 0x01, 0x55, 9]) + struct.pack(
        "<I", 8000)
    assert dm.register_frame(7, dm.REG_READ, dm.RID_PMAX) == bytes([7, 0, 0x33, 21, 0, 0, 0, 0])
    assert struct.unpack("<f", dm.register_frame(7, dm.REG_WRITE, dm.RID_PMAX, 12.5)[4:])[0] == 12.5


def test_zero_command_decodes_to_zero_within_one_step() -> None:
    frame = dm.encode_mit(0.0, 0.0, 0.0, 0.0, 0.0, J4310)
    p, v, kp, kd, t = emu.decode_mit(frame, J4310.pmax, J4310.vmax, J4310.tmax)
    assert abs(p) <= 25 / 65535 and abs(v) <= 60 / 4095 and abs(t) <= 20 / 4095
    assert kp == 0.0 and kd == 0.0


finite = st.floats(allow_nan=False, allow_infinity=False, width=64)


@given(p=st.floats(-12.5, 12.5), v=st.floats(-30, 30), kp=st.floats(0, 500), kd=st.floats(0, 5),
       t=st.floats(-10, 10))
def test_mit_round_trip_is_within_half_a_step(p: float, v: float, kp: float, kd: float, t: float) -> None:
    got = emu.decode_mit(dm.encode_mit(p, v, kp, kd, t, J4310), J4310.pmax, J4310.vmax, J4310.tmax)
    steps = (25 / 65535, 60 / 4095, 500 / 4095, 5 / 4095, 20 / 4095)
    for want, have, step in zip((p, v, kp, kd, t), got, steps, strict=True):
        assert abs(have - want) <= step / 2 + 1e-9


@given(p=finite, v=finite, t=finite)
def test_out_of_range_values_saturate_at_the_range_ends(p: float, v: float, t: float) -> None:
    got = emu.decode_mit(dm.encode_mit(p, v, 0.0, 0.0, t, J4310), J4310.pmax, J4310.vmax, J4310.tmax)
    assert -12.5 <= got[0] <= 12.5 and -30 <= got[1] <= 30 and -10 <= got[4] <= 10
    if p >= 12.5:
        assert got[0] == 12.5
    if p <= -12.5:
        assert got[0] == -12.5


@given(u=st.integers(0, 65535), v=st.integers(0, 4095), t=st.integers(0, 4095), status=st.sampled_from([0, 1, 8, 14]),
       nib=st.integers(0, 15), mos=st.integers(0, 255), rotor=st.integers(0, 255))
def test_reply_round_trip(u: int, v: int, t: int, status: int, nib: int, mos: int, rotor: int) -> None:
    reply = dm.decode_reply(emu.encode_reply_word(status, nib, u, v, t, mos, rotor), J4310)
    assert reply.raw == (u, v, t) and (reply.status, reply.id_nibble, reply.t_mos, reply.t_rotor) == (
        status, nib, mos, rotor)
    assert reply.position == pytest.approx(-12.5 + u * 25 / 65535)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_commands_are_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="not finite"):
        dm.encode_mit(bad, 0.0, 0.0, 0.0, 0.0, J4310)


def test_worst_case_frame_bits_and_bus_load() -> None:
    # Davis et al. 2007, standard format: 8s + 47 + floor((34 + 8s - 1) / 4) bits, interframe space included
    assert dm.frame_bits_worst_case(8) == 135
    assert dm.frame_bits_worst_case(0) == 55
    # 7 motors, a command and a reply each, 500 Hz, 1 Mbit/s: 7 * 2 * 135 * 500 / 1e6
    assert dm.bus_load(7, 0.002, 1_000_000) == pytest.approx(0.945)
    assert dm.bus_load(7, 0.004, 1_000_000) == pytest.approx(0.4725)
    assert dm.bus_load(7, 0.002, 1_000_000, nominal=True) == pytest.approx(7 * 2 * 111 * 500 / 1e6)
