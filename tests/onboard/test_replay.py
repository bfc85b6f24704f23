"""Issue 13: expert plans through the scheduler, the safety layer and the emulator's joints (virtual time).

Before the fix the safety layer clamped velocity or acceleration in most cycles of a normal run; these
tests replay the sim expert through the onboard motion path and would have caught it."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from edge_vla.action_space import sim_action_space
from edge_vla.onboard.replay import BEFORE, FIXED, expert_episodes, expert_plan, replay
from edge_vla.onboard.safety import SafetyLimits, within_limits
from edge_vla.sim.env import ReachEnv

SEEDS = range(1_000_000, 1_000_003)


@pytest.mark.parametrize("latency_s", [0.03, 0.1])
def test_expert_through_the_motion_path_needs_no_acceleration_clamps(latency_s: float) -> None:
    r = expert_episodes(replace(FIXED, latency_s=latency_s), SEEDS, duration_s=2.0)
    assert r["reached"] == len(SEEDS)
    assert r["acceleration"] == 0 and r["braking"] == 0
    assert r["velocity"] <= 0.01 * r["cycles"]  # the cubic's overshoot of a 0.9 v_max cruise, a cycle or two


def test_before_the_fix_the_same_episodes_clamp_in_most_cycles() -> None:
    """The regression this guards against: anchored hand-over + blend, no feedforward, stop-dead plans."""
    r = expert_episodes(BEFORE, SEEDS, max_accel=None, duration_s=2.0)
    assert (r["velocity"] + r["acceleration"]) > 0.5 * r["cycles"]


def test_what_is_sent_is_within_limits_and_the_arm_tracks_it() -> None:
    env = ReachEnv()
    env.reset(SEEDS[0])
    assert env.scene is not None
    run = replay(expert_plan(env.scene), env.q, 1.5, FIXED)
    limits = SafetyLimits.from_action_space(sim_action_space(), FIXED.rate_hz)
    v = np.vstack([np.zeros(2), np.diff(run.sent, axis=0) * FIXED.rate_hz])
    for k in range(1, run.cycles):
        assert within_limits(limits, run.sent[k - 1], v[k - 1], run.sent[k]) == []
    # Velocity feedforward: the PD drive lags the command by friction * v / kp, not (kd + friction) * v / kp.
    assert np.max(np.abs(run.sent - run.measured)) < 0.02
    slow = replay(expert_plan(env.scene), env.q, 1.5, replace(FIXED, velocity_feedforward=False))
    assert np.max(np.abs(slow.sent - slow.measured)) > 0.05
