"""The host-side watchdog: a latched state machine over the signals the control loop gathers each cycle.

    DISARMED --arm()--> RUNNING --trip(kind)--> STOPPING --stop_complete()--> STOPPED
                           ^                       |(cat 0 goes straight to STOPPED)   |
                           +-------- arm() <-- rearm() (explicit, never automatic) <---+

The stop category follows the fault kind (IEC 60204-1): category 0 (torque off now) when the link or
the firmware can no longer be trusted to carry out a controlled stop; category 1 (decelerate to hold,
then torque off) for everything the motor controller can still execute: stale camera or chunk,
overruns, a dead inference worker, non-finite actions, an operator stop, the planned end of a run.
Only the first trip is acted on; later ones while stopping are recorded but do not change the stop.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from enum import Enum

from edge_vla.errors import ConfigError

log = logging.getLogger(__name__)


class State(Enum):
    DISARMED = "disarmed"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class FaultKind(Enum):
    CAMERA_STALE = "camera_stale"
    CHUNK_STALE = "chunk_stale"
    CHUNK_EXHAUSTED = "chunk_exhausted"
    OVERRUN = "overrun"
    LINK_STALE = "link_stale"
    LINK_ERRORS = "link_errors"
    FIRMWARE_FAULT = "firmware_fault"
    WORKER_DEAD = "worker_dead"
    NONFINITE_ACTION = "nonfinite_action"
    OPERATOR_STOP = "operator_stop"  # an operator's stop, SIGINT / SIGTERM, the parent's stop request
    LOOP_ERROR = "loop_error"  # an exception inside the control loop itself
    FOLLOWING_ERROR = "following_error"  # |commanded - measured| over the joint's limit (a collision, a block)
    EFFORT_LIMIT = "effort_limit"  # a gripper-role joint over its effort limit
    STOP_ESCALATED = "stop_escalated"  # a category-1 ramp did not end within its bound: torque off now
    # Last, so the shared bus's trip_kind numbers (1 + index) of the kinds above stay what they were.
    DURATION = "duration"  # the run's planned --duration ended: not a fault, and no operator's act either


# Stops that end a run as planned or asked: logged at INFO, not a fault (exit status 0).
PLANNED_STOPS = frozenset({FaultKind.OPERATOR_STOP, FaultKind.DURATION})


STOP_CATEGORY: dict[FaultKind, int] = {
    FaultKind.CAMERA_STALE: 1,
    FaultKind.CHUNK_STALE: 1,
    FaultKind.CHUNK_EXHAUSTED: 1,
    FaultKind.OVERRUN: 1,
    FaultKind.WORKER_DEAD: 1,
    FaultKind.NONFINITE_ACTION: 1,
    FaultKind.OPERATOR_STOP: 1,
    FaultKind.LINK_STALE: 0,
    FaultKind.LINK_ERRORS: 0,
    FaultKind.FIRMWARE_FAULT: 0,
    FaultKind.LOOP_ERROR: 0,
    FaultKind.FOLLOWING_ERROR: 1,
    FaultKind.EFFORT_LIMIT: 1,
    FaultKind.STOP_ESCALATED: 0,
    FaultKind.DURATION: 1,
}
# Losing the link is category 0 by default: a controller we cannot reach cannot be commanded through a
# ramp, and its own heartbeat watchdog then runs its configured stop anyway. Robots that fall without
# torque and have no brakes configure 1 (WatchdogConfig.link_loss_category, from the robot config).
DEFAULT_LINK_LOSS_CATEGORY = 0


@dataclass(frozen=True)
class WatchdogConfig:
    """Thresholds; a threshold of math.inf disables that check."""

    camera_max_age_s: float = 0.5  # newest camera frame older than this
    chunk_max_age_s: float = 1.5  # newest chunk's observation older than this
    chunk_exhausted_max_s: float = 0.3  # holding past the end of every chunk for longer than this
    max_consecutive_overruns: int = 5  # deadlines missed in a row
    link_max_age_s: float = 0.1  # newest motor-controller state older than this
    max_link_errors: int = 3  # new link errors (CRC, framing, NACK) within link_error_window_s
    link_error_window_s: float = 1.0
    worker_max_age_s: float = 1.0  # inference worker heartbeat older than this
    max_consecutive_nonfinite: int = 3  # NaN/Inf chunks in a row (each is already held by safety)
    link_loss_category: int = DEFAULT_LINK_LOSS_CATEGORY  # stop category for LINK_STALE (robot config)

    def validate(self) -> WatchdogConfig:
        if self.link_loss_category not in (0, 1):
            raise ConfigError(f"link_loss_category must be 0 or 1, got {self.link_loss_category}")
        for name, value in vars(self).items():
            if name != "link_loss_category" and not value > 0:
                raise ConfigError(f"watchdog threshold {name} must be > 0 (math.inf disables it), got {value}")
        return self


@dataclass
class Signals:
    """What the control loop measured this cycle. None means 'not available yet' (not checked)."""

    now: float
    camera_age_s: float | None = None
    chunk_age_s: float | None = None
    exhausted_for_s: float = 0.0
    consecutive_overruns: int = 0
    link_age_s: float | None = None
    link_errors_total: int = 0
    firmware_faults: int = 0  # fault bits reported by the firmware (trip bits only)
    worker_age_s: float | None = None
    consecutive_nonfinite: int = 0
    following_error: str | None = None  # why the tracking check failed this cycle (edge_vla.onboard.following)
    effort_limit: str | None = None


@dataclass(frozen=True)
class Trip:
    kind: FaultKind
    category: int
    reason: str
    t: float  # time.monotonic() of the trip

    def as_dict(self) -> dict:
        return {"kind": self.kind.value, "category": self.category, "reason": self.reason, "t": self.t}


@dataclass
class Watchdog:
    config: WatchdogConfig = field(default_factory=WatchdogConfig)
    state: State = State.DISARMED
    trips: list[Trip] = field(default_factory=list)
    active: Trip | None = None  # the trip that caused the current stop
    _error_times: list[tuple[float, int]] = field(default_factory=list)
    defer_logs: bool = False  # the control loop sends the STOP frame first and logs afterwards (flush_logs)
    _pending_logs: list[tuple[int, str, tuple]] = field(default_factory=list)
    MAX_TRIPS = 64

    def __post_init__(self) -> None:
        self.config.validate()

    def _log(self, level: int, msg: str, *args: object) -> None:
        if self.defer_logs:
            self._pending_logs.append((level, msg, args))
        else:
            log.log(level, msg, *args)

    def flush_logs(self) -> None:
        """Write deferred log lines (a log write must not delay the STOP frame)."""
        while self._pending_logs:
            level, msg, args = self._pending_logs.pop(0)
            log.log(level, msg, *args)

    # -- transitions ---------------------------------------------------------------------------
    def arm(self, now: float, link_errors_total: int = 0) -> None:
        if self.state is not State.DISARMED:
            raise ConfigError(f"cannot arm from {self.state.value}; a stopped watchdog needs rearm() first")
        self._error_times = [(now, link_errors_total)]
        self.state = State.RUNNING
        log.info("watchdog armed")

    def trip(self, kind: FaultKind, reason: str, now: float) -> Trip | None:
        """Record a trip; returns it if it starts a stop (the first while running), else None."""
        category = self.config.link_loss_category if kind is FaultKind.LINK_STALE else STOP_CATEGORY[kind]
        trip = Trip(kind, category, reason, now)
        self.trips.append(trip)
        if len(self.trips) > self.MAX_TRIPS:  # bounded: the first trips and the latest are what matter
            del self.trips[self.MAX_TRIPS // 2]
        if kind is FaultKind.STOP_ESCALATED and self.state is State.STOPPING:
            self.active = trip
            self.state = State.STOPPED
            self._log(logging.ERROR, "SAFETY STOP escalated to category 0 at t=%.6f: %s", now, reason)
            return trip
        if self.state is not State.RUNNING:
            self._log(logging.INFO, "watchdog: %s while %s (%s)", kind.value, self.state.value, reason)
            return None
        self.active = trip
        self.state = State.STOPPED if trip.category == 0 else State.STOPPING
        if kind in PLANNED_STOPS:  # a planned end or an operator's stop, not a fault
            self._log(logging.INFO, "stopped (%s): category-%d stop at t=%.6f", reason, trip.category, now)
        else:
            self._log(logging.ERROR, "SAFETY STOP category %d at t=%.6f: %s: %s", trip.category, now, kind.value,
                      reason)
        return trip

    def stop_complete(self) -> None:
        if self.state is State.STOPPING:
            self.state = State.STOPPED
            log.info("category-1 stop complete: torque off")

    def rearm(self) -> None:
        """The explicit operator action that clears a latched stop (the next arm() starts again)."""
        if self.state not in (State.STOPPED, State.DISARMED):
            raise ConfigError(f"cannot re-arm while {self.state.value}; wait for the stop to complete")
        self.state = State.DISARMED
        self.active = None
        log.info("watchdog reset by an explicit operator request")

    # -- checks ---------------------------------------------------------------------------------
    def check(self, s: Signals) -> Trip | None:
        """Evaluate every signal; trips on the first failing one (category 0 checks first)."""
        if self.state is not State.RUNNING:
            return None
        found = self._first_fault(s)
        return None if found is None else self.trip(found[0], found[1], s.now)

    def _first_fault(self, s: Signals) -> tuple[FaultKind, str] | None:
        c = self.config
        if s.firmware_faults:
            return FaultKind.FIRMWARE_FAULT, f"firmware reported fault bits 0x{s.firmware_faults:04x}"
        if s.link_age_s is not None and s.link_age_s > c.link_max_age_s:
            return FaultKind.LINK_STALE, f"no motor state for {s.link_age_s * 1e3:.0f} ms (limit {c.link_max_age_s * 1e3:.0f})"
        recent = self._recent_link_errors(s.now, s.link_errors_total)
        if recent >= c.max_link_errors:
            return FaultKind.LINK_ERRORS, f"{recent} link errors within {c.link_error_window_s:g} s (limit {c.max_link_errors})"
        if s.following_error is not None:
            return FaultKind.FOLLOWING_ERROR, s.following_error
        if s.effort_limit is not None:
            return FaultKind.EFFORT_LIMIT, s.effort_limit
        if s.worker_age_s is not None and s.worker_age_s > c.worker_max_age_s:
            return FaultKind.WORKER_DEAD, f"inference worker silent for {s.worker_age_s:.2f} s (limit {c.worker_max_age_s:g})"
        if s.camera_age_s is not None and s.camera_age_s > c.camera_max_age_s:
            return FaultKind.CAMERA_STALE, f"camera frame {s.camera_age_s * 1e3:.0f} ms old (limit {c.camera_max_age_s * 1e3:.0f})"
        if s.chunk_age_s is not None and s.chunk_age_s > c.chunk_max_age_s:
            return FaultKind.CHUNK_STALE, f"newest chunk is {s.chunk_age_s:.2f} s old (limit {c.chunk_max_age_s:g})"
        if s.exhausted_for_s > c.chunk_exhausted_max_s:
            return FaultKind.CHUNK_EXHAUSTED, f"chunk exhausted for {s.exhausted_for_s:.2f} s (limit {c.chunk_exhausted_max_s:g})"
        if s.consecutive_overruns >= c.max_consecutive_overruns:
            return FaultKind.OVERRUN, f"{s.consecutive_overruns} control deadlines missed in a row"
        if s.consecutive_nonfinite >= c.max_consecutive_nonfinite:
            return FaultKind.NONFINITE_ACTION, f"{s.consecutive_nonfinite} non-finite commands in a row"
        return None

    def _recent_link_errors(self, now: float, total: int) -> int:
        # (time, cumulative count) samples; the count at the window's start is the baseline.
        if not self._error_times or total != self._error_times[-1][1]:
            self._error_times.append((now, total))
        horizon = now - self.config.link_error_window_s
        while len(self._error_times) > 1 and self._error_times[1][0] <= horizon:
            self._error_times.pop(0)
        base = self._error_times[0][1]
        if math.isinf(self.config.max_link_errors):
            return 0
        return total - base
