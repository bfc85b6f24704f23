"""A LeRobot dataset's metadata is bytes from outside (downloaded, converted by another tool, hand-edited): a wrong
type, a broken path template, a damaged parquet or JSON file each give one LeRobotDatasetError naming the file and
what to do, never a traceback from deep inside the reader."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from lerobot_data import error_line

from edge_vla.export.lerobot import LeRobotDatasetError, load_dataset


def _info(**fields: Any) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        path = root / "meta/info.json"
        doc = json.loads(path.read_text())
        doc.update(fields)
        path.write_text(json.dumps(doc))
    return apply


def _feature(key: str, value: Any) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        path = root / "meta/info.json"
        doc = json.loads(path.read_text())
        doc["features"][key] = value
        path.write_text(json.dumps(doc))
    return apply


def _write(rel: str, data: bytes) -> Callable[[Path], None]:
    return lambda root: (root / rel).write_bytes(data)


def _truncate(rel: str) -> Callable[[Path], None]:
    return lambda root: (root / rel).write_bytes((root / rel).read_bytes()[:200])


DEEP = b"[" * 100_000 + b"]" * 100_000
V30 = {
    "info a list": (_write("meta/info.json", b"[1]"), "meta/info.json is not a JSON object"),
    "info nested": (_write("meta/info.json", DEEP), "nested too deeply"),
    "info not UTF-8": (_write("meta/info.json", b'{"fps": "\xff"}'), "utf-8"),
    "fps a string": (_info(fps="thirty"), "'fps' must be a positive number, got 'thirty'"),
    "fps zero": (_info(fps=0), "'fps' must be a positive number, got 0"),
    "features a list": (_info(features=[1]), "'features' must be a JSON object"),
    "feature a number": (_feature("observation.state", 5), "feature 'observation.state' must be a JSON object"),
    "shape a string": (_feature("observation.state", {"dtype": "float32", "shape": "3"}),
                       "feature 'observation.state' shape must be a list of positive whole numbers, got '3'"),
    "data_path a number": (_info(data_path=5), "'data_path' must be a string"),
    "data_path unknown field": (_info(data_path="data/{nope}.parquet"), "data_path 'data/{nope}.parquet'"),
    "video_path malformed": (_info(video_path="videos/{video_key"), "video_path 'videos/{video_key'"),
    "stats a list": (_write("meta/stats.json", b"[1]"), "meta/stats.json"),
    "stats not numbers": (_write("meta/stats.json", b'{"action": {"mean": "x"}}'), "meta/stats.json"),
    "tasks truncated": (_truncate("meta/tasks.parquet"), "meta/tasks.parquet is not a readable parquet file"),
    "episodes truncated": (_truncate("meta/episodes/chunk-000/file-000.parquet"),
                           "file-000.parquet is not a readable parquet file"),
    "data truncated": (_truncate("data/chunk-000/file-000.parquet"), "file-000.parquet is not a readable parquet file"),
}
V21 = {
    "chunks_size zero": (_info(chunks_size=0), "'chunks_size' must be a positive whole number, got 0"),
    "episode without index": (_write("meta/episodes.jsonl", b'{"length": 3}\n'),
                              "meta/episodes.jsonl line 1 lacks 'episode_index'"),
    "episode a list": (_write("meta/episodes.jsonl", b"[1]\n"), "meta/episodes.jsonl line 1 is not a JSON object"),
    "task without index": (_write("meta/tasks.jsonl", b'{"task": "x"}\n'),
                           "meta/tasks.jsonl line 1 lacks 'task_index'"),
    "episodes nested": (_write("meta/episodes.jsonl", DEEP + b"\n"), "nested too deeply"),
}


def _read(root: Path) -> None:
    load_dataset(f"lerobot:{root}?val=0", 64, 1, 8, split="all")


def _damaged(source: Path, tmp_path: Path, damage: Callable[[Path], None]) -> Path:
    root = Path(shutil.copytree(source, tmp_path / "ds"))
    damage(root)
    return root


@pytest.mark.parametrize("case", V30)
def test_damaged_v30_metadata_is_one_error(v30: Path, tmp_path: Path, case: str) -> None:
    damage, named = V30[case]
    with pytest.raises(LeRobotDatasetError) as err:
        _read(_damaged(v30, tmp_path, damage))
    assert named in str(err.value) and "\n" not in str(err.value), err.value


@pytest.mark.parametrize("case", V21)
def test_damaged_v21_metadata_is_one_error(v21: Path, tmp_path: Path, case: str) -> None:
    damage, named = V21[case]
    with pytest.raises(LeRobotDatasetError) as err:
        _read(_damaged(v21, tmp_path, damage))
    assert named in str(err.value) and "\n" not in str(err.value), err.value


def test_the_undamaged_copies_read(v30: Path, v21: Path, tmp_path: Path) -> None:
    """Control: the same copy-and-read path takes the datasets as written (the refusals are about the damage)."""
    for source in (v30, v21):
        _read(_damaged(source, tmp_path / source.name, lambda root: None))


def test_cli_train_names_the_field_in_one_line(v30: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edge_vla.cli import main

    root = _damaged(v30, tmp_path, _info(fps="thirty"))
    out = tmp_path / "run"
    assert main(["train", "--data", f"lerobot:{root}", "--train-steps", "1", "--threads", "1", "-o", str(out)]) == 1
    assert "'fps' must be a positive number" in error_line(capsys.readouterr().err)
    assert not out.exists()
