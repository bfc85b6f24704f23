"""Chunk scheduling timing: latency compensation, hand-over, ensembling, interpolation, exhaustion."""

from __future__ import annotations

import numpy as np
import pytest

from edge_vla.errors import ConfigError
from edge_vla.onboard.scheduler import Chunk, Trajectory, make_scheduler

P = 0.1  # action period (10 Hz)


def ramp(start: float, step: float, n: int = 8, seq: int = 0, obs_t: float = 0.0) -> Chunk:
    """A 1-D chunk whose k-th action is start + (k+1) * step; the observed state was `start`."""
    acts = (start + step * np.arange(1, n + 1))[:, None]
    return Chunk(actions=acts, period=P, obs_timestamp=obs_t, start_state=np.array([start]), seq=seq)


@pytest.mark.parametrize("interp", ["linear", "cubic"])
def test_trajectory_passes_through_waypoints_and_holds_the_last(interp) -> None:
    traj = Trajectory(10.0, np.array([0.0]), np.arange(1, 9, dtype=float)[:, None], P, interp)
    for k in range(9):
        assert traj(10.0 + k * P)[0] == pytest.approx(float(k), abs=1e-9)
    assert traj(9.0)[0] == 0.0 and traj(100.0)[0] == 8.0
    assert traj.index(10.25) == 2 and traj.index(11.0) == 8


def test_cubic_interpolation_has_no_velocity_step_at_waypoints() -> None:
    acts = np.array([0.5, 0.8, 0.9, 0.9, 0.7])[:, None]
    lin = Trajectory(0.0, np.array([0.0]), acts, P, "linear")
    cub = Trajectory(0.0, np.array([0.0]), acts, P, "cubic")
    dt = 1e-4

    def vel_jump(tr: Trajectory, t: float) -> float:
        return abs((tr(t + dt) - tr(t))[0] - (tr(t) - tr(t - dt))[0]) / dt

    assert vel_jump(lin, 0.1) > 1.0  # linear: velocity 5 rad/s then 3 rad/s
    assert vel_jump(cub, 0.1) < 1e-2


def test_receding_skips_actions_whose_time_passed() -> None:
    sched = make_scheduler("receding", interp="linear")
    sched.reset(np.array([0.0]))
    # Observation at t=5.0; inference took 0.25 s, so the chunk arrives at 5.25.
    sched.push(ramp(0.0, 1.0, obs_t=5.0), now=5.25)
    s = sched.sample(5.25)
    assert s.q[0] == pytest.approx(2.5) and s.index == 2 and not s.exhausted
    assert sched.sample(5.8).q[0] == pytest.approx(8.0)
    assert sched.sample(5.8).exhausted


def test_sync_starts_on_arrival_and_reports_consumption() -> None:
    sched = make_scheduler("sync", interp="linear", execute=4)
    sched.reset(np.array([0.0]))
    sched.push(ramp(0.0, 1.0, seq=7, obs_t=5.0), now=5.25)
    assert sched.sample(5.25).q[0] == pytest.approx(0.0)  # no compensation: starts where it is
    assert sched.sample(5.35).q[0] == pytest.approx(1.0)
    assert sched.consumed_seq == -1
    s = sched.sample(5.65)  # 4 actions played -> exhausted, holding action 4
    assert s.exhausted and s.q[0] == pytest.approx(4.0) and sched.consumed_seq == 7


def test_blend_hands_over_without_a_jump() -> None:
    hard = make_scheduler("receding", interp="linear")
    soft = make_scheduler("receding", interp="linear", blend_s=0.2)
    for s in (hard, soft):
        s.reset(np.array([0.0]))
        s.push(ramp(0.0, 0.1, seq=0, obs_t=0.0), now=0.05)
    # The next chunk disagrees by 1 rad (a different mode of a multimodal policy).
    for s in (hard, soft):
        s.push(ramp(1.3, 0.1, seq=1, obs_t=0.3), now=0.35)
    before = 0.35  # both were at the first chunk's value here
    first_value = 0.35  # ramp(0, 0.1) at t=0.35
    assert hard.sample(before).q[0] - first_value > 0.9  # jump
    assert soft.sample(before).q[0] == pytest.approx(first_value)
    # Over the blend the step between 1 ms samples stays small, and at the end it is the new chunk.
    qs = [soft.sample(0.35 + i * 1e-3).q[0] for i in range(201)]
    assert max(np.abs(np.diff(qs))) < 0.02
    assert qs[-1] == pytest.approx(hard.sample(0.55).q[0])


def test_ensemble_weights_older_chunks_more() -> None:
    sched = make_scheduler("ensemble", interp="linear", ensemble_m=0.5)
    sched.reset(np.array([0.0]))
    sched.push(ramp(0.0, 0.0, seq=0, obs_t=0.0), now=0.0)  # says 0 throughout
    sched.push(ramp(1.0, 0.0, seq=1, obs_t=0.1), now=0.1)  # says 1 throughout
    w = np.exp(-0.5 * np.arange(2))
    assert sched.sample(0.3).q[0] == pytest.approx(w[1] / w.sum())
    # Once the old chunk ends only the new one is left.
    assert sched.sample(0.85).q[0] == pytest.approx(1.0)
    assert sched.sample(0.95).exhausted


def test_no_chunk_yet_holds_and_is_exhausted() -> None:
    sched = make_scheduler("receding")
    sched.reset(np.array([0.3, -0.2]))
    s = sched.sample(1.0)
    assert s.exhausted and np.allclose(s.q, [0.3, -0.2])


def test_unknown_strategy_names_choices() -> None:
    with pytest.raises(ConfigError, match="receding"):
        make_scheduler("fastest")
