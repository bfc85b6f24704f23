"""Recorded tasks longer than a preset's instruction length (tiny: 23 bytes). Every size the data decides comes
from the data: `train` sizes the instruction from the dataset's longest task, `distill` gives the student the
teacher's, the bundle and runtime take it end to end, and a model too short for a dataset is refused up front
(naming the task), never told to shorten a recorded instruction."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from lerobot_data import FPS, error_line, make_small_recording

import edge_vla
from edge_vla.cli import main
from edge_vla.config import preset
from edge_vla.errors import ObservationError
from edge_vla.export.checkpoint import load_checkpoint, save_checkpoint
from edge_vla.export.lerobot import write_dataset
from edge_vla.export.lerobot.reader import split_episodes
from edge_vla.export.model import VLA
from edge_vla.runtime.types import Observation
from edge_vla.tokenizer import normalize

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# The tokenizer folds case and runs of spaces: 43 bytes, 44 tokens with the end mark.
LONG = "Pick up the red cube and put it in the  bowl"
MEDIUM = "stack the green block on the blue one"  # 37 bytes: past tiny's 23, short of LONG
LONG_TOKENS = len(normalize(LONG).encode()) + 1


def cli(argv: list[str]) -> int:
    """The real CLI; torch's thread count is restored (train and distill set it for the process)."""
    threads = torch.get_num_threads()
    try:
        return main(argv)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def long_tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The longest task only in the held-out episode: the length must come from the whole dataset, not the
    # training split, or `evaluate` (held-out episodes) would meet an instruction the model cannot take.
    _, val = split_episodes([0, 1, 2], 0.1, 0)
    tasks = tuple(LONG if e in val else MEDIUM for e in range(3))
    return write_dataset(make_small_recording(tasks), tmp_path_factory.mktemp("long") / "ds", fps=FPS)


@pytest.fixture(scope="module")
def trained(long_tasks: Path) -> Path:
    out = long_tasks.with_name("ckpt")
    assert cli(["train", "--data", f"lerobot:{long_tasks}", "--steps", "2", "--batch-size", "4", "--threads", "1",
                "--checkpoint-every", "2", "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def short_model(long_tasks: Path) -> Path:
    """A model of the dataset's state and action sizes with tiny's 24-token instruction (untrained)."""
    return save_checkpoint(VLA(preset("tiny", state_dim=3, action_dim=4)), long_tasks.with_name("short"))


@pytest.fixture(scope="module")
def long_model(long_tasks: Path) -> Path:
    """A teacher that takes the long task (untrained: distillation is checked for sizes, not quality)."""
    torch.manual_seed(0)
    teacher = VLA(preset("tiny", state_dim=3, action_dim=4, max_text_len=LONG_TOKENS))
    return save_checkpoint(teacher, long_tasks.with_name("teacher"))


def test_train_sizes_the_instruction_from_the_longest_task(trained: Path) -> None:
    model, _ = load_checkpoint(trained)
    assert LONG_TOKENS == 44 and model.config.max_text_len == LONG_TOKENS
    assert (model.config.state_dim, model.config.action_dim) == (3, 4)


def test_bundle_takes_the_long_task_end_to_end(trained: Path, long_tasks: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    assert cli(["export", str(trained), "-o", str(bundle)]) == 0  # numerics on the recording's frames
    policy = edge_vla.Policy.load(bundle)
    obs = Observation([np.full((64, 64, 3), 128, np.uint8)], LONG, np.zeros(3, np.float32))
    chunk = policy.infer(obs).actions.copy()
    assert chunk.shape == (8, 4) and np.isfinite(chunk).all()
    # The task's last byte reaches the model (nothing is cut): same noise, one letter changed at the end.
    policy.reset()
    assert np.array_equal(policy.infer(obs).actions, chunk)
    policy.reset()
    assert not np.array_equal(policy.infer(Observation(obs.images, LONG[:-1] + "x", obs.state)).actions,
                              chunk)
    # Control: the limit is real, one byte past the dataset's longest task is refused.
    with pytest.raises(ObservationError, match=r"instruction is 44 bytes but this model takes at most 43"):
        policy.infer(Observation(obs.images, LONG + "s", obs.state))
    # The held-out episode (the long task) runs through the open-loop check.
    assert cli(["evaluate", str(bundle), "--data", f"lerobot:{long_tasks}", "--samples", "4"]) == 0


def test_distilled_student_inherits_the_teachers_instruction_length(long_model: Path, long_tasks: Path,
                                                                   tmp_path: Path) -> None:
    assert cli(["distill", "--teacher", str(long_model), "--data", f"lerobot:{long_tasks}", "--student-preset", "tiny",
                "-o", str(tmp_path / "s"), "--steps", "2", "--batch-size", "4", "--reflow-steps", "0",
                "--threads", "1", "--device", "cpu"]) == 0
    student, _ = load_checkpoint(tmp_path / "s")
    assert student.config.preset == "tiny" and student.config.max_text_len == LONG_TOKENS


def test_distill_set_overrides_the_student(long_model: Path, long_tasks: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    common = ["distill", "--teacher", str(long_model), "--data", f"lerobot:{long_tasks}", "--steps", "2",
              "--batch-size", "4", "--reflow-steps", "0", "--threads", "1", "--device", "cpu"]
    assert cli([*common, "-o", str(tmp_path / "s"), "--set", "vision=patch", "--set", "keypoints=0",
                "--set", "width=64", "--set", "max_text_len=30"]) == 0
    student, _ = load_checkpoint(tmp_path / "s")
    assert (student.config.vision, student.config.keypoints, student.config.width) == ("patch", 0, 64)
    # The data decides the instruction length: a smaller one asked for is raised to fit the longest task.
    assert student.config.max_text_len == LONG_TOKENS
    # Sizes the teacher decides cannot be overridden: refused before any work.
    assert cli([*common, "-o", str(tmp_path / "x"), "--set", "state_dim=7"]) == 1
    err = error_line(capsys.readouterr().err)
    assert "--set state_dim=7" in err and "comes from the teacher (3)" in err, err
    assert not (tmp_path / "x").exists()


def test_model_too_short_for_the_data_is_refused_up_front(short_model: Path, long_model: Path, long_tasks: Path,
                                                         tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = f"lerobot:{long_tasks}"
    for argv in (["evaluate", str(short_model), "--data", src, "--samples", "4"],
                 ["export", str(short_model), "-o", str(tmp_path / "b"), "--precision", "int8", "--calib", src],
                 ["distill", "--teacher", str(short_model), "--data", src, "-o", str(tmp_path / "s"),
                  "--steps", "2", "--reflow-steps", "0", "--threads", "1", "--device", "cpu"]):
        assert cli(argv) == 1, argv
        err = error_line(capsys.readouterr().err)
        # The split's longest task: the held-out one for evaluate, a training one for calibration and distillation.
        assert re.search(r"task '[^']+' is (37|43) bytes but .* takes instructions of at most 23 bytes", err), err
        assert "edge-vla train --data lerobot:" in err and "shorten" not in err, err
    assert not (tmp_path / "b").exists() and not (tmp_path / "s").exists()
    # With a teacher that takes the task, the model under test is still the one named.
    assert cli(["evaluate", str(short_model), "--data", src, "--teacher", str(long_model), "--samples", "4"]) == 1
    err = error_line(capsys.readouterr().err)
    assert f"checkpoint {short_model} takes instructions of at most 23 bytes" in err, err
