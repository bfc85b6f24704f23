"""A controller with no joints must never be armed (review finding: "0-joint firmware can arm").

Every safety check the host and the firmware make is a check over joints (limits, following error, clamps, the
joint count of STATE and SETPOINT): over zero joints each one holds vacuously. A controller that declares 0 joints
(a port built with an empty joint table, a firmware whose table failed to load) is therefore refused:
- by the host at hello(), in one line, before it holds a session (so arm() is refused BAD_SESSION by the
  controller, and `capabilities` does not describe it);
- by the C firmware itself: with no joints configured (fw_init(..., 0, ...), which it accepts: a port's mistake)
  it answers ARM with NACK BAD_JOINT_COUNT and keeps torque off.
A CAPABILITIES frame whose joint count its payload does not carry (255 joints in 16 bytes, 17 joints) is malformed:
dropped and counted, never taken, so hello() ends without a session (that part held before; its message now says
the controller answered with a malformed frame instead of blaming power or cabling).

Host side: the test plays the controller on a real pty and writes its frames by hand (CRC-valid), and ACKs every
ARM, so only the host's own refusal can keep it from "arming". The control case is the same controller with one
joint: hello() completes and arm() is ACKed. Firmware side: the gcc-built reference through ctypes (the library
the emulator loads), configured with 0 joints, and the same with 1 joint as the control.
"""

from __future__ import annotations

import ctypes
import secrets
import struct
import threading
from collections.abc import Iterator

import pytest

from firmware_bridge import framing, native
from firmware_bridge import protocol as p
from firmware_bridge.errors import IncompatibleProtocolError, NackError
from firmware_bridge.protocol import Mode, MsgType, NackCode
from firmware_bridge.serial_link import SerialLink
from firmware_bridge.transport import PtyTransport

NONCE = 0x5EED1234
ONE_JOINT = (p.JointLimits("j0", -3.0, 3.0, 3.0, 20.0),)


class FakeController:
    """The controller's end of a pty, on a thread: answers HELLO with the CAPABILITIES payload it is given (then
    SAFETY_CONFIG and SESSION), ACKs every ARM, CLEAR_FAULTS and DISARM. Records the ARMs it ACKed."""

    def __init__(self, pty: PtyTransport, caps_payload: bytes, safety_joints: int) -> None:
        self.pty, self.caps_payload, self.safety_joints = pty, caps_payload, safety_joints
        self.seq = 1
        self.armed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> FakeController:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _write(self, msg_type: int, payload: bytes) -> None:
        self.pty.write(framing.encode_raw(msg_type, self.seq, payload))
        self.seq += 1

    def _run(self) -> None:
        decoder = framing.StreamDecoder()
        while not self._stop.is_set():
            for _, data in self.pty.read(0.01):
                for block in decoder.feed(data):
                    raw = framing.decode_raw(block)
                    if raw.type == MsgType.HELLO:
                        self._write(MsgType.CAPABILITIES, self.caps_payload)
                        safety = p.SafetyConfig(0, 1, 0, 0, False, True, 256, 10, 4,
                                                (p.JointSafety(),) * self.safety_joints)
                        self._write(MsgType.SAFETY_CONFIG, safety.encode())
                        self._write(MsgType.SESSION, p.Session(NONCE, raw.seq).encode())
                    elif raw.type in (MsgType.ARM, MsgType.CLEAR_FAULTS, MsgType.DISARM):
                        if raw.type == MsgType.ARM:
                            self.armed += 1
                        self._write(MsgType.ACK, p.Ack(raw.seq, raw.type).encode())


def tap(link: SerialLink) -> list[bytes]:
    """Every frame `link` writes, as it goes on the wire."""
    sent: list[bytes] = []
    write = link.transport.write

    def recording_write(frame: bytes, urgent: bool = False) -> None:
        sent.append(bytes(frame))
        write(frame, urgent)

    link.transport.write = recording_write  # type: ignore[method-assign]
    return sent


def capabilities_payload(joints: tuple[p.JointLimits, ...]) -> bytes:
    return p.Capabilities(1, 2, (1, 2, 0), 0.1, 100, 0.2, joints).encode()


@pytest.fixture
def pty() -> Iterator[PtyTransport]:
    t = PtyTransport()
    t.open()
    try:
        yield t
    finally:
        t.close()


# ---- the host ------------------------------------------------------------------------------------------------------


def test_hello_refuses_a_controller_that_declares_0_joints(pty: PtyTransport) -> None:
    with FakeController(pty, capabilities_payload(()), safety_joints=0) as fw, SerialLink(pty.port) as link:
        sent = tap(link)
        with pytest.raises(IncompatibleProtocolError) as refused:
            link.hello()
        message = str(refused.value)
        assert "\n" not in message and "the controller declares 0 joints" in message, message
        assert link.capabilities is None and link.session is None and link.needs_hello
        # An ARM now carries no session (nonce 0), which a 1.2 firmware refuses BAD_SESSION; this fake ACKs it
        # anyway, so the frame itself is what shows the host did not take the session.
        link.arm()
        arm = framing.decode_raw(sent[-1].rstrip(b"\x00"))
        assert arm.type == MsgType.ARM and struct.unpack("<I", arm.payload) == (0,) and fw.armed == 1


def test_control_a_controller_with_one_joint_completes_hello_and_arms(pty: PtyTransport) -> None:
    with FakeController(pty, capabilities_payload(ONE_JOINT), safety_joints=1) as fw, SerialLink(pty.port) as link:
        caps = link.hello()
        assert caps.joint_count == 1 and link.session == NONCE
        link.arm()
        assert fw.armed == 1


@pytest.mark.parametrize(("joints", "rows"), [(255, 0), (255, 1), (17, 17), (2, 1)],
                         ids=["255-in-16-bytes", "255-with-one-row", "17-beyond-the-table", "2-with-one-row"])
def test_capabilities_claiming_joints_its_payload_does_not_carry_is_never_taken(pty: PtyTransport, joints: int,
                                                                                rows: int) -> None:
    """The joint count byte says more than the frame carries (or more than the 16-joint table): a malformed frame,
    counted in bad_messages, never taken; hello() ends without a session or capabilities, in one line that says the
    controller did answer (not "no answer to HELLO ... check that the controller is powered", as it said before)."""
    row = capabilities_payload(ONE_JOINT)[16:]
    payload = bytearray(capabilities_payload(())) + row * rows  # by hand: the codec refuses more than 16 rows
    payload[2] = joints
    with FakeController(pty, bytes(payload), safety_joints=min(rows, 16)), SerialLink(pty.port) as link:
        with pytest.raises(IncompatibleProtocolError) as refused:
            link.hello(timeout=0.5)
        message = str(refused.value)
        assert "\n" not in message and "answered HELLO with a malformed CAPABILITIES" in message, message
        assert link.stats.bad_messages >= 1
        assert link.capabilities is None and link.session is None and link.needs_hello


# ---- the C firmware ------------------------------------------------------------------------------------------------


class CFirmware:
    """The reference firmware (fw_core.c) through ctypes, configured with `n` joints (fw_init accepts 0)."""

    def __init__(self, n: int) -> None:
        self.lib = native.load()
        self.fw = ctypes.create_string_buffer(self.lib.fw_sizeof())
        self.lib.fw_init(self.fw, n, 100, 200, 0, 4, 0x010200)
        self.lib.fw_seed_sessions(self.fw, secrets.randbits(64))
        for j in range(n):
            assert self.lib.fw_set_joint(self.fw, j, b"j%d" % j, -3_000_000, 3_000_000, 3_000_000, 20_000, 500_000,
                                         20_000) == 0
        self.now = 1_000

    def send(self, msg_type: int, seq: int, payload: bytes) -> list[framing.RawFrame]:
        frame = framing.encode_raw(msg_type, seq, payload)
        self.now += 1_000
        self.lib.fw_rx_bytes(self.fw, (ctypes.c_uint8 * len(frame)).from_buffer_copy(frame), len(frame), self.now)
        out = (ctypes.c_uint8 * 4096)()
        n = self.lib.fw_tx_take(self.fw, out, len(out))
        return [framing.decode_raw(b) for b in framing.StreamDecoder().feed(bytes(out[:n]))]

    def torque_on(self) -> bool:
        cmd = (ctypes.c_int32 * (5 * 16))()
        return bool(self.lib.fw_get_commands(self.fw, cmd))

    def hello_and_arm(self) -> tuple[p.Capabilities, p.Message]:
        out = self.send(MsgType.HELLO, 100, p.Hello().encode())
        caps = p.Capabilities.decode(next(f.payload for f in out if f.type == MsgType.CAPABILITIES))
        session = p.Session.decode(next(f.payload for f in out if f.type == MsgType.SESSION))
        answer = [f for f in self.send(MsgType.ARM, 101, p.Arm(session.session).encode())
                  if f.type in (MsgType.ACK, MsgType.NACK)]
        assert len(answer) == 1, answer
        return caps, framing.decode_message(answer[0])


def test_c_firmware_with_no_joints_refuses_arm() -> None:
    fw = CFirmware(0)
    caps, answer = fw.hello_and_arm()
    assert caps.joint_count == 0  # a port can build it so, and it says so
    assert isinstance(answer, p.Nack) and answer.code == NackCode.BAD_JOINT_COUNT, answer
    assert fw.lib.fw_mode(fw.fw) == Mode.DISARMED and not fw.torque_on()


def test_control_c_firmware_with_one_joint_arms() -> None:
    fw = CFirmware(1)
    caps, answer = fw.hello_and_arm()
    assert caps.joint_count == 1
    assert type(answer) is p.Ack and answer.acked_type == MsgType.ARM
    assert fw.lib.fw_mode(fw.fw) == Mode.ARMED and fw.torque_on()


def test_host_refuses_the_0_joint_c_firmware_on_a_pty() -> None:
    """Both together: the 0-joint C firmware answering a real host link on a pty (served by hand: the emulator's
    FirmwareRef refuses 0 joints before the C code sees them). hello() is refused, and the ARM that follows carries
    no session: refused by the firmware, which never arms."""
    fw = CFirmware(0)
    t = PtyTransport()
    t.open()
    stop = threading.Event()

    def serve() -> None:
        decoder = framing.StreamDecoder()
        while not stop.is_set():
            for _, data in t.read(0.01):
                for block in decoder.feed(data):
                    raw = framing.decode_raw(block)
                    for f in fw.send(raw.type, raw.seq, raw.payload):
                        t.write(framing.encode_raw(f.type, f.seq, f.payload))

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        with SerialLink(t.port) as link:
            with pytest.raises(IncompatibleProtocolError, match="the controller declares 0 joints"):
                link.hello()
            with pytest.raises(NackError) as nack:
                link.arm()
            assert nack.value.code == NackCode.BAD_SESSION  # checked first: no session, nothing else is told
        assert fw.lib.fw_mode(fw.fw) == Mode.DISARMED and not fw.torque_on()
    finally:
        stop.set()
        server.join(timeout=5)
        t.close()

