"""The safety layer: every command passes through here, and what it returns is what goes on the wire.

Limits are enforced together, with hard priorities: position > velocity (and max change per cycle) >
acceleration. Velocity toward a position limit is also capped by the braking distance under the
acceleration limit, so that the three never conflict: from any state this layer produced, a command
exists that satisfies all of them (see `_braking_speed`). Non-finite requests (NaN/Inf) are rejected
as a whole vector and replaced by "hold the last safe command", which the same limits then turn into
a smooth deceleration rather than a step to zero velocity.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edge_vla.action_space import ActionSpace
from edge_vla.errors import ConfigError

CLAMP_KINDS = ("nonfinite", "position", "velocity", "step", "braking", "acceleration")


@dataclass(frozen=True)
class SafetyLimits:
    """Per-joint limits in physical units; `dt` is the nominal control period the command is sent at."""

    lower: np.ndarray
    upper: np.ndarray
    max_velocity: np.ndarray
    max_acceleration: np.ndarray
    dt: float
    max_step: np.ndarray | None = None  # max change per cycle (rad); defaults to max_velocity * dt

    @classmethod
    def from_action_space(
        cls, space: ActionSpace, rate_hz: float, max_step: float | np.ndarray | None = None
    ) -> SafetyLimits:
        if rate_hz <= 0:
            raise ConfigError(f"control rate must be positive, got {rate_hz} Hz")
        step = None if max_step is None else np.broadcast_to(np.asarray(max_step, np.float64), (space.dim,))
        return cls(
            lower=np.asarray(space.lower, np.float64),
            upper=np.asarray(space.upper, np.float64),
            max_velocity=np.asarray(space.max_velocity, np.float64),
            max_acceleration=np.asarray(space.max_acceleration, np.float64),
            dt=1.0 / rate_hz,
            max_step=step,
        )

    @property
    def dim(self) -> int:
        return len(self.lower)

    def step_limit(self) -> np.ndarray:
        vstep = self.max_velocity * self.dt
        return vstep if self.max_step is None else np.minimum(vstep, self.max_step)


@dataclass
class SafetyResult:
    """What was asked, what was sent, and which clamps fired this cycle."""

    requested: np.ndarray
    sent: np.ndarray
    clamped: tuple[str, ...]
    rejected: bool  # the request was non-finite and was replaced by a hold


@dataclass
class SafetyLayer:
    """Stateful: remembers the last command sent and its velocity (finite differences at `dt`)."""

    limits: SafetyLimits
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CLAMP_KINDS, 0))
    consecutive_rejects: int = 0
    _q: np.ndarray | None = None
    _v: np.ndarray | None = None

    def reset(self, position: np.ndarray) -> None:
        """Start from the measured position at rest. Out-of-range positions are brought in gradually."""
        q = np.asarray(position, np.float64).reshape(self.limits.dim)
        if not np.all(np.isfinite(q)):
            raise ConfigError(f"cannot start the safety layer from a non-finite position {q.tolist()}")
        self._q = q.copy()
        self._v = np.zeros_like(q)
        self.consecutive_rejects = 0

    @property
    def last_sent(self) -> np.ndarray:
        if self._q is None:
            raise ConfigError("SafetyLayer.reset(position) must be called before the first command")
        return self._q.copy()

    @property
    def velocity(self) -> np.ndarray:
        return np.zeros(self.limits.dim) if self._v is None else self._v.copy()

    def hold(self) -> SafetyResult:
        """Decelerate toward the last safe command (what a category-1 stop and a rejected request do)."""
        return self._apply(self.last_sent, requested=self.last_sent, rejected=False)

    def command(self, requested: np.ndarray) -> SafetyResult:
        if self._q is None:
            raise ConfigError("SafetyLayer.reset(position) must be called before the first command")
        req = np.asarray(requested, np.float64).reshape(-1)
        if req.shape != (self.limits.dim,) or not np.all(np.isfinite(req)):
            self.counts["nonfinite"] += 1
            self.consecutive_rejects += 1
            result = self._apply(self._q, requested=req, rejected=True)
            result.clamped = ("nonfinite", *result.clamped)
            return result
        self.consecutive_rejects = 0
        return self._apply(req, requested=req, rejected=False)

    def _apply(self, target: np.ndarray, requested: np.ndarray, rejected: bool) -> SafetyResult:
        assert self._q is not None and self._v is not None
        lim = self.limits
        dt = lim.dt
        q, v = self._q, self._v
        fired: list[str] = []

        goal = np.clip(target, lim.lower, lim.upper)
        if np.any(goal != target):
            fired.append("position")
        delta = goal - q

        # Velocity and max change per cycle: a symmetric bound on the step.
        vstep = lim.max_velocity * dt
        step = lim.step_limit()
        d1 = np.clip(delta, -step, step)
        if np.any(np.abs(delta) > vstep):
            fired.append("velocity")
        elif np.any(d1 != delta):
            fired.append("step")

        # Braking distance: never move so fast toward a limit that we could not stop before it.
        hi = np.minimum(step, _braking_speed(lim.upper - q, lim.max_acceleration, dt) * dt)
        lo = np.maximum(-step, -_braking_speed(q - lim.lower, lim.max_acceleration, dt) * dt)
        d2 = np.clip(d1, lo, hi)
        if np.any(d2 != d1):
            fired.append("braking")

        # Acceleration: the step may differ from the last one by at most a_max * dt^2. The braking
        # cap guarantees this interval meets [lo, hi]; the max/min only guard rounding (position wins).
        dv = lim.max_acceleration * dt * dt
        acc_lo = np.maximum(lo, np.minimum(v * dt - dv, hi))
        acc_hi = np.minimum(hi, np.maximum(v * dt + dv, lo))
        clipped = np.clip(d2, acc_lo, acc_hi)
        if np.any(clipped != d2):
            fired.append("acceleration")
        # Position stays hard even if rounding disagreed.
        new_q = np.clip(q + clipped, np.minimum(lim.lower, q), np.maximum(lim.upper, q))
        self._v = (new_q - q) / dt
        self._q = new_q
        for kind in fired:
            self.counts[kind] += 1
        return SafetyResult(requested=requested, sent=new_q.copy(), clamped=tuple(fired), rejected=rejected)


def _braking_speed(distance: np.ndarray, accel: np.ndarray, dt: float) -> np.ndarray:
    """Largest speed v with v*dt + v^2/(2a) <= distance: one more step, then brake at `accel`.

    If the step at v is taken now, the remaining distance d' satisfies d' >= v^2/(2a), so next cycle
    v - a*dt is still allowed: the constraint stays feasible forever (discrete braking covers less
    distance than the continuous ramp v^2/(2a)).
    """
    d = np.maximum(distance, 0.0)
    adt = accel * dt
    return np.maximum(-adt + np.sqrt(adt * adt + 2.0 * accel * d), 0.0)


def within_limits(limits: SafetyLimits, prev_q: np.ndarray, prev_v: np.ndarray, q: np.ndarray,
                  tol: float = 1e-9) -> list[str]:
    """Which limits a step prev -> q violates (used by tests and the telemetry self-check)."""
    bad = []
    if np.any(q < limits.lower - tol) or np.any(q > limits.upper + tol):
        bad.append("position")
    step = q - prev_q
    if np.any(np.abs(step) > limits.step_limit() * (1 + tol) + tol):
        bad.append("velocity")
    v = step / limits.dt
    if np.any(np.abs(v - prev_v) > limits.max_acceleration * limits.dt * (1 + 1e-6) + 1e-6):
        bad.append("acceleration")
    if not np.all(np.isfinite(q)):
        bad.append("nonfinite")
    return bad


__all__ = ["CLAMP_KINDS", "SafetyLayer", "SafetyLimits", "SafetyResult", "within_limits"]
