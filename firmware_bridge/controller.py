"""The one interface the control loop drives: a motor controller, whatever speaks to it.

Two kinds of backend implement it, chosen by the link URL's scheme (firmware_bridge.schemes):
- `link.Link` (serial://, can://): this project's firmware protocol. The controller is an MCU running the
  firmware reference; it owns the motion watchdog, the session-bound arming and the stop ramps.
- `motors.link_adapter.MotorDeviceLink` (dynamixel://, feetech://): a servo bus driven through a
  `motors.base.MotorDevice`. The host does what the firmware would, with what each servo offers (a Dynamixel's
  Bus Watchdog; nothing on a Feetech STS).

The loop (edge_vla.onboard.control) only calls what is declared here and learns no device details. Commands
are non-blocking (`send_*` returns a sequence number, `ack_result(seq)` answers it in a later cycle) because a
control cycle never waits; the blocking forms (`arm`, `disarm`, `clear_faults`, `stop`) are for bench tools.
Arming is an operator act: nothing implementing this interface arms by itself.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from firmware_bridge.errors import NackError
from firmware_bridge.protocol import Capabilities, Fault, FaultReport, Message, Mode, Setpoint, Status

ArrayLike = np.ndarray | Sequence[float]
FAULT_LOG_SIZE = 256  # fault reports kept in `faults` (`fault_count` counts all of them)
IGNORED_FRAME_KINDS = ("extended", "error", "remote")  # what a CAN transport drops (LinkStats.ignored_frames)


@dataclass(frozen=True)
class JointState:
    positions: np.ndarray  # rad (or m)
    velocities: np.ndarray  # rad/s
    efforts: np.ndarray  # N*m
    fault_bits: Fault
    mode: Mode
    firmware_time_s: float
    host_time: float  # time.monotonic() when the frame was decoded (arrival)
    ack_seq: int
    # 1.1: when the firmware sampled this state, on this host's time.monotonic() clock (firmware time
    # + the estimated clock offset). Use it for staleness: a STATE delayed in a buffer shows its real age.
    sampled_host_time: float | None = None
    status: Status = Status.NONE
    seq: int = -1

    @property
    def sample_time(self) -> float:
        return self.host_time if self.sampled_host_time is None else self.sampled_host_time


@dataclass
class LinkStats:
    frames_sent: int = 0
    frames_received: int = 0
    bytes_received: int = 0
    crc_errors: int = 0
    framing_errors: int = 0
    bad_messages: int = 0  # right CRC, wrong length/type/version/field
    duplicates: int = 0
    drops: int = 0  # gaps in the firmware's sequence numbers
    stale: int = 0  # frames dropped for a sequence number older than the last one (replays, late copies)
    reconnects: int = 0
    stops_unacknowledged: int = 0  # stop() calls that ended without an ACK
    # CAN only (zero elsewhere): frames on our receive IDs that were not the controller's data frames, by kind
    # ("extended": a 29-bit ID, "error": the bus reporting errors, "remote": RTR), and reads cut at the transport's
    # per-read frame budget (a node flooding our IDs). Copied from the transport after every read.
    ignored_frames: dict[str, int] = field(default_factory=lambda: dict.fromkeys(IGNORED_FRAME_KINDS, 0))
    reads_at_budget: int = 0
    rtts: deque = field(default_factory=lambda: deque(maxlen=4096))

    def rtt_percentiles(self, qs: Sequence[float] = (50, 90, 99)) -> dict[str, float]:
        """Round-trip times in seconds (command sent -> its ACK or STATE decoded), over the last 4096."""
        if not self.rtts:
            return {}
        values = np.percentile(np.fromiter(self.rtts, float), qs)
        return {f"p{q:g}": float(v) for q, v in zip(qs, values, strict=True)}

    def as_dict(self) -> dict[str, object]:
        d: dict[str, object] = {k: dict(v) if isinstance(v, dict) else v for k, v in vars(self).items() if k != "rtts"}
        d["rtt"] = self.rtt_percentiles()
        return d


class Controller(ABC):
    """A connection to one motor controller (see the module docstring). Not opened by the constructor."""

    def __init__(self) -> None:
        self.capabilities: Capabilities | None = None
        self.faults: deque[FaultReport] = deque(maxlen=FAULT_LOG_SIZE)
        self.fault_count = 0  # fault reports received ever; `faults` keeps the last FAULT_LOG_SIZE
        self.stats = LinkStats()
        self._latest: JointState | None = None
        self._opened = False
        self._connected = False
        self._session: int | None = None

    @classmethod
    @abstractmethod
    def from_url(cls, url: str, **kw: Any) -> Controller:
        """Build (not open) the controller a URL of this backend's scheme names; ValueError for a bad URL."""

    # ---- lifecycle ----
    @abstractmethod
    def open(self) -> Controller:
        """Open the connection; the controller stays disarmed."""

    @abstractmethod
    def close(self) -> None:
        """Idempotent; never raises for a vanished device."""

    def __enter__(self) -> Controller:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    @abstractmethod
    def url(self) -> str:
        """The URL that reaches this controller (schemes.open_link)."""

    @property
    def connected(self) -> bool:
        return self._connected

    # ---- session ----
    @abstractmethod
    def hello(self, timeout: float = 1.0) -> Capabilities:
        """Start a session and learn the controller's joints, limits and watchdog; stops an armed controller."""

    @property
    def session(self) -> int | None:
        return self._session

    @property
    @abstractmethod
    def needs_hello(self) -> bool:
        """True when arming needs a hello() first."""

    # ---- one control cycle ----
    @abstractmethod
    def poll(self, timeout: float = 0.0) -> list[Message]:
        """Read what arrived (updates `latest_state`, `faults`, answers); never raises for a lost device."""

    @property
    def latest_state(self) -> JointState | None:
        return self._latest

    def state_age(self, state: JointState | None = None, now: float | None = None) -> float:
        """Seconds since `state` (default: the latest) was sampled, on this host's clock; inf without one."""
        st = state if state is not None else self._latest
        if st is None:
            return math.inf
        return (time.monotonic() if now is None else now) - st.sample_time

    @abstractmethod
    def send_setpoints(self, positions: ArrayLike, velocities: ArrayLike | None = None,
                       efforts: ArrayLike | None = None, kp: ArrayLike | None = None,
                       kd: ArrayLike | None = None) -> Setpoint:
        """Write one setpoint (SI units); the controller clamps to its limits. Returns what was sent."""

    @abstractmethod
    def heartbeat(self) -> int:
        """Feed the controller's motion watchdog where it has one fed this way; returns a sequence number."""

    @abstractmethod
    def keepalive(self) -> int:
        """Prove the connection alive without feeding the motion watchdog; answered through ack_result()."""

    # ---- commands: non-blocking, answered by ack_result() ----
    @abstractmethod
    def send_arm(self) -> int: ...

    @abstractmethod
    def send_disarm(self) -> int: ...

    @abstractmethod
    def send_clear_faults(self) -> int: ...

    @abstractmethod
    def send_stop(self, category: int, reason: int = 0) -> int:
        """IEC 60204-1 stop category 0 (torque off now) or 1 (decelerate, then torque off)."""

    @abstractmethod
    def ack_result(self, seq: int) -> bool | NackError | None:
        """True (acknowledged), a NackError (refused, with its reason), or None (no answer yet)."""

    # ---- blocking forms, for bench tools (never from a control cycle) ----
    @abstractmethod
    def arm(self, timeout: float = 0.5) -> None: ...

    @abstractmethod
    def disarm(self, timeout: float = 0.2, retries: int = 3) -> None: ...

    @abstractmethod
    def clear_faults(self, timeout: float = 0.5) -> None: ...

    @abstractmethod
    def stop(self, category: int, reason: int = 0, timeout: float = 0.05, retries: int = 5) -> bool:
        """Stop and wait for the acknowledgement; False if it never came."""

    # ---- faults ----
    def faults_since(self, count: int) -> list[FaultReport]:
        """Fault reports number `count` onwards (count from an earlier `fault_count`) that are still kept."""
        kept = list(self.faults)
        first = self.fault_count - len(kept)
        return kept[max(0, count - first):]


__all__ = ["FAULT_LOG_SIZE", "IGNORED_FRAME_KINDS", "ArrayLike", "Controller", "JointState", "LinkStats"]
