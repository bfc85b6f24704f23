"""hello() refuses a controller whose SAFETY_CONFIG describes another number of joints than its CAPABILITIES.

SAFETY_CONFIG (firmware -> host, protocol 1.1) carries one row of safety limits per joint (following error,
effort limit, gain caps). A controller announcing 7 joints with a safety table for 6 (a firmware port built with
another arm's table, or a second controller answering on the same port/node) has joints without the limits the
host believes it has. The host must refuse that session at hello(), in one line naming both counts, before it
holds a session nonce (so no ARM, hence no motion, can follow).

The controller is the real C firmware (gcc-built, in the emulator) on a real pty; a shim rewrites only its
SAFETY_CONFIG frame to the given row count, CRC-valid. The control case passes the frame through the same shim
with the matching count: the handshake succeeds.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator

import pytest

from firmware_bridge import framing
from firmware_bridge.emulator import Emulator, EmulatorConfig, default_limits
from firmware_bridge.errors import IncompatibleProtocolError
from firmware_bridge.firmware import FirmwareRef
from firmware_bridge.protocol import Mode, MsgType, SafetyConfig
from firmware_bridge.serial_link import SerialLink
from firmware_bridge.transport import PtyTransport


class SafetyTableOfSize:
    """The real C firmware, except that its SAFETY_CONFIG lists `rows` joints (cut short or padded with copies of
    its last row). Every other frame goes out byte for byte."""

    def __init__(self, fw: FirmwareRef, rows: int) -> None:
        self._fw, self._rows = fw, rows
        self.rewritten = 0
        self.hello_answer_bytes = 0  # bytes of the tx batch that answered a HELLO (CAPABILITIES..SESSION)

    def __getattr__(self, name: str) -> object:
        return getattr(self._fw, name)

    def tx_take(self) -> bytes:
        out = b""
        for block in framing.StreamDecoder().feed(self._fw.tx_take()):
            raw = framing.decode_raw(block)
            payload = raw.payload
            if raw.type == MsgType.SAFETY_CONFIG:
                cfg = SafetyConfig.decode(payload)
                rows = (cfg.joints + (cfg.joints[-1],) * self._rows)[: self._rows]
                payload = dataclasses.replace(cfg, joints=rows).encode()
                self.rewritten += 1
            out += framing.encode_raw(raw.type, raw.seq, payload, raw.version)
            if raw.type == MsgType.SESSION:
                self.hello_answer_bytes = len(out)
        return out


@pytest.fixture
def controller(request: pytest.FixtureRequest) -> Iterator[tuple[Emulator, SafetyTableOfSize]]:
    """(emulator, shim) for a controller of `joints` joints whose SAFETY_CONFIG has `rows` rows."""
    joints, rows = request.param
    emu = Emulator(EmulatorConfig(joints=default_limits(joints), heartbeat_timeout_ms=250), PtyTransport())
    shim = SafetyTableOfSize(emu.fw, rows)
    emu.fw = shim  # type: ignore[assignment]
    with emu:
        yield emu, shim


@pytest.mark.parametrize("controller", [(7, 6), (6, 7)], indirect=True, ids=["7-joint-fw-6-row-table",
                                                                               "6-joint-fw-7-row-table"])
def test_hello_refuses_a_safety_config_for_another_joint_count(controller) -> None:
    emu, shim = controller
    joints, rows = len(emu.config.joints), shim._rows
    with SerialLink(emu.port) as link:
        with pytest.raises(IncompatibleProtocolError) as refused:
            link.hello()
        message = str(refused.value)
        assert "\n" not in message
        assert f"{joints} joints in CAPABILITIES" in message and f"SAFETY_CONFIG for {rows} joints" in message, message
        assert shim.rewritten >= 1  # the firmware did send the (rewritten) frame: refused for its content
        # no session was taken, so nothing can arm: the link says so, and an ARM attempt is refused by the firmware
        assert link.session is None and link.needs_hello and link.capabilities is None
        with pytest.raises(Exception, match="BAD_SESSION"):
            link.arm()
    assert emu.fw.mode == Mode.DISARMED
    assert "armed" not in [e["event"] for e in emu.events]


@pytest.mark.parametrize("controller", [(7, 6)], indirect=True)
def test_a_refused_hello_keeps_no_session_that_arrived_in_the_same_read(controller) -> None:
    """The firmware sends CAPABILITIES, SAFETY_CONFIG and SESSION back to back; when one read takes all three, the
    link has decoded the SESSION (and its nonce) before hello() looks at SAFETY_CONFIG. The refusal must still
    leave no session, or arm() would work on the refused controller. The first read waits (polling) until the whole
    answer is in the port's input buffer, so this case is the one tested every time."""
    emu, shim = controller
    with SerialLink(emu.port) as link:
        read = link.transport.read

        def read_whole_answer(timeout: float) -> list[tuple[int, bytes]]:
            deadline = time.monotonic() + 3.0
            while not (shim.hello_answer_bytes and link.transport._ser.in_waiting >= shim.hello_answer_bytes):
                assert time.monotonic() < deadline, "the firmware's answer to HELLO never arrived"
                time.sleep(0.001)
            link.transport.read = read  # type: ignore[method-assign]
            return read(timeout)

        link.transport.read = read_whole_answer  # type: ignore[method-assign]
        with pytest.raises(IncompatibleProtocolError, match="SAFETY_CONFIG for 6 joints"):
            link.hello()
        assert link.session is None and link.needs_hello
        with pytest.raises(Exception, match="BAD_SESSION"):
            link.arm()
    assert emu.fw.mode == Mode.DISARMED


@pytest.mark.parametrize("controller", [(7, 7), (6, 6)], indirect=True, ids=["7-joints", "6-joints"])
def test_control_matching_counts_complete_the_handshake(controller) -> None:
    """The same shim, rewriting SAFETY_CONFIG with the matching row count: the session starts, and arms."""
    emu, shim = controller
    joints = len(emu.config.joints)
    with SerialLink(emu.port) as link:
        caps = link.hello()
        assert shim.rewritten >= 1
        assert caps.joint_count == joints and caps.safety is not None and len(caps.safety.joints) == joints
        assert caps.session is not None and link.session == caps.session
        link.clear_faults()
        link.arm()
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and not (link.latest_state and link.latest_state.mode == Mode.ARMED):
            link.poll(0.01)
        assert link.latest_state is not None and link.latest_state.mode == Mode.ARMED
        link.disarm()
