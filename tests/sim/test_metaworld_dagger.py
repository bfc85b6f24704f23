"""DAgger on MetaWorld (issue 29): roll out a policy, label every visited state with the scripted expert's chunk
from that state (the env snapshotted, the expert run forward, the env restored), and train on demos + DAgger data.

Fast: reach-v3 only, 32 px, short horizons, 1-2 episodes; skipped without the metaworld extra."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest

if importlib.util.find_spec("metaworld") is None:
    pytest.skip("MetaWorld is an optional extra: pip install 'edge-vla[metaworld]'", allow_module_level=True)

from edge_vla.cli import main as edge_vla
from edge_vla.errors import ConfigError, EdgeVlaError
from edge_vla.sim import dataset
from edge_vla.sim import metaworld_dagger as dagger
from edge_vla.sim.metaworld import MetaWorldEnv

# The experts' gains exceed the action range by design (the env clips); MetaWorldEnv silences this per process,
# pytest restores warning filters per test.
pytestmark = pytest.mark.filterwarnings("ignore:Constant:UserWarning")

CAMS = ("corner2", "gripperPOV")
SEED = 300_003
CHUNK = 16


def wobble(steps: int, seed: int = 7) -> np.ndarray:
    """Executed actions that are not the expert's, so the env visits states the expert would not."""
    return np.random.default_rng(seed).uniform(-0.6, 0.6, size=(steps, 4)).astype(np.float32)


def fresh_expert_chunk(env: MetaWorldEnv, seed: int, prefix: np.ndarray) -> np.ndarray:
    """The expert's actions over CHUNK steps from the state `prefix` leads to, replayed from a reset (no snapshots)."""
    env.reset(seed)
    for a in prefix:
        env.step(a)
    out = []
    for _ in range(CHUNK):
        out.append(env.expert_action())
        env.step(out[-1])
    return np.stack(out)


@pytest.fixture(scope="module")
def pair():
    """Two reach envs built once for the module (building one takes about a second)."""
    envs = [MetaWorldEnv("reach-v3", CAMS, 32, 60) for _ in range(2)]
    yield envs
    for env in envs:
        env.close()


@pytest.fixture
def twins(pair):
    for env in pair:
        env.reset(SEED)
    return pair


def label_and_step(labelled: MetaWorldEnv, twin: MetaWorldEnv, actions: np.ndarray) -> list[np.ndarray]:
    """Label every state of `labelled` and step both envs with the same actions; the observations must agree."""
    labeller = dagger.ExpertLabeller(labelled)
    labels = []
    for t, a in enumerate(actions):
        labels.append(labeller.chunk(CHUNK))
        labelled.step(a)
        twin.step(a)
        if not np.array_equal(labelled.raw, twin.raw):
            raise AssertionError(f"step {t}: the labelled env diverged from its twin (max |diff| "
                                 f"{np.abs(labelled.raw - twin.raw).max():.3g})")
    return labels


def test_labelling_leaves_the_env_exactly_as_it_was_and_labels_are_a_fresh_expert_rollout(twins):
    labelled, twin = twins
    actions = wobble(20)
    labels = label_and_step(labelled, twin, actions)
    assert (labelled.t, labelled.success) == (twin.t, twin.success)
    assert labelled.env.curr_path_length == twin.env.curr_path_length == 20
    for a, b in zip(labelled.render(), twin.render()):  # what the next frame shows is unchanged too
        np.testing.assert_array_equal(a, b)
    assert all(lab.shape == (CHUNK, 4) and lab.dtype == np.float32 for lab in labels)
    for t in (0, 9, 19):
        np.testing.assert_array_equal(labels[t], fresh_expert_chunk(twin, SEED, actions[:t]))
    assert not np.allclose(labels[0], labels[19])  # the labels follow the state they were taken at


@pytest.mark.parametrize("half", ["python", "mujoco"])
def test_an_incomplete_restore_is_caught_by_the_twin_check(twins, monkeypatch, half):
    """Control: restoring only MuJoCo's state (not MetaWorld's Python-side fields such as the previous-observation
    half of the 39-D observation and the path length), or running the expert on the live MjData, diverges."""
    labelled, twin = twins
    if half == "python":
        monkeypatch.setattr(dagger, "_restore_python_state", lambda sim, saved: None)
    else:
        monkeypatch.setattr(dagger.ExpertLabeller, "_workspace", lambda self, live: live)
    with pytest.raises(AssertionError, match="diverged from its twin"):
        label_and_step(labelled, twin, wobble(3))


def drift_up(obs) -> np.ndarray:
    """A deliberately bad policy: the hand rises, away from every reach goal, whatever it sees."""
    return np.tile(np.array([0.0, 0.0, 1.0, 0.0], np.float32), (8, 1))


def expert_states(env: MetaWorldEnv, seed: int) -> np.ndarray:
    """The states the expert visits from this seed's layout, to its success (or the env's horizon)."""
    env.reset(seed)
    states, done = [env.state], False
    while not done:
        _, done = env.step(env.expert_action())
        states.append(env.state)
    return np.stack(states)


def test_beta_one_is_the_expert_and_succeeds(pair):
    ds = dagger.collect(drift_up, "metaworld:reach-v3?horizon=60", range(SEED, SEED + 1), image_size=32,
                        num_cameras=2, beta=1.0)
    assert ds.meta["policy_success"]["overall"] == [1, 1] and ds.meta["dagger"] is True
    expert = expert_states(pair[0], SEED)
    np.testing.assert_array_equal(ds.states, expert[: len(ds)])  # the expert's own trajectory, state by state
    # The expert executed each label's first action, so each label's second is the next state's first.
    np.testing.assert_array_equal(ds.actions[:-1, 1], ds.actions[1:, 0])


def test_beta_zero_records_where_a_bad_policy_goes_labelled_with_the_experts_corrections(pair):
    horizon = 30
    ds = dagger.collect(drift_up, f"metaworld:reach-v3?horizon={horizon}", range(SEED, SEED + 1), image_size=32,
                        num_cameras=2, beta=0.0)
    assert len(ds) == horizon and ds.meta["policy_success"]["overall"] == [0, 1]
    assert ds.images.shape == (horizon, 2, 32, 32, 3) and ds.actions.shape == (horizon, CHUNK, 4)
    assert ds.goals is not None and ds.goals.shape == (horizon, 6)
    hand, goal = ds.states[:, :3], ds.goals[:, 3:]
    assert hand[-1, 2] > hand[0, 2] + 0.15  # the student's states: the hand went up ...
    visited = expert_states(pair[0], SEED)[:, :3]
    late = hand[10:]
    nearest = np.linalg.norm(late[:, None] - visited[None], axis=-1).min(axis=1)
    assert nearest.min() > 0.05, "the bad policy's late states should be far from anything the expert visits"
    corrective = ds.actions[10:, 0, :3]  # ... each labelled with the expert's move back towards the goal
    assert np.abs(corrective).max(axis=1).min() > 0.5
    toward = np.einsum("ij,ij->i", corrective, goal[10:] - late)
    assert (toward > 0).all()


def test_collection_is_reproducible_and_beta_mixes_per_chunk():
    spec = "metaworld:reach-v3?horizon=24"
    a = dagger.collect(drift_up, spec, range(SEED, SEED + 1), image_size=32, num_cameras=2, beta=0.5)
    b = dagger.collect(drift_up, spec, range(SEED, SEED + 1), image_size=32, num_cameras=2, beta=0.5)
    np.testing.assert_array_equal(a.states, b.states)
    np.testing.assert_array_equal(a.actions, b.actions)
    expert, total = a.meta["expert_chunks"]
    assert 0 < expert < total, (expert, total)  # some chunks ran the expert, some the policy


# --- the command line: make-data --dagger-policy, and train on demos + DAgger data --------------------------------
def run(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = edge_vla(argv)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def demos_and_checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    """A one-episode reach demo set at 32 px and a checkpoint trained on it for one step (a real, if useless,
    student: DAgger loads it the way `edge-vla evaluate` does)."""
    root = tmp_path_factory.mktemp("dagger")
    demos = root / "demos.npz"
    env = "metaworld:reach-v3?cameras=corner2,gripperPOV&horizon=60"
    assert edge_vla(["-q", "make-data", "--env", env, "--cameras", "2", "--image-size", "32", "--episodes", "1",
                     "-o", str(demos)]) == 0
    ckpt = root / "student"
    assert edge_vla(["-q", "train", "--preset", "tiny", "--set", "image_size=32", "--data", str(demos),
                     "--train-steps", "1", "--threads", "1", "-o", str(ckpt)]) == 0
    return demos, ckpt


def test_make_data_dagger_writes_a_dataset_train_accepts_beside_the_demos(demos_and_checkpoint, tmp_path, capsys):
    demos, ckpt = demos_and_checkpoint
    out = tmp_path / "dagger1.npz"
    rc, stdout, err = run(["-q", "make-data", "--env", "metaworld:reach-v3?horizon=20", "--cameras", "2",
                           "--image-size", "32", "--episodes", "1", "--dagger-policy", str(ckpt), "-o", str(out)],
                          capsys)
    assert rc == 0, err
    assert "DAgger" in stdout and str(out) in stdout
    ds = dataset.load(out)
    meta = ds.meta
    assert meta["dagger"] is True and meta["beta"] == 0.0
    assert meta["seeds"] == [dagger.DAGGER_SEED_BASE, dagger.DAGGER_SEED_BASE + 1]
    assert meta["policy"]["path"] == str(ckpt.resolve())
    assert meta["policy"]["sha256"] == hashlib.sha256((ckpt / "model.safetensors").read_bytes()).hexdigest()
    assert meta["env"] == "metaworld:reach-v3?cameras=corner2,gripperPOV&horizon=20"  # the policy's cameras
    assert set(meta["policy_success"]) >= {"overall", "tasks"}
    assert ds.images.shape[1:] == (2, 32, 32, 3) and ds.actions.shape[1:] == (CHUNK, 4)
    assert meta["action_space"] == dataset.load(demos).meta["action_space"]

    both = tmp_path / "both"
    rc, _, err = run(["-q", "train", "--preset", "tiny", "--set", "image_size=32", "--data", f"{demos},{out}",
                      "--train-steps", "1", "--threads", "1", "-o", str(both)], capsys)
    assert rc == 0, err
    trained = json.loads((both / "config.json").read_text())["meta"]
    assert trained["samples"] == len(dataset.load(demos)) + len(ds)
    assert [p["path"] for p in trained["dataset"]["parts"]] == [str(demos), str(out)]
    assert trained["dataset"]["env"].startswith("metaworld:reach-v3?cameras=corner2,gripperPOV")


def test_concatenated_datasets_keep_episodes_apart(demos_and_checkpoint, tmp_path):
    from edge_vla.export.data import load_training_data

    demos, _ = demos_and_checkpoint
    part = dataset.load(demos)
    both = load_training_data(f"{demos},{demos}")
    assert len(both) == 2 * len(part)
    first, second = both.episodes[: len(part)], both.episodes[len(part):]
    assert not set(first.tolist()) & set(second.tolist())  # a validation split cannot cut an episode in two
    np.testing.assert_array_equal(both.images[len(part):], part.images)


def with_meta(src: Path, dst: Path, **changes) -> Path:
    ds = dataset.load(src)
    ds.meta = ds.meta | changes
    return dataset.save(ds, dst)


@pytest.mark.parametrize(("changes", "named"), [
    ({"cameras": ["front", "gripperPOV"], "env": "metaworld:reach-v3?cameras=front,gripperPOV&horizon=60"}, "cameras"),
    ({"env": "metaworld:push-v3?cameras=corner2,gripperPOV"}, "env tasks (['push-v3']"),
    ({"image_size": 64}, "image_size"),
    ({"task": "reach"}, "task"),
])
def test_mismatched_datasets_are_refused_in_one_line(demos_and_checkpoint, tmp_path, capsys, changes, named):
    demos, _ = demos_and_checkpoint
    other = with_meta(demos, tmp_path / "other.npz", **changes)
    rc, _, err = run(["train", "--preset", "tiny", "--set", "image_size=32", "--data", f"{demos},{other}",
                      "--train-steps", "1", "-o", str(tmp_path / "never")], capsys)
    assert rc == 1 and err.count("\n") == 1, err
    assert f"{other}" in err and named in err and "differs" in err
    assert not (tmp_path / "never").exists()


def test_a_missing_part_is_named(demos_and_checkpoint, tmp_path, capsys):
    demos, _ = demos_and_checkpoint
    rc, _, err = run(["train", "--set", "image_size=32", "--data", f"{demos},{tmp_path / 'gone.npz'}",
                      "--train-steps", "1", "--episodes", "1", "-o", str(tmp_path / "never")], capsys)
    assert rc == 1 and err.count("\n") == 1 and "gone.npz" in err and "does not exist" in err, err
    assert not (tmp_path / "gone.npz").exists()  # not generated under a made-up name


@pytest.mark.parametrize(("argv", "message"), [
    (["--dagger-policy", "/nonexistent/student"], "--dagger-policy /nonexistent/student: .*does not exist"),
    (["--dagger-policy", __file__], "--dagger-policy .*test_metaworld_dagger.py: .*not a checkpoint"),
    (["--env", "sim", "--dagger-policy", "random"], "--dagger-policy rolls out a policy in MetaWorld"),
    (["--dagger-policy", "random", "--dagger-beta", "1.5"], "--dagger-beta 1.5: .*between 0 and 1"),
    (["--dagger-policy", "random", "--dagger-beta", "nan"], "--dagger-beta nan"),
    (["--dagger-beta", "0.5"], "--dagger-beta needs --dagger-policy"),
    (["--dagger-policy", "random", "--seed", "999990", "--episodes", "20"], "held-out"),
    (["--dagger-policy", "random", "--seed", "-3"], "--seed -3"),
    (["--dagger-policy", "random", "--episodes", "0"], "--episodes 0"),
    (["--dagger-policy", "random", "--noise", "0.1"], "--noise"),
    (["--dagger-policy", "random", "--format", "lerobot"], "npz"),
    (["--dagger-policy", "expert"], "--dagger-beta 1"),
])
def test_bad_dagger_options_are_one_line(argv, message, capsys):
    base = ["make-data", "--env", "metaworld:reach-v3?horizon=5", "--cameras", "2", "--image-size", "32",
            "--episodes", "1", "-o", "/nonexistent/dir/never.npz"]
    if "--env" in argv:
        base = base[:1] + base[3:]
    rc, _, err = run(base + argv, capsys)
    assert rc == 1 and err.count("\n") == 1, err
    assert re.search(message, err), err


def test_a_policy_with_other_cameras_or_image_size_is_refused(demos_and_checkpoint, capsys):
    _, ckpt = demos_and_checkpoint
    for extra, message in ((["--env", "metaworld:reach-v3?cameras=front,gripperPOV"], "corner2"),
                           (["--env", "metaworld:reach-v3", "--image-size", "64"], "32"),
                           (["--env", "metaworld:reach-v3", "--cameras", "1"], "2 camera")):
        rc, _, err = run(["make-data", "--cameras", "2", "--image-size", "32", "--episodes", "1", "--dagger-policy",
                          str(ckpt), "-o", "/nonexistent/never.npz", *extra], capsys)
        assert rc == 1 and err.count("\n") == 1 and message in err, err


def test_collect_refuses_bad_arguments_directly():
    with pytest.raises(ConfigError, match="beta"):
        dagger.collect(drift_up, "metaworld:reach-v3", range(1), beta=-0.1)
    with pytest.raises(EdgeVlaError, match="MetaWorld"):
        dagger.collect(drift_up, "sim", range(1))
