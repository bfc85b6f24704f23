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

from dataclasses import dataclass

import numpy as np

from edge_vla.errors import ConfigError

STRATEGIES = ("sync", "receding", "ensemble")
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
            q, v = commanded if commanded is not None else self._own_command(now)
            v = np.asarray(v, np.float64)
            if not self.clock.ramping(now) and float(np.max(np.abs(v), initial=0.0)) <= REST_SPEED:
                self.clock.start(now)
            rate = self.clock.rate(now)
            traj = self._continuing(chunk, now, np.asarray(q, np.float64), v / rate if rate > 0.05 else None)
            self._previous = None  # continuous in position and velocity already: no cross-fade
        else:
            traj = self._trajectory(chunk, now)
            self._previous = self.current
        self._blend_from = now
        self.current = traj
        self.seq = chunk.seq
        self.chunks_received += 1

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
    raise ConfigError(f"unknown chunk strategy {name!r}; choose one of {STRATEGIES}")
