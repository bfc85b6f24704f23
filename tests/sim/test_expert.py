"""The sim expert's plans stay within the joints' limits: velocity everywhere, acceleration on arrival."""

from __future__ import annotations

import numpy as np
import pytest

from edge_vla.sim.env import ACTION_PERIOD_S, ReachEnv
from edge_vla.sim.expert import PLAN_ACCEL, braking_step, expert_chunk
from edge_vla.sim.scene import JOINT_ACCEL_LIMIT, JOINT_VEL_LIMIT

T = ACTION_PERIOD_S


def plans(n: int = 30, chunk_len: int = 16, max_accel: object = PLAN_ACCEL) -> list[tuple[np.ndarray, np.ndarray]]:
    env = ReachEnv()
    out = []
    for seed in range(n):
        obs = env.reset(1_000_000 + seed)
        assert env.scene is not None
        out.append((obs.state.astype(np.float64), expert_chunk(env.scene, obs.state, chunk_len, max_accel=max_accel)))
    return out


def test_plans_respect_the_velocity_limit_and_brake_within_the_acceleration_budget() -> None:
    for q, plan in plans():
        path = np.vstack([q, plan.astype(np.float64)])
        v = np.diff(path, axis=0) / T
        assert np.all(np.abs(v) <= JOINT_VEL_LIMIT + 1e-4)
        # After the first action (the arm's velocity before it is not the plan's to know), speed changes by at
        # most PLAN_ACCEL * T per action: the arrival is a ramp to rest, not a stop from cruising speed.
        a = np.diff(v, axis=0) / T
        assert np.all(np.abs(a) <= PLAN_ACCEL + 1e-2), np.abs(a).max()
        assert np.allclose(v[-1], 0.0, atol=1e-3)  # 16 actions (1.6 s) reach every goal here, at rest


def test_the_constant_speed_plans_before_issue_13_stop_dead() -> None:
    """The data this replaces: cruising at 0.9 v_max, then 0 within one action (22.5 rad/s^2 > 20)."""
    worst = max(np.abs(np.diff(np.diff(np.vstack([q, p]), axis=0) / T, axis=0) / T).max()
                for q, p in plans(max_accel=None))
    assert worst > JOINT_ACCEL_LIMIT.max()
    assert 0.9 * JOINT_VEL_LIMIT.max() / T == pytest.approx(22.5)


def test_braking_step_lands_on_the_goal_and_never_stalls() -> None:
    d = np.array([1.0])
    speed, accel = np.array([2.25]), np.array([10.0])
    steps = []
    for _ in range(40):
        s = braking_step(d, speed, accel, T)
        steps.append(float(s[0]))
        d = d - s
    assert d[0] == pytest.approx(0.0, abs=1e-9)
    assert max(steps) <= 2.25 * T + 1e-12
    assert np.all(np.abs(np.diff(steps)) <= accel[0] * T * T + 1e-9)
    assert braking_step(np.array([0.0]), speed, accel, T)[0] == 0.0
