"""Targeted fault injection on host->firmware frames, and the observer that judges the robot's behaviour.

`HostFrameFaults` acts on whole frames by message type (drop the next STOP, corrupt every other frame,
replay an earlier ARM), unlike `faults.FaultInjector`, which is random. `SafetyObserver` watches what
reaches the firmware and what the motors do, independently of the firmware's own bookkeeping, and
flags any time torque came on without an ARM of the live session (after a stop: without a CLEAR_FAULTS
followed by an ARM, both of the live session).
"""

from __future__ import annotations

import os
import struct
import time
from collections import deque
from dataclasses import dataclass, field

from cobs import cobs

from firmware_bridge.errors import FrameError
from firmware_bridge.framing import RawFrame, decode_raw
from firmware_bridge.protocol import PROTOCOL_MAJOR, MsgType

HISTORY = 64  # frames kept per message type for replay


def frame_type(block: bytes) -> int | None:
    """The message type of one COBS block (no delimiter), or None if it does not decode."""
    try:
        raw = cobs.decode(block)
    except cobs.DecodeError:
        return None
    return raw[1] if len(raw) >= 8 else None


def frame_payload(block: bytes) -> bytes:
    try:
        raw = cobs.decode(block)
    except cobs.DecodeError:
        return b""
    return bytes(raw[4:-4])


def type_name(t: int | None) -> str:
    try:
        return MsgType(t).name if t is not None else "undecodable"
    except ValueError:
        return f"0x{t:02x}"


@dataclass
class HostFrameFaults:
    """Per-type drops, alternating corruption and a replay history of genuine host frames."""

    drop: dict[int, int] = field(default_factory=dict)  # message type -> frames still to drop
    alternate_left: int = 0  # frames still in the corrupt/good alternation
    history: dict[int, deque[bytes]] = field(default_factory=dict)

    def filter(self, block: bytes) -> tuple[bytes | None, str | None]:
        """(block to deliver or None, what was done to it or None)."""
        t = frame_type(block)
        if t is not None and self.drop.get(t, 0) > 0:
            self.drop[t] -= 1
            return None, "dropped"
        if t is not None:
            self.history.setdefault(t, deque(maxlen=HISTORY)).append(block)
        if self.alternate_left > 0:
            self.alternate_left -= 1
            if self.alternate_left % 2 == 1:  # corrupt, good, corrupt, good, ...
                bad = bytearray(block)
                i = len(bad) // 2
                bad[i] = bad[i] ^ 0x5A or 0x01  # never 0x00: stays one frame, fails its CRC
                return bytes(bad), "corrupted"
        return block, None

    def recorded(self, msg_type: int, which: str = "oldest") -> bytes:
        frames = self.history.get(int(msg_type))
        if not frames:
            raise LookupError(f"no {type_name(msg_type)} frame from the host has been recorded yet")
        if which not in ("oldest", "latest"):
            raise ValueError(f"which must be 'oldest' or 'latest', got {which!r}")
        return frames[0] if which == "oldest" else frames[-1]


def _checked(block: bytes) -> RawFrame | None:
    """One frame as the firmware would take it (COBS and CRC intact), else None: it applies nothing."""
    try:
        return decode_raw(block)
    except FrameError:
        return None


class SafetyObserver:
    """Authorisation of torque, judged from the wire and from nothing the firmware keeps to itself.

    Torque may come on only after an ARM carrying the live session's nonce, and after a stop only if a
    CLEAR_FAULTS carrying it came first. The live session is the one the firmware announced (its SESSION
    frame, on the wire to the host) after the last HELLO it received; a HELLO, whoever sent it, ends the
    previous one. So frames captured from an earlier session and written again (even right after a
    replayed HELLO) are not the host's, and neither is anything the emulator injected itself (`injected`),
    nor a byte-identical copy of a CLEAR_FAULTS or ARM already seen in this session (a host numbers every
    frame anew, and re-says HELLO long before its sequence numbers could repeat within one session).
    """

    SEEN_CAP = 4096  # CLEAR_FAULTS/ARM frames remembered per session

    def __init__(self) -> None:
        self.stopped = False  # a stop happened and no operator arm has followed yet
        self.live_session: int | None = None  # the nonce announced after the last HELLO; None until then
        self._cleared = False
        self._arm_ok = False  # an authorised ARM since the last stop or torque-on
        self._torque = False
        self._seen: deque[bytes] = deque(maxlen=self.SEEN_CAP)  # this session's CLEAR_FAULTS/ARM frames

    def on_firmware_frame(self, block: bytes) -> None:
        """A frame the firmware sent (no delimiter): learns the live session from SESSION."""
        raw = _checked(block)
        if raw is not None and raw.type == MsgType.SESSION and len(raw.payload) == 8:
            self.live_session = struct.unpack_from("<I", raw.payload)[0] or None

    def on_host_frame(self, block: bytes, injected: bool) -> None:
        """A frame delivered to the firmware (no delimiter), after any corruption on the way."""
        raw = _checked(block)
        if raw is None or raw.version != PROTOCOL_MAJOR:
            return
        if raw.type == MsgType.HELLO and len(raw.payload) == 4:
            # A new session, whoever started it: its nonce is unknown until the firmware announces it, and
            # nothing said in the previous one counts any more.
            self.live_session = None
            self._cleared = self._arm_ok = False
            self._seen.clear()
            return
        if raw.type not in (MsgType.CLEAR_FAULTS, MsgType.ARM):
            return
        replayed = block in self._seen
        self._seen.append(block)
        if injected or replayed or not self._of_live_session(raw.payload):
            return
        if raw.type == MsgType.CLEAR_FAULTS:
            self._cleared = True
        elif raw.type == MsgType.ARM and (self._cleared or not self.stopped):
            self._arm_ok = True

    def _of_live_session(self, payload: bytes) -> bool:
        return (self.live_session is not None and len(payload) == 4
                and struct.unpack("<I", payload)[0] == self.live_session)

    def on_stop(self) -> None:
        """Any stop: a host STOP, a firmware trip, torque removed."""
        self.stopped = True
        self._cleared = self._arm_ok = False

    def on_torque(self, on: bool) -> bool:
        """Torque state this tick; True if torque just came on without authorisation."""
        rising = on and not self._torque
        self._torque = on
        if not rising:
            return False
        authorised = self._arm_ok
        self.stopped = False
        self._cleared = self._arm_ok = False
        return not authorised


def safety_report(events: list[dict]) -> dict:
    """The campaign's summary of an emulator's event log (times on time.monotonic())."""
    return {
        "stops": [e["t"] for e in events if e["event"] == "rx_stop"],
        "torque_off": [e["t"] for e in events if e["event"] == "torque_off"],
        "modes": [(e["t"], e["to"]) for e in events if e["event"] == "mode"],
        "unauthorized": [e for e in events if e["event"] == "unauthorized_motion"],
        "moved_without_operator_arm": any(e["event"] == "unauthorized_motion" for e in events),
    }


def write_as_another_node(port: str, frames: list[bytes]) -> float:
    """Write whole frames on the line from a file descriptor of its own (another node on the bus, a replay
    attacker); returns the time it wrote."""
    fd = os.open(os.path.realpath(port), os.O_WRONLY | os.O_NOCTTY)
    try:
        t = time.monotonic()
        os.write(fd, b"".join(frames))
    finally:
        os.close(fd)
    return t
