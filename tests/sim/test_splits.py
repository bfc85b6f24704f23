"""The sim's splits: base exactly as before splits existed, and the hard split (`--env sim:hard`)."""

import hashlib
import json

import numpy as np
import pytest

from edge_vla import cli
from edge_vla.config import preset
from edge_vla.errors import ConfigError
from edge_vla.sim import dataset
from edge_vla.sim.env import ReachEnv
from edge_vla.sim.evaluate import evaluate_expert
from edge_vla.sim.scene import COLORS, HARD_COLORS, SPLITS, Scene
from edge_vla.sim.splits import is_sim, meta_split, sim_env, sim_split
from edge_vla.tokenizer import tokenize
from export.envs import export_options, resolve_env, target_env
from export.exporter import ExportOptions

# Computed with the code of main before splits existed (commit a57fe34): the base split must not move by a bit,
# or every base dataset, the shipped checkpoint and the README's base figures would silently change meaning.
BASE_FRAMES_SHA256 = "f269d3ddc82085a1305f90ae84c9de2c55c5a7cc09156a61f19f1a97ffe134b8"
BASE_DATA_SHA256 = "4187c89dc3253802d9a938b6c55cbba73a43063b023222ae7ea1aa21f03fc3ba"
BASE_META_KEYS = ["action_period_s", "counterfactual", "expert_max_accel", "format_version", "image_size", "noise",
                  "num_cameras", "seeds", "task"]


def test_base_split_frames_are_bit_identical_to_before_splits():
    h = hashlib.sha256()
    env = ReachEnv(image_size=32, num_cameras=2)
    for seed in (0, 7, 1_000_000):
        obs = env.reset(seed)
        for im in obs.images:
            h.update(im.tobytes())
        h.update(obs.state.tobytes())
        h.update(obs.instruction.encode())
        obs = env.reset(seed, target=2)
        obs, _, _ = env.step(np.array([1.0, 0.5], np.float32))
        for im in obs.images:
            h.update(im.tobytes())
        h.update(obs.instruction.encode())
    assert h.hexdigest() == BASE_FRAMES_SHA256


def test_base_split_dataset_is_bit_identical_to_before_splits():
    ds = dataset.generate(range(3), image_size=16, num_cameras=1)
    h = hashlib.sha256()
    for a in (ds.images, ds.states, ds.actions, ds.episodes, ds.goals):
        h.update(np.ascontiguousarray(a).tobytes())
    h.update("\n".join(ds.instructions.tolist()).encode())
    assert h.hexdigest() == BASE_DATA_SHA256 and len(ds) == 88
    assert sorted(ds.meta) == BASE_META_KEYS and meta_split(ds.meta) == "base"  # no split key on base data


def test_hard_scenes_have_five_blocks_distractors_and_jitter():
    scenes = [Scene.sample(np.random.default_rng(s), "hard") for s in range(60)]
    max_len = preset("tiny").max_text_len
    for s in scenes:
        assert s.split == "hard" and len(s.block_colors) == 5 == len(set(s.block_colors)) == len(s.block_xy)
        assert set(s.block_colors) <= set(HARD_COLORS) and 1 <= len(s.distractors) <= 2
        assert s.block_colors[s.target] in s.instruction
        tokenize(s.instruction, max_len)  # raises if the colour word and end mark do not fit
        for d in s.distractors:  # never on top of a block
            assert min(np.linalg.norm(d.xy - b) for b in s.block_xy) > 0.15
    assert {c for s in scenes for c in s.block_colors} == set(HARD_COLORS)  # the new colours do appear
    assert {d.kind for s in scenes for d in s.distractors} == {"ring", "bar"}
    assert len({s.lighting for s in scenes}) == len(scenes)  # per-episode lighting
    jitter = np.concatenate([s.block_rgb - [HARD_COLORS[c] for c in s.block_colors] for s in scenes])
    assert 5 < np.abs(jitter).max() <= SPLITS["hard"].color_jitter
    # the distractors and the lighting reach the pixels
    s = scenes[0]
    plain = Scene(s.block_xy, s.block_colors, s.target, s.instruction, "hard", s.block_rgb)
    q = np.array([1.5, 0.0], np.float32)
    assert not np.array_equal(s.render(q, 64), plain.render(q, 64))
    # a counterfactual keeps every look of the scene and names another block in it
    other = s.with_target((s.target + 1) % 5)
    assert other.distractors == s.distractors and other.lighting == s.lighting
    assert other.block_colors[other.target] in other.instruction
    np.testing.assert_array_equal(other.render(q, 32), s.render(q, 32))
    assert set(COLORS) < set(HARD_COLORS)


def test_expert_solves_the_hard_split_and_its_swapped_instructions():
    for shift in (0, 1):
        r = evaluate_expert(20, split="hard", target_shift=shift)
        assert r.successes == 20, r


def test_hard_dataset_records_its_split_and_named_goals(tmp_path):
    ds = dataset.load(dataset.save(dataset.generate(range(2), image_size=16, split="hard"), tmp_path / "h.npz"))
    assert ds.meta["split"] == "hard" and ds.meta["env"] == "sim:hard" and meta_split(ds.meta) == "hard"
    assert len({str(i) for i in ds.instructions[ds.episodes == 0]}) == 5  # counterfactual: every block named
    env = ReachEnv(image_size=16, split="hard")
    for row in (0, len(ds) - 1):
        seed = int(ds.episodes[row])
        env.reset(seed)
        assert env.scene is not None
        named = [i for i, c in enumerate(env.scene.block_colors) if c in str(ds.instructions[row])]
        np.testing.assert_allclose(ds.goals[row], env.scene.block_xy[named[0]], atol=1e-6)


def test_env_strings_name_a_split_or_fail_in_one_line():
    assert [sim_split(e) for e in ("sim", "sim:base", "sim:hard")] == ["base", "base", "hard"]
    assert sim_env("base") == "sim" and sim_env("hard") == "sim:hard"
    assert is_sim("sim:hard") and not is_sim("metaworld:reach-v3") and not is_sim(None)
    with pytest.raises(ConfigError, match=r"unknown sim split 'foo'; use one of sim, sim:base, sim:hard") as e:
        sim_split("sim:foo")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="unknown sim split"):
        ReachEnv(split="foo")


def test_cli_makes_and_evaluates_the_hard_split(tmp_path, capsys):
    out = tmp_path / "hard.npz"
    assert cli.main(["make-data", "--env", "sim:hard", "--episodes", "2", "--image-size", "16", "-o", str(out)]) == 0
    assert dataset.load(out).meta["split"] == "hard"
    report = tmp_path / "eval.json"
    assert cli.main(["evaluate", "expert", "--env", "sim:hard", "--episodes", "3", "--sensitivity",
                     "--json", str(report)]) == 0
    doc = json.loads(report.read_text())
    assert doc["env"] == "sim:hard" and doc["split"] == "hard"
    assert doc["contenders"][0]["instruction_sensitivity"]["successes"] == 3
    capsys.readouterr()
    assert cli.main(["make-data", "--env", "sim:foo", "--episodes", "1", "-o", str(tmp_path / "x.npz")]) != 0
    err = capsys.readouterr().err.strip()
    assert "unknown sim split 'foo'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.npz").exists()


def test_models_trained_on_hard_default_to_it_and_export_calibrates_on_it(tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    hard_meta = dataset.generate(range(1), image_size=16, split="hard").meta
    (bundle / "manifest.json").write_text(json.dumps({"provenance": {"dataset": hard_meta}}))
    assert target_env(str(bundle)) == "sim:hard" and resolve_env(None, [str(bundle)]) == "sim:hard"
    assert resolve_env("sim", [str(bundle)]) == "sim"  # asked for explicitly: base
    assert target_env("export/assets/tiny-reach") is None  # the shipped base checkpoint stays on base
    opts = export_options(ExportOptions(), {"dataset": hard_meta})
    assert opts.calib == "sim:hard" and opts.observations == "sim:hard"
    base = export_options(ExportOptions(), {"dataset": dataset.generate(range(1), image_size=16).meta})
    assert base.calib is None and base.observations is None
