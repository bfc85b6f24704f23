"""Write demonstrations in LeRobot's layout (v3.0, or v2.1), so sim data and recorded data take one path.

The layout and the field names follow LeRobot's own writer (dataset_writer.py, dataset_metadata.py,
io_utils.py); per-frame `action` is the label at that frame (for the sim: the expert's first planned
action), and chunks are cut from consecutive frames by the reader, exactly as for recorded data.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from edge_vla.bundle import swap_in_dir
from edge_vla.optional import require
from edge_vla.sim.dataset import Dataset

from .errors import LeRobotDatasetError
from .layout import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_DATA_PATH,
    DEFAULT_EPISODES_PATH,
    DEFAULT_FEATURES,
    DEFAULT_VIDEO_PATH,
    INFO_PATH,
    LEGACY_DATA_PATH,
    LEGACY_EPISODES_PATH,
    LEGACY_EPISODES_STATS_PATH,
    LEGACY_TASKS_PATH,
    LEGACY_VIDEO_PATH,
    QUANTILES,
    STATS_PATH,
    TASKS_PATH,
)
from .video import VideoWriter, video_info

VERSIONS = ("v3.0", "v2.1")
STATE_KEY, ACTION_KEY = "observation.state", "action"


def camera_key(i: int) -> str:
    return "observation.images." + (["main", "wrist"][i] if i < 2 else f"cam{i}")


def write_dataset(ds: Dataset, out: str | Path, fps: int | None = None, version: str = "v3.0",
                  encoder: str = "h264-lossless", episodes_per_file: int = 50, robot_type: str = "edge-vla-sim",
                  state_names: list[str] | None = None, action_names: list[str] | None = None,
                  overwrite: bool = False) -> Path:
    """Write `ds` as a LeRobot dataset at `out`, atomically (staging dir + rename).

    `ds` holds frames in episode order: images uint8 [N, cameras, H, W, 3] (H and W even for H.264), states
    [N, Ds], actions [N, Da] or chunks [N, H, Da] (then each frame's action is its chunk's first), episodes [N]."""
    if version not in VERSIONS:
        raise LeRobotDatasetError(f"unknown LeRobot version {version!r}; choose one of {VERSIONS}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise LeRobotDatasetError(f"{out} exists and is not empty; choose another -o or pass overwrite")
    if fps is None:
        period = float(ds.meta.get("action_period_s", 0.1))
        fps = round(1.0 / period)
        if abs(fps * period - 1.0) > 1e-6:
            raise LeRobotDatasetError(f"action period {period} s is not 1/integer fps; pass fps explicitly")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _write(ds, staging, fps, version, encoder, max(1, episodes_per_file), robot_type, state_names, action_names)
        swap_in_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _write(ds: Dataset, root: Path, fps: int, version: str, encoder: str, per_file: int, robot_type: str,
           state_names: list[str] | None, action_names: list[str] | None) -> None:
    pa = require("pyarrow")
    pq = require("pyarrow.parquet")
    n, cams, height, width = ds.images.shape[:4]
    sdim, adim = ds.states.shape[1], ds.actions.shape[-1]
    actions = ds.actions[:, 0] if ds.actions.ndim == 3 else ds.actions
    # Episodes are contiguous runs of frames, renumbered 0..E-1 in order as LeRobot requires.
    cuts = [0, *(np.flatnonzero(np.diff(ds.episodes) != 0) + 1).tolist(), n]
    bounds = list(pairwise(cuts))
    tasks: dict[str, int] = {}
    for s in ds.instructions:
        tasks.setdefault(str(s), len(tasks))
    cam_keys = [camera_key(c) for c in range(cams)]
    features: dict[str, Any] = {
        key: {"dtype": "video", "shape": [height, width, 3], "names": ["height", "width", "channels"]} for key in cam_keys}
    features[STATE_KEY] = {"dtype": "float32", "shape": [sdim], "names": state_names or [f"q{i}" for i in range(sdim)]}
    features[ACTION_KEY] = {"dtype": "float32", "shape": [adim], "names": action_names or [f"q{i}" for i in range(adim)]}
    features.update(DEFAULT_FEATURES)
    frame_cols: list[dict[str, np.ndarray]] = []
    for e, (a, b) in enumerate(bounds):
        frame_cols.append({
            STATE_KEY: ds.states[a:b].astype(np.float32), ACTION_KEY: actions[a:b].astype(np.float32),
            "timestamp": (np.arange(b - a) / fps).astype(np.float32), "frame_index": np.arange(b - a, dtype=np.int64),
            "episode_index": np.full(b - a, e, dtype=np.int64), "index": np.arange(a, b, dtype=np.int64),
            "task_index": np.array([tasks[str(s)] for s in ds.instructions[a:b]], dtype=np.int64)})
    ep_stats = [_episode_stats(cols, ds.images[a:b], cam_keys) for cols, (a, b) in zip(frame_cols, bounds)]

    def table(cols: list[dict[str, np.ndarray]]) -> Any:
        merged = {k: np.concatenate([c[k] for c in cols]) for k in cols[0]}
        arrays = {}
        for k, v in merged.items():
            if v.ndim == 2:  # fixed-size lists, as datasets.Sequence(length=D) stores them
                arrays[k] = pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), v.shape[1])
            else:
                arrays[k] = pa.array(v)
        return pa.table(arrays)

    episodes_meta: list[dict[str, Any]] = []
    if version == "v3.0":
        groups = [list(range(i, min(i + per_file, len(bounds)))) for i in range(0, len(bounds), per_file)]
        frame_base = 0
        for g, eps in enumerate(groups):
            chunk, file = divmod(g, DEFAULT_CHUNK_SIZE)
            path = root / DEFAULT_DATA_PATH.format(chunk_index=chunk, file_index=file)
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table([frame_cols[e] for e in eps]), path)
            spans: dict[str, list[tuple[float, float]]] = {}
            for c, key in enumerate(cam_keys):
                writer = VideoWriter(root / DEFAULT_VIDEO_PATH.format(video_key=key, chunk_index=chunk, file_index=file),
                                     fps, width, height, encoder)
                try:
                    spans[key] = [writer.append(ds.images[bounds[e][0]:bounds[e][1], c]) for e in eps]
                finally:
                    writer.close()
            for j, e in enumerate(eps):
                length = bounds[e][1] - bounds[e][0]
                row: dict[str, Any] = {"episode_index": e, "tasks": sorted({str(s) for s in ds.instructions[bounds[e][0]:bounds[e][1]]}),
                                       "length": length, "data/chunk_index": chunk, "data/file_index": file,
                                       "dataset_from_index": frame_base, "dataset_to_index": frame_base + length}
                for key in cam_keys:
                    row |= {f"videos/{key}/chunk_index": chunk, f"videos/{key}/file_index": file,
                            f"videos/{key}/from_timestamp": spans[key][j][0], f"videos/{key}/to_timestamp": spans[key][j][1]}
                row |= {"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0}
                row |= {f"stats/{feat}/{stat}": np.asarray(v).reshape(-1).tolist()
                        for feat, st in ep_stats[e].items() for stat, v in st.items()}
                episodes_meta.append(row)
                frame_base += length
        path = root / DEFAULT_EPISODES_PATH.format(chunk_index=0, file_index=0)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(episodes_meta), path)
        _write_tasks_parquet(root / TASKS_PATH, tasks)
        data_path, video_path = DEFAULT_DATA_PATH, DEFAULT_VIDEO_PATH
    else:
        for e, (a, b) in enumerate(bounds):
            chunk = e // DEFAULT_CHUNK_SIZE
            path = root / LEGACY_DATA_PATH.format(episode_chunk=chunk, episode_index=e)
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table([frame_cols[e]]), path)
            for c, key in enumerate(cam_keys):
                writer = VideoWriter(root / LEGACY_VIDEO_PATH.format(episode_chunk=chunk, video_key=key, episode_index=e),
                                     fps, width, height, encoder)
                try:
                    writer.append(ds.images[a:b, c])
                finally:
                    writer.close()
            episodes_meta.append({"episode_index": e, "tasks": sorted({str(s) for s in ds.instructions[a:b]}),
                                  "length": b - a})
        _write_jsonl(root / LEGACY_EPISODES_PATH, episodes_meta)
        _write_jsonl(root / LEGACY_TASKS_PATH, [{"task_index": i, "task": t} for t, i in tasks.items()])
        _write_jsonl(root / LEGACY_EPISODES_STATS_PATH,
                     [{"episode_index": e, "stats": _jsonable(s)} for e, s in enumerate(ep_stats)])
        data_path, video_path = LEGACY_DATA_PATH, LEGACY_VIDEO_PATH
    first_video = {key: (root / (video_path.format(video_key=key, chunk_index=0, file_index=0) if version == "v3.0"
                                 else video_path.format(episode_chunk=0, video_key=key, episode_index=0)))
                   for key in cam_keys}
    for key in cam_keys:
        features[key]["info"] = video_info(first_video[key])
    info: dict[str, Any] = {
        "codebase_version": version, "robot_type": robot_type, "total_episodes": len(bounds), "total_frames": n,
        "total_tasks": len(tasks), "chunks_size": DEFAULT_CHUNK_SIZE, "fps": fps,
        "splits": {"train": f"0:{len(bounds)}"}, "data_path": data_path, "video_path": video_path, "features": features,
    }
    if version == "v3.0":
        info |= {"data_files_size_in_mb": 100, "video_files_size_in_mb": 200}
        _write_json(root / STATS_PATH, _jsonable(_dataset_stats(frame_cols, ds.images, cam_keys)))
    else:
        info |= {"total_chunks": (len(bounds) - 1) // DEFAULT_CHUNK_SIZE + 1, "total_videos": len(bounds) * cams}
    _write_json(root / INFO_PATH, info)


def _vector_stats(x: np.ndarray) -> dict[str, np.ndarray]:
    x = x.astype(np.float64).reshape(len(x), -1)
    out = {"min": x.min(0), "max": x.max(0), "mean": x.mean(0), "std": x.std(0), "count": np.array([len(x)])}
    return out | {q: np.quantile(x, p, axis=0) for q, p in QUANTILES.items()}


def _image_stats(images: np.ndarray) -> dict[str, np.ndarray]:
    """Per channel in [0, 1], shaped [3, 1, 1] as compute_stats.compute_episode_stats writes them."""
    px = images.reshape(-1, 3).astype(np.float64) / 255.0
    s = _vector_stats(px)
    return {k: (v if k == "count" else v.reshape(3, 1, 1)) for k, v in s.items()} | {"count": np.array([len(images)])}


def _episode_stats(cols: dict[str, np.ndarray], images: np.ndarray, cam_keys: list[str]) -> dict[str, dict]:
    stats = {k: _vector_stats(v) for k, v in cols.items()}
    stats |= {key: _image_stats(images[:, c]) for c, key in enumerate(cam_keys)}
    return stats


def _dataset_stats(frame_cols: list[dict[str, np.ndarray]], images: np.ndarray, cam_keys: list[str]) -> dict:
    merged = {k: np.concatenate([c[k] for c in frame_cols]) for k in frame_cols[0]}
    return _episode_stats(merged, images, cam_keys)


def _jsonable(stats: dict[str, dict[str, np.ndarray]]) -> dict:
    return {k: {s: np.asarray(v).tolist() for s, v in d.items()} for k, d in stats.items()}


def _write_tasks_parquet(path: Path, tasks: dict[str, int]) -> None:
    """A task table pandas reads back indexed by the task string (LeRobot's io_utils.load_tasks expects that):
    the frame's index is stored as column "task" and named in the schema's pandas metadata."""
    pa = require("pyarrow")
    pq = require("pyarrow.parquet")
    pandas_meta = {
        "index_columns": ["task"], "column_indexes": [{"name": None, "field_name": None, "pandas_type": "unicode",
                                                       "numpy_type": "object", "metadata": {"encoding": "UTF-8"}}],
        "columns": [{"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64",
                     "metadata": None},
                    {"name": "task", "field_name": "task", "pandas_type": "unicode", "numpy_type": "object",
                     "metadata": None}],
        "creator": {"library": "pyarrow", "version": pa.__version__}, "pandas_version": "2.2.3"}
    t = pa.table({"task_index": pa.array(list(tasks.values()), pa.int64()), "task": pa.array(list(tasks), pa.string())})
    t = t.replace_schema_metadata({b"pandas": json.dumps(pandas_meta).encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(t, path)


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=4) + "\n")


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
