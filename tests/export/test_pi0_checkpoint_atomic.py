"""A π0 training checkpoint (`edge-vla train --family pi0`) is replaced whole or not at all.

Each checkpoint was written straight into -o, file by file: transformers' save_pretrained (config.json,
model.safetensors), then optimizer.pt and goal_probe.pt with torch.save, then train_state.json. A run stopped while
writing (a kill, a full disk, a crash in serialization) left a truncated model.safetensors or optimizer.pt, or the
next step's weights beside the previous step's train_state.json, and a later --resume either failed on the truncated
file with a deserializer's message or continued from step N with weights of another step, without a word.

The failures are injected deterministically where the writers run: the weights' writer (safetensors, called by
save_pretrained) or the optimizer's (torch.save) writes part of its bytes and then raises, as a process killed
mid-write stops. Control: a checkpoint saved normally loads back and resumes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import transformers.modeling_utils as modeling_utils  # noqa: E402
from pi0_tiny import TINY  # noqa: E402

from edge_vla.errors import CheckpointError  # noqa: E402
from edge_vla.export.pi0 import train as pi0_train  # noqa: E402
from edge_vla.export.pi0.checkpoint import open_pi0  # noqa: E402
from edge_vla.export.train import TrainConfig  # noqa: E402
from edge_vla.sim import dataset  # noqa: E402
from edge_vla.sim.dataset import Dataset  # noqa: E402

STATE, WEIGHTS, OPTIMIZER, PROBE = "train_state.json", "model.safetensors", "optimizer.pt", "goal_probe.pt"


class Killed(BaseException):
    """Stands in for the process dying mid-write: nothing in the trainer may catch it."""


def _config(steps: int) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=2, checkpoint_every=1, warmup=1, threads=1)


def _train(ds: Dataset, out: Path, steps: int, resume: bool) -> Path:
    return pi0_train.train_pi0(ds, out, _config(steps), TINY, resume=resume, progress=False)


def _digests(path: Path) -> dict[str, str]:
    """Every entry of a checkpoint directory (hidden ones too) and the sha256 of each file's bytes."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
            for p in sorted(path.iterdir())}


@pytest.fixture(scope="module")
def sim_data() -> Dataset:
    return dataset.generate(range(2))  # the sim knows its goals: the run also saves goal_probe.pt


@pytest.fixture(scope="module")
def step_1(tmp_path_factory: pytest.TempPathFactory, sim_data: Dataset) -> Path:
    """A run checkpointed at step 1 (each test continues a copy of it)."""
    torch.set_num_threads(1)
    return _train(sim_data, tmp_path_factory.mktemp("pi0") / "run", 1, resume=False)


@pytest.fixture
def run(step_1: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(step_1, tmp_path / "run"))


def _dies_after_part_of_its_bytes(write: Callable[..., Any], target_arg: int = 1) -> Callable[..., Any]:
    """`write`, but it stops (Killed) after half of what it writes has reached the file."""
    def partial(*args: Any, **kwargs: Any) -> None:
        target = args[target_arg]
        write(*args, **kwargs)
        data = Path(target).read_bytes()
        Path(target).write_bytes(data[: len(data) // 2])
        raise Killed(f"killed while writing {target}")
    return partial


def _kill_the_weights_write(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(modeling_utils, "safe_save_file", _dies_after_part_of_its_bytes(modeling_utils.safe_save_file))


def _kill_the_optimizer_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.save of optimizer.pt (the weights were written before it)."""
    real = torch.save

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if Path(getattr(f, "name", f)).name == OPTIMIZER:
            _dies_after_part_of_its_bytes(real)(obj, f, *args, **kwargs)
        real(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", save)


@pytest.mark.parametrize("kill", [_kill_the_weights_write, _kill_the_optimizer_write], ids=["weights", "optimizer"])
def test_a_save_stopped_mid_write_leaves_the_previous_checkpoint_whole(
        kill: Callable[[pytest.MonkeyPatch], None], run: Path, sim_data: Dataset,
        monkeypatch: pytest.MonkeyPatch) -> None:
    before = _digests(run)
    with monkeypatch.context() as patched:
        kill(patched)
        with pytest.raises(Killed):
            _train(sim_data, run, 2, resume=True)  # step 2's checkpoint dies mid-write
    assert _digests(run) == before  # every file still step 1's, and no partial file or staging left behind
    assert json.loads((run / STATE).read_text())["step"] == 1
    _train(sim_data, run, 2, resume=True)  # ... so --resume continues from step 1
    assert json.loads((run / STATE).read_text())["step"] == 2


def test_a_save_stopped_between_its_renames_is_completed_by_resume(
        run: Path, sim_data: Dataset, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every file of step 2 is written and synced before the first rename; stopped after that rename, -o holds
    step 2's first file beside step 1's others, and the rest wait in the staging directory, which --resume
    puts in place before it reads anything."""
    real, renames = os.replace, []

    def replace(src: Any, dst: Any) -> None:
        if renames:
            raise Killed(f"killed before renaming {src}")
        renames.append(Path(dst).name)
        real(src, dst)

    with monkeypatch.context() as patched:
        patched.setattr(os, "replace", replace)
        with pytest.raises(Killed):
            _train(sim_data, run, 2, resume=True)
    assert renames and renames[0] != STATE and json.loads((run / STATE).read_text())["step"] == 1

    assert pi0_train.finish_interrupted_save(run) is True
    state = json.loads((run / STATE).read_text())
    assert state["step"] == 2
    now = _digests(run)
    assert {name: now[name] for name in state["files"]} == state["files"]  # step 2's files, all of them
    assert not [name for name in now if name.startswith(".")]  # the staging directory is gone
    _train(sim_data, run, 3, resume=True)
    assert json.loads((run / STATE).read_text())["step"] == 3


def test_resume_refuses_weights_that_are_not_the_ones_its_state_was_saved_with(
        run: Path, sim_data: Dataset, tmp_path: Path) -> None:
    """What a save stopped between writing the weights and the state left before: step 2's weights beside step 1's
    state, resumed as step 1 without a word. The state names its files' digests; a mismatch is refused in one line."""
    assert {WEIGHTS, OPTIMIZER, PROBE} <= set(json.loads((run / STATE).read_text())["files"])
    later = Path(shutil.copytree(run, tmp_path / "later"))
    _train(sim_data, later, 2, resume=True)
    shutil.copyfile(later / WEIGHTS, run / WEIGHTS)
    with pytest.raises(CheckpointError) as refused:
        _train(sim_data, run, 3, resume=True)
    message = str(refused.value)
    assert WEIGHTS in message and STATE in message and "step 1" in message and "\n" not in message, message
    assert json.loads((run / STATE).read_text())["step"] == 1  # refused before training


def test_control_a_normal_save_loads_back_and_resumes(run: Path, sim_data: Dataset) -> None:
    assert json.loads((run / STATE).read_text())["step"] == 1 and (run / PROBE).is_file()
    assert not [name for name in os.listdir(run) if name.startswith(".")]  # no staging left behind
    saved = open_pi0(run).load_model().state_dict()
    _train(sim_data, run, 2, resume=True)
    resumed = open_pi0(run).load_model().state_dict()
    assert saved.keys() == resumed.keys()
    assert any(not torch.equal(saved[k], resumed[k]) for k in saved)  # step 2 was trained and saved
    assert json.loads((run / STATE).read_text())["step"] == 2
