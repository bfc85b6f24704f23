"""Targeted fault injection on host->firmware frames, and the observer that judges the robot's behaviour.

`HostFrameFaults` acts on whole frames by message type (drop the next STOP, corrupt every other frame,
replay an earlier ARM), unlike `faults.FaultInjector`, which is random. `SafetyObserver` watches what
reaches the firmware and what the motors do, independently of the firmware's own bookkeeping, and
flags any time torque came back after a stop without a CLEAR_FAULTS followed by an ARM from the host.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from cobs import cobs

from firmware_bridge.protocol import MsgType

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


class SafetyObserver:
    """Authorisation of torque after a stop, judged from the wire: the host must send CLEAR_FAULTS and
    then ARM (genuine frames, not injected replays) after the stop before torque may come back."""

    def __init__(self) -> None:
        self.stopped = False  # a stop happened and no operator arm has followed yet
        self._cleared = False
        self._armed_after_clear = False
        self._torque = False

    def on_host_frame(self, msg_type: int | None, injected: bool) -> None:
        if injected or not self.stopped:
            return
        if msg_type == MsgType.CLEAR_FAULTS:
            self._cleared = True
        elif msg_type == MsgType.ARM and self._cleared:
            self._armed_after_clear = True

    def on_stop(self) -> None:
        """Any stop: a host STOP, a firmware trip, torque removed."""
        self.stopped = True
        self._cleared = self._armed_after_clear = False

    def on_torque(self, on: bool) -> bool:
        """Torque state this tick; True if torque just came on without authorisation."""
        rising = on and not self._torque
        self._torque = on
        if not rising:
            return False
        authorised = not self.stopped or self._armed_after_clear
        self.stopped = False
        self._cleared = self._armed_after_clear = False
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
