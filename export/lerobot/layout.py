"""LeRobot's on-disk layout, v3.0 and v2.1, read into one `DatasetMeta`.

Verified against huggingface/lerobot (src/lerobot/datasets/utils.py, io_utils.py, dataset_metadata.py,
dataset_writer.py, dataset_reader.py, video_utils.py, compute_stats.py, utils/constants.py and
scripts/convert_dataset_v21_to_v30.py; v2.1 templates from lerobot/common/datasets/utils.py at the
v2.1 release). LeRobot itself is not a dependency (it needs Python >= 3.12 and its own torch).

v3.0: meta/info.json, meta/stats.json, meta/tasks.parquet (index "task", column "task_index"),
      meta/episodes/chunk-XXX/file-XXX.parquet (one row per episode: length, tasks, data/chunk_index,
      data/file_index, dataset_from_index/to_index, videos/<key>/{chunk_index,file_index,from_timestamp,
      to_timestamp}, stats/<feature>/<stat>), data/chunk-XXX/file-XXX.parquet (one row per frame, several
      episodes per file), videos/<key>/chunk-XXX/file-XXX.mp4 (several episodes per file, one after the
      other: an episode's frame at `timestamp` is at from_timestamp + timestamp in the file).
v2.1: data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet,
      videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4 (one file per episode,
      starting at t = 0), meta/episodes.jsonl, meta/tasks.jsonl, meta/episodes_stats.jsonl
      (episode_chunk = episode_index // chunks_size).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_vla.files import read_bounded
from edge_vla.optional import require

from .errors import LeRobotDatasetError

INFO_PATH = "meta/info.json"
STATS_PATH = "meta/stats.json"
TASKS_PATH = "meta/tasks.parquet"
EPISODES_DIR = "meta/episodes"
CHUNK_FILE_PATTERN = "chunk-{chunk_index:03d}/file-{file_index:03d}"
DEFAULT_DATA_PATH = "data/" + CHUNK_FILE_PATTERN + ".parquet"
DEFAULT_VIDEO_PATH = "videos/{video_key}/" + CHUNK_FILE_PATTERN + ".mp4"
DEFAULT_EPISODES_PATH = EPISODES_DIR + "/" + CHUNK_FILE_PATTERN + ".parquet"
LEGACY_EPISODES_PATH = "meta/episodes.jsonl"
LEGACY_EPISODES_STATS_PATH = "meta/episodes_stats.jsonl"
LEGACY_TASKS_PATH = "meta/tasks.jsonl"
LEGACY_DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
LEGACY_VIDEO_PATH = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
DEFAULT_CHUNK_SIZE = 1000
# Columns every LeRobot frame row carries (lerobot.utils.constants.DEFAULT_FEATURES).
DEFAULT_FEATURES: dict[str, dict[str, Any]] = {
    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    "frame_index": {"dtype": "int64", "shape": [1], "names": None},
    "episode_index": {"dtype": "int64", "shape": [1], "names": None},
    "index": {"dtype": "int64", "shape": [1], "names": None},
    "task_index": {"dtype": "int64", "shape": [1], "names": None},
}
QUANTILES = {"q01": 0.01, "q10": 0.10, "q50": 0.50, "q90": 0.90, "q99": 0.99}  # compute_stats.DEFAULT_QUANTILES
SUPPORTED_VERSIONS = ("v2.0", "v2.1", "v3.0")


@dataclass(frozen=True)
class VideoSegment:
    """Where one episode's frames of one camera live: a file and the time span inside it."""

    path: Path
    start: float               # seconds into the file of the episode's timestamp 0
    end: float | None = None   # end of the episode's span (v3.0 to_timestamp); None: to the end of the file


@dataclass(frozen=True)
class FrameShape:
    """The frame size a video feature declares in info.json: `shape` as written, and the (height, width, channels)
    it can mean. LeRobot writes [height, width, channels]; older conversions (e.g. lerobot/pusht) are channel-first,
    which `names` says (as LeRobot's dataset_to_policy_features reads it); without such names either is taken."""

    declared: tuple[int, int, int]            # features[key]["shape"] as written
    names: Any                                 # features[key]["names"] as written
    accepts: frozenset[tuple[int, int, int]]

    @classmethod
    def of(cls, feature: dict[str, Any]) -> FrameShape | None:
        shape, names = feature.get("shape"), feature.get("names")
        if shape is None:
            return None
        a, b, c = shape  # checked by _check_info: three positive whole numbers
        hwc, chw = (a, b, c), (b, c, a)
        axes = [str(n).lower() for n in names] if isinstance(names, list) and len(names) == 3 else []
        accepts = ({hwc} if axes and axes[2] in _CHANNELS else {chw} if axes and axes[0] in _CHANNELS
                   else {hwc, chw})
        return cls(hwc, names, frozenset(accepts))


_CHANNELS = ("channel", "channels")


@dataclass(frozen=True)
class EpisodeInfo:
    index: int
    length: int
    tasks: tuple[str, ...]
    data_file: Path
    videos: dict[str, VideoSegment] = field(default_factory=dict)


@dataclass
class DatasetMeta:
    root: Path
    version: str
    fps: float
    features: dict[str, dict[str, Any]]
    tasks: dict[int, str]
    episodes: list[EpisodeInfo]
    stats: dict[str, dict[str, np.ndarray]]
    info: dict[str, Any]

    @property
    def video_keys(self) -> list[str]:
        return [k for k, f in self.features.items() if f.get("dtype") == "video"]

    @property
    def image_keys(self) -> list[str]:
        return [k for k, f in self.features.items() if f.get("dtype") == "image"]

    def frame_shape(self, key: str) -> FrameShape | None:
        """What info.json declares for video feature `key`'s frames; None when it declares no shape."""
        return FrameShape.of(self.features[key])

    def dim(self, key: str) -> int:
        shape = self.features[key].get("shape") or [1]
        return int(np.prod(shape))

    def names(self, key: str) -> list[str]:
        """Per-dimension names; LeRobot stores a list, or a dict such as {"motors": [...]}."""
        names = self.features[key].get("names")
        if isinstance(names, dict):
            names = next(iter(names.values()), None)
        n = self.dim(key)
        if isinstance(names, list) and len(names) == n and all(isinstance(x, str) for x in names):
            return list(names)
        return [f"{key}.{i}" for i in range(n)]


def open_meta(root: str | Path) -> DatasetMeta:
    """Read a dataset's metadata (no frames, no video): info, tasks, episodes, statistics."""
    root = Path(root).expanduser()
    info_path = root / INFO_PATH
    if not info_path.is_file():
        raise LeRobotDatasetError(
            f"{root} is not a LeRobot dataset: {INFO_PATH} is missing. Point at the dataset's root folder (the one "
            "holding meta/, data/ and videos/), e.g. ~/.cache/huggingface/lerobot/<user>/<dataset>")
    info = _read_json(info_path)
    if not isinstance(info, dict):
        raise LeRobotDatasetError(f"{info_path} is not a JSON object; re-download meta/ or re-run the conversion")
    version = str(info.get("codebase_version", ""))
    if version not in SUPPORTED_VERSIONS:
        raise LeRobotDatasetError(
            f"{root}: codebase_version {version!r} is not supported (this reader knows {SUPPORTED_VERSIONS}); "
            "convert it with LeRobot's converters (lerobot.scripts.convert_dataset_v21_to_v30 for v2.1)")
    for key in ("fps", "features", "data_path"):
        if key not in info:
            raise LeRobotDatasetError(f"{info_path} lacks {key!r}; the file is truncated or not LeRobot's")
    _check_info(info_path, info)
    if version == "v3.0":
        return _open_v30(root, info)
    return _open_v21(root, info)


# --- v3.0 --------------------------------------------------------------------------------------------
def _open_v30(root: Path, info: dict[str, Any]) -> DatasetMeta:
    pq = require("pyarrow.parquet")
    tasks = _read_tasks_parquet(root / TASKS_PATH)
    ep_files = sorted((root / EPISODES_DIR).glob("chunk-*/file-*.parquet"))
    if not ep_files:
        raise LeRobotDatasetError(f"{root}: no episode metadata under {EPISODES_DIR}/chunk-*/file-*.parquet; "
                                  "the dataset is incomplete (download meta/ again)")
    video_keys = [k for k, f in info["features"].items() if f.get("dtype") == "video"]
    episodes: list[EpisodeInfo] = []
    for path in ep_files:
        names = [n for n in read_parquet(path, pq.read_schema).names if not n.startswith("stats/")]  # stats unused
        cols = read_parquet(path, pq.read_table, columns=names).to_pydict()
        required = {"episode_index", "length", "data/chunk_index", "data/file_index"}
        if required - set(cols):
            raise LeRobotDatasetError(f"{path} lacks column(s) {sorted(required - set(cols))}; it is not LeRobot "
                                      "v3.0 episode metadata (re-download meta/ or re-run the conversion)")
        for i in range(len(cols["episode_index"])):
            row = _EpisodeRow({k: v[i] for k, v in cols.items()}, path, i)
            data = root / _fill(info, "data_path", chunk_index=row.index("data/chunk_index"),
                                file_index=row.index("data/file_index"))
            videos = {}
            for key in video_keys:
                if info.get("video_path") is None or f"videos/{key}/from_timestamp" not in row.values:
                    continue  # reported as a missing video entry if this camera is chosen
                vpath = root / _fill(info, "video_path", video_key=key,
                                     chunk_index=row.index(f"videos/{key}/chunk_index"),
                                     file_index=row.index(f"videos/{key}/file_index"))
                videos[key] = VideoSegment(vpath, row.time(f"videos/{key}/from_timestamp"),
                                           row.time(f"videos/{key}/to_timestamp"))
            episodes.append(EpisodeInfo(row.index("episode_index"), row.index("length"),
                                        tuple(row.values.get("tasks") or ()), data, videos))
    episodes.sort(key=lambda e: e.index)
    stats_path = root / STATS_PATH
    stats = _as_arrays(_read_json(stats_path), stats_path) if stats_path.is_file() else {}
    return DatasetMeta(root, "v3.0", float(info["fps"]), info["features"], tasks, episodes, stats, info)


@dataclass(frozen=True)
class _EpisodeRow:
    """One row of a v3.0 meta/episodes file, read field by field: a null, a string, a NaN or an Inf (from another
    converter or a hand edit) is one error naming the file, the row and the field, not a TypeError / ValueError
    traceback, and not a NaN segment end that silently disables the segment check."""

    values: dict[str, Any]
    path: Path
    row: int

    def index(self, key: str) -> int:
        value = self.values.get(key)
        # pyarrow gives int64 columns as ints; a float column of whole numbers (pandas with a gap) is taken too.
        whole = type(value) is int or (type(value) is float and value.is_integer())
        if not whole or value < 0:
            raise self._bad(key, value, "a whole number >= 0")
        return int(value)

    def time(self, key: str) -> float:
        value = self.values.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not np.isfinite(value) or value < 0:
            raise self._bad(key, value, "a finite number of seconds >= 0")
        return float(value)

    def _bad(self, key: str, value: Any, want: str) -> LeRobotDatasetError:
        shown = repr(value)[:60] if isinstance(value, (int, float, str)) or value is None else type(value).__name__
        episode = self.values.get("episode_index")
        return LeRobotDatasetError(f"{self.path} row {self.row} (episode {episode!r}): {key} is {shown}, not {want}; "
                                   f"{_REDO}")


def _read_tasks_parquet(path: Path) -> dict[int, str]:
    if not path.is_file():
        raise LeRobotDatasetError(f"{path} is missing; the dataset's task table is needed for the instructions")
    table = read_parquet(path, require("pyarrow.parquet").read_table).to_pydict()
    # LeRobot writes a pandas frame indexed by the task string: the index is stored as column "task".
    names = table.get("task") or table.get("__index_level_0__")
    if names is None or "task_index" not in table:
        raise LeRobotDatasetError(f"{path} has columns {sorted(table)}, expected 'task' and 'task_index'")
    return {int(i): str(s) for i, s in zip(table["task_index"], names)}


# --- v2.1 --------------------------------------------------------------------------------------------
def _open_v21(root: Path, info: dict[str, Any]) -> DatasetMeta:
    chunks_size = info.get("chunks_size", DEFAULT_CHUNK_SIZE)
    if type(chunks_size) is not int or chunks_size < 1:
        raise LeRobotDatasetError(f"{root / INFO_PATH}: 'chunks_size' must be a positive whole number, got "
                                  f"{chunks_size!r}; re-download meta/ or re-run the conversion")
    tasks = {int(r["task_index"]): str(r["task"])
             for r in _read_jsonl(root / LEGACY_TASKS_PATH, required=("task_index", "task"))}
    video_keys = [k for k, f in info["features"].items() if f.get("dtype") == "video"]
    episodes = []
    rows = _read_jsonl(root / LEGACY_EPISODES_PATH, required=("episode_index", "length"))
    for row in sorted(rows, key=lambda r: r["episode_index"]):
        idx = int(row["episode_index"])
        chunk = idx // chunks_size
        data = root / _fill(info, "data_path", episode_chunk=chunk, episode_index=idx)
        videos = {}
        if info.get("video_path"):
            videos = {k: VideoSegment(root / _fill(info, "video_path", episode_chunk=chunk, video_key=k,
                                                   episode_index=idx), 0.0, None)
                      for k in video_keys}
        episodes.append(EpisodeInfo(idx, int(row["length"]), tuple(row.get("tasks") or ()), data, videos))
    stats_path = root / STATS_PATH
    if (root / LEGACY_EPISODES_STATS_PATH).is_file():
        stats = aggregate_stats([_as_arrays(r["stats"], root / LEGACY_EPISODES_STATS_PATH)
                                 for r in _read_jsonl(root / LEGACY_EPISODES_STATS_PATH, required=("stats",))])
    elif stats_path.is_file():  # v2.0 kept only the dataset-wide file
        stats = _as_arrays(_read_json(stats_path), stats_path)
    else:
        stats = {}
    return DatasetMeta(root, str(info["codebase_version"]), float(info["fps"]), info["features"], tasks, episodes,
                       stats, info)


def aggregate_stats(per_episode: list[dict[str, dict[str, np.ndarray]]]) -> dict[str, dict[str, np.ndarray]]:
    """Dataset statistics from per-episode ones (count-weighted mean and pooled variance, as LeRobot's
    compute_stats.aggregate_stats). Quantiles cannot be pooled exactly: a count-weighted mean is kept."""
    out: dict[str, dict[str, np.ndarray]] = {}
    keys = {k for s in per_episode for k in s}
    for key in sorted(keys):
        parts = [s[key] for s in per_episode if key in s and "count" in s[key] and "mean" in s[key]]
        if not parts:
            continue
        n = np.array([float(np.asarray(p["count"]).ravel()[0]) for p in parts])
        w = (n / n.sum()).reshape(-1, *[1] * np.asarray(parts[0]["mean"]).ndim)
        mean = (w * np.stack([p["mean"] for p in parts])).sum(0)
        second = (w * np.stack([np.asarray(p["std"]) ** 2 + np.asarray(p["mean"]) ** 2 for p in parts])).sum(0)
        agg = {"mean": mean, "std": np.sqrt(np.maximum(second - mean ** 2, 0.0)),
               "min": np.min(np.stack([p["min"] for p in parts]), 0), "max": np.max(np.stack([p["max"] for p in parts]), 0),
               "count": np.array([n.sum()])}
        for q in QUANTILES:
            if all(q in p for p in parts):
                agg[q] = (w * np.stack([p[q] for p in parts])).sum(0)
        out[key] = agg
    return out


# --- helpers -----------------------------------------------------------------------------------------
_REDO = "re-download meta/ or re-run the conversion"


def _check_info(path: Path, info: dict[str, Any]) -> None:
    """The info.json fields the reader uses, by type: a wrong one is named here, not met as an AttributeError,
    ZeroDivisionError or numpy ufunc error deep inside the reader."""
    fps, features = info["fps"], info["features"]
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps < float("inf"):
        raise LeRobotDatasetError(f"{path}: 'fps' must be a positive number, got {fps!r}; {_REDO}")
    if not isinstance(features, dict):
        raise LeRobotDatasetError(f"{path}: 'features' must be a JSON object, got {type(features).__name__}; {_REDO}")
    for key, feature in features.items():
        if not isinstance(feature, dict):
            raise LeRobotDatasetError(f"{path}: feature {key!r} must be a JSON object, got {feature!r}; {_REDO}")
        shape = feature.get("shape")
        if shape is not None and not (isinstance(shape, list)
                                      and all(type(n) is int and n > 0 for n in shape)):
            raise LeRobotDatasetError(f"{path}: feature {key!r} shape must be a list of positive whole numbers, got "
                                      f"{shape!r}; {_REDO}")
        if feature.get("dtype") == "video" and shape is not None and len(shape) != 3:
            raise LeRobotDatasetError(f"{path}: video feature {key!r} shape must be 3 positive whole numbers ([height, "
                                      f"width, channels]), got {shape!r}; {_REDO}")
    for key in ("data_path", "video_path"):
        if info.get(key) is not None and not isinstance(info[key], str):
            raise LeRobotDatasetError(f"{path}: {key!r} must be a string, got {info[key]!r}; {_REDO}")


def _fill(info: dict[str, Any], key: str, **fields: Any) -> str:
    """info.json's path template `key` filled in; one that names a field LeRobot does not give is refused."""
    template = info[key]
    try:
        return template.format(**fields)
    except (KeyError, IndexError, ValueError, AttributeError) as exc:
        raise LeRobotDatasetError(f"meta/info.json: {key} {template!r} cannot be filled in with {sorted(fields)} "
                                  f"({type(exc).__name__}: {exc}); {_REDO}") from None


def read_parquet(path: Path, read: Callable[..., Any], **options: Any) -> Any:
    """`read(path, **options)` (a pyarrow.parquet reader), a damaged or foreign file as one LeRobotDatasetError."""
    pa = require("pyarrow")
    try:
        return read(path, **options)
    except (pa.ArrowException, OSError) as exc:
        raise LeRobotDatasetError(f"{path} is not a readable parquet file ({exc}); it is truncated or damaged: "
                                  "download the dataset again") from None


def _parse_json(text: bytes, where: str) -> Any:
    try:
        return json.loads(text.decode("utf-8"))
    except RecursionError:
        raise LeRobotDatasetError(f"{where} is not readable JSON (nested too deeply); re-download or re-write the "
                                  "dataset") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise LeRobotDatasetError(f"{where} is not readable JSON ({exc}); re-download or re-write the "
                                  "dataset") from None


# Metadata is read whole, so with a bound: a multi-GB (even sparse) file was read into memory before any check.
# Far above real datasets' (LeRobot's largest hub datasets: info.json a few KB, episodes_stats.jsonl tens of MB).
MAX_META_JSON_BYTES = 64 * 1024 * 1024
MAX_META_JSONL_BYTES = 512 * 1024 * 1024


def _read_meta_bytes(path: Path, max_bytes: int) -> bytes:
    return read_bounded(path, max_bytes, "LeRobot metadata file", LeRobotDatasetError,
                        fix="re-download or re-write the dataset")


def _read_json(path: Path) -> Any:
    return _parse_json(_read_meta_bytes(path, MAX_META_JSON_BYTES), str(path))


def _read_jsonl(path: Path, required: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    if not path.is_file():
        raise LeRobotDatasetError(f"{path} is missing; a v2.1 dataset needs meta/episodes.jsonl and meta/tasks.jsonl")
    rows = []
    for n, line in enumerate(_read_meta_bytes(path, MAX_META_JSONL_BYTES).splitlines(), 1):
        if line.strip():
            row = _parse_json(line, f"{path} line {n}")
            if not isinstance(row, dict):
                raise LeRobotDatasetError(f"{path} line {n} is not a JSON object; {_REDO}")
            missing = [k for k in required if k not in row]
            if missing:
                raise LeRobotDatasetError(f"{path} line {n} lacks {', '.join(map(repr, missing))}; {_REDO}")
            rows.append(row)
    return rows


def _as_arrays(stats: Any, path: Path) -> dict[str, dict[str, np.ndarray]]:
    if not isinstance(stats, dict):
        raise LeRobotDatasetError(f"{path} is not a JSON object of per-feature statistics; {_REDO}")
    try:
        return {k: {s: np.asarray(v, dtype=np.float64) for s, v in d.items()} for k, d in stats.items()
                if isinstance(d, dict)}
    except (TypeError, ValueError) as exc:
        raise LeRobotDatasetError(f"{path} holds a statistic that is not numbers ({exc}); {_REDO}") from None
