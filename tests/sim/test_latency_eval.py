"""Closed-loop evaluation with injected inference latency (docs/rtc.md, "Latency model").

Exact schedules are checked on a recording fake environment (state = the step count, never solved) with tagged,
deterministic policies; lockstep equivalence and the CLI on the real sim.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from edge_vla.errors import ConfigError
from edge_vla.runtime.types import Observation
from edge_vla.sim.env import ReachEnv
from edge_vla.sim.evaluate import evaluate, random_policy
from edge_vla.sim.expert import expert_chunk
from edge_vla.sim.latency_eval import (
    STRATEGIES,
    SimExpert,
    SimStepEnv,
    delay_steps,
    draw_latency_ms,
    evaluate_latency,
    parse_latencies,
    parse_strategies,
    run_episode,
)

H = 8


class FakeEnv:
    """Never solved, `steps` long; the observation's state is [t, 0]; records every commanded action."""

    action_period_s = 0.1

    def __init__(self, steps: int = 30) -> None:
        self.steps, self.t = steps, 0
        self.executed: list[np.ndarray] = []

    def begin(self, seed: int) -> None:
        self.t, self.executed = 0, []

    def observe(self) -> Observation:
        return Observation(images=[], instruction="", state=np.array([self.t, 0.0], np.float32))

    def step(self, action: np.ndarray) -> tuple[bool, bool]:
        self.executed.append(np.asarray(action, np.float32).copy())
        self.t += 1
        return False, self.t >= self.steps

    def hold(self, last: np.ndarray | None) -> np.ndarray:
        return np.zeros(2, np.float32) if last is None else last


class Tagged:
    """Chunk j of call c is [100 c + j, 0]: every executed action names the call and index it came from."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, obs: Observation) -> np.ndarray:
        c, self.calls = self.calls, self.calls + 1
        return np.stack([[100.0 * c + j, 0.0] for j in range(H)]).astype(np.float32)


class Ramp:
    """A plan on the absolute clock, [t_obs + j + 1, offset]; `offset` alternates +-0.5 per call when `disagree`
    (consecutive plans then differ by exactly 1 in dimension 1). With a prefix (RTC), it echoes the prefix and
    continues it with the same slope, as a model trained with action-prefix conditioning should."""

    rtc_max_delay = H - 1

    def __init__(self, disagree: bool) -> None:
        self.disagree, self.calls = disagree, 0
        self.prefixes: list[np.ndarray | None] = []

    def __call__(self, obs: Observation, prefix: np.ndarray | None = None) -> np.ndarray:
        offset = (0.5 if self.calls % 2 else -0.5) if self.disagree else 0.0
        self.calls += 1
        t = float(obs.state[0])
        plan = np.array([[t + j + 1, offset] for j in range(H)], np.float32)
        self.prefixes.append(None if prefix is None else np.asarray(prefix).copy())
        if prefix is None or len(prefix) == 0:
            return plan
        k = len(prefix)
        rest = [prefix[-1] + np.array([j - k + 1, 0.0], np.float32) for j in range(k, H)]
        return np.concatenate([prefix, np.stack(rest)]).astype(np.float32)


def executed_tags(env: FakeEnv) -> list[float]:
    return [float(a[0]) for a in env.executed]


def test_delay_is_the_ceiling_of_latency_over_the_action_period():
    assert [delay_steps(ms, 0.1) for ms in (0, 0.5, 100, 100.5, 199.9, 200, 250, 300)] == [0, 1, 1, 2, 2, 2, 3, 3]
    assert [delay_steps(ms, 0.0125) for ms in (25, 30, 50)] == [2, 3, 4]  # MetaWorld's 80 Hz
    trace = run_episode(FakeEnv(), Tagged(), "receding", 150, seed=0, sigma=0.0)
    assert set(trace.delays) == {2} and set(trace.latencies_ms) == {150.0}


def test_nominal_latency_is_the_90th_percentile_of_a_lognormal_draw():
    draws = np.array([draw_latency_ms(200, seed, i) for seed in range(200) for i in range(10)])
    assert abs(np.mean(draws <= 200) - 0.9) < 0.03  # nominal = p90: a 10% tail beyond it
    assert draws.max() > 230 and draws.min() > 0
    assert draw_latency_ms(0, 5, 3) == 0.0  # zero stays lockstep
    assert draw_latency_ms(200, 7, 2) == draw_latency_ms(200, 7, 2) != draw_latency_ms(200, 7, 3)


def expert_on(env: ReachEnv):
    def act(obs: Observation) -> np.ndarray:
        assert env.scene is not None
        return expert_chunk(env.scene, obs.state, 8)

    return act


def test_zero_latency_sync_is_todays_lockstep_evaluation():
    """Same outcomes and steps, episode by episode: the scripted expert (mostly successes) and random (failures)."""
    for make in (expert_on, lambda env: random_policy(3)):
        env = ReachEnv()
        before = evaluate(make(env), episodes=12, env=env)
        grid = evaluate_latency(make(env), ["sync", "receding"], [0], episodes=12, env=env)
        for row in grid.rows:
            assert row.result.outcomes == before.outcomes, row.strategy
            assert row.result.mean_steps == before.mean_steps
        assert len(grid.rows[0].traces) == 12
    env = ReachEnv()
    assert sum(evaluate(expert_on(env), episodes=12, env=env).outcomes) >= 11  # the comparison covers successes


def test_every_strategy_sees_the_same_latency_draws():
    traces = {s: run_episode(FakeEnv(), Ramp(True), s, 200, seed=11) for s in STRATEGIES}
    first = traces["sync"].latencies_ms
    assert len(set(first)) > 3  # drawn per inference, not one value
    for s, tr in traces.items():
        n = min(len(first), len(tr.latencies_ms))
        assert n >= 5 and tr.latencies_ms[:n] == first[:n], s
    assert run_episode(FakeEnv(), Ramp(True), "sync", 200, seed=12).latencies_ms[:5] != first[:5]


def test_during_the_delay_sync_holds_while_receding_keeps_executing():
    env = FakeEnv(20)
    run_episode(env, Tagged(), "sync", 200, seed=0, sigma=0.0, execute=4)  # k = 2
    assert executed_tags(env) == [0, 0, 0, 1, 2, 3, 3, 3, 100, 101, 102, 103, 103, 103, 200, 201, 202, 203, 203, 203]
    env = FakeEnv(20)
    run_episode(env, Tagged(), "receding", 200, seed=0, sigma=0.0, execute=4)
    # chunk c planned at step 4c takes over at its index 2 (2 steps later); the old one plays on meanwhile
    assert executed_tags(env) == [0, 0, 2, 3, 4, 5, 102, 103, 104, 105, 202, 203, 204, 205, 302, 303, 304, 305,
                                  402, 403]


def test_ensemble_averages_the_overlapping_chunks_with_the_onboard_weights():
    env = FakeEnv(10)
    run_episode(env, Tagged(), "ensemble", 0, seed=0, execute=4, ensemble_m=0.1)
    w = np.exp(-0.1 * np.arange(2))
    expected_t4 = (w[0] * 4 + w[1] * 100) / w.sum()  # chunk 0's index 4 (oldest) and chunk 1's index 0
    assert executed_tags(env)[:4] == [0, 1, 2, 3]
    assert executed_tags(env)[4] == pytest.approx(expected_t4, rel=1e-6)


@pytest.mark.parametrize("strategy", ["receding", "ensemble", "rtc"])
def test_handover_disagreement_is_zero_for_agreeing_plans_and_positive_for_disagreeing_ones(strategy):
    agree = run_episode(FakeEnv(), Ramp(False), strategy, 200, seed=1)
    assert agree.handover_disagreement and max(agree.handover_disagreement) == 0.0
    disagree = run_episode(FakeEnv(), Ramp(True), "receding" if strategy == "rtc" else strategy, 200, seed=1)
    assert min(disagree.handover_disagreement) == pytest.approx(1.0)  # control: the 1-unit offset is measured


def test_sync_and_receding_agree_at_zero_latency_on_the_disagreement_too():
    sync = run_episode(FakeEnv(), Ramp(True), "sync", 0, seed=1)
    rec = run_episode(FakeEnv(), Ramp(True), "receding", 0, seed=1)
    assert sync.handover_disagreement == rec.handover_disagreement and len(sync.handover_disagreement) == 7


def test_rtc_is_refused_for_a_policy_without_prefix_support():
    with pytest.raises(ConfigError, match="action-prefix") as err:
        run_episode(FakeEnv(), Tagged(), "rtc", 200, seed=0)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="action-prefix"):
        evaluate_latency(random_policy(0), ["sync", "rtc"], [0, 100], episodes=1)


def test_rtc_plays_the_old_chunk_during_the_delay_and_hands_over_without_a_jump():
    env, policy = FakeEnv(), Ramp(True)
    trace = run_episode(env, policy, "rtc", 200, seed=4)
    executed = np.stack(env.executed)
    assert trace.handovers >= 5 and max(trace.handover_disagreement) == 0.0
    for start, k, prefix in zip(trace.inference_steps, trace.delays, policy.prefixes, strict=False):
        if k == 0:
            assert prefix is None
            continue
        assert prefix.shape == (k, 2)
        end = min(start + k, len(executed))
        np.testing.assert_array_equal(executed[start:end], prefix[: end - start])  # exactly what executed
    # control: the same policy under receding (no prefix) is seen to jump at every hand-over
    assert min(run_episode(FakeEnv(), Ramp(True), "receding", 200, seed=4).handover_disagreement) > 0.9


def test_rtc_prefix_is_capped_at_the_policys_max_delay():
    policy = Ramp(True)
    policy.rtc_max_delay = 1
    trace = run_episode(FakeEnv(), policy, "rtc", 300, seed=0, sigma=0.0)  # k = 3 > 1
    assert all(p is not None and len(p) == 1 for p in policy.prefixes)
    assert trace.prefix_truncated == len(policy.prefixes)
    policy = Ramp(True)
    policy.rtc_max_delay = 3  # k = 3 fits exactly: nothing truncated
    assert run_episode(FakeEnv(), policy, "rtc", 300, seed=0, sigma=0.0).prefix_truncated == 0
    assert all(len(p) == 3 for p in policy.prefixes)


def test_exhausted_when_the_old_chunk_runs_out_before_the_new_one_arrives():
    # execute 4 of 8: an inference starts with 4 actions left. k = 4 just fits; k = 5 holds the last one for 2 steps.
    for strategy in ("receding", "ensemble", "rtc"):
        fits = run_episode(FakeEnv(), Tagged() if strategy != "rtc" else Ramp(True), strategy, 400, seed=0,
                           sigma=0.0)
        assert fits.exhausted == 0 and fits.held_steps == 4, strategy  # only the start-up wait holds
    env = FakeEnv()
    late = run_episode(env, Tagged(), "receding", 500, seed=0, sigma=0.0)
    # inferences start at 0, 5, 10, 15, 20, 25; each after the first runs 2 steps past the old chunk's end
    assert late.inference_steps == (0, 5, 10, 15, 20, 25)
    assert late.exhausted == 5 and late.held_steps == 5 + 5 * 2
    assert executed_tags(env)[5:15] == [5, 6, 7, 7, 7, 105, 106, 107, 107, 107]
    assert run_episode(FakeEnv(), Tagged(), "sync", 500, seed=0, sigma=0.0).exhausted == 0  # sync holds by design


def test_parsers_refuse_bad_lists_in_one_line():
    assert parse_latencies("0, 100,200.5") == [0.0, 100.0, 200.5]
    assert parse_strategies("sync,rtc") == ["sync", "rtc"]
    for bad in ("", "100,-5", "1e9", "nan", "fast", "100,100"):
        with pytest.raises(ConfigError, match="--latency-ms") as err:
            parse_latencies(bad)
        assert "\n" not in str(err.value)
    for bad in ("", "sync,warp", "sync,sync"):
        with pytest.raises(ConfigError, match="--strategies"):
            parse_strategies(bad)


def test_grid_metrics_pair_against_zero_latency_and_sync():
    grid = evaluate_latency(random_policy(0), ["sync", "receding"], [0, 200], episodes=3)
    assert [(r.strategy, r.latency_ms) for r in grid.rows] == [("sync", 0), ("sync", 200), ("receding", 0),
                                                                ("receding", 200)]
    doc = grid.as_dict()
    assert doc["rows"][1]["vs_zero_latency"]["episodes"] == 3 and doc["rows"][3]["vs_sync"]["b"].startswith("policy")
    table = grid.table()
    assert table.count("\n| ") == 4 and "hand-over" in table


def test_sim_adapter_holds_the_arm_still_before_the_first_chunk():
    env = SimStepEnv(ReachEnv())
    env.begin(3)
    q0 = env.env.q.copy()
    env.step(env.hold(None))
    np.testing.assert_allclose(env.env.q, q0)


def test_cli_prints_the_table_and_writes_json(tmp_path, capsys):
    from edge_vla import cli

    out = tmp_path / "lat.json"
    assert cli.main(["evaluate", "expert", "--episodes", "2", "--latency-ms", "0,200", "--strategies",
                     "sync,receding,ensemble", "--json-out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| sync | 200 |" in printed and "| ensemble | 0 |" in printed
    doc = json.loads(out.read_text())
    assert len(doc["contenders"][0]["rows"]) == 6 and doc["latency"]["sigma"] == 0.25
    assert cli.main(["evaluate", "random", "--episodes", "1", "--latency-ms", "0,100", "--strategies", "rtc"]) != 0
    assert "action-prefix" in capsys.readouterr().err
    assert cli.main(["evaluate", "expert", "--episodes", "1", "--latency-ms", "-1"]) != 0


def test_metaworld_holds_with_zero_motion_and_keeps_lockstep_at_zero_latency(monkeypatch):
    """Deltas: a hold is no motion with the last gripper command. At 0 ms sync is `metaworld.evaluate` exactly."""
    from edge_vla.sim.latency_eval import MetaWorldStepEnv, evaluate_latency_metaworld

    held = MetaWorldStepEnv.hold(object.__new__(MetaWorldStepEnv), np.array([0.5, -1, 1, 0.7], np.float32))
    np.testing.assert_array_equal(held, np.array([0, 0, 0, 0.7], np.float32))
    try:
        from edge_vla.sim import metaworld

        metaworld._modules()
    except Exception:
        pytest.skip("MetaWorld is an optional extra: pip install 'edge-vla[metaworld]'")
    built = []

    class Recorded(metaworld.MetaWorldEnv):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            built.append(self)

    monkeypatch.setattr(metaworld, "MetaWorldEnv", Recorded)

    def expert(obs: Observation) -> np.ndarray:  # the scripted expert's action of now, repeated as a chunk
        return np.repeat(built[-1].expert_action()[None], 8, axis=0)

    spec = "metaworld:reach-v3?horizon=60"
    before = metaworld.evaluate(expert, spec, episodes=2)
    grid = evaluate_latency_metaworld(expert, spec, ["sync"], [25], episodes=2)
    assert sum(before.overall.outcomes) == 2 and grid.rows[0].result.outcomes == before.overall.outcomes
    assert grid.rows[0].result.mean_steps == before.overall.mean_steps
    delays = [k for tr in grid.rows[1].traces for k in tr.delays]  # 25 ms at 80 Hz: 2 actions at the p90
    assert set(delays) <= {1, 2, 3} and delays.count(2) > len(delays) / 2


def test_a_bundle_declaring_rtc_gets_the_prefix_through_the_cli_adapter():
    """`edge-vla evaluate BUNDLE --strategies rtc` calls Policy.infer(obs, prefix=...) for a bundle whose manifest
    declares rtc (Policy.rtc_max_delay > 0), and refuses one that does not."""
    from types import SimpleNamespace

    from edge_vla.export.evaluate_cli import BundleAct

    class FakeBundle:
        def __init__(self, delay: int) -> None:
            self.rtc_max_delay, self.ramp = delay, Ramp(True)
            self.prefixes: list[np.ndarray | None] = []

        def infer(self, obs: Observation, prefix: np.ndarray | None = None) -> SimpleNamespace:
            self.prefixes.append(prefix)
            return SimpleNamespace(actions=self.ramp(obs, prefix))

    bundle = FakeBundle(2)
    trace = run_episode(FakeEnv(), BundleAct(bundle), "rtc", 200, seed=2)
    assert max(trace.handover_disagreement) == 0.0
    assert all(p is not None and 1 <= len(p) <= 2 for p in bundle.prefixes)
    plain = FakeBundle(0)
    run_episode(FakeEnv(), BundleAct(plain), "receding", 200, seed=2)
    assert set(map(type, plain.prefixes)) == {type(None)}  # no prefix outside rtc
    with pytest.raises(ConfigError, match="action-prefix"):
        run_episode(FakeEnv(), BundleAct(plain), "rtc", 200, seed=2)


def test_on_the_sim_the_prefix_taking_expert_hands_over_without_a_jump_where_receding_jumps():
    """The real sim at 200 ms: the scripted expert plans from a state the arm has already left under receding; given
    the prefix it continues from it (rtc). Without a prefix SimExpert is the plain expert."""
    env = ReachEnv()
    expert = SimExpert(env)
    obs = env.reset(5)
    assert env.scene is not None
    np.testing.assert_array_equal(expert(obs), expert_chunk(env.scene, obs.state, 8))
    grid = evaluate_latency(expert, ["receding", "rtc"], [200], episodes=8, env=env)
    receding, rtc = grid.rows[1], grid.rows[3]
    assert (receding.strategy, rtc.strategy, rtc.latency_ms) == ("receding", "rtc", 200)
    assert rtc.handover_disagreement < 1e-6 and receding.handover_disagreement > 0.1  # float32 rounding only
    assert rtc.result.successes == receding.result.successes == 8


def test_metaworld_latency_grid_progress_counts_every_task(monkeypatch):
    """--episodes is per task on MetaWorld: the progress total covers tasks x strategies x latencies x episodes
    (it said `episode 126/60` on MT10). Control: the sim grid's total has no task factor."""
    from types import SimpleNamespace

    from edge_vla.export import evaluate_cli

    totals: list[int] = []
    monkeypatch.setattr(evaluate_cli, "progress", lambda label, n, reseed: totals.append(n) or reseed)
    monkeypatch.setattr(evaluate_cli, "evaluate_latency_metaworld", lambda *a, **k: "grid")
    monkeypatch.setattr(evaluate_cli, "evaluate_latency", lambda *a, **k: "grid")
    contender = evaluate_cli.Contender("policy", lambda obs: obs, None, dims=(4, 4))
    monkeypatch.setattr(contender, "metaworld_policy", lambda env: None, raising=False)
    args = SimpleNamespace(episodes=3, seed_base=0, execute=4, latency_sigma=0.25)
    contender.run_latency(args, "metaworld:reach-v3,push-v3", "base", ["sync", "rtc"], [25.0])
    contender.run_latency(args, "sim", "base", ["sync", "rtc"], [25.0])
    assert totals == [3 * 2 * 2 * 2, 3 * 2 * 2]  # tasks x strategies x (0 ms + 25 ms) x episodes; the sim: no tasks
