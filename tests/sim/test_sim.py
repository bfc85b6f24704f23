import itertools

import numpy as np
import pytest

from edge_vla.errors import EdgeVlaError
from edge_vla.sim import dataset
from edge_vla.sim.env import ReachEnv
from edge_vla.sim.evaluate import (
    EvalResult,
    evaluate,
    evaluate_expert,
    paired_difference,
    random_policy,
    wilson_interval,
)
from edge_vla.sim.scene import TEMPLATES, Scene, forward_kinematics, inverse_kinematics


def test_reset_is_deterministic_per_seed():
    a, b = ReachEnv(), ReachEnv()
    oa, ob = a.reset(7), b.reset(7)
    assert oa.instruction == ob.instruction
    np.testing.assert_array_equal(oa.images[0], ob.images[0])
    np.testing.assert_array_equal(oa.state, ob.state)
    assert ReachEnv().reset(8).instruction != oa.instruction or not np.array_equal(ReachEnv().reset(8).images[0], oa.images[0])


def test_observation_shapes_and_cameras():
    obs = ReachEnv(image_size=32, num_cameras=2).reset(0)
    assert len(obs.images) == 2
    assert all(im.shape == (32, 32, 3) and im.dtype == np.uint8 for im in obs.images)
    assert not np.array_equal(obs.images[0], obs.images[1])  # the wrist view differs from the overview


def test_instructions_need_vision():
    """At least 3 distinct instructions, and the same instruction names blocks at different places."""
    scenes = [Scene.sample(np.random.default_rng(s)) for s in range(200)]
    instructions = {s.instruction for s in scenes}
    assert len(instructions) >= 3 * len(TEMPLATES)
    same = [s for s in scenes if s.instruction == scenes[0].instruction]
    spread = np.ptp(np.stack([s.target_xy for s in same]), axis=0)
    assert np.all(spread > 0.2)


def test_inverse_kinematics_reaches_target():
    rng = np.random.default_rng(0)
    for _ in range(50):
        scene = Scene.sample(rng)
        q = inverse_kinematics(scene.target_xy, np.array([1.5, 0.0]))
        assert np.linalg.norm(forward_kinematics(q)[1] - scene.target_xy) < 1e-3


def test_expert_succeeds_and_random_does_not():
    expert = evaluate_expert(40)
    assert expert.success_rate >= 0.95
    rand = evaluate(random_policy(0), 40, name="random")
    assert rand.success_rate < 0.2


def test_step_rejects_non_finite_action():
    env = ReachEnv()
    env.reset(0)
    with pytest.raises(ValueError, match="finite"):
        env.step(np.array([np.nan, 0.0]))


def test_wilson_interval_brackets_rate():
    lo, hi = wilson_interval(30, 100)
    assert 0 <= lo < 0.3 < hi <= 1
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_dataset_round_trip(tmp_path):
    ds = dataset.generate(range(3), image_size=32)
    path = dataset.save(ds, tmp_path / "d.npz")
    back = dataset.load(path)
    np.testing.assert_array_equal(back.images, ds.images)
    np.testing.assert_array_equal(back.actions, ds.actions)
    assert list(back.instructions) == list(ds.instructions)
    assert back.meta["image_size"] == 32
    np.testing.assert_array_equal(back.goals, ds.goals)
    # every goal is the named block of its layout: the expert's plan ends there
    env = ReachEnv()
    env.reset(0, target=0)
    assert env.scene is not None
    np.testing.assert_allclose(ds.goals[0], env.scene.target_xy, atol=1e-6)
    # files written before goals existed still load, without them
    old = dataset.Dataset(ds.images, ds.instructions, ds.states, ds.actions, ds.episodes, ds.meta)
    assert dataset.load(dataset.save(old, tmp_path / "old.npz")).goals is None


def test_dataset_errors_are_clear(tmp_path):
    with pytest.raises(EdgeVlaError, match="make-data"):
        dataset.load(tmp_path / "missing.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(EdgeVlaError, match="regenerate"):
        dataset.load(bad)


def test_counterfactual_data_names_every_block_of_each_layout():
    ds = dataset.generate(range(2), image_size=32)
    assert ds.meta["counterfactual"]
    for layout in (0, 1):
        rows = np.flatnonzero(ds.episodes == layout)
        starts = [rows[0]] + [r for prev, r in itertools.pairwise(rows) if ds.instructions[r] != ds.instructions[prev]]
        assert len({str(ds.instructions[r]) for r in starts}) == 3  # one instruction per block
        for r in starts[1:]:  # same layout and start pose: only the instruction differs
            np.testing.assert_array_equal(ds.images[r], ds.images[starts[0]])
            np.testing.assert_array_equal(ds.states[r], ds.states[starts[0]])


def test_with_target_keeps_the_layout_and_renames_the_block():
    scene = Scene.sample(np.random.default_rng(3))
    other = scene.with_target((scene.target + 1) % 3)
    np.testing.assert_array_equal(other.block_xy, scene.block_xy)
    assert other.block_colors[other.target] in other.instruction
    assert other.instruction.replace(other.block_colors[other.target], "X") == scene.instruction.replace(
        scene.block_colors[scene.target], "X")
    with pytest.raises(ValueError, match="block index"):
        scene.with_target(5)


def test_expert_follows_a_shifted_instruction():
    shifted = evaluate_expert(20, target_shift=1)
    assert shifted.success_rate >= 0.95 and shifted.target_shift == 1
    assert len(shifted.outcomes) == 20


def test_paired_difference_is_tighter_than_marginal_intervals_and_checks_pairing():
    rng = np.random.default_rng(0)
    shared = rng.random(300) < 0.8
    a = EvalResult("a", 300, 0, 0, 0, 0, outcomes=tuple(int(x) for x in shared))
    flip = shared.copy()
    flip[np.flatnonzero(shared)[:6]] = False  # b fails 6 episodes that a solves
    b = EvalResult("b", 300, 0, 0, 0, 0, outcomes=tuple(int(x) for x in flip))
    d = paired_difference(a, b)
    assert d.only_a == 6 and d.only_b == 0
    assert d.diff == pytest.approx(0.02)
    assert d.ci_low < d.diff < d.ci_high
    assert d.ci_high - d.ci_low < 0.5 * (wilson_interval(240, 300)[1] - wilson_interval(240, 300)[0])
    with pytest.raises(ValueError, match="same episodes"):
        paired_difference(a, EvalResult("c", 299, 0, 0, 0, 0, outcomes=(1,) * 299))


def test_paired_difference_covers_the_true_difference():
    """Coverage of the 95% interval over simulated correlated pairs (true difference 0.05)."""
    rng = np.random.default_rng(1)
    hits, trials = 0, 400
    for _ in range(trials):
        u = rng.random(150)
        x, y = u < 0.85, u < 0.80  # strongly correlated contenders, p 0.85 vs 0.80
        d = paired_difference(EvalResult("x", 150, 0, 0, 0, 0, outcomes=tuple(x.astype(int))),
                              EvalResult("y", 150, 0, 0, 0, 0, outcomes=tuple(y.astype(int))))
        hits += d.ci_low <= 0.05 <= d.ci_high
    assert hits / trials >= 0.92


def test_execute_sets_how_many_actions_play_before_the_policy_replans(tmp_path, capsys):
    """`evaluate --execute 1` replans every action, the cadence closest to the onboard loop's; INT8's
    state rounding only showed there (issue 13)."""
    import json

    from edge_vla import cli
    from edge_vla.sim.evaluate import evaluate

    calls = []

    def hold(obs):
        calls.append(1)
        return np.repeat(obs.state[None], 8, axis=0)

    for execute, per_call in ((1, 1), (4, 4)):
        calls.clear()
        result = evaluate(hold, episodes=2, execute=execute)
        assert result.successes == 0 and len(calls) == 2 * -(-30 // per_call)
    out = tmp_path / "e.json"
    assert cli.main(["evaluate", "random", "--episodes", "2", "--execute", "1", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["execute"] == 1
    assert "replanning every 1 action" in capsys.readouterr().out
    assert cli.main(["evaluate", "random", "--episodes", "1", "--execute", "0"]) != 0


def test_zero_actions_per_chunk_is_refused_not_an_endless_loop():
    """execute=0 played no action, so the episode never ended: the closed loops refuse it (the old code hung)."""
    from edge_vla.errors import ConfigError
    from edge_vla.sim.evaluate import evaluate
    from export.distill import rollout_observations

    def hold(obs):
        return np.repeat(obs.state[None], 8, axis=0)

    with pytest.raises(ConfigError, match="at least 1 action per chunk"):
        evaluate(hold, episodes=1, execute=0)
    with pytest.raises(ConfigError, match="at least 1 action per chunk"):
        rollout_observations(hold, [0], image_size=64, num_cameras=1, execute=0)
