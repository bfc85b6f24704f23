"""Issue 23, item 1: a replayed session start must not re-arm a tripped firmware.

A node on the bus (any node, on a shared CAN bus) captures one session's HELLO, CLEAR_FAULTS and ARM and,
after a category-0 STOP, writes the same three frames again byte for byte. Each test has its control: a
live session, which uses the session the firmware announced to it, does arm.

Written before the fix and run against protocol 1.1 (where the replay armed the firmware): the frames are
built by type number and the session announcement (SESSION, 0x0F) is read only if the firmware sends one.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from firmware_bridge import framing
from firmware_bridge import protocol as p
from firmware_bridge.emulator import Emulator, EmulatorConfig, default_limits
from firmware_bridge.errors import IncompatibleProtocolError, NackError
from firmware_bridge.firmware import FirmwareRef
from firmware_bridge.injection import write_as_another_node
from firmware_bridge.link import Link
from firmware_bridge.protocol import Fault, Mode, NackCode
from firmware_bridge.serial_link import SerialLink
from firmware_bridge.transport import PtyTransport

HELLO, ARM, STOP, CLEAR_FAULTS, SESSION = 0x01, 0x03, 0x08, 0x0C, 0x0F


def announced_session(out: bytes) -> bytes:
    """The session nonce the firmware announced in `out` (b"" if it announced none, as 1.1 did)."""
    nonce = b""
    for block in framing.StreamDecoder().feed(out):
        raw = framing.decode_raw(block)
        if raw.type == SESSION:
            nonce = raw.payload[:4]
    return nonce


def operator_arm_frames(fw: FirmwareRef, seq: int, now: int) -> list[bytes]:
    """A host's session start and operator arm, as it goes on the wire: HELLO, CLEAR_FAULTS, ARM."""
    hello = framing.encode_raw(HELLO, seq, struct.pack("<BBH", p.PROTOCOL_MAJOR, p.PROTOCOL_MINOR, 0))
    fw.rx(hello, now)
    nonce = announced_session(fw.tx_take())
    frames = [hello]
    for i, msg_type in enumerate((CLEAR_FAULTS, ARM), start=1):
        frames.append(framing.encode_raw(msg_type, seq + i, nonce))
        fw.rx(frames[-1], now + i)
    return frames


def test_replayed_session_start_does_not_rearm_the_c_firmware() -> None:
    fw = FirmwareRef(default_limits(2), state_rate_hz=0)
    captured = operator_arm_frames(fw, seq=100, now=1_000)
    assert fw.mode == Mode.ARMED, "session 1 did not arm"
    fw.rx(framing.encode_raw(STOP, 103, p.Stop(0).encode()), 2_000)
    assert fw.mode == Mode.TRIPPED and Fault.HOST_STOP_CAT0 in fw.faults
    fw.events()

    for i, frame in enumerate(captured):  # byte for byte
        fw.rx(frame, 3_000 + i)
    assert fw.mode == Mode.TRIPPED and Fault.HOST_STOP_CAT0 in fw.faults, (fw.mode, fw.faults)
    assert not fw.commands()[0], "torque came back on after a replayed session start"
    assert "ARMED" not in [e.kind.name for e in fw.events()]

    # Control: a live session (another host process: another sequence range) arms.
    live = operator_arm_frames(fw, seq=40_000, now=4_000)
    assert fw.mode == Mode.ARMED and fw.faults == Fault.NONE and fw.commands()[0]
    assert live[1] != captured[1] and live[2] != captured[2]


# ---- through the real host link, over a real pty -------------------------------------------------------------

def tap(link: Link) -> list[bytes]:
    """Everything `link` writes on the wire, frame by frame (what another node on the bus sees)."""
    seen: list[bytes] = []
    write: Callable[[bytes, bool], None] = link.transport.write

    def recording_write(frame: bytes, urgent: bool = False) -> None:
        seen.append(bytes(frame))
        write(frame, urgent)

    link.transport.write = recording_write  # type: ignore[method-assign]
    return seen


def frame_type(frame: bytes) -> int:
    return framing.decode_raw(frame.rstrip(b"\x00")).type


def wait_until(pred: Callable[[], object], timeout: float = 3.0, poll: Link | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if poll is not None:
            poll.keepalive()
            poll.poll(0.005)
        else:
            time.sleep(0.005)
        if pred():
            return
    raise AssertionError("condition not met in time")


def replay_answered(emu: Emulator, since: float) -> None:
    """Wait until the firmware handled all three replayed frames, then 20 ms more of its ticks (nothing may
    come on late)."""
    handled = ("hello", "armed", "bad_session", "faults_cleared")
    wait_until(lambda: sum(e["t"] >= since and e["event"] in handled for e in emu.events) >= 3)
    t0 = emu.fw.time_us
    wait_until(lambda: emu.fw.time_us >= t0 + 20_000)


def capture_one_session(port: str) -> list[bytes]:
    """A real host session on `port`: HELLO, CLEAR_FAULTS, ARM, then a category-0 STOP. Returns its HELLO,
    CLEAR_FAULTS and ARM frames as a tap on the wire saw them."""
    with SerialLink(port) as link:
        wire = tap(link)
        link.hello()
        link.clear_faults()
        link.arm()
        assert link.stop(0)
        wait_until(lambda: link.latest_state is not None and link.latest_state.mode == Mode.TRIPPED, poll=link)
    return [next(f for f in wire if frame_type(f) == t) for t in (HELLO, CLEAR_FAULTS, ARM)]


def live_operator_arm(port: str) -> None:
    """A new live session from the real host link: hello, clear_faults, arm, until the firmware reports ARMED."""
    with SerialLink(port) as live:
        live.hello()
        live.clear_faults()
        live.arm()
        wait_until(lambda: live.latest_state is not None and live.latest_state.mode == Mode.ARMED, poll=live)
        live.disarm()


@pytest.fixture
def emu() -> Iterator[Emulator]:
    cfg = EmulatorConfig(joints=default_limits(2), heartbeat_timeout_ms=250, stop_ramp_ms=100)
    with Emulator(cfg, PtyTransport()) as e:
        yield e


def test_replayed_session_start_over_the_wire_does_not_rearm(emu: Emulator) -> None:
    capture = capture_one_session(emu.port)
    t_replay = write_as_another_node(emu.port, capture)
    replay_answered(emu, t_replay)
    after = [e["event"] for e in emu.events if e["t"] >= t_replay]
    assert "armed" not in after and "faults_cleared" not in after, after
    assert after.count("bad_session") == 2, after  # CLEAR_FAULTS and ARM, each refused for its old session
    assert emu.fw.mode == Mode.TRIPPED and Fault.HOST_STOP_CAT0 in emu.fw.faults

    live_operator_arm(emu.port)  # control: a new live session from the real host link arms
    assert not emu.safety_report()["moved_without_operator_arm"], emu.safety_report()["unauthorized"]


class IgnoresSessions:
    """The real C firmware behind a shim that rewrites every CLEAR_FAULTS and ARM to carry the current session:
    a firmware without the session check (protocol 1.1's defect). Used to test the emulator's own verdict."""

    def __init__(self, fw: FirmwareRef) -> None:
        self._fw = fw

    def __getattr__(self, name: str) -> object:
        return getattr(self._fw, name)

    def rx(self, data: bytes, now_us: int) -> None:
        out = b""
        for block in framing.StreamDecoder().feed(data):
            raw = framing.decode_raw(block)  # the emulator delivers whole, intact frames here
            payload = struct.pack("<I", self._fw.session) if raw.type in (CLEAR_FAULTS, ARM) else raw.payload
            out += framing.encode_raw(raw.type, raw.seq, payload, raw.version)
        self._fw.rx(out, now_us)


def test_emulator_flags_a_replayed_session_start_that_a_faulty_firmware_applied() -> None:
    """The emulator judges "authorised" by the live session's nonce, not by what the firmware did: with a
    firmware that ignores sessions, the replay arms it and the emulator reports unauthorized_motion; the
    live session's own arm (the control) is not reported."""
    cfg = EmulatorConfig(joints=default_limits(2), heartbeat_timeout_ms=250, stop_ramp_ms=100)
    emu = Emulator(cfg, PtyTransport())
    emu.fw = IgnoresSessions(emu.fw)  # type: ignore[assignment]
    with emu:
        capture = capture_one_session(emu.port)
        assert not emu.safety_report()["moved_without_operator_arm"]  # session 1 armed legitimately
        t_replay = write_as_another_node(emu.port, capture)
        wait_until(lambda: any(e["event"] == "unauthorized_motion" and e["t"] >= t_replay for e in emu.events))
        assert [e["event"] for e in emu.events if e["t"] >= t_replay].count("armed") == 1
        emu.inject_garbage(framing.encode(p.Stop(0), 0))  # torque off again (a stale STOP still applies)
        wait_until(lambda: emu.fw.mode == Mode.TRIPPED)
        t_live = time.monotonic()
        live_operator_arm(emu.port)
    assert [e for e in emu.events if e["event"] == "armed" and e["t"] >= t_live]
    assert not [e for e in emu.events if e["event"] == "unauthorized_motion" and e["t"] >= t_live]


# ---- the host side of session binding -------------------------------------------------------------------------

def test_host_refuses_1_1_firmware() -> None:
    """1.1 firmware applies a replayed session start; a 1.2 host refuses it at HELLO with a clear message."""
    with Emulator(EmulatorConfig(protocol=(1, 1)), PtyTransport()) as emu, SerialLink(emu.port) as link, \
            pytest.raises(IncompatibleProtocolError, match=r"1\.1.*re-arms on a replayed session start"):
        link.hello()


def test_link_notices_another_nodes_hello_and_needs_its_own_again(emu: Emulator, caplog) -> None:
    with SerialLink(emu.port) as link:
        link.hello()
        first = link.session
        assert first is not None and first == emu.fw.session and not link.needs_hello
        # Someone else's session start, numbered just before this link's next frame: the sequence window then
        # admits that frame, and only the session refuses it.
        write_as_another_node(emu.port, [framing.encode(p.Hello(), (link._seq - 1) & 0xFFFF)])
        wait_until(lambda: link.needs_hello, poll=link)
        assert link.session is None and "did not send" in caplog.text
        with pytest.raises(NackError, match=r"BAD_SESSION.*call hello\(\)") as refused:
            link.clear_faults()
        assert refused.value.code == NackCode.BAD_SESSION
        caps = link.hello()
        assert caps.session == link.session == emu.fw.session and link.session not in (None, first)
        link.clear_faults()
        link.arm()
        wait_until(lambda: link.latest_state is not None and link.latest_state.mode == Mode.ARMED, poll=link)
        link.disarm()


def test_firmware_that_announces_no_session_is_refused() -> None:
    """A port that never seeds session nonces answers session 0: it can never arm, so hello() says so."""
    pty = PtyTransport()
    pty.open()
    answered = threading.Event()

    def unseeded_firmware() -> None:
        decoder, deadline = framing.StreamDecoder(), time.monotonic() + 5.0
        while not answered.is_set() and time.monotonic() < deadline:
            for _, data in pty.read(0.02):
                for block in decoder.feed(data):
                    seq, msg = framing.decode(block)
                    if isinstance(msg, p.Hello):
                        pty.write(framing.encode(p.Capabilities(1, 2, (1, 2, 0), 0.1, 100, 0.2, (
                            p.JointLimits("a", -1, 1, 1, 1),)), 1))
                        pty.write(framing.encode(p.SafetyConfig(0, 1, 0, 0, False, True, 256, 10, 4,
                                                                (p.JointSafety(),)), 2))
                        pty.write(framing.encode(p.Session(0, seq), 3))
                        answered.set()

    fake = threading.Thread(target=unseeded_firmware, daemon=True)
    fake.start()
    try:
        with SerialLink(pty.port) as link, pytest.raises(IncompatibleProtocolError, match="announced no session"):
            link.hello()
    finally:
        answered.set()
        fake.join(5)
        pty.close()


# ---- the live session's own frames ------------------------------------------------------------------------------

def test_a_malformed_hello_does_not_reopen_the_window_for_the_live_sessions_frames() -> None:
    """Only a well-formed HELLO (which draws a new nonce) may reset the sequence window: a 5-byte HELLO numbered
    just before captured CLEAR_FAULTS/ARM of the live session must not let them through."""
    fw = FirmwareRef(default_limits(2), state_rate_hz=0)
    captured = operator_arm_frames(fw, seq=100, now=1_000)
    fw.rx(framing.encode_raw(STOP, 103, p.Stop(0).encode()), 2_000)
    fw.rx(framing.encode_raw(HELLO, 100, bytes(5)), 3_000)  # malformed, numbered to re-admit seq 101, 102
    fw.rx(captured[1] + captured[2], 3_001)
    assert fw.mode == Mode.TRIPPED and Fault.HOST_STOP_CAT0 in fw.faults


def test_captured_arm_of_the_live_session_is_refused_after_the_sequence_numbers_wrap() -> None:
    """The u16 sequence window comes round again after 65536 frames; a session arms only within its first
    SESSION_ARM_SPAN sequence numbers, so a captured CLEAR_FAULTS/ARM of it never becomes new again."""
    fw = FirmwareRef(default_limits(2), state_rate_hz=0)
    captured = operator_arm_frames(fw, seq=100, now=1_000)
    fw.rx(framing.encode_raw(STOP, 103, p.Stop(0).encode()), 2_000)
    keepalives = b"".join(framing.encode_raw(0x0D, s & 0xFFFF, bytes(4)) for s in range(104, 100 + 0x10000))
    fw.rx(keepalives, 3_000)  # a host keeping a stopped firmware's link alive for a long while
    fw.tx_take()
    fw.rx(captured[1] + captured[2], 4_000)  # now within the window again: (101 - 100 - 0x10000 + 4) mod 2^16
    assert fw.mode == Mode.TRIPPED and Fault.HOST_STOP_CAT0 in fw.faults


def test_link_says_hello_again_before_its_session_stops_arming(emu: Emulator, monkeypatch) -> None:
    """needs_hello turns True SESSION_RENEW_MARGIN frames before the firmware's SESSION_ARM_SPAN (shrunk here
    on the host side only, so the test sends 100 frames, not 28672); hello() renews the session."""
    from firmware_bridge import link as link_module

    monkeypatch.setattr(link_module, "SESSION_ARM_SPAN", link_module.SESSION_RENEW_MARGIN + 100)
    with SerialLink(emu.port) as link:
        link.hello()
        for _ in range(99):
            link.keepalive()
        assert not link.needs_hello
        link.keepalive()
        assert link.needs_hello and link.session is not None  # still a session, but renew it before arming
        first = link.session
        link.hello()
        assert not link.needs_hello and link.session not in (None, first)
        link.clear_faults()
        link.arm()
        wait_until(lambda: link.latest_state is not None and link.latest_state.mode == Mode.ARMED, poll=link)
        link.disarm()
