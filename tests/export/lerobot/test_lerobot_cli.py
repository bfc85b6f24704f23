"""The real-data path end to end through the CLI on tiny settings: train, export (INT8 calibrated on the
recording), open-loop evaluate against the teacher, distill offline, make-data in LeRobot's layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from lerobot_data import FPS

from edge_vla.bundle import Bundle
from edge_vla.cli import main
from edge_vla.export.checkpoint import load_checkpoint
from edge_vla.export.lerobot import load_dataset

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def trained(v30: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("lerobot_cli") / "ckpt"
    try:
        assert main(["train", "--data", f"lerobot:{v30}", "--steps", "4", "--batch-size", "8", "--threads", "1",
                     "-o", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def bundles(trained: Path, v21: Path) -> dict[str, Path]:
    fp32, int8 = trained.with_name("b_fp32"), trained.with_name("b_int8")
    assert main(["export", str(trained), "-o", str(fp32)]) == 0  # numerics on the training data by default
    assert main(["export", str(trained), "-o", str(int8), "--precision", "int8", "--calib", f"lerobot:{v21}",
                 "--calib-count", "8"]) == 0
    return {"fp32": fp32, "int8": int8}


def test_train_takes_sizes_and_statistics_from_the_dataset(trained: Path, v30: Path) -> None:
    model, meta = load_checkpoint(trained)
    assert (model.config.state_dim, model.config.action_dim) == (3, 4)
    stats = json.loads((v30 / "meta/stats.json").read_text())
    assert np.allclose(model.action_mean.numpy(), stats["action"]["mean"], atol=1e-6)
    assert np.allclose(model.state_std.numpy(), np.asarray(stats["observation.state"]["std"]) + 1e-6, atol=1e-6)
    assert meta["dataset"]["format"] == "lerobot" and meta["dataset"]["split"] == "train"
    assert len(meta["dataset"]["episodes"]) == 2 and len(meta["dataset"]["val_episodes"]) == 1


def test_export_carries_the_recordings_action_space(bundles: dict[str, Path], v21: Path) -> None:
    b = Bundle.open(bundles["int8"])
    space = b.action_space
    assert space.names == ("a0", "a1", "a2", "gripper") and space.action_period_s == pytest.approx(1 / FPS)
    prov = b.manifest["provenance"]
    assert prov["calibration"]["source"] == f"lerobot:{v21}" and prov["calibration"]["observations"] == 8
    assert prov["dataset"]["normalization"]["action"]["source"] == "meta/stats.json"
    assert "q01" in prov["dataset"]["normalization"]["action"]
    assert json.loads((bundles["fp32"] / "reports/numerics.json").read_text())["passed"]


def test_open_loop_check_against_recording_and_teacher(bundles: dict[str, Path], trained: Path, v30: Path,
                                                      tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = {}
    for precision, bundle in bundles.items():
        out = tmp_path / f"{precision}.json"
        assert main(["evaluate", str(bundle), "--data", f"lerobot:{v30}", "--teacher", str(trained),
                     "--samples", "12", "--json", str(out)]) == 0
        report = json.loads(out.read_text())
        rows[precision] = {p["name"]: p for p in report["pairs"]}
        assert report["samples"] == 12 and len(report["episodes"]) == 1
    printed = capsys.readouterr().out
    assert "model vs teacher" in printed and "per chunk step" in printed
    fp32, int8 = rows["fp32"], rows["int8"]
    # Same noise into bundle and teacher: the FP32 bundle matches its own checkpoint.
    assert fp32["model vs teacher"]["rmse_std"] < 1e-3
    assert 0 < fp32["model vs teacher"]["rmse_std"] < int8["model vs teacher"]["rmse_std"] < 0.5
    rec = int8["model vs recorded"]
    assert len(rec["rmse_per_dim"]) == 4 and len(rec["rmse_std_per_step"]) == 8
    assert rec["ci95"][0] <= rec["rmse_std"] <= rec["ci95"][1]
    assert fp32["teacher vs recorded"]["rmse_std"] == pytest.approx(int8["teacher vs recorded"]["rmse_std"])


def test_distill_offline_on_recorded_states(trained: Path, v21: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    threads = torch.get_num_threads()
    try:
        assert main(["distill", "--teacher", str(trained), "--data", f"lerobot:{v21}", "-o", str(tmp_path / "s"),
                     "--steps", "3", "--batch-size", "4", "--reflow-steps", "0", "--threads", "1",
                     "--device", "cpu"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert "DAgger needs the simulator" in capsys.readouterr().out
    student, meta = load_checkpoint(tmp_path / "s")
    assert (student.config.state_dim, student.config.action_dim) == (3, 4)
    assert meta["distill"]["dagger_rounds"] == 0 and meta["dataset"]["codebase_version"] == "v2.1"


def test_make_data_writes_lerobot_layout(tmp_path: Path) -> None:
    out = tmp_path / "sim_v21"
    assert main(["make-data", "--format", "lerobot", "--lerobot-version", "v2.1", "--episodes", "2",
                 "-o", str(out)]) == 0
    ds = load_dataset(f"lerobot:{out}", 64, 1, 8, split="all")
    assert ds.meta["codebase_version"] == "v2.1" and ds.meta["action_names"] == ["shoulder", "elbow"]
    assert len(set(ds.episodes.tolist())) == 2


def test_cli_reports_bad_data_as_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--data", f"lerobot:{tmp_path}", "--steps", "1"]) == 1
    assert "is not a LeRobot dataset: meta/info.json is missing" in capsys.readouterr().err
