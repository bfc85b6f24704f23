"""`edge-vla train --resume` against an output directory that is not the run the command describes.

--resume trusts what it finds in -o: a checkpoint without training state, one of another preset, a corrupt
train_state.json or optimizer file, or one already at --train-steps. Each is refused in one line that names the
problem and what to do, before any training, and the checkpoint there is left byte for byte as it was."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from edge_vla.cli import main
from edge_vla.sim import dataset

BATCH = ["--batch-size", "4", "--checkpoint-every", "2", "--threads", "1"]
STEPS = ["--train-steps", "4", *BATCH]


def _cli(argv: list[str]) -> int:
    threads = torch.get_num_threads()
    try:
        return main(["-q", *argv])
    finally:
        torch.set_num_threads(threads)


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and ": error: " in lines[0], err  # one line, no traceback, no progress
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 2-step tiny run (with its training state) and the data it was trained on."""
    root = tmp_path_factory.mktemp("resume")
    data = root / "reach.npz"
    dataset.save(dataset.generate(range(2)), data)
    run = root / "run"
    assert _cli(["train", "--data", str(data), "--train-steps", "2", *BATCH, "-o", str(run)]) == 0
    return run, data


@pytest.fixture
def run(trained: tuple[Path, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained[0], tmp_path / "run"))


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def _resume(run: Path, data: Path, *extra: str) -> int:
    return _cli(["train", "--data", str(data), *STEPS, "-o", str(run), "--resume", *extra])


def test_a_good_run_resumes(run: Path, trained: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """Control: the same command with an intact run continues it to --train-steps."""
    assert _resume(run, trained[1]) == 0, capsys.readouterr().err
    assert json.loads((run / "train_state.json").read_text())["step"] == 4


def test_a_checkpoint_without_training_state_is_not_replaced_by_a_fresh_run(
        run: Path, trained: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """A checkpoint with weights only (a shipped asset, a distilled student, one copied without its optimizer):
    --resume used to start a fresh model from step 0 and write it over these weights at its first checkpoint."""
    (run / "train_state.json").unlink()
    (run / "optimizer.safetensors").unlink()
    before = _files(run)
    assert _resume(run, trained[1]) == 1
    err = _error_line(capsys.readouterr().err)
    assert "no training state" in err and f"--init {run}" in err, err
    assert _files(run) == before


def test_resuming_a_directory_with_no_checkpoint_is_refused(trained: tuple[Path, Path], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """A mistyped -o with --resume silently started a new training there."""
    assert _resume(tmp_path / "typo", trained[1]) == 1
    err = _error_line(capsys.readouterr().err)
    assert "no checkpoint to resume" in err and "drop --resume" in err, err
    assert not (tmp_path / "typo").exists()


@pytest.mark.parametrize(("flags", "named"), [
    (["--preset", "small"], "preset 'tiny' vs 'small'"),
    (["--set", "width=64", "--set", "heads=2"], "width 128 vs 64"),
])
def test_a_different_model_is_refused_not_ignored(run: Path, trained: tuple[Path, Path], flags: list[str],
                                                  named: str, capsys: pytest.CaptureFixture[str]) -> None:
    """--preset/--set that disagree with the run in -o used to be ignored without a word."""
    before = _files(run)
    assert _resume(run, trained[1], *flags) == 1
    err = _error_line(capsys.readouterr().err)
    assert named in err and "--resume" in err, err
    assert _files(run) == before


def test_a_run_already_at_its_steps_says_so(run: Path, trained: tuple[Path, Path],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """`--resume` without raising --train-steps trained nothing and still printed "checkpoint written"."""
    before = _files(run)
    assert _cli(["train", "--data", str(trained[1]), "--train-steps", "2", *BATCH, "-o", str(run),
                 "--resume"]) == 1
    err = _error_line(capsys.readouterr().err)
    assert "already at step 2" in err and "--train-steps" in err, err
    assert _files(run) == before


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


def _drop_moment(path: Path) -> None:
    tensors = load_file(path)
    del tensors["action_out.weight.exp_avg_sq"]  # a parameter with some of its moments: a partial file
    save_file(tensors, path)


def _wrong_shape(path: Path) -> None:
    tensors = load_file(path)
    tensors["action_out.weight.exp_avg"] = torch.zeros(3, 3)
    save_file(tensors, path)


def _state(doc: object) -> Callable[[Path], None]:
    return lambda path: path.write_text(json.dumps(doc))


@pytest.mark.parametrize(("name", "damage", "named"), [
    ("train_state.json", lambda p: p.write_text("{"), "not valid JSON"),
    ("train_state.json", lambda p: p.write_text("[" * 100_000 + "]" * 100_000), "not valid JSON"),
    ("train_state.json", _state([2]), "not a JSON object"),
    ("train_state.json", _state({"step": 2}), "torch_rng"),
    ("train_state.json", _state({"step": "2", "torch_rng": []}), "step"),
    ("train_state.json", _state({"step": 2, "torch_rng": [1, 2, 3]}), "torch_rng"),
    ("optimizer.safetensors", _truncate, "not a readable safetensors file"),
    ("optimizer.safetensors", _drop_moment, "action_out.weight.exp_avg_sq missing"),
    ("optimizer.safetensors", _wrong_shape, "action_out.weight.exp_avg"),
])
def test_damaged_training_state_is_one_line(run: Path, trained: tuple[Path, Path], name: str,
                                            damage: Callable[[Path], None], named: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    damage(run / name)
    before = _files(run)
    assert _resume(run, trained[1]) == 1
    err = _error_line(capsys.readouterr().err)
    assert name in err and named in err and "--init" in err, err
    assert _files(run) == before
