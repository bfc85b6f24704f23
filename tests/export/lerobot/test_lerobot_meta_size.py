"""LeRobot metadata files are read with a bound: a multi-GB (sparse) info.json, stats.json or episodes.jsonl was
read whole into memory before anything was checked. Now one line naming the file and the limit, at once."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from edge_vla.export.lerobot import LeRobotDatasetError, load_dataset

HUGE = 8 * 1024**3  # sparse: costs nothing on disk, 8 GiB to whoever reads it whole


def _read(root: Path) -> None:
    load_dataset(f"lerobot:{root}?val=0", 64, 1, 8, split="all")


@pytest.mark.parametrize(("layout", "rel"), [("v30", "meta/info.json"), ("v30", "meta/stats.json"),
                                             ("v21", "meta/info.json"), ("v21", "meta/episodes.jsonl"),
                                             ("v21", "meta/tasks.jsonl")])
def test_a_huge_metadata_file_is_refused_unread(layout: str, rel: str, request: pytest.FixtureRequest,
                                                tmp_path: Path) -> None:
    root = Path(shutil.copytree(request.getfixturevalue(layout), tmp_path / "ds"))
    with open(root / rel, "r+b") as f:
        f.truncate(HUGE)
    t0 = time.monotonic()
    with pytest.raises(LeRobotDatasetError) as err:
        _read(root)
    message = str(err.value)
    assert rel.split("/")[-1] in message and "too large" in message and "\n" not in message, message
    assert time.monotonic() - t0 < 30  # refused from its size, not after reading 8 GiB


def test_control_the_same_copies_read(v30: Path, v21: Path, tmp_path: Path) -> None:
    for source in (v30, v21):
        root = Path(shutil.copytree(source, tmp_path / source.name))
        assert os.path.getsize(root / "meta/info.json") < 1024**2
        _read(root)
