"""A hostile controller on a real pty: the test plays the firmware and writes its frames by hand, so it can
send what a faulty or foreign controller would (answers that never come, CRC-valid frames with the wrong joint
count). Each probe has a control case that shows the link tells "applied" from "ignored"."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import can
import numpy as np
import pytest

from firmware_bridge import canbus, framing
from firmware_bridge import protocol as p
from firmware_bridge.can_link import CanLink
from firmware_bridge.errors import IncompatibleProtocolError
from firmware_bridge.link import Link
from firmware_bridge.protocol import Fault, Mode, MsgType
from firmware_bridge.serial_link import SerialLink
from firmware_bridge.transport import PtyTransport

JOINTS = (p.JointLimits("j0", -3.0, 3.0, 3.0, 20.0), p.JointLimits("j1", -3.0, 3.0, 3.0, 20.0))


class FakeFirmware:
    """The controller's end of a real pty: decodes what the host sent, writes frames numbered like a firmware."""

    def __init__(self, pty: PtyTransport) -> None:
        self.pty = pty
        self.seq = 1
        self._decoder = framing.StreamDecoder()

    def write(self, msg: p.Message) -> None:
        self.pty.write(framing.encode(msg, self.seq))
        self.seq += 1

    def read_frames(self, timeout: float = 0.0) -> list[tuple[int, p.Message]]:
        out = []
        for _, data in self.pty.read(timeout):
            out += [framing.decode(block) for block in self._decoder.feed(data)]
        return out

    def answer_hello(self, timeout: float = 2.0) -> None:
        """CAPABILITIES, SAFETY_CONFIG and SESSION for the first HELLO that arrives (protocol 1.2)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for seq, msg in self.read_frames(0.01):
                if isinstance(msg, p.Hello):
                    self.write(p.Capabilities(1, 2, (1, 2, 0), 0.1, 100, 0.2, JOINTS))
                    self.write(p.SafetyConfig(0, 1, 0, 0, False, True, 256, 10, 4, (p.JointSafety(),) * 2))
                    self.write(p.Session(0x1234ABCD, seq))
                    return


@pytest.fixture
def fake() -> Iterator[tuple[FakeFirmware, SerialLink]]:
    pty = PtyTransport()
    pty.open()
    try:
        with SerialLink(pty.port) as link:
            yield FakeFirmware(pty), link
    finally:
        pty.close()


def wait_for(link: Link, pred: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        link.poll(0.005)
        if pred():
            return
    raise AssertionError(f"condition not met within {timeout} s; stats {link.stats.as_dict()}")


def _acked_keepalive(fw: FakeFirmware, link: SerialLink) -> int:
    seq = link.keepalive()
    assert any(s == seq for s, _ in fw.read_frames(1.0))
    fw.write(p.Ack(seq, MsgType.KEEPALIVE))
    wait_for(link, lambda: link.ack_result(seq) is True)
    return seq


def _wrap_sequence_numbers(fw: FakeFirmware, link: SerialLink, back_to: int) -> None:
    """Send frames the controller does not ACK (as SETPOINTs, answered by STATE, in a long armed run) until the
    link's next sequence number is `back_to` again; the controller's end drains them."""
    while True:
        seq = link.keepalive()
        if seq % 64 == 0:
            fw.pty.read(0.0)
        if (seq + 1) & 0xFFFF == back_to:
            fw.pty.read(0.0)
            return


# ---- 1. an answer to a sequence number of the previous wrap never answers a new frame ----------------------

def test_stop_after_the_sequence_numbers_wrap_is_not_confirmed_by_an_old_ack(fake) -> None:
    """After 65536 frames the host's u16 seq comes round: an ACK kept from the previous wrap (a KEEPALIVE while
    disarmed, before a long armed run of SETPOINTs) must not confirm a STOP that reuses its number and was lost."""
    fw, link = fake
    old = _acked_keepalive(fw, link)
    _wrap_sequence_numbers(fw, link, back_to=old)
    assert link.stop(0, timeout=0.02, retries=2) is False  # the controller never answered this STOP
    assert link.stats.stops_unacknowledged == 1
    seq = link.send_stop(0)
    assert link.ack_result(seq) is None  # the non-blocking form (the control loop's) is not fooled either
    # control: the same STOP, ACKed by the controller, is confirmed
    fw.write(p.Ack(seq, MsgType.STOP))
    wait_for(link, lambda: link.ack_result(seq) is True)


def test_arm_after_the_wrap_is_not_refused_by_an_old_nack(fake) -> None:
    """The other direction: a NACK of the previous wrap must not be read as the answer to a new command."""
    fw, link = fake
    seq = link.keepalive()
    fw.write(p.Nack(seq, MsgType.KEEPALIVE, p.NackCode.STALE_SEQ))
    wait_for(link, lambda: link.ack_result(seq) is not None)
    _wrap_sequence_numbers(fw, link, back_to=seq)
    assert link.send_arm() == seq and link.ack_result(seq) is None


# ---- 2. a CRC-valid STATE whose joint count is not the controller's ------------------------------------------

def _hello(fw: FakeFirmware, link: SerialLink) -> None:
    responder = threading.Thread(target=fw.answer_hello)
    responder.start()
    try:
        assert link.hello().joint_count == 2
    finally:
        responder.join()


def _state(n: int, t_us: int, pos: float) -> p.State:
    return p.State(t_us, 0, Fault.NONE, Mode.ARMED, np.full(n, pos), np.zeros(n), np.zeros(n))


@pytest.mark.parametrize("n", [0, 1, 3])
def test_state_with_another_joint_count_is_dropped_and_says_why(fake, caplog, n: int) -> None:
    """One joint's position would be broadcast over every joint by numpy (edge_vla's shared state does exactly
    that), and none would crash the loop: the host must drop it and keep the last real state."""
    fw, link = fake
    _hello(fw, link)
    fw.write(_state(2, 1000, 0.1))  # control: a well-formed STATE is taken
    wait_for(link, lambda: link.latest_state is not None)
    good_seq, bad_before = link.latest_state.seq, link.stats.bad_messages
    with caplog.at_level(logging.WARNING, logger="firmware_bridge.link"):
        fw.write(_state(n, 2000, 2.5))
        wait_for(link, lambda: link.stats.bad_messages > bad_before)
    st = link.latest_state
    assert st.seq == good_seq and st.positions.tolist() == [0.1, 0.1]
    assert any(f"STATE for {n} joints" in r.getMessage() and "announced 2" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    fw.write(_state(2, 3000, 0.2))  # the link goes on with the next good one
    wait_for(link, lambda: link.latest_state.seq != good_seq)
    assert link.latest_state.positions.tolist() == [0.2, 0.2]


# ---- 3. CAN: the controller's urgent FAULT overtakes its own queued ACK in arbitration --------------------------

def _can_controller(bus: can.BusABC, node: int, replies: list[int], done: threading.Event) -> None:
    """The controller's end of a virtual CAN bus. It answers each STOP as the firmware does, ACK (normal ID) then
    FAULT (urgent ID), and puts the CAN frames on the bus in the order arbitration gives them when both sit in
    the controller's TX mailboxes: the ACK's first frame is already on the wire, then the FAULT's frames win
    over the rest of the ACK (lower ID), then the rest of the ACK."""
    decoder, fw_seq = framing.StreamDecoder(), 100
    while not done.is_set():
        msg = bus.recv(0.01)
        if msg is None or msg.arbitration_id != canbus.can_id(canbus.HOST_TO_FW_URGENT, node):
            continue
        for block in decoder.feed(bytes(msg.data)):
            seq, cmd = framing.decode(block)
            if not isinstance(cmd, p.Stop):
                continue
            ack = canbus.segment(framing.encode(p.Ack(seq, MsgType.STOP), fw_seq))
            fault = canbus.segment(framing.encode(
                p.FaultReport(1000, Fault.HOST_STOP_CAT0, Fault.HOST_STOP_CAT0, 0, Mode.TRIPPED), fw_seq + 1))
            fw_seq += 2
            normal, urgent = (canbus.can_id(b, node) for b in (canbus.FW_TO_HOST, canbus.FW_TO_HOST_URGENT))
            for arb, chunk in [(normal, ack[0])] + [(urgent, c) for c in fault] + [(normal, c) for c in ack[1:]]:
                bus.send(can.Message(arbitration_id=arb, data=chunk, is_extended_id=False))
            replies.append(seq)


def test_can_stop_is_confirmed_when_the_urgent_fault_overtakes_its_ack() -> None:
    """CAN delivers each ID in order, not the two IDs: the firmware numbers ACK n and FAULT n+1, and FAULT n+1 can
    arrive first. A single window over both IDs then dropped ACK n as stale, so no STOP was ever confirmed."""
    channel, node = f"fbh-{uuid.uuid4().hex[:8]}", 5
    done, replies = threading.Event(), []
    with can.Bus(interface="virtual", channel=channel) as bus, CanLink(channel, "virtual", node_id=node) as link:
        controller = threading.Thread(target=_can_controller, args=(bus, node, replies, done))
        controller.start()
        try:
            assert link.stop(0, timeout=0.1, retries=3) is True
            assert len(replies) == 1  # confirmed by the controller's first answer, not after a resend
            wait_for(link, lambda: link.fault_count == 1)
            assert link.faults[-1].fault_code == Fault.HOST_STOP_CAT0 and link.stats.stale == 0
            # control: within its own ID a late copy is still refused (a replayed ACK never confirms anything)
            old_ack = framing.encode(p.Ack(0x7777, MsgType.STOP), 99)  # older than the ACK on its ID
            for chunk in canbus.segment(old_ack):
                bus.send(can.Message(arbitration_id=canbus.can_id(canbus.FW_TO_HOST, node), data=chunk,
                                     is_extended_id=False))
            # ... and so is an old frame written on the quiet urgent ID, far behind the newest frame of any ID
            replayed = framing.encode(p.Ack(0x7778, MsgType.STOP), (100 - 2000) & 0xFFFF)
            for chunk in canbus.segment(replayed):
                bus.send(can.Message(arbitration_id=canbus.can_id(canbus.FW_TO_HOST_URGENT, node), data=chunk,
                                     is_extended_id=False))
            wait_for(link, lambda: link.stats.stale == 2)
            assert link.ack_result(0x7777) is None and link.ack_result(0x7778) is None
            assert link.stats.drops == 0  # the overtaken ACK filled the gap the FAULT left
        finally:
            done.set()
            controller.join()


# ---- 4. a foreign CAPABILITIES frame outside hello() -------------------------------------------------------------

def test_a_foreign_capabilities_frame_mid_run_is_dropped_and_stop_does_not_raise(fake, caplog) -> None:
    """The stop path must not throw: one CRC-valid CAPABILITIES of another protocol major arriving after the
    session started (noise, a second controller) is dropped and counted, and poll()/stop() go on. Control: the
    same frame answering hello() is the incompatible firmware it names, and hello() refuses it."""
    fw, link = fake
    _hello(fw, link)
    foreign = p.Capabilities(2, 0, (2, 0, 0), 0.1, 100, 0.2, JOINTS)
    bad_before = link.stats.bad_messages
    with caplog.at_level(logging.WARNING, logger="firmware_bridge.link"):
        fw.pty.write(framing.encode(foreign, fw.seq, version=2))
        fw.seq += 1
        wait_for(link, lambda: link.stats.bad_messages > bad_before)
    assert any("protocol 2.0" in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert link.stop(0, timeout=0.02, retries=1) is False  # no answer came: unconfirmed, and no exception

    def answer_foreign() -> None:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            if any(isinstance(m, p.Hello) for _, m in fw.read_frames(0.01)):
                fw.pty.write(framing.encode(foreign, fw.seq, version=2))
                return

    responder = threading.Thread(target=answer_foreign)
    responder.start()
    try:
        with pytest.raises(IncompatibleProtocolError, match="protocol 2.0"):
            link.hello(timeout=1.0)
    finally:
        responder.join()
