"""Non-finite recorded values are refused when the dataset is read, naming the episode, the frame, the feature
and the file: a NaN must neither train into a checkpoint of NaNs nor surface later as an unrelated error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from lerobot_data import FPS, error_line, make_small_recording

from edge_vla.cli import main
from edge_vla.export.lerobot import LeRobotDatasetError, load_dataset, write_dataset
from edge_vla.export.lerobot.layout import DEFAULT_DATA_PATH

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
TASKS = ("pick up the cube",) * 3
LENGTHS = (8, 6, 8)


def cli(argv: list[str]) -> int:
    threads = torch.get_num_threads()
    try:
        return main(argv)
    finally:
        torch.set_num_threads(threads)


def recording_with(feature: str, episode: int, frame: int, value: float, out: Path) -> Path:
    rec = make_small_recording(TASKS, LENGTHS)
    row = sum(LENGTHS[:episode]) + frame
    column = rec.states if feature == "observation.state" else rec.actions
    column[row, 1] = value
    # Two episodes per file: episode 2 lives in the second data file, so the file named must be the right one.
    return write_dataset(rec, out, fps=FPS, episodes_per_file=2)


@pytest.mark.parametrize(("feature", "episode", "frame", "value"), [
    ("observation.state", 1, 4, float("nan")),
    ("action", 2, 0, float("inf")),
])
def test_train_refuses_a_non_finite_recorded_value(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   feature: str, episode: int, frame: int, value: float) -> None:
    root = recording_with(feature, episode, frame, value, tmp_path / "ds")
    out = tmp_path / "ckpt"
    assert cli(["train", "--data", f"lerobot:{root}?val=0", "--steps", "2", "--batch-size", "4", "--threads", "1",
                "-o", str(out)]) == 1
    err = error_line(capsys.readouterr().err)
    file = root / DEFAULT_DATA_PATH.format(chunk_index=0, file_index=episode // 2)
    assert f"episode {episode}, frame {frame}" in err and f"{feature!r}" in err and str(file) in err, err
    assert ("nan" if np.isnan(value) else "inf") in err
    assert not out.exists()  # nothing trained, nothing written


def test_non_finite_statistics_are_refused(tmp_path: Path) -> None:
    root = write_dataset(make_small_recording(TASKS, LENGTHS), tmp_path / "ds", fps=FPS)
    load_dataset(f"lerobot:{root}?val=0", 64, 1, 8, split="all")  # control: the clean dataset reads
    stats = json.loads((root / "meta/stats.json").read_text())
    stats["observation.state"]["std"][2] = float("nan")
    (root / "meta/stats.json").write_text(json.dumps(stats))  # Python writes NaN; so do other JSON writers
    with pytest.raises(LeRobotDatasetError, match=r"meta/stats.json: the 'observation.state' statistic 'std' is "
                       r"not finite .*recompute"):
        load_dataset(f"lerobot:{root}?val=0", 64, 1, 8, split="all")
