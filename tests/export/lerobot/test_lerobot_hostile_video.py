"""Where an episode's frames are in its video comes from outside (meta/episodes: videos/*/from_timestamp,
to_timestamp, chunk/file indices; the data's timestamps). A value that is not a finite time, or a time far past
the video, must be one LeRobotDatasetError naming the file, never an OverflowError / ValueError / TypeError
traceback from the seek or the row parsing, and never silently ignored."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from edge_vla.export.lerobot import LeRobotDatasetError, load_dataset
from edge_vla.export.lerobot.layout import LEGACY_DATA_PATH

MAIN = "observation.images.main"
EPISODES = "meta/episodes/chunk-000/file-000.parquet"


def _read(root: Path) -> Any:
    return load_dataset(f"lerobot:{root}?val=0", 64, 1, 8, split="all")


def _episode_column(column: str, value: Any, dtype: Any = None) -> Callable[[Path], Path]:
    """Episode 0's `column` in meta/episodes set to `value` (the rest of the column kept)."""
    def apply(root: Path) -> Path:
        path = root / EPISODES
        table = pq.read_table(path)
        values = table[column].to_pylist()
        values[0] = value
        if isinstance(value, str):
            values = [value if i == 0 else str(v) for i, v in enumerate(values)]
        array = pa.array(values, dtype or (pa.string() if isinstance(value, str) else table[column].type))
        pq.write_table(table.set_column(table.schema.get_field_index(column), column, array), path)
        return path
    return apply


V30_META = {
    "from_timestamp NaN": (_episode_column(f"videos/{MAIN}/from_timestamp", float("nan")),
                           f"videos/{MAIN}/from_timestamp is nan"),
    "from_timestamp null": (_episode_column(f"videos/{MAIN}/from_timestamp", None),
                            f"videos/{MAIN}/from_timestamp is None"),
    "from_timestamp a string": (_episode_column(f"videos/{MAIN}/from_timestamp", "0.0x"),
                                f"videos/{MAIN}/from_timestamp is '0.0x'"),
    "to_timestamp NaN (disabled the segment check)": (_episode_column(f"videos/{MAIN}/to_timestamp", float("nan")),
                                                      f"videos/{MAIN}/to_timestamp is nan"),
    "to_timestamp Inf": (_episode_column(f"videos/{MAIN}/to_timestamp", float("inf")),
                         f"videos/{MAIN}/to_timestamp is inf"),
    "video chunk_index null": (_episode_column(f"videos/{MAIN}/chunk_index", None),
                               f"videos/{MAIN}/chunk_index is None"),
    "data file_index a string": (_episode_column("data/file_index", "x"), "data/file_index is 'x'"),
}


@pytest.mark.parametrize("case", V30_META)
def test_a_bad_segment_in_the_episode_metadata_is_one_error_naming_the_file(v30: Path, tmp_path: Path,
                                                                            case: str) -> None:
    damage, named = V30_META[case]
    root = Path(shutil.copytree(v30, tmp_path / "ds"))
    path = damage(root)
    with pytest.raises(LeRobotDatasetError) as err:
        _read(root)
    msg = str(err.value)
    assert f"{path} row 0 (episode 0)" in msg and named in msg and len(msg.splitlines()) == 1, msg


def test_a_segment_starting_past_the_end_of_its_video_is_named(v30: Path, tmp_path: Path) -> None:
    """from_timestamp 1e30 (finite): the seek to it overflowed a C long, an OverflowError traceback."""
    root = Path(shutil.copytree(v30, tmp_path / "ds"))
    _episode_column(f"videos/{MAIN}/from_timestamp", 1e30)(root)
    _episode_column(f"videos/{MAIN}/to_timestamp", 1e30 + 1)(root)
    with pytest.raises(LeRobotDatasetError) as err:
        _read(root)
    msg = str(err.value)
    assert f"episode 0, camera '{MAIN}': frames are wanted from 1e+30 s but " in msg, msg
    assert "chunk-000/file-000.mp4 holds 1.4333 s of video" in msg and len(msg.splitlines()) == 1, msg


def test_data_timestamps_far_past_the_video_are_named(v21: Path, tmp_path: Path) -> None:
    """v2.1 has no segment end to check against: a finite timestamp of 1e30 s in the data reached the seek."""
    root = Path(shutil.copytree(v21, tmp_path / "ds"))
    path = root / LEGACY_DATA_PATH.format(episode_chunk=0, episode_index=0)
    table = pq.read_table(path)
    ts = np.asarray(table["timestamp"]).copy()
    ts[:] = 1e30
    pq.write_table(table.set_column(table.schema.get_field_index("timestamp"), "timestamp",
                                    pa.array(ts.astype(np.float32))), path)
    with pytest.raises(LeRobotDatasetError) as err:
        _read(root)
    msg = str(err.value)
    assert f"episode 0, camera '{MAIN}': frames are wanted from 1e+30 s but " in msg, msg
    assert "episode_000000.mp4 holds 0.8333 s of video" in msg and len(msg.splitlines()) == 1, msg


def test_control_the_undamaged_copies_read(v30: Path, v21: Path, tmp_path: Path) -> None:
    """The same copies, undamaged, read every frame (74 over three episodes): the refusals above are the damage."""
    for name, source in (("v30", v30), ("v21", v21)):
        ds = _read(Path(shutil.copytree(source, tmp_path / name)))
        assert ds.images.shape == (74, 1, 64, 64, 3)
