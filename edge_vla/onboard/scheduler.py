"""Chunk scheduling: turn action chunks (10 Hz waypoints) into a setpoint at the control rate.

Every chunk becomes a `Trajectory`: waypoints at knot times, interpolated (linear, or C1 cubic Hermite
so that velocity has no steps at the waypoints) and held at the last action once it runs out
("exhausted": the watchdog's business).

Strategies (the control loop calls `push` when a chunk arrives and `sample` every cycle):
- `sync`: the robot waits for each chunk; its timeline starts on arrival, from the current setpoint;
  the worker infers again only after `execute` actions have played (see `consumed_seq`).
- `receding`: asynchronous; the timeline is anchored at the observation's timestamp, so actions whose
  time passed while inference ran are skipped (latency compensation).
- `ensemble`: ACT-style temporal ensembling: every chunk that covers `now` votes, weights exp(-m * i)
  with i = 0 the oldest.
- `rtc`: real-time chunking (Black et al. 2025; action-prefix conditioning, arXiv 2512.05964) for bundles
  trained for it. The worker starts each inference with the prefix: the d actions of the plan that will
  execute before it returns (d from a p95 of recent latencies, `LatencyTracker`; `rtc_prefix`); the model
  returns a chunk whose first d actions are that prefix, and `RtcScheduler` hands over to it exactly at
  index d on the old plan's own timeline. A chunk later than that is adopted at the current index; one
  that arrives after the old chunk ran out (the loop held its last action) resumes after the hold.

Hand-over between chunks (`handover`, sync and receding):
- `continuous` (default): the new trajectory starts at the position and velocity commanded now (what
  the control loop passes to `push`) and joins the chunk's waypoints from the first one at least
  `HANDOVER_GAP` periods ahead. Position and velocity stay continuous across chunks, so a hand-over
  costs no acceleration beyond what the plans themselves ask for.
- `anchored`: the trajectory starts at the state the observation saw (sync: the setpoint in force),
  with the first segment's slope as its start velocity. Where the measured state lags the command (a
  PD drive tracking a ramp) every chunk starts behind the setpoint: a jump backwards that `blend_s`
  only turns into a velocity step (the cause of most acceleration clamps in issue 13's runs).
`blend_s` > 0 adds a linear cross-fade from the old trajectory to the new one for the anchored
hand-over and the ensemble (a continuous hand-over does not need one); this is the host-side half of
real-time chunking (the policy-side half, inpainting the committed prefix, needs guidance inside the
sampler).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from edge_vla.errors import ConfigError
from edge_vla.onboard.histogram import LogHistogram

# The strategies every bundle can run (the profile's verdicts cover each). `rtc` needs a bundle trained for it
# (its manifest's rtc block): `edge-vla run --strategy` offers RUN_STRATEGIES and refuses rtc for other bundles.
STRATEGIES = ("sync", "receding", "ensemble")
RTC = "rtc"
RUN_STRATEGIES = (*STRATEGIES, RTC)
INTERPOLATIONS = ("linear", "cubic")
HANDOVERS = ("continuous", "anchored")


@dataclass
class Chunk:
    """A chunk as the control loop sees it (what the inference worker published)."""

    actions: np.ndarray  # [H, D] joint targets
    period: float  # seconds between actions
    obs_timestamp: float  # monotonic time of the observation
    start_state: np.ndarray  # [D] the state the observation saw
    seq: int = 0
    # rtc: the first `prefix_len` actions are actions prefix_index.. of chunk `prefix_base` (0: no prefix)
    prefix_base: int = -1
    prefix_index: int = 0
    prefix_len: int = 0


@dataclass
class Sample:
    q: np.ndarray  # setpoint for this cycle
    exhausted: bool  # past the end of every chunk: holding the last action
    seq: int  # the newest chunk contributing
    index: int  # which action of that chunk we are heading to (H when exhausted)


class Trajectory:
    """Waypoints p_0 (start) .. p_H (last action) at t0 + k * period (or at the knot times `times`),
    interpolated in time, holding p_H after the end.

    `start_velocity` sets the tangent at p_0 (a continuous hand-over); otherwise it is the first
    segment's slope. Interior tangents are Catmull-Rom (finite differences over the neighbouring knots);
    the last is zero because the last action is then held. `first_action` is the index, within its
    chunk, of the action at knot 1 (actions skipped by a hand-over are not in the trajectory).
    """

    def __init__(self, t0: float, start: np.ndarray, actions: np.ndarray, period: float, interp: str,
                 start_velocity: np.ndarray | None = None, times: np.ndarray | None = None,
                 first_action: int = 0) -> None:
        if period <= 0:
            raise ConfigError(f"chunk action period must be positive, got {period}")
        acts = np.asarray(actions, np.float64)
        self.t0 = float(t0)
        self.period = float(period)
        self.points = np.vstack([np.asarray(start, np.float64)[None, :], acts])
        self.n = len(acts)
        self.first_action = first_action
        if times is None:
            self.knots = self.t0 + self.period * np.arange(self.n + 1)
        else:
            knots = np.concatenate([[self.t0], np.asarray(times, np.float64)])
            if len(knots) != self.n + 1 or np.any(np.diff(knots) <= 0):
                raise ConfigError("trajectory knot times must follow t0 and increase, one per action")
            self.knots = knots
        self.end = float(self.knots[-1])
        self.cubic = interp == "cubic"
        p, t = self.points, self.knots
        m = np.zeros_like(p)
        # A non-finite action gives non-finite tangents without a warning: the safety layer holds and
        # counts non-finite setpoints (and the watchdog trips on them), so here they only pass through.
        with np.errstate(invalid="ignore", over="ignore"):
            if self.n >= 2:
                m[1:-1] = (p[2:] - p[:-2]) / (t[2:] - t[:-2])[:, None]
            if self.n >= 1:
                m[0] = (p[1] - p[0]) / (t[1] - t[0])
        if start_velocity is not None:
            m[0] = np.asarray(start_velocity, np.float64)
        self.tangents = m

    def _segment(self, t: float) -> int:
        return int(np.searchsorted(self.knots, t, side="right")) - 1

    def __call__(self, t: float) -> np.ndarray:
        if t <= self.t0 or self.n == 0:
            return self.points[0 if t <= self.t0 else -1].copy()
        if t >= self.end:
            return self.points[-1].copy()
        k = self._segment(t)
        h = self.knots[k + 1] - self.knots[k]
        u = (t - self.knots[k]) / h
        p0, p1 = self.points[k], self.points[k + 1]
        if not self.cubic:  # C0 only: the velocity steps at every knot, a hand-over included
            return p0 + u * (p1 - p0)
        m0, m1 = self.tangents[k] * h, self.tangents[k + 1] * h
        u2, u3 = u * u, u * u * u
        return (2 * u3 - 3 * u2 + 1) * p0 + (u3 - 2 * u2 + u) * m0 + (-2 * u3 + 3 * u2) * p1 + (u3 - u2) * m1

    def index(self, t: float) -> int:
        """The action (index in its chunk) the trajectory is heading to at t (the chunk's length once exhausted)."""
        k = min(self.n, max(0, self._segment(t)))
        return self.first_action + k

    def velocity(self, t: float) -> np.ndarray:
        """d/dt of the trajectory at t (zero before t0 and once it holds its last action)."""
        if t < self.t0 or t >= self.end or self.n == 0:
            return np.zeros_like(self.points[0])
        k = self._segment(t)
        h = self.knots[k + 1] - self.knots[k]
        p0, p1 = self.points[k], self.points[k + 1]
        if not self.cubic:
            return (p1 - p0) / h
        u = (t - self.knots[k]) / h
        m0, m1 = self.tangents[k] * h, self.tangents[k + 1] * h
        u2 = u * u
        return ((6 * u2 - 6 * u) * p0 + (3 * u2 - 4 * u + 1) * m0 + (-6 * u2 + 6 * u) * p1 + (3 * u2 - 2 * u) * m1) / h

    def planned(self, t: float) -> np.ndarray:
        """The plan's own value at t: its actions (not the start point, not the hand-over's tangents) linearly
        interpolated between their due times and held past either end. Hand-overs are judged against this."""
        if self.n == 0:
            return self.points[0].copy()
        knots, acts = self.knots[1:], self.points[1:]
        return np.array([np.interp(t, knots, acts[:, j]) for j in range(acts.shape[1])])


class HandoverStats:
    """Plan disagreement at each hand-over: |the new chunk's first action it executes - what the old plan had for
    that moment| (L2 over the joints, the action space's units), before any smoothing. It is what the continuous
    hand-over has to hide; the evaluation's `hand-over disagreement` (docs/rtc.md) is the same measure on the
    sim's step grid. Fixed memory (a log histogram: the loop runs for days)."""

    def __init__(self) -> None:
        self.hist = LogHistogram(lowest=1e-6, highest=100.0)

    def record(self, old: Trajectory | None, new: Trajectory) -> float | None:
        if old is None or new.n == 0:
            return None
        gap = float(np.linalg.norm(new.points[1] - old.planned(float(new.knots[1]))))
        self.hist.record(gap)
        return gap

    def as_dict(self) -> dict[str, float | int]:
        h = self.hist
        return {"handovers": h.count, "handover_disagreement_mean": h.total / h.count if h.count else 0.0,
                "handover_disagreement_p95": h.percentile(95), "handover_disagreement_max": h.max}


# A continuous hand-over joins the new chunk at its first waypoint at least this many periods ahead:
# a shorter first segment turns a small disagreement between plan and command into a large
# acceleration (it grows with 1 / segment length squared).
HANDOVER_GAP = 1.0
# Below this speed (rad/s, every joint) the command counts as at rest when a chunk arrives: its plan
# is then played through a ramp of the plan clock (see PlanClock).
REST_SPEED = 0.05


def continuing(now: float, q: np.ndarray, v: np.ndarray | None, chunk: Chunk, t_first: float, interp: str,
               count: int | None = None) -> Trajectory:
    """The C1 hand-over: from (q, v) commanded at `now` into the chunk's actions, action k due at
    t_first + k * period; actions due before now + HANDOVER_GAP periods are skipped (the last is kept).
    `v` None: the first segment's slope (a start from rest played through a ramp of the plan clock)."""
    acts = np.asarray(chunk.actions, np.float64)
    if count is not None:
        acts = acts[:count]
    times = t_first + chunk.period * np.arange(len(acts))
    keep = int(np.searchsorted(times, now + HANDOVER_GAP * chunk.period, side="left"))
    if keep >= len(acts):  # the whole chunk is due: head for its last action, one period from now
        keep, times = len(acts) - 1, np.array([now + chunk.period])
        return Trajectory(now, q, acts[keep:], chunk.period, interp, start_velocity=v, times=times,
                          first_action=keep)
    return Trajectory(now, q, acts[keep:], chunk.period, interp, start_velocity=v, times=times[keep:],
                      first_action=keep)


class PlanClock:
    """Plan time for the continuous hand-over: real time, except after a start from rest.

    A plan made from a position only (a VLA's state has no velocity) asks for cruising speed from its
    first action, which from rest needs more than the acceleration limit (the sim expert: 2.25 rad/s
    within one 0.1 s action, 22.5 rad/s^2 against 20). So when a chunk arrives while the command is at
    rest, the plan clock restarts with its rate ramping linearly from 0 to 1 over `ramp_s`: the plan is
    followed exactly, only later (by ramp_s / 2), and the start needs at most plan speed / ramp_s of
    acceleration. Every chunk's timeline is in plan time, so latency compensation stays consistent:
    an observation made during the ramp is anchored at the plan time it was made at, and one made while
    still at rest, before the ramp, at the ramp's start (nothing of that plan is stale yet).
    """

    def __init__(self, ramp_s: float = 0.0) -> None:
        if ramp_s < 0:
            raise ConfigError(f"ramp_s must be >= 0, got {ramp_s}")
        self.ramp_s = ramp_s
        self.t_start: float | None = None  # real time of the latest start from rest
        self._tau_start = 0.0

    def reset(self) -> None:
        self.t_start = None

    def ramping(self, t: float) -> bool:
        return self.t_start is not None and t - self.t_start < self.ramp_s

    def start(self, t: float) -> None:
        self._tau_start = self(t)
        self.t_start = t

    def __call__(self, t: float) -> float:
        if self.t_start is None:
            return t
        x = t - self.t_start
        if x <= 0 or self.ramp_s <= 0:
            return self._tau_start + x
        if x < self.ramp_s:
            return self._tau_start + x * x / (2 * self.ramp_s)
        return self._tau_start + x - self.ramp_s / 2

    def rate(self, t: float) -> float:
        """d(plan time) / d(real time) at t."""
        if self.t_start is None or self.ramp_s <= 0:
            return 1.0
        x = t - self.t_start
        return 1.0 if x < 0 or x >= self.ramp_s else x / self.ramp_s


class Scheduler:
    """Base: holds the current trajectory, the plan clock and the hand-over blend."""

    name = "base"

    def __init__(self, interp: str = "cubic", blend_s: float = 0.0, handover: str = "continuous",
                 ramp_s: float = 0.0) -> None:
        if interp not in INTERPOLATIONS:
            raise ConfigError(f"unknown interpolation {interp!r}; choose one of {INTERPOLATIONS}")
        if handover not in HANDOVERS:
            raise ConfigError(f"unknown hand-over {handover!r}; choose one of {HANDOVERS}")
        if blend_s < 0:
            raise ConfigError(f"blend_s must be >= 0, got {blend_s}")
        self.interp = interp
        self.blend_s = blend_s
        self.handover = handover
        self.clock = PlanClock(ramp_s if handover == "continuous" else 0.0)
        self.current: Trajectory | None = None
        self.seq = -1
        self._previous: Trajectory | None = None
        self._blend_from = 0.0
        self._hold: np.ndarray | None = None  # before any chunk: hold here
        self.chunks_received = 0
        self.consumed_seq = -1
        self.handovers = HandoverStats()

    def reset(self, q: np.ndarray) -> None:
        self._hold = np.asarray(q, np.float64).copy()
        self.current = self._previous = None
        self.clock.reset()

    def _time(self, now: float) -> float:
        """The time trajectories are evaluated at: plan time for a continuous hand-over."""
        return self.clock(now) if self.handover == "continuous" else now

    def push(self, chunk: Chunk, now: float, commanded: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Adopt a chunk at `now`. `commanded`: the (position, velocity) the control loop commands this cycle,
        where a continuous hand-over starts (default: this scheduler's own output and its velocity)."""
        if self.handover == "continuous":
            q, v = self._handover_start(now, commanded)
            traj = self._continuing(chunk, now, q, v)
            self._previous = None  # continuous in position and velocity already: no cross-fade
        else:
            traj = self._trajectory(chunk, now)
            self._previous = self.current
        self._install(traj, chunk, now)

    def _handover_start(self, now: float, commanded: tuple[np.ndarray, np.ndarray] | None
                        ) -> tuple[np.ndarray, np.ndarray | None]:
        """Where a continuous hand-over starts: the commanded position, and its velocity in plan time (None: a
        start from rest played through a ramp of the plan clock, which restarts here if the command is at rest)."""
        q, v = commanded if commanded is not None else self._own_command(now)
        v = np.asarray(v, np.float64)
        if not self.clock.ramping(now) and float(np.max(np.abs(v), initial=0.0)) <= REST_SPEED:
            self.clock.start(now)
        rate = self.clock.rate(now)
        return np.asarray(q, np.float64), (v / rate if rate > 0.05 else None)

    def _install(self, traj: Trajectory, chunk: Chunk, now: float) -> None:
        self.handovers.record(self.current, traj)
        self._blend_from = now
        self.current = traj
        self.seq = chunk.seq
        self.chunks_received += 1

    def summary(self) -> dict[str, float | int]:
        """What the run's summary reports about this scheduler's hand-overs."""
        return self.handovers.as_dict()

    def _own_command(self, now: float, h: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
        q = self.sample(now).q
        if self.current is None:
            return q, np.zeros_like(q)
        return q, (q - self.sample(now - h).q) / h

    def _trajectory(self, chunk: Chunk, now: float) -> Trajectory:
        return Trajectory(chunk.obs_timestamp, chunk.start_state, chunk.actions, chunk.period, self.interp)

    def _continuing(self, chunk: Chunk, now: float, q: np.ndarray, v: np.ndarray | None) -> Trajectory:
        # Latency compensation: the timeline starts at the observation's plan time (the robot moved on while
        # the chunk was inferred), or at the start from rest if it was observed before that.
        start = self.clock.t_start if self.clock.t_start is not None else now
        anchor = self.clock(max(chunk.obs_timestamp, start))
        return continuing(self.clock(now), q, v, chunk, anchor + chunk.period, self.interp)

    def _blend(self, q: np.ndarray, now: float) -> np.ndarray:
        if self._previous is None or self.blend_s <= 0:
            return q
        w = (now - self._blend_from) / self.blend_s
        if w >= 1.0:
            self._previous = None
            return q
        return (1.0 - w) * self._previous(now) + w * q

    def sample(self, now: float) -> Sample:
        if self.current is None:
            if self._hold is None:
                raise ConfigError("scheduler.reset(q) must be called before sampling without a chunk")
            return Sample(self._hold.copy(), exhausted=True, seq=-1, index=0)
        traj = self.current
        t = self._time(now)
        q = self._blend(traj(t), now)
        return Sample(q, exhausted=t >= traj.end, seq=self.seq, index=traj.index(t))


class SyncScheduler(Scheduler):
    """Wait for each chunk; play `execute` actions of it from the moment it arrives."""

    name = "sync"

    def __init__(self, execute: int | None = None, **kw) -> None:
        super().__init__(**kw)
        self.execute = execute

    def _trajectory(self, chunk: Chunk, now: float) -> Trajectory:
        n = self._count(chunk)
        # The robot held still while waiting: start from the setpoint in force now, not the observed state.
        start = self.sample(now).q if (self.current is not None or self._hold is not None) else chunk.start_state
        return Trajectory(now, start, chunk.actions[:n], chunk.period, self.interp)

    def _continuing(self, chunk: Chunk, now: float, q: np.ndarray, v: np.ndarray | None) -> Trajectory:
        tau = self.clock(now)
        return continuing(tau, q, v, chunk, tau + chunk.period, self.interp, count=self._count(chunk))

    def _count(self, chunk: Chunk) -> int:
        return len(chunk.actions) if self.execute is None else max(1, min(self.execute, len(chunk.actions)))

    def sample(self, now: float) -> Sample:
        s = super().sample(now)
        if s.exhausted and s.seq >= 0:
            self.consumed_seq = s.seq
        return s


class RecedingScheduler(Scheduler):
    """Newest chunk wins, anchored at its observation time: stale actions are skipped."""

    name = "receding"


class EnsembleScheduler(Scheduler):
    """Temporal ensembling over every chunk that still covers `now` (ACT, weights exp(-m * i))."""

    name = "ensemble"

    def __init__(self, m: float = 0.1, max_chunks: int = 8, **kw) -> None:
        kw.setdefault("handover", "anchored")  # every chunk votes on its own anchored timeline
        super().__init__(**kw)
        self.m = m
        self.max_chunks = max_chunks
        self.active: list[Trajectory] = []

    def push(self, chunk: Chunk, now: float, commanded: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        super().push(chunk, now)
        assert self.current is not None
        keep = [t for t in self.active if t.end > now][-(self.max_chunks - 1):]
        self.active = [*keep, self.current]

    def sample(self, now: float) -> Sample:
        if self.current is None:
            return super().sample(now)
        live = [t for t in self.active if t.t0 <= now < t.end]
        if not live:
            return super().sample(now)
        weights = np.exp(-self.m * np.arange(len(live)))
        q = sum(w * t(now) for w, t in zip(weights, live)) / weights.sum()
        q = self._blend(np.asarray(q), now)
        return Sample(q, exhausted=False, seq=self.seq, index=self.current.index(now))


# --- real-time chunking ----------------------------------------------------------------------------------------
class LatencyTracker:
    """How long the next inference will take, for rtc's delay d: a high percentile of the last `window` measured
    latencies plus `headroom_s`. The percentile, not the mean: a prefix that is too short makes the chunk late
    (adopted past index d, against actions already played), one that is too long only ages the plan a little.
    A sliding window, so it follows a slowdown (thermal throttling, a busy core) within a few inferences; at p95
    of 20, one outlier barely moves it and two do. Before any measurement it knows nothing (None): the first
    inference goes without a prefix, and from then on the estimate starts from the first measured latency."""

    def __init__(self, window: int = 20, percentile: float = 95.0, headroom_s: float = 0.0) -> None:
        if window < 1:
            raise ConfigError(f"latency window must be >= 1 inference, got {window}")
        if not 0.0 <= percentile <= 100.0:
            raise ConfigError(f"latency percentile must be in 0..100, got {percentile}")
        if not headroom_s >= 0.0:
            raise ConfigError(f"latency headroom must be >= 0 s, got {headroom_s}")
        self.percentile, self.headroom_s = percentile, headroom_s
        self._recent: deque[float] = deque(maxlen=window)

    def record(self, seconds: float) -> None:
        if math.isfinite(seconds) and seconds >= 0.0:
            self._recent.append(float(seconds))

    def estimate(self) -> float | None:
        """Seconds: the percentile over the window plus the headroom; None before the first measurement."""
        if not self._recent:
            return None
        return float(np.percentile(np.fromiter(self._recent, np.float64), self.percentile)) + self.headroom_s

    def delay(self, period_s: float, max_delay: int, phase: float = 0.0) -> int | None:
        """d = ceil(phase + estimate / period) actions, in 1..max_delay: the actions that execute before the
        next chunk can take over. `phase` (0..1) is how much of the action under way has already played: the
        prefix starts with that action, so its elapsed part does not count towards the delay."""
        est = self.estimate()
        if est is None:
            return None
        d = math.ceil(phase + est / period_s - 1e-9)  # the tolerance keeps an exact 0.2 s / 0.1 s at 2
        return int(min(max(d, 1), max_delay))


@dataclass(frozen=True)
class PrefixPlan:
    """An rtc prefix: actions `index`.. of chunk `base_seq`, the ones that execute while the next chunk is inferred."""

    base_seq: int
    index: int
    actions: np.ndarray  # [d, D]


def rtc_prefix(actions: np.ndarray, seq: int, position: float, tracker: LatencyTracker, period_s: float,
               max_delay: int) -> PrefixPlan | None:
    """The prefix for an inference starting now, on the plan the loop follows: chunk `seq` (its `actions`), at
    `position` (k.x: heading to action k, x of its period played; RtcScheduler.plan_position). It starts with the
    action under way and is d actions long (the tracker's delay, at most max_delay and what the chunk has left).
    None when there is nothing to continue (no latency measured yet, or the chunk already ran out)."""
    pos = max(0.0, float(position)) if math.isfinite(position) else 0.0
    index = math.floor(pos)
    if index >= len(actions):
        return None
    d = tracker.delay(period_s, max_delay, phase=pos - index)
    if d is None:
        return None
    d = min(d, len(actions) - index)
    return PrefixPlan(seq, index, np.array(actions[index : index + d], copy=True))


@dataclass(frozen=True)
class RtcEvent:
    """What became of an rtc chunk that did not take over on time (and of one without a prefix)."""

    kind: str  # "late" | "held" | "no_prefix"
    seq: int
    delay: int  # d: the prefix's length (0: none)
    index: int  # the action of the new chunk it was adopted at
    late_s: float = 0.0  # late: plan time past its takeover
    held_s: float = 0.0  # held: how long the loop held the old chunk's last action


@dataclass
class _Timeline:
    """A chunk's place in plan time: action k is due at base + (k + 1) * period."""

    base: float
    period: float
    length: int


@dataclass
class _Pending:
    chunk: Chunk
    timeline: _Timeline
    takeover: float  # plan time at which the loop starts heading to the chunk's action d


class RtcScheduler(Scheduler):
    """Real-time chunking: every chunk after the first continues the plan, on its timeline.

    A chunk with a prefix (actions i0..i0+d-1 of chunk X) is placed on X's timeline shifted by i0 actions, so its
    first d actions fall exactly where X's did. Then:
    - on time (it arrives before its action d-1 is reached): pending; at that knot the trajectory continues into
      its actions d.. from the old trajectory's own position and velocity there (the position is X's action
      i0+d-1, which is the prefix's last: nothing jumps);
    - late (past that knot, X still running): adopted now with the continuous hand-over, at the current index;
    - held (X ran out first; the loop held its last action, the watchdog's chunk-exhausted clock running):
      it resumes from the action after X's last, one period from now, from rest.
    A chunk without a prefix (or whose prefix came from a chunk this scheduler no longer follows, e.g. from
    before a re-arm) is adopted as receding adopts it when there is no plan to continue: the first after an arm
    or homing, or after the plan ran out. While a plan executes such a chunk is dropped (it was inferred before
    the worker saw that plan: the one in flight when the first chunk was adopted); the next chunk continues the
    plan. The worker reads `plan_position` (via the shared bus) to take the next prefix; `rtc_counts` and
    `events` say what happened, for the run's summary and log.
    """

    name = RTC
    KEEP = 16  # timelines remembered: a prefix refers to the newest chunk the worker saw, one or two back

    def __init__(self, **kw) -> None:
        if kw.get("handover", "continuous") != "continuous":
            raise ConfigError("the rtc strategy hands over on the chunks' own timeline from the commanded state: it "
                              "needs the continuous hand-over")
        super().__init__(**kw)
        self._timelines: dict[int, _Timeline] = {}
        self._pending: list[_Pending] = []
        self._anchor = 0.0
        self.plan_seq = -1
        self.rtc_counts = {"on_time": 0, "late": 0, "held": 0, "no_prefix": 0, "dropped": 0}
        self.events: list[RtcEvent] = []  # the control loop takes them (logs) after its cycle's setpoint

    def reset(self, q: np.ndarray) -> None:
        super().reset(q)
        self._timelines.clear()
        self._pending.clear()
        self.plan_seq = -1

    def plan_position(self, now: float) -> tuple[int, float]:
        """(seq, position) of the newest chunk the loop will follow: position k.x means heading to its action k,
        x of that action's period played. (-1, 0.0) when there is none."""
        tl = self._timelines.get(self.plan_seq)
        if tl is None:
            return -1, 0.0
        return self.plan_seq, (self.clock(now) - tl.base) / tl.period

    def summary(self) -> dict[str, float | int]:
        return {**super().summary(), **{f"rtc_{k}": v for k, v in self.rtc_counts.items()}}

    # -- adoption ----------------------------------------------------------------------------------------------
    def push(self, chunk: Chunk, now: float, commanded: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        tau = self.clock(now)
        self._take_over_due(tau)
        base = self._timelines.get(chunk.prefix_base) if chunk.prefix_len > 0 else None
        d = chunk.prefix_len
        if base is None or d >= len(chunk.actions):
            if self.current is not None and (tau < self.current.end or self._pending):
                # Inferred before the worker saw the plan that executes now (the one in flight when the first
                # chunk was adopted): adopting it would switch plans mid-motion; the next chunk continues this one.
                self.rtc_counts["dropped"] += 1
                return
            self._adopt_fresh(chunk, now, commanded)
            return
        tl = _Timeline(base.base + chunk.prefix_index * base.period, chunk.period, len(chunk.actions))
        takeover = tl.base + d * chunk.period
        if tau <= takeover:
            # Later pending chunks are superseded: this newer one takes over first, continuing what plays until then.
            self._pending = [p for p in self._pending if p.takeover < takeover]
            self._pending.append(_Pending(chunk, tl, takeover))
            self._remember(chunk.seq, tl)
            return
        self._pending.clear()  # older chunks; this one continues the plan from now on
        if tau >= self.current.end:
            self._resume_after_hold(chunk, now, commanded, tl)
            return
        q, v = self._handover_start(now, commanded)
        traj = continuing(self.clock(now), q, v, chunk, tl.base + chunk.period, self.interp)
        self._install(traj, chunk, now)
        self._remember(chunk.seq, tl)
        self.rtc_counts["late"] += 1
        self.events.append(RtcEvent("late", chunk.seq, d, traj.first_action, late_s=tau - takeover))

    def _adopt_fresh(self, chunk: Chunk, now: float, commanded: tuple[np.ndarray, np.ndarray] | None) -> None:
        self._pending.clear()
        super().push(chunk, now, commanded)  # the receding adoption; _continuing records its anchor
        self._remember(chunk.seq, _Timeline(self._anchor, chunk.period, len(chunk.actions)))
        self.rtc_counts["no_prefix"] += 1
        self.events.append(RtcEvent("no_prefix", chunk.seq, 0, self.current.first_action if self.current else 0))

    def _resume_after_hold(self, chunk: Chunk, now: float, commanded: tuple[np.ndarray, np.ndarray] | None,
                           tl: _Timeline) -> None:
        """The old chunk ran out before this one arrived. The arm holds the old chunk's last action; in this
        chunk's terms that is action `last`, so it goes on with action last + 1, one period from now."""
        assert self.current is not None
        held_s = self.clock(now) - self.current.end
        last = round((self.current.end - tl.base) / tl.period) - 1
        resume = min(max(last + 1, 0), len(chunk.actions) - 1)
        q, v = self._handover_start(now, commanded)  # at rest: the plan clock ramps from here
        tau = self.clock(now)
        shifted = _Timeline(tau - resume * chunk.period, chunk.period, len(chunk.actions))
        acts = np.asarray(chunk.actions, np.float64)[resume:]
        traj = Trajectory(tau, q, acts, chunk.period, self.interp, start_velocity=v,
                          times=tau + chunk.period * np.arange(1, len(acts) + 1), first_action=resume)
        self._install(traj, chunk, now)
        self._remember(chunk.seq, shifted)
        self.rtc_counts["held"] += 1
        self.events.append(RtcEvent("held", chunk.seq, chunk.prefix_len, traj.first_action, held_s=held_s))

    def _continuing(self, chunk: Chunk, now: float, q: np.ndarray, v: np.ndarray | None) -> Trajectory:
        start = self.clock.t_start if self.clock.t_start is not None else now
        self._anchor = self.clock(max(chunk.obs_timestamp, start))
        return continuing(self.clock(now), q, v, chunk, self._anchor + chunk.period, self.interp)

    def _remember(self, seq: int, tl: _Timeline) -> None:
        self._timelines[seq] = tl
        self.plan_seq = seq
        while len(self._timelines) > self.KEEP:
            del self._timelines[min(self._timelines)]

    # -- the takeover at index d -------------------------------------------------------------------------------
    def _take_over_due(self, tau: float) -> None:
        while self._pending and self._pending[0].takeover <= tau:
            self._take_over(self._pending.pop(0))

    def _take_over(self, p: _Pending) -> None:
        """At the knot of the prefix's last action (plan time p.takeover): on into actions d.., from the old
        trajectory's own position and velocity there, each action at its time on the chunk's timeline."""
        old = self.current
        assert old is not None
        d, acts = p.chunk.prefix_len, np.asarray(p.chunk.actions, np.float64)
        times = p.timeline.base + p.timeline.period * (np.arange(d, len(acts)) + 1)
        traj = Trajectory(p.takeover, old(p.takeover), acts[d:], p.timeline.period, self.interp,
                          start_velocity=old.velocity(p.takeover), times=times, first_action=d)
        self._install(traj, p.chunk, p.takeover)
        self.rtc_counts["on_time"] += 1

    def sample(self, now: float) -> Sample:
        self._take_over_due(self.clock(now))
        return super().sample(now)


def start_ramp_s(max_velocity: np.ndarray, max_acceleration: np.ndarray, fraction: float = 0.5) -> float:
    """The plan clock's ramp for an action space: a plan at up to the velocity limit starts from rest
    within `fraction` of the acceleration limit (the rest is left for the interpolation's own curvature)."""
    return float(np.max(np.asarray(max_velocity, np.float64) / (fraction * np.asarray(max_acceleration, np.float64))))


def make_scheduler(
    name: str, interp: str = "cubic", blend_s: float = 0.0, execute: int | None = None, ensemble_m: float = 0.1,
    handover: str = "continuous", ramp_s: float = 0.0,
) -> Scheduler:
    if name == "sync":
        return SyncScheduler(execute=execute, interp=interp, blend_s=blend_s, handover=handover, ramp_s=ramp_s)
    if name == "receding":
        return RecedingScheduler(interp=interp, blend_s=blend_s, handover=handover, ramp_s=ramp_s)
    if name == "ensemble":
        return EnsembleScheduler(m=ensemble_m, interp=interp, blend_s=blend_s)
    if name == RTC:
        return RtcScheduler(interp=interp, blend_s=blend_s, handover=handover, ramp_s=ramp_s)
    raise ConfigError(f"unknown chunk strategy {name!r}; choose one of {RUN_STRATEGIES}")
