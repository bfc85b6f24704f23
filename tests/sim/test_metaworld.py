"""The MetaWorld adapter: the environment selector (no MetaWorld needed) and the env itself (skipped without it)."""

import importlib.util

import numpy as np
import pytest

from edge_vla.errors import ConfigError
from edge_vla.sim.metaworld import (
    ANCHORS,
    MAX_INSTRUCTION,
    MT10,
    TASKS,
    MetaWorldSpec,
    action_space,
    camera_entries,
    is_metaworld,
    weighted_anchor,
)


def test_spec_parses_tasks_suites_and_options():
    spec = MetaWorldSpec.parse("metaworld:reach,push-v3?cameras=corner2,gripperPOV&horizon=150")
    assert spec.tasks == ("reach-v3", "push-v3") and spec.cameras == ("corner2", "gripperPOV") and spec.horizon == 150
    assert MetaWorldSpec.parse(str(spec)) == spec
    assert MetaWorldSpec.parse("metaworld:mt10").tasks == MT10 and str(MetaWorldSpec.parse("metaworld:MT10")) == "metaworld:mt10"
    assert MetaWorldSpec.parse("metaworld:mt10").camera_names(2) == ("corner2", "gripperPOV")  # gripperPOV: the wrist
    assert is_metaworld("metaworld:reach-v3") and not is_metaworld("sim") and not is_metaworld(None)


@pytest.mark.parametrize(("spec", "message"), [
    ("metaworld:reach-v3,fly-v3", r"unknown MetaWorld task\(s\) \['fly-v3'\]"),
    ("metaworld:", "unknown MetaWorld task"),
    ("metaworld:reach-v3?cameras=wrist", r"unknown camera\(s\) \['wrist'\]; MetaWorld has corner"),
    ("metaworld:reach-v3?horizon=900", "horizon 900 is outside 1..500"),
    ("metaworld:reach-v3?fps=3", r"unknown option\(s\) \['fps'\]"),
    ("sim", "is not a MetaWorld environment"),
])
def test_bad_specs_say_what_to_use(spec, message):
    with pytest.raises(ConfigError, match=message):
        MetaWorldSpec.parse(spec)


def test_camera_count_must_match_the_named_cameras():
    with pytest.raises(ConfigError, match="names 1 camera"):
        MetaWorldSpec.parse("metaworld:reach-v3?cameras=topview").camera_names(2)
    assert [c["role"] for c in camera_entries(("corner2", "gripperPOV"), 64)] == ["scene", "wrist"]


def test_instructions_are_unique_sentences_within_the_text_budget():
    texts = [t[1] for t in TASKS.values()]
    assert len(TASKS) == 50 and len(set(texts)) == 50
    assert max(len(t.encode()) for t in texts) <= MAX_INSTRUCTION


def test_difficulty_split_and_the_weighted_anchor_for_mt10():
    groups = [TASKS[t][0] for t in MT10]
    assert (groups.count("easy"), groups.count("medium"), groups.count("hard")) == (7, 1, 2)
    assert sum(1 for d, _ in TASKS.values() if d == "very hard") == 5
    assert weighted_anchor(MT10, ANCHORS["TinyVLA"]) == pytest.approx((7 * 77.6 + 21.5 + 2 * 11.4) / 10)


def test_action_space_is_an_end_effector_delta_with_a_gripper():
    space = action_space()
    assert space.kind == "delta_ee_pose" and space.dim_roles == ("ee", "ee", "ee", "gripper")
    assert np.all(space.lower == -1) and np.all(space.upper == 1)


# --- the environment (needs the metaworld extra) ---------------------------------------------------------
@pytest.fixture(scope="module")
def reach():
    # find_spec, not an import: the adapter picks MuJoCo's headless GL backend before mujoco is first imported.
    if importlib.util.find_spec("metaworld") is None:
        pytest.skip("MetaWorld is an optional extra: pip install 'edge-vla[metaworld]'")
    from edge_vla.sim.metaworld import MetaWorldEnv

    env = MetaWorldEnv("reach-v3", ("corner2", "gripperPOV"), image_size=32, horizon=40)
    yield env
    env.close()


def test_seeds_draw_layouts_deterministically_and_state_is_hand_and_gripper(reach):
    reach.reset(1_000_000)
    a_raw, a_img = reach.raw.copy(), reach.observation().images
    reach.reset(1_000_000)
    np.testing.assert_array_equal(reach.raw, a_raw)
    np.testing.assert_array_equal(reach.observation().images[0], a_img[0])
    reach.reset(1_000_001)
    assert not np.allclose(reach.raw[36:39], a_raw[36:39])  # another goal
    obs = reach.observation()
    np.testing.assert_array_equal(obs.state, a_raw[:4].astype(np.float32))  # hand xyz, gripper: no goal, no object
    assert obs.instruction == "reach the goal"
    assert [im.shape for im in obs.images] == [(32, 32, 3)] * 2 and obs.images[0].dtype == np.uint8
    assert not np.array_equal(obs.images[0], obs.images[1])


def test_demonstrations_record_object_and_goal_positions_for_the_goal_head_only():
    """The goal head's target on MetaWorld: the object's and the goal's xyz (privileged, training only). Training
    sizes the head from the data; the policy's inputs (state, images) never carry them."""
    if importlib.util.find_spec("metaworld") is None:
        pytest.skip("MetaWorld is an optional extra: pip install 'edge-vla[metaworld]'")
    from edge_vla.config import preset
    from edge_vla.export.envs import training_config
    from edge_vla.sim import metaworld

    ds = metaworld.generate("metaworld:reach-v3?horizon=150", range(2), image_size=32, frame_every=10)
    assert ds.goals is not None and ds.goals.shape == (len(ds), 6) and ds.goals.dtype == np.float32
    goal_xyz = ds.goals[:, 3:]
    first = ds.episodes == ds.episodes[0]
    assert np.allclose(goal_xyz[first], goal_xyz[first][0])  # the goal stays put within an episode ...
    assert not np.allclose(goal_xyz[first][0], goal_xyz[~first][0])  # ... and another seed draws another
    assert ds.states.shape[1] == 4  # hand xyz and gripper: the positions are not an input
    cfg = training_config(preset("tiny"), ds)
    assert cfg.goal_dim == 6 and cfg.goal_head


def test_evaluation_renders_only_when_the_policy_needs_a_chunk(reach, monkeypatch):
    from edge_vla.sim import metaworld

    renders, calls = [], []
    real = metaworld.MetaWorldEnv.render
    monkeypatch.setattr(metaworld.MetaWorldEnv, "render", lambda self: renders.append(1) or real(self))

    def still(obs):  # never reaches the goal: the episode runs to the horizon
        calls.append(obs)
        return np.zeros((8, 4), np.float32)

    res = metaworld.evaluate(still, "metaworld:reach-v3?horizon=20", episodes=1, image_size=32, execute=4)
    assert res.overall.successes == 0 and res.overall.mean_steps == 20
    assert len(calls) == len(renders) == 5  # 20 steps / 4 per chunk; the expert path renders nothing
    renders.clear()
    assert metaworld.evaluate_expert("metaworld:reach-v3?horizon=100", episodes=1).overall.successes == 1
    assert renders == []


def test_a_missing_extra_is_one_line_naming_it(monkeypatch):
    from edge_vla.errors import MissingDependencyError
    from edge_vla.sim.metaworld import MetaWorldEnv

    monkeypatch.setitem(__import__("sys").modules, "metaworld", None)  # as if not installed
    with pytest.raises(MissingDependencyError, match=r"pip install 'edge-vla\[metaworld\]'") as err:
        MetaWorldEnv("reach-v3")
    assert "\n" not in str(err.value)


def test_the_front_camera_frames_the_workspace_so_the_goal_marker_is_larger_than_in_corner2():
    """`front`: a fixed camera facing the robot across the table, framing the reachable workspace (a real cell
    mounts one like it). At 64 px the reach goal marker covers more pixels than in corner2, whose view takes in
    the whole table, and it moves with the goal."""
    if importlib.util.find_spec("metaworld") is None:
        pytest.skip("MetaWorld is an optional extra: pip install 'edge-vla[metaworld]'")
    from edge_vla.sim.metaworld import MetaWorldEnv

    def goal_pixels(env) -> np.ndarray:
        img = env.render()
        moved = [np.argwhere(np.abs(a.astype(int) - b.astype(int)).sum(-1) > 60) for a, b in zip(img, base)]
        return moved

    with MetaWorldEnv("reach-v3", ("front", "corner2"), image_size=64, horizon=10) as env:
        sizes = {"front": [], "corner2": []}
        for seed in (3, 4, 5):
            env.reset(seed)
            base = env.render()
            site = env.env.model.site("goal").id
            rgba = env.env.model.site_rgba[site].copy()
            env.env.model.site_rgba[site, 3] = 0.0  # hide the marker: the pixels that change are the marker's
            moved = goal_pixels(env)
            env.env.model.site_rgba[site] = rgba
            sizes["front"].append(len(moved[0]))
            sizes["corner2"].append(len(moved[1]))
        env.reset(3)
        a = env.render()[0]
        env.reset(4)
        assert not np.array_equal(a, env.render()[0])
    assert min(sizes["front"]) >= 2, sizes
    assert sum(sizes["front"]) > 1.5 * sum(sizes["corner2"]), sizes
