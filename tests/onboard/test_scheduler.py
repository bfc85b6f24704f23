"""Chunk scheduling timing: latency compensation, hand-over, ensembling, interpolation, exhaustion, plan clock."""

from __future__ import annotations

import numpy as np
import pytest

from edge_vla.errors import ConfigError
from edge_vla.onboard.scheduler import Chunk, PlanClock, Trajectory, make_scheduler

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
    sched = make_scheduler("receding", interp="linear", handover="anchored")
    sched.reset(np.array([0.0]))
    # Observation at t=5.0; inference took 0.25 s, so the chunk arrives at 5.25.
    sched.push(ramp(0.0, 1.0, obs_t=5.0), now=5.25)
    s = sched.sample(5.25)
    assert s.q[0] == pytest.approx(2.5) and s.index == 2 and not s.exhausted
    assert sched.sample(5.8).q[0] == pytest.approx(8.0)
    assert sched.sample(5.8).exhausted


def test_sync_starts_on_arrival_and_reports_consumption() -> None:
    sched = make_scheduler("sync", interp="linear", execute=4, handover="anchored")
    sched.reset(np.array([0.0]))
    sched.push(ramp(0.0, 1.0, seq=7, obs_t=5.0), now=5.25)
    assert sched.sample(5.25).q[0] == pytest.approx(0.0)  # no compensation: starts where it is
    assert sched.sample(5.35).q[0] == pytest.approx(1.0)
    assert sched.consumed_seq == -1
    s = sched.sample(5.65)  # 4 actions played -> exhausted, holding action 4
    assert s.exhausted and s.q[0] == pytest.approx(4.0) and sched.consumed_seq == 7


def test_blend_hands_over_without_a_jump() -> None:
    hard = make_scheduler("receding", interp="linear", handover="anchored")
    soft = make_scheduler("receding", interp="linear", blend_s=0.2, handover="anchored")
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


def velocity(sched, t: float, h: float = 1e-6) -> np.ndarray:
    """Forward (h > 0) or backward (h < 0) difference: the velocity just after or just before t."""
    return (sched.sample(t + h).q - sched.sample(t).q) / h


def test_continuous_first_chunk_from_rest_starts_on_arrival_then_compensates_latency() -> None:
    sched = make_scheduler("receding", interp="linear")  # continuous hand-over, no ramp
    sched.reset(np.array([0.0]))
    # Observed at rest at 5.0, arriving at 5.25: the robot did not move meanwhile, so nothing is stale.
    sched.push(ramp(0.0, 1.0, seq=0, obs_t=5.0), now=5.25, commanded=(np.array([0.0]), np.array([0.0])))
    assert sched.sample(5.25).q[0] == pytest.approx(0.0)
    assert sched.sample(5.45).q[0] == pytest.approx(2.0)
    # Moving now: a chunk observed at 5.45 (state 2.0) and arriving at 5.55 skips what is due before 5.65.
    q = sched.sample(5.55).q
    sched.push(ramp(2.0, 1.0, seq=1, obs_t=5.45), now=5.55, commanded=(q, np.array([10.0])))
    assert sched.sample(5.55).q[0] == pytest.approx(q[0])
    assert sched.sample(5.65).q[0] == pytest.approx(4.0)  # action 2 of the new chunk, on its own timeline
    assert sched.sample(5.65).index == 2  # heading to action 2 (same numbering as an anchored chunk)


@pytest.mark.parametrize("interp", ["cubic"])
def test_continuous_handover_keeps_velocity_continuous(interp) -> None:
    """A chunk planned from a measured state that lags the command (a PD drive without feedforward lags
    ~0.1 rad at 2.25 rad/s): the anchored hand-over steps the velocity, the continuous one does not."""
    speed, lag = 2.25, 0.1
    steps = {}
    for handover in ("anchored", "continuous"):
        sched = make_scheduler("receding", interp=interp, blend_s=0.1, handover=handover)
        sched.reset(np.array([0.0]))
        sched.push(ramp(0.0, speed * P, n=20, seq=0, obs_t=0.0), now=0.0,
                   commanded=(np.array([0.0]), np.array([speed])))
        t_obs, now = 0.5, 0.55
        v_before = velocity(sched, now, h=-1e-6)
        q_cmd = sched.sample(now).q
        sched.push(ramp(speed * t_obs - lag, speed * P, seq=1, obs_t=t_obs), now=now,
                   commanded=(q_cmd, v_before))
        steps[handover] = abs(velocity(sched, now)[0] - v_before[0])
        assert sched.sample(now).q[0] == pytest.approx(q_cmd[0], abs=1e-9)  # no position jump either way
    assert steps["anchored"] > 0.5  # lag / blend_s: ~1 rad/s in one cycle, 100 rad/s^2 at 100 Hz
    assert steps["continuous"] < 1e-3


def test_plan_clock_ramps_a_start_from_rest_within_the_acceleration_budget() -> None:
    ramp_s, speed = 0.25, 2.25
    sched = make_scheduler("receding", interp="cubic", ramp_s=ramp_s)
    sched.reset(np.array([0.0]))
    sched.push(ramp(0.0, speed * P, n=8, obs_t=0.0), now=0.03, commanded=(np.array([0.0]), np.array([0.0])))
    dt = 0.01
    q = np.array([sched.sample(0.03 + k * dt).q[0] for k in range(60)])
    v = np.diff(q) / dt
    a = np.diff(v) / dt
    assert abs(v[0]) < 0.1  # starts from rest
    assert np.max(np.abs(a)) <= speed / ramp_s * 1.05  # 9 rad/s^2 against the 22.5 of an instant start
    assert v[-1] == pytest.approx(speed, rel=0.02)  # then cruises at the plan's speed, ramp_s / 2 later
    assert q[-1] == pytest.approx(speed * (59 * dt - ramp_s / 2), abs=0.01)


def test_plan_clock_is_continuous_and_monotonic() -> None:
    clock = PlanClock(0.2)
    assert clock(3.0) == 3.0  # real time until a start from rest
    clock.start(1.0)
    ts = np.linspace(0.5, 2.0, 301)
    taus = np.array([clock(t) for t in ts])
    assert np.all(np.diff(taus) >= 0) and clock(1.0) == pytest.approx(1.0)
    assert clock.rate(1.1) == pytest.approx(0.5) and clock.rate(1.5) == 1.0
    assert clock(1.5) == pytest.approx(1.5 - 0.1)  # a constant delay of ramp / 2 after the ramp
