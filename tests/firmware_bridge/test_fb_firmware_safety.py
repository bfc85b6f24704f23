"""Safety properties of the C firmware reference (issue 12), driven deterministically through ctypes.

KEEPALIVE (new in protocol 1.1) is sent by type number. CLEAR_FAULTS and ARM carry the session nonce
(protocol 1.2) that the harness read from the firmware's SESSION frame.
"""

from __future__ import annotations

import shutil
import struct
import subprocess

import numpy as np
import pytest
from fw_harness import MS, Harness, limits

from firmware_bridge import native
from firmware_bridge import protocol as p
from firmware_bridge.firmware import FirmwareRef

CLEAR_FAULTS, KEEPALIVE = 0x0C, 0x0D
FAULTS_LATCHED, ENABLE_OFF, STALE_SEQ = 8, 9, 10


def make(**kw) -> Harness:
    kw.setdefault("heartbeat_timeout_ms", 100)
    kw.setdefault("stop_ramp_ms", 200)
    kw.setdefault("state_rate_hz", 0)
    h = Harness(FirmwareRef(kw.pop("joints", limits()), **kw))
    h.hello()
    return h


def trip_by_heartbeat_loss(h: Harness) -> None:
    assert h.arm() == p.Ack(h.seq - 1, p.MsgType.ARM)
    h.run(h.now + 400 * MS)
    assert h.fw.mode == p.Mode.TRIPPED and p.Fault.HEARTBEAT_TIMEOUT in h.fw.faults


# ---- arming is explicit: faults stay latched until CLEAR_FAULTS -------------------------------------

def test_arm_after_reconnect_does_not_clear_latched_faults() -> None:
    h = make()
    trip_by_heartbeat_loss(h)
    h.hello()  # a restarted host: new session
    nack = h.arm()
    assert isinstance(nack, p.Nack) and nack.code == FAULTS_LATCHED
    assert h.fw.mode == p.Mode.TRIPPED and p.Fault.HEARTBEAT_TIMEOUT in h.fw.faults
    assert h.clear() == p.Ack(h.seq - 1, CLEAR_FAULTS)
    assert h.fw.mode == p.Mode.DISARMED and not (h.fw.faults & ~p.Fault.SETPOINT_CLAMPED)
    assert not isinstance(h.arm(), p.Nack) and h.fw.mode == p.Mode.ARMED


def test_disarm_does_not_clear_latched_faults() -> None:
    h = make()
    trip_by_heartbeat_loss(h)
    h.send(p.Disarm())
    assert h.fw.mode == p.Mode.TRIPPED and p.Fault.HEARTBEAT_TIMEOUT in h.fw.faults
    assert isinstance(h.arm(), p.Nack) and h.fw.mode == p.Mode.TRIPPED


def test_host_stop_latches_until_clear_faults() -> None:
    h = make()
    h.arm()
    assert h.answer(h.send(p.Stop(0))) == p.Ack(h.seq - 1, p.MsgType.STOP)
    nack = h.arm()
    assert isinstance(nack, p.Nack) and nack.code == FAULTS_LATCHED and h.fw.mode == p.Mode.TRIPPED


def test_clear_faults_refused_during_the_ramp() -> None:
    h = make()
    h.arm()
    h.send(p.Stop(1))
    nack = h.clear()
    assert isinstance(nack, p.Nack) and nack.code == p.NackCode.BUSY and h.fw.mode == p.Mode.STOPPING


def test_hello_while_armed_stops_the_motors() -> None:
    """A new session while armed means the host that armed is gone: the firmware must not stay armed."""
    h = make()
    h.arm()
    h.hello()
    assert h.fw.mode in (p.Mode.STOPPING, p.Mode.TRIPPED)
    assert h.fw.faults & 0x0800  # SESSION_RESET


# ---- enable input --------------------------------------------------------------------------------

def test_enable_input_required_for_arm_and_dropping_it_stops() -> None:
    h = make(enable_required=True, enable_category=0)
    h.fw.set_enable(False, h.now)
    nack = h.arm()
    assert isinstance(nack, p.Nack) and nack.code == ENABLE_OFF and h.fw.mode == p.Mode.DISARMED
    h.fw.set_enable(True, h.now)
    assert not isinstance(h.arm(), p.Nack)
    h.fw.set_enable(False, h.now + 10)
    assert h.fw.mode == p.Mode.TRIPPED and p.Fault.ENABLE_LOST in h.fw.faults
    h.fw.set_enable(True, h.now + 20)  # re-asserting enable is not an arm
    assert h.fw.mode == p.Mode.TRIPPED


def test_enable_drop_category_1_ramps() -> None:
    h = make(enable_required=True, enable_category=1)
    h.fw.set_enable(True, h.now)
    h.arm()
    h.fw.set_enable(False, h.now + 10)
    assert h.fw.mode == p.Mode.STOPPING


# ---- stops: acknowledged, and nothing after a stop keeps the firmware alive ----------------------------

def test_after_stop_setpoints_are_refused_and_heartbeats_do_not_feed_the_watchdog() -> None:
    h = make()
    h.arm()
    h.send(p.Stop(1))
    h.take()
    sp = h.send(p.Setpoint(np.array([0.1, 0.1])))
    nack = h.answer(sp)
    assert isinstance(nack, p.Nack) and nack.code == p.NackCode.NOT_ARMED
    h.run(h.now + 250 * MS, heartbeat=True)  # heart-beating through the ramp changes nothing
    assert h.fw.mode == p.Mode.TRIPPED


def test_keepalive_is_acked_but_never_feeds_the_motion_watchdog() -> None:
    h = make()
    h.arm()
    seq = h.raw(KEEPALIVE, struct.pack("<I", 1))
    assert h.answer(seq) == p.Ack(seq, KEEPALIVE)
    for _ in range(30):
        h.now += 5 * MS
        h.raw(KEEPALIVE, struct.pack("<I", 2))
        h.tick()
    assert h.fw.mode in (p.Mode.STOPPING, p.Mode.TRIPPED)
    assert p.Fault.HEARTBEAT_TIMEOUT in h.fw.faults


def test_stale_stop_is_still_applied() -> None:
    h = make()
    h.arm()
    h.raw(p.MsgType.STOP, p.Stop(0).encode(), seq=(h.seq - 50) & 0xFFFF)  # an old sequence number
    assert h.fw.mode == p.Mode.TRIPPED


# ---- replayed and stale frames -------------------------------------------------------------------------

def test_replayed_arm_after_stop_is_not_applied() -> None:
    h = make()
    arm_seq = h.send(p.Arm(h.session))
    h.send(p.Stop(0))
    h.replay(arm_seq)
    assert h.fw.mode == p.Mode.TRIPPED
    h.clear()
    h.replay(arm_seq)  # even with the faults cleared, an old ARM is not an operator's ARM
    assert h.fw.mode != p.Mode.ARMED
    h.take()
    answers = [m for _, m in h.rx if isinstance(m, p.Ack) and m.acked_seq == arm_seq]
    assert type(answers[0]) is p.Ack and all(isinstance(a, p.Nack) and a.code == STALE_SEQ for a in answers[1:])


def test_replayed_setpoint_is_not_applied() -> None:
    h = make()
    h.arm()
    first = h.send(p.Setpoint(np.array([0.5, 0.5])))
    h.send(p.Setpoint(np.array([0.1, 0.1])))
    h.replay(first)
    _, cmd = h.fw.commands()
    assert cmd[:, 0].tolist() == pytest.approx([0.1, 0.1])
    assert h.fw.stats()["rx_stale"] + h.fw.stats()["rx_duplicates"] >= 1


def test_frame_far_ahead_of_the_window_is_refused() -> None:
    h = make(seq_window=64)
    h.arm()
    seq = h.raw(p.MsgType.SETPOINT, p.Setpoint(np.array([0.4, 0.4])).encode(), seq=(h.seq + 1000) & 0xFFFF)
    nack = h.answer(seq)
    assert isinstance(nack, p.Nack) and nack.code == STALE_SEQ
    assert h.fw.commands()[1][:, 0].tolist() == [0.0, 0.0]


# ---- link errors: a leaky bucket, not reset by one good frame ----------------------------------------

def test_alternating_bad_and_good_frames_trip() -> None:
    h = make(link_error_limit=4)
    h.arm()
    garbage = b"\x05\x11\x22\x33\x44\x00"
    for _ in range(40):
        h.now += 1 * MS
        h.fw.rx(garbage, h.now)
        h.send(p.Heartbeat(1))
        h.tick()
    assert h.fw.mode == p.Mode.TRIPPED and p.Fault.LINK_ERRORS in h.fw.faults


def test_sparse_errors_leak_away() -> None:
    h = make(link_error_limit=3)
    h.arm()
    for _ in range(10):  # one bad frame every 300 ms, well under the leak rate
        for _ in range(30):
            h.now += 10 * MS
            h.send(p.Heartbeat(1))
            h.tick()
        h.fw.rx(b"\x05\x11\x22\x33\x44\x00", h.now)
    assert h.fw.mode == p.Mode.ARMED


# ---- time and overflow --------------------------------------------------------------------------------

def test_time_stepping_back_is_no_elapsed_time() -> None:
    h = make(state_rate_hz=100)
    h.at(5_000 * MS).arm()
    h.send(p.Heartbeat(1))
    h.take()
    h.tick(1_000 * MS)  # the time source jumped back 4 s
    assert h.fw.mode == p.Mode.ARMED  # no underflow into a huge "elapsed" time
    assert len([m for m in h.take() if isinstance(m, p.State)]) <= 1  # no STATE flood either
    assert h.fw.stats()["time_backsteps"] == 1
    h.run(h.now + 50 * MS, heartbeat=True)
    assert h.fw.mode == p.Mode.ARMED
    h.run(h.now + 150 * MS)  # and the watchdog still works on the new time base
    assert p.Fault.HEARTBEAT_TIMEOUT in h.fw.faults


def test_firmware_time_reported_is_monotonic_across_a_backstep() -> None:
    h = make(state_rate_hz=100)
    h.run(50 * MS)
    h.tick(10 * MS)
    h.run(100 * MS)
    times = [m.firmware_time_us for m in h.take() if isinstance(m, p.State)]
    assert len(times) > 5 and times == sorted(times)


def test_long_heartbeat_timeout_does_not_overflow() -> None:
    h = make(heartbeat_timeout_ms=4_295_000)  # 71.6 min: ms * 1000 does not fit in 32 bits
    h.arm()
    h.run(h.now + 1_000 * MS, step_us=10 * MS)
    assert h.fw.mode == p.Mode.ARMED


# ---- following error, effort limit, gains and ramp clamps -------------------------------------------------

def safety(**kw):
    from firmware_bridge.protocol import JointSafety

    return JointSafety(**kw)


def test_following_error_trips_category_0() -> None:
    h = make(joint_safety=[safety(max_position_error=0.2), safety(max_position_error=0.2)])
    h.set_measured([0.0, 0.0])
    h.arm()
    h.send(p.Setpoint(np.array([0.15, 0.0])))
    h.tick(h.now + MS)
    assert h.fw.mode == p.Mode.ARMED
    h.send(p.Setpoint(np.array([0.25, 0.0])))  # the joint is blocked at 0: the error exceeds 0.2
    h.tick(h.now + MS)
    assert h.fw.mode == p.Mode.TRIPPED and p.Fault.FOLLOWING_ERROR in h.fw.faults
    faults = [m for m in h.take() if isinstance(m, p.FaultReport)]
    assert faults[-1].fault_code == p.Fault.FOLLOWING_ERROR and faults[-1].stop_category == 0


def test_gripper_gets_an_effort_limit_instead_of_a_position_error_limit() -> None:
    h = make(joint_safety=[safety(max_position_error=0.2), safety(role="gripper", max_position_error=0.2,
                                                                    effort_limit=5.0)])
    h.set_measured([0.0, 0.0], eff=[0.0, 3.0])
    h.arm()
    h.send(p.Setpoint(np.array([0.0, 1.0])))  # gripper closed on an object: large error, by design
    h.tick(h.now + MS)
    assert h.fw.mode == p.Mode.ARMED
    h.set_measured([0.0, 0.0], eff=[0.0, 6.0])
    h.tick(h.now + MS)
    assert h.fw.mode == p.Mode.TRIPPED and p.Fault.EFFORT_LIMIT in h.fw.faults


def test_gains_are_clamped_and_flagged() -> None:
    h = make(joint_safety=[safety(kp_max=100.0, kd_max=5.0), safety(kp_max=100.0, kd_max=5.0)])
    h.arm()
    h.send(p.Setpoint(np.zeros(2), kp=np.array([1e4, 50.0]), kd=np.array([1.0, 80.0])))
    _, cmd = h.fw.commands()
    assert cmd[:, 3].tolist() == [100.0, 50.0] and cmd[:, 4].tolist() == [1.0, 5.0]
    assert p.Fault.GAINS_CLAMPED in h.fw.faults


def test_ramp_target_is_clamped_to_joint_limits() -> None:
    h = make()
    h.set_measured([2.95, -2.95], vel=[3.0, -3.0])  # moving fast towards the limits
    h.arm()
    h.send(p.Stop(1))
    worst = 0.0
    for _ in range(199):
        h.now += MS
        h.fw.tick(h.now)
        _, cmd = h.fw.commands()
        worst = max(worst, float(np.max(np.abs(cmd[:, 0]))))
    assert worst <= 3.0


def test_ramp_escalates_to_category_0_when_a_joint_does_not_decelerate() -> None:
    h = make()
    h.set_measured([0.0, 0.0], vel=[1.0, 0.0])
    h.arm()
    h.send(p.Stop(1))
    for _ in range(100):  # half the ramp; the joint keeps 2.9 rad/s (falling, runaway)
        h.now += MS
        h.set_measured([0.0, 0.0], vel=[2.9, 0.0])
        h.fw.tick(h.now)
    assert h.fw.mode == p.Mode.TRIPPED and p.Fault.STOP_ESCALATED in h.fw.faults


# ---- C build properties ---------------------------------------------------------------------------------

def test_tx_take_can_take_partial_output() -> None:
    h = make(state_rate_hz=1000)
    h.run(h.now + 20 * MS)
    pieces = []
    while chunk := h.fw.tx_take(7):  # a UART driver taking a few bytes at a time
        assert len(chunk) <= 7
        pieces.append(chunk)
    data = b"".join(pieces)
    assert len(data) > 7 and data.endswith(b"\x00")
    from firmware_bridge import framing

    blocks = framing.StreamDecoder().feed(data)
    assert len(blocks) >= 15 and all(framing.decode(b)[1].TYPE == p.MsgType.STATE for b in blocks)


@pytest.mark.skipif(shutil.which("nm") is None, reason="binutils nm not installed")
def test_crc_table_is_static_const_not_lazily_initialised() -> None:
    lib = native.build_library()
    syms = subprocess.run(["nm", str(lib)], capture_output=True, text=True, check=True).stdout
    table = [line.split() for line in syms.splitlines() if line.endswith("crc_table")]
    assert table and table[0][1] in ("r", "R"), f"crc_table should live in read-only data: {table}"
    assert "crc_table_ready" not in syms


def test_long_ramp_is_capped_and_its_math_does_not_overflow() -> None:
    h = make(stop_ramp_ms=4_000_000_000, joints=limits(pmax=2000.0))  # u32 ms: capped at 60 s
    h.set_measured([0.0, 0.0], vel=[3.0, -3.0])
    h.arm()
    h.send(p.Stop(1))
    last = 0.0
    for t_s in (1, 10, 30, 59):
        h.tick(h.now + 0)  # keep the clock where it is, then jump
        h.set_measured([last, -last], vel=[3.0 * (1 - t_s / 60), -3.0 * (1 - t_s / 60)])
        h.tick(1000 + t_s * 1_000_000)
        _, cmd = h.fw.commands()
        assert cmd[0, 0] > last and cmd[1, 0] == pytest.approx(-cmd[0, 0])  # still integrating the ramp
        last = cmd[0, 0]
    assert last == pytest.approx(3.0 * 59 * (120 - 59) / 120, rel=1e-3) and h.fw.mode == p.Mode.STOPPING
    h.tick(1000 + 60_000_001)
    assert h.fw.mode == p.Mode.TRIPPED
