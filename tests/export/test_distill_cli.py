"""`edge-vla distill` then `edge-vla compare`, end to end on a micro teacher (seconds, not quality)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from edge_vla.config import preset
from edge_vla.export import compare_cli, distill_cli
from edge_vla.export.checkpoint import load_checkpoint, save_checkpoint
from edge_vla.export.model import VLA
from edge_vla.sim import dataset


def parse(module, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.configure(parser)
    return parser.parse_args(argv)


def test_distill_then_compare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    # 64 px like the tiny student, but a much smaller trunk than the real teacher.
    teacher = VLA(preset("small", patch_size=16, width=32, depth=1, heads=2, expert_width=32, expert_depth=1,
                         expert_heads=2, mlp_ratio=2))
    save_checkpoint(teacher, tmp_path / "teacher")
    dataset.save(dataset.generate(range(2), image_size=64), tmp_path / "reach.npz")
    try:
        rc = distill_cli.main(parse(distill_cli, [
            "--teacher", str(tmp_path / "teacher"), "--student-preset", "tiny", "-o", str(tmp_path / "student"),
            "--data", str(tmp_path / "reach.npz"), "--max-obs", "12", "--steps", "3", "--batch-size", "4",
            "--dagger-episodes", "1", "--reflow-steps", "2", "--fast-steps", "2", "--threads", "1",
            "--device", "cpu"]))
        assert rc == 0
        fast, meta = load_checkpoint(tmp_path / "student")
        assert fast.config.preset == "tiny" and fast.config.num_steps == 2 and meta["stage"] == "reflow"
        assert torch.equal(fast.action_std, teacher.action_std)  # the teacher's action space is kept
        rc = compare_cli.main(parse(compare_cli, [
            "--teacher", str(tmp_path / "teacher"), "--student", str(tmp_path / "student_kd"),
            "--fast-student", str(tmp_path / "student"), "--episodes", "1", "--error-obs", "4",
            "-o", str(tmp_path / "table.md"), "--json", str(tmp_path / "rows.json")]))
        assert rc == 0
    finally:
        torch.set_num_threads(threads)
    table = (tmp_path / "table.md").read_text()
    assert "| teacher small (10 steps) |" in table and "reflow (1 step)" in table and "INT8" in table
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert rows[0]["rmse"] == 0.0 and rows[1]["flops"] > rows[3]["flops"] > rows[4]["flops"] > 0  # 10 > 2 > 1 steps
    assert "| model |" in capsys.readouterr().out


def test_divergent_distillation_stops_without_writing_a_student(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A learning rate far too high: distillation stops at the first non-finite loss or gradient, naming the
    stage, the step and the batch, and no student checkpoint (nor its _kd copy) is written."""
    import re

    from edge_vla.cli import main

    threads = torch.get_num_threads()
    torch.manual_seed(0)
    save_checkpoint(VLA(preset("tiny")), tmp_path / "teacher")
    dataset.save(dataset.generate(range(1), image_size=64), tmp_path / "reach.npz")
    try:
        rc = main(["distill", "--teacher", str(tmp_path / "teacher"), "-o", str(tmp_path / "student"),
                   "--data", str(tmp_path / "reach.npz"), "--max-obs", "12", "--steps", "6", "--batch-size", "4",
                   "--lr", "1e10", "--dagger-rounds", "0", "--reflow-steps", "2", "--threads", "1",
                   "--device", "cpu"])
    finally:
        torch.set_num_threads(threads)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    err = lines[-1]  # progress bars go to stderr before the error, which must be one line
    assert rc == 1 and [line for line in lines if ": error: " in line] == [err], lines
    assert re.search(r"distillation \(distill\) stopped at step \d+ of 6: the (loss|gradient norm) is (nan|inf)",
                     err), err
    assert re.search(r"batch of 4 observations \[[\d, ]+\]", err), err
    assert not (tmp_path / "student").exists() and not (tmp_path / "student_kd").exists()


def test_distill_takes_a_list_of_datasets_as_train_does(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--data A.npz,B.npz` (demonstrations and DAgger rounds) labels the observations of both; a missing name in
    the list is refused before any file is read."""
    from edge_vla.cli import main

    threads = torch.get_num_threads()
    torch.manual_seed(0)
    save_checkpoint(VLA(preset("tiny")), tmp_path / "teacher")
    dataset.save(dataset.generate(range(1), image_size=64), tmp_path / "a.npz")
    dataset.save(dataset.generate(range(1, 2), image_size=64), tmp_path / "b.npz")
    sizes = [len(dataset.load(tmp_path / f).states) for f in ("a.npz", "b.npz")]
    common = ["distill", "--teacher", str(tmp_path / "teacher"), "--train-steps", "1", "--batch-size", "4",
              "--dagger-rounds", "0", "--reflow-steps", "0", "--threads", "1", "--device", "cpu"]
    try:
        assert main([*common, "-o", str(tmp_path / "s"), "--data", f"{tmp_path / 'a.npz'},{tmp_path / 'b.npz'}"]) == 0
        capsys.readouterr()
        assert main([*common, "-o", str(tmp_path / "s2"), "--data", f"{tmp_path / 'a.npz'},{tmp_path / 'nope.npz'}"]) == 1
        assert "nope.npz does not exist" in capsys.readouterr().err
    finally:
        torch.set_num_threads(threads)
    _, meta = load_checkpoint(tmp_path / "s")
    assert meta["distill"]["observations"] == sum(sizes), meta["distill"]
    assert not (tmp_path / "s2").exists()


def test_a_metaworld_teacher_distills_on_metaworld_data(tmp_path: Path, one_torch_thread) -> None:
    """MetaWorld data names 6 goal coordinates (object and goal positions) where the sim names 2: the student's goal
    head is sized from the data, as `edge-vla train` does (it crashed on a tensor size mismatch, 2 against 6)."""
    import importlib.util

    if importlib.util.find_spec("metaworld") is None:  # importing metaworld imports mujoco: MUJOCO_GL first
        pytest.skip("pip install 'edge-vla[metaworld]'")
    from edge_vla.cli import main
    from edge_vla.export import assets
    from edge_vla.sim import metaworld

    spec = metaworld.MetaWorldSpec.parse("metaworld:reach-v3?cameras=front,gripperPOV")
    ds = metaworld.generate(spec, range(1), 64, 2, frame_every=20)
    assert ds.goals is not None and ds.goals.shape[1] == 6
    dataset.save(ds, tmp_path / "mw.npz")
    rc = main(["distill", "--teacher", str(assets.shipped_checkpoint("tiny-mt10")), "--student-preset", "tiny",
               "-o", str(tmp_path / "s"), "--data", str(tmp_path / "mw.npz"), "--max-obs", "8", "--train-steps", "1",
               "--batch-size", "4", "--dagger-rounds", "0", "--reflow-steps", "0", "--threads", "1", "--device", "cpu"])
    assert rc == 0
    student, _ = load_checkpoint(tmp_path / "s")
    assert student.config.goal_dim == 6 and student.config.num_cameras == 2
