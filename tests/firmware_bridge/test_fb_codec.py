"""Codec properties: CRC check value, round trips, and rejection of every corruption."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from firmware_bridge import framing
from firmware_bridge import protocol as p
from firmware_bridge.crc import CHECK_VALUE, crc32c
from firmware_bridge.errors import FrameError

finite = st.floats(-2000.0, 2000.0, allow_nan=False)
joint_counts = st.integers(1, p.MAX_JOINTS)


def test_crc32c_published_check_value() -> None:
    assert CHECK_VALUE == 0xE3069283
    assert crc32c(b"123456789") == CHECK_VALUE
    assert crc32c(b"6789", crc32c(b"12345")) == CHECK_VALUE  # chaining over chunks


@st.composite
def setpoints(draw: st.DrawFn) -> p.Setpoint:
    n = draw(joint_counts)
    arr = lambda lo=-2000.0, hi=2000.0: np.array(draw(st.lists(st.floats(lo, hi), min_size=n, max_size=n)))
    opt = lambda a: a if draw(st.booleans()) else None
    gains = draw(st.booleans())
    return p.Setpoint(arr(), opt(arr()), opt(arr(-1e6, 1e6)), arr(0, 1e5) if gains else None,
                      arr(0, 1e5) if gains else None)


@st.composite
def safety_configs(draw: st.DrawFn) -> p.SafetyConfig:
    n = draw(joint_counts)
    limit = st.floats(0.0, 2000.0, allow_nan=False)
    joints = tuple(p.JointSafety(draw(st.sampled_from(p.ROLES)), draw(limit), draw(limit), draw(limit), draw(limit),
                                 draw(limit)) for _ in range(n))
    cat = st.integers(0, 1)
    return p.SafetyConfig(draw(st.integers(0, 2**64 - 1)), draw(cat), draw(cat), draw(cat), draw(st.booleans()),
                          draw(st.booleans()), draw(st.integers(1, 0x8000)), draw(st.integers(0, 0xFFFF)),
                          draw(st.integers(1, 255)), joints)


@st.composite
def messages(draw: st.DrawFn) -> p.Message:
    n = draw(joint_counts)
    vec = lambda: np.array(draw(st.lists(finite, min_size=n, max_size=n)))
    u16, u8 = st.integers(0, 0xFFFF), st.integers(0, 255)
    return draw(st.one_of(
        setpoints(),
        st.just(p.State(draw(st.integers(0, 2**64 - 1)), draw(u16), p.Fault(draw(st.integers(0, 0xFFF))),
                        draw(st.sampled_from(p.Mode)), vec(), vec(), vec(), p.Status(draw(st.integers(0, 7))))),
        safety_configs(),
        st.builds(p.Keepalive, st.integers(0, 2**32 - 1)),
        st.builds(p.ClearFaults, st.integers(0, 2**32 - 1)),
        st.builds(p.Session, st.integers(0, 2**32 - 1), u16),
        st.builds(p.Heartbeat, st.integers(0, 2**32 - 1)),
        st.builds(p.Stop, st.integers(0, 1), u8),
        st.builds(p.Ack, u16, u8, u8),
        st.builds(p.Nack, u16, u8, u8),
        st.builds(p.Hello, u8, u8),
        st.builds(p.Arm, st.integers(0, 2**32 - 1)), st.just(p.Disarm()),
        st.builds(p.FaultReport, st.integers(0, 2**64 - 1), st.sampled_from(list(p.Fault)[1:]),
                  st.sampled_from(list(p.Fault)), st.sampled_from([0, 1, 255]), st.sampled_from(p.Mode)),
    ))


@settings(max_examples=300, deadline=None)
@given(messages(), st.integers(0, 0xFFFF))
def test_round_trip_is_exact_on_the_wire(msg: p.Message, seq: int) -> None:
    frame = framing.encode(msg, seq)
    assert frame.count(0) == 1 and frame.endswith(b"\x00")
    got_seq, got = framing.decode(frame[:-1])
    assert got_seq == seq and type(got) is type(msg)
    assert got.encode() == msg.encode()  # decoding loses nothing that encoding kept


@settings(max_examples=200, deadline=None)
@given(setpoints())
def test_setpoint_quantisation_is_bounded(sp: p.Setpoint) -> None:
    got = p.Setpoint.decode(sp.encode())
    np.testing.assert_allclose(got.positions, sp.positions, atol=0.5 / p.POS_SCALE + 1e-9)
    if sp.velocities is None:
        assert got.velocities is None
    else:
        np.testing.assert_allclose(got.velocities, sp.velocities, atol=0.5 / p.VEL_SCALE + 1e-9)


@settings(max_examples=60, deadline=None)
@given(messages(), st.integers(0, 0xFFFF))
def test_every_single_byte_corruption_is_rejected(msg: p.Message, seq: int) -> None:
    block = framing.encode(msg, seq)[:-1]
    for i in range(len(block)):
        for delta in (1, 0x80, 0xFF):
            bad = bytearray(block)
            bad[i] = (bad[i] + delta) & 0xFF
            with pytest.raises(FrameError):
                framing.decode(bytes(bad))


@settings(max_examples=300, deadline=None)
@given(messages(), st.data())
def test_random_corruption_is_rejected(msg: p.Message, data: st.DataObject) -> None:
    block = bytearray(framing.encode(msg, 7)[:-1])
    original = bytes(block)
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(block) - 1))
        block[i] = data.draw(st.integers(0, 255))
    if bytes(block) == original:
        return
    # A corruption may turn a byte into the delimiter: the receiver then sees several blocks; none may pass.
    for piece in bytes(block).split(b"\x00"):
        if piece:
            with pytest.raises(FrameError):
                framing.decode(piece)


def test_stream_decoder_resynchronises_after_garbage() -> None:
    dec = framing.StreamDecoder()
    frame = framing.encode(p.Heartbeat(5), 3)
    blocks = dec.feed(b"\x17garbage" * 200)  # longer than any frame, no delimiter yet: discarded
    blocks += dec.feed(b"more garbage\x00" + frame[:5])
    blocks += dec.feed(frame[5:] + b"\x03\x01\x02\x00" + frame)
    decoded = []
    for b in blocks:
        with contextlib.suppress(FrameError):
            decoded.append(framing.decode(b))
    assert decoded == [(3, p.Heartbeat(5)), (3, p.Heartbeat(5))]
    assert dec.overflows == 1


def test_nan_setpoint_is_refused_before_the_wire() -> None:
    with pytest.raises(ValueError, match="non-finite"):
        p.Setpoint(np.array([0.0, np.nan])).encode()


def test_other_protocol_major_is_rejected() -> None:
    block = framing.encode(p.Heartbeat(1), 1, version=p.PROTOCOL_MAJOR + 1)[:-1]
    with pytest.raises(FrameError) as err:
        framing.decode(block)
    assert err.value.kind == "version"


@example(p.SafetyConfig(0, 0, 0, 0, False, False, 1, 0, 1, (p.JointSafety(effort_limit=0.0625, kp_max=0.0, kd_max=0.0),)))
@settings(max_examples=150, deadline=None)
@given(safety_configs())
def test_safety_config_limits_survive_the_wire(cfg: p.SafetyConfig) -> None:
    got = p.SafetyConfig.decode(cfg.encode())
    assert (got.link_loss_category, got.enable_required, got.seq_window) == (
        cfg.link_loss_category, cfg.enable_required, cfg.seq_window)
    for a, b in zip(got.joints, cfg.joints, strict=True):
        assert a.role == b.role
        assert a.max_position_error == pytest.approx(b.max_position_error, abs=_half_unit(p.POS_SCALE))
        assert a.effort_limit == pytest.approx(b.effort_limit, abs=_half_unit(p.EFFORT_SCALE))
        assert a.kp_max == pytest.approx(b.kp_max, abs=_half_unit(p.GAIN_SCALE))


def _half_unit(scale: float) -> float:
    """Rounding to the wire loses at most half a unit; a value exactly halfway (0.0625 at 1e3 per
    unit) lands on that bound, and float subtraction can put it a few ulps past it."""
    return 0.5 / scale * (1 + 1e-9)


def test_capabilities_from_a_1_1_firmware_keep_the_1_0_layout() -> None:
    """Minor-version rule: 1.1 adds a frame (SAFETY_CONFIG) and fills STATE's reserved word; the 1.0
    layouts of CAPABILITIES and STATE are unchanged, so a 1.0 host still decodes them."""
    caps = p.Capabilities(1, 1, (1, 1, 0), 0.1, 100, 0.2, (p.JointLimits("a", -1, 1, 2, 3),),
                          safety=p.SafetyConfig(0, 1, 0, 0, False, True, 256, 10, 4, (p.JointSafety(),)))
    assert len(caps.encode()) == 16 + 32 and p.Capabilities.decode(caps.encode()).safety is None
    state = p.State(5, 1, p.Fault.NONE, p.Mode.ARMED, np.zeros(1), np.zeros(1), np.zeros(1), p.Status.STOP_LATCHED)
    assert len(state.encode()) == 16 + 12 and state.encode()[14:16] == b"\x02\x00"
