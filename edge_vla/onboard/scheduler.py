"""Chunk scheduling: turn action chunks (10 Hz waypoints) into a setpoint at the control rate.

Every chunk becomes a `Trajectory`: its waypoints at t0 + (k+1) * period, starting from the state the
observation saw at t0, interpolated (linear, or C1 cubic Hermite so that velocity has no steps at the
waypoints) and held at the last action once it runs out ("exhausted": the watchdog's business).

Strategies (the control loop calls `push` when a chunk arrives and `sample` every cycle):
- `sync`: the robot waits for each chunk; its timeline starts on arrival, from the current setpoint;
  the worker infers again only after `execute` actions have played (see `consumed_seq`).
- `receding`: asynchronous; the timeline is anchored at the observation's timestamp, so actions whose
  time passed while inference ran are skipped (latency compensation).
- `ensemble`: ACT-style temporal ensembling: every chunk that covers `now` votes, weights exp(-m * i)
  with i = 0 the oldest.
`blend_s` > 0 adds a hand-over (a linear cross-fade from the old trajectory to the new one), so that
consecutive chunks do not jump; this is the host-side half of real-time chunking (the policy-side
half, inpainting the committed prefix, needs guidance inside the sampler).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edge_vla.errors import ConfigError

STRATEGIES = ("sync", "receding", "ensemble")
INTERPOLATIONS = ("linear", "cubic")


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
    """Waypoints p_0 (start) .. p_H (last action) at t0 + k * period, interpolated in time."""

    def __init__(self, t0: float, start: np.ndarray, actions: np.ndarray, period: float, interp: str) -> None:
        if period <= 0:
            raise ConfigError(f"chunk action period must be positive, got {period}")
        acts = np.asarray(actions, np.float64)
        self.t0 = float(t0)
        self.period = float(period)
        self.points = np.vstack([np.asarray(start, np.float64)[None, :], acts])
        self.n = len(acts)
        self.end = self.t0 + self.n * self.period
        self.cubic = interp == "cubic"
        if self.cubic:
            # Catmull-Rom tangents inside; zero at the end because the last action is then held.
            p = self.points
            m = np.zeros_like(p)
            if self.n >= 2:
                m[1:-1] = (p[2:] - p[:-2]) / (2 * self.period)
            m[0] = (p[1] - p[0]) / self.period
            self.tangents = m

    def __call__(self, t: float) -> np.ndarray:
        s = (t - self.t0) / self.period
        if s <= 0:
            return self.points[0].copy()
        if s >= self.n:
            return self.points[-1].copy()
        k = int(s)
        u = s - k
        p0, p1 = self.points[k], self.points[k + 1]
        if not self.cubic:
            return p0 + u * (p1 - p0)
        h = self.period
        m0, m1 = self.tangents[k] * h, self.tangents[k + 1] * h
        u2, u3 = u * u, u * u * u
        return (2 * u3 - 3 * u2 + 1) * p0 + (u3 - 2 * u2 + u) * m0 + (-2 * u3 + 3 * u2) * p1 + (u3 - u2) * m1

    def index(self, t: float) -> int:
        """The action the trajectory is heading to at t (n once exhausted)."""
        return min(self.n, max(0, math.floor((t - self.t0) / self.period)))


class Scheduler:
    """Base: holds the current trajectory and the hand-over blend."""

    name = "base"

    def __init__(self, interp: str = "cubic", blend_s: float = 0.0) -> None:
        if interp not in INTERPOLATIONS:
            raise ConfigError(f"unknown interpolation {interp!r}; choose one of {INTERPOLATIONS}")
        if blend_s < 0:
            raise ConfigError(f"blend_s must be >= 0, got {blend_s}")
        self.interp = interp
        self.blend_s = blend_s
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

    def push(self, chunk: Chunk, now: float) -> None:
        traj = self._trajectory(chunk, now)
        self._previous = self.current
        self._blend_from = now
        self.current = traj
        self.seq = chunk.seq
        self.chunks_received += 1

    def _trajectory(self, chunk: Chunk, now: float) -> Trajectory:
        return Trajectory(chunk.obs_timestamp, chunk.start_state, chunk.actions, chunk.period, self.interp)

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
        q = self._blend(traj(now), now)
        return Sample(q, exhausted=now >= traj.end, seq=self.seq, index=traj.index(now))


class SyncScheduler(Scheduler):
    """Wait for each chunk; play `execute` actions of it from the moment it arrives."""

    name = "sync"

    def __init__(self, execute: int | None = None, **kw) -> None:
        super().__init__(**kw)
        self.execute = execute

    def _trajectory(self, chunk: Chunk, now: float) -> Trajectory:
        n = len(chunk.actions) if self.execute is None else max(1, min(self.execute, len(chunk.actions)))
        # The robot held still while waiting: start from the setpoint in force now, not the observed state.
        start = self.sample(now).q if (self.current is not None or self._hold is not None) else chunk.start_state
        return Trajectory(now, start, chunk.actions[:n], chunk.period, self.interp)

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
        super().__init__(**kw)
        self.m = m
        self.max_chunks = max_chunks
        self.active: list[Trajectory] = []

    def push(self, chunk: Chunk, now: float) -> None:
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


def make_scheduler(
    name: str, interp: str = "cubic", blend_s: float = 0.0, execute: int | None = None, ensemble_m: float = 0.1
) -> Scheduler:
    if name == "sync":
        return SyncScheduler(execute=execute, interp=interp, blend_s=blend_s)
    if name == "receding":
        return RecedingScheduler(interp=interp, blend_s=blend_s)
    if name == "ensemble":
        return EnsembleScheduler(m=ensemble_m, interp=interp, blend_s=blend_s)
    raise ConfigError(f"unknown chunk strategy {name!r}; choose one of {STRATEGIES}")
