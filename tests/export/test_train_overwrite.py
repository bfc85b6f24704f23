"""`edge-vla train -o DIR` (and `distill -o DIR`) where DIR already holds a checkpoint.

A training into a directory that holds one used to replace it without a word: a mistyped -o (or a second run with
the default -o) cost the hours the first run took. Now the command refuses in one line, before any work, naming the
two ways on: --resume to continue that run, --overwrite to start a new training over it (as Hugging Face's
Trainer asks for overwrite_output_dir). The train cases run the real `edge-vla` console command in its own process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edge_vla.cli import main
from edge_vla.config import preset
from edge_vla.export.checkpoint import save_checkpoint
from edge_vla.export.model import VLA
from edge_vla.sim import dataset

EDGE_VLA = str(Path(sys.executable).parent / "edge-vla")
TINY_RUN = ["--train-steps", "2", "--batch-size", "4", "--threads", "1", "--checkpoint-every", "2"]


def _edge_vla(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.run([EDGE_VLA, "-q", *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and ": error: " in lines[0], err  # one line, no traceback, no progress
    return lines[0]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-step tiny training into a fresh directory (two layouts: the smallest data the train tests use)."""
    work = tmp_path_factory.mktemp("overwrite")
    dataset.save(dataset.generate(range(2)), work / "reach.npz")
    done = _edge_vla("train", "--data", "reach.npz", "-o", "run", *TINY_RUN, cwd=work)
    assert done.returncode == 0, done.stderr
    assert json.loads((work / "run" / "train_state.json").read_text())["step"] == 2
    return work


def test_training_again_into_a_checkpoint_is_refused_and_leaves_it_byte_for_byte(first_run: Path) -> None:
    before = _files(first_run / "run")
    again = _edge_vla("train", "--data", "reach.npz", "-o", "run", *TINY_RUN, "--seed", "1", cwd=first_run)
    assert again.returncode == 1, again.stdout + again.stderr
    err = _one_error_line(again.stderr)
    assert "run already holds a checkpoint" in err and "--resume" in err and "--overwrite" in err, err
    assert _files(first_run / "run") == before


def test_resume_and_overwrite_together_are_refused(first_run: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(first_run)
    before = _files(first_run / "run")
    assert main(["train", "--data", "reach.npz", "-o", "run", *TINY_RUN, "--resume", "--overwrite"]) == 1
    err = _one_error_line(capsys.readouterr().err)
    assert "--resume" in err and "--overwrite" in err and "give one" in err, err
    assert _files(first_run / "run") == before


def test_control_overwrite_trains_a_new_run_over_it(first_run: Path, tmp_path: Path) -> None:
    """--overwrite is applied, not ignored: a new training (another seed) replaces the weights."""
    run = tmp_path / "run"
    run.mkdir()
    for name, data in _files(first_run / "run").items():
        (run / name).write_bytes(data)
    old_weights = (run / "model.safetensors").read_bytes()
    again = _edge_vla("train", "--data", str(first_run / "reach.npz"), "-o", "run", *TINY_RUN, "--seed", "1",
                      "--overwrite", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert (run / "model.safetensors").read_bytes() != old_weights
    assert json.loads((run / "train_state.json").read_text())["step"] == 2


def _weights_only(path: Path) -> Path:
    """A checkpoint without training state: a shipped asset, a distilled student."""
    return save_checkpoint(VLA(preset("tiny")), path)


def test_pi0_family_is_refused_too_before_any_data_is_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """--family pi0 writes its step-0 weights straight into -o: without the check they replaced the old ones
    before the first step. The refusal comes before the default dataset is generated."""
    monkeypatch.chdir(tmp_path)
    run = _weights_only(tmp_path / "pi0")
    before = _files(run)
    assert main(["train", "--family", "pi0", "-o", "pi0", *TINY_RUN, "--episodes", "1"]) == 1
    err = _one_error_line(capsys.readouterr().err)
    assert "pi0 already holds a checkpoint" in err and "--overwrite" in err, err
    assert _files(run) == before and not (tmp_path / "runs").exists()


def test_pi0_resume_without_training_state_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """π0 --resume with no train_state.json used to start a fresh model over the weights in -o."""
    monkeypatch.chdir(tmp_path)
    run = _weights_only(tmp_path / "pi0")
    before = _files(run)
    assert main(["train", "--family", "pi0", "-o", "pi0", *TINY_RUN, "--episodes", "1", "--resume"]) == 1
    err = _one_error_line(capsys.readouterr().err)
    assert "no training state" in err and "--overwrite" in err, err
    assert _files(run) == before and not (tmp_path / "runs").exists()


DISTILL = ["distill", "--student-preset", "tiny", "--train-steps", "1", "--batch-size", "4", "--dagger-rounds", "0",
           "--reflow-steps", "0", "--threads", "1", "--device", "cpu"]


def test_distill_into_a_checkpoint_is_refused_then_overwrite_replaces_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    teacher = _weights_only(tmp_path / "teacher")
    dataset.save(dataset.generate(range(1)), tmp_path / "reach.npz")
    student = _weights_only(tmp_path / "student")
    before = _files(student)
    argv = [*DISTILL, "--teacher", str(teacher), "--data", str(tmp_path / "reach.npz"), "-o", str(student)]
    threads = torch.get_num_threads()
    try:
        assert main(argv) == 1
        err = _one_error_line(capsys.readouterr().err)
        assert "student already holds a checkpoint" in err and "--overwrite" in err, err
        assert _files(student) == before
        assert main([*argv, "--overwrite"]) == 0, capsys.readouterr().err  # control: applied, not ignored
    finally:
        torch.set_num_threads(threads)
    assert _files(student)["model.safetensors"] != before["model.safetensors"]


def test_pi0_init_is_refused_not_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """--family pi0 never read --init: the "fine-tuned" π0 started from random weights."""
    monkeypatch.chdir(tmp_path)
    init = _weights_only(tmp_path / "init")
    assert main(["train", "--family", "pi0", "-o", "pi0", *TINY_RUN, "--episodes", "1", "--init", str(init)]) == 1
    err = _one_error_line(capsys.readouterr().err)
    assert "--init" in err and "--family pi0" in err, err
    assert not (tmp_path / "pi0").exists()
