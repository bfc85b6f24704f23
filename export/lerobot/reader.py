"""A LeRobot dataset (v3.0 or v2.1) as the project's in-memory `Dataset`: every camera resized to the
model's input, the instruction from the task table, the state, and action chunks at the model's chunk
length and action period (linearly resampled when that period is not a multiple of 1/fps), split into
training and validation by episode.

    source = "lerobot:/data/koch_pick?cameras=observation.images.top&val=0.1"
    ds = load_dataset(source, image_size=64, num_cameras=1, chunk_len=8, split="train")
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import numpy as np

from edge_vla.action_space import ActionSpace
from edge_vla.onboard.cameras import resize_nearest
from edge_vla.optional import require
from edge_vla.progress import progress as progress_bar
from edge_vla.sim.dataset import Dataset

from ..envs import longest_instruction
from .errors import LeRobotDatasetError
from .layout import LEGACY_EPISODES_STATS_PATH, QUANTILES, STATS_PATH, DatasetMeta, EpisodeInfo, open_meta, read_parquet
from .video import decode_segment

log = logging.getLogger(__name__)

PREFIX = "lerobot:"
SPLITS = ("train", "val", "all")


@dataclass(frozen=True)
class SourceSpec:
    """`lerobot:PATH[?cameras=K1,K2&state=KEY&action=KEY&val=0.1&seed=0&stride=1&period=S&episodes=0,1]`."""

    root: Path
    cameras: tuple[str, ...] | None = None   # video feature keys in model camera order (default: info.json order)
    state: str = "observation.state"
    action: str = "action"
    val_fraction: float = 0.1                 # share of episodes held out for validation / open-loop checks
    split_seed: int = 0
    stride: int = 1                           # use every stride-th frame as an observation
    period: float | None = None               # seconds between a chunk's actions (default 1 / fps)
    episodes: tuple[int, ...] | None = None   # restrict to these episode indices

    def __str__(self) -> str:
        return PREFIX + str(self.root)


def is_lerobot_source(source: object) -> bool:
    return isinstance(source, str) and source.startswith(PREFIX)


def parse_source(source: str | SourceSpec) -> SourceSpec:
    if isinstance(source, SourceSpec):
        return source
    if not is_lerobot_source(source):
        raise LeRobotDatasetError(f"{source!r} is not a LeRobot source; write lerobot:PATH")
    body = source[len(PREFIX):]
    path, _, query = body.partition("?")
    if not path:
        raise LeRobotDatasetError("lerobot: needs a path, e.g. lerobot:/data/my_dataset")
    q = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
    known = {"cameras", "state", "action", "val", "seed", "stride", "period", "episodes"}
    unknown = sorted(set(q) - known)
    if unknown:
        raise LeRobotDatasetError(f"unknown option(s) {unknown} in {source!r}; known: {sorted(known)}")
    try:
        spec = SourceSpec(
            root=Path(path).expanduser(),
            cameras=tuple(c for c in q["cameras"].split(",") if c) if q.get("cameras") else None,
            state=q.get("state", "observation.state"), action=q.get("action", "action"),
            val_fraction=float(q.get("val", 0.1)), split_seed=int(q.get("seed", 0)), stride=int(q.get("stride", 1)),
            period=float(q["period"]) if q.get("period") else None,
            episodes=tuple(int(e) for e in q["episodes"].split(",") if e) if q.get("episodes") else None)
    except ValueError as exc:
        raise LeRobotDatasetError(f"bad option value in {source!r} ({exc})") from exc
    if not 0.0 <= spec.val_fraction < 1.0 or spec.stride < 1 or (spec.period is not None and spec.period <= 0):
        raise LeRobotDatasetError(f"{source!r}: val must be in [0, 1), stride >= 1 and period > 0")
    return spec


@dataclass
class RecordedDataset(Dataset):
    """A Dataset whose normalization comes from the recording's meta/stats.json (all episodes)."""

    normalization: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def action_stats(self) -> dict[str, list[float]]:
        return _mean_std(self.normalization.get("action")) or super().action_stats()

    def state_stats(self) -> dict[str, list[float]]:
        return _mean_std(self.normalization.get("state")) or super().state_stats()

    @property
    def action_space(self) -> ActionSpace:
        return ActionSpace.from_dict(self.meta["action_space"])


def _mean_std(stats: dict[str, list[float]] | None) -> dict[str, list[float]] | None:
    if not stats or "mean" not in stats or "std" not in stats:
        return None
    return {"mean": list(stats["mean"]), "std": [s + 1e-6 for s in stats["std"]]}


def split_episodes(indices: list[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Episode-level split, reproducible from the seed; at least one episode on each side when there are two."""
    if val_fraction <= 0 or len(indices) < 2:
        return sorted(indices), []
    n_val = min(len(indices) - 1, max(1, round(val_fraction * len(indices))))
    perm = np.random.default_rng(seed).permutation(sorted(indices))
    val = sorted(int(i) for i in perm[:n_val])
    return sorted(set(indices) - set(val)), val


def select_cameras(meta: DatasetMeta, spec: SourceSpec, num_cameras: int) -> list[str]:
    videos = meta.video_keys
    if spec.cameras:
        bad = [c for c in spec.cameras if c not in meta.features]
        if bad:
            raise LeRobotDatasetError(f"{meta.root}: camera(s) {bad} not in the dataset; its cameras are {videos}")
        chosen = list(spec.cameras)
    else:
        chosen = videos[:num_cameras]
    for key in chosen:
        if meta.features[key].get("dtype") != "video":
            raise LeRobotDatasetError(
                f"{meta.root}: feature {key!r} has dtype {meta.features[key].get('dtype')!r}; only video features "
                "are read (images stored inside parquet are not): re-record or convert it with videos")
    if len(chosen) < num_cameras:
        raise LeRobotDatasetError(
            f"{meta.root}: the model needs {num_cameras} camera(s) but the dataset has video features {videos}"
            + (f" and {len(chosen)} were chosen" if spec.cameras else "")
            + "; train a preset with fewer cameras or record more")
    return chosen[:num_cameras]


def check_feature(meta: DatasetMeta, key: str, what: str, option: str, want_dim: int | None) -> int:
    if key not in meta.features:
        numeric = [k for k, f in meta.features.items() if f.get("dtype") in ("float32", "float64")]
        raise LeRobotDatasetError(
            f"{meta.root}: the model needs the {what} but the dataset has no feature {key!r} (its numeric features: "
            f"{numeric}); name the right one with ?{option}=KEY")
    dim = meta.dim(key)
    if want_dim is not None and dim != want_dim:
        raise LeRobotDatasetError(
            f"{meta.root}: feature {key!r} has {dim} dimension(s) but the model's {what} has {want_dim}; use a model "
            f"trained on this dataset (`edge-vla train --data lerobot:{meta.root}` sets it from the data)")
    return dim


def dataset_tasks(meta: DatasetMeta, episodes: Iterable[int] | None = None) -> list[str]:
    """The task strings of these episodes (default: every task of the dataset), from the metadata alone. An
    episode without a task list could hold any task of the table, so then the whole table counts."""
    wanted = None if episodes is None else set(episodes)
    eps = [e for e in meta.episodes if wanted is None or e.index in wanted]
    tasks = {t for e in eps for t in e.tasks}
    if episodes is None or any(not e.tasks for e in eps):
        tasks |= set(meta.tasks.values())
    return sorted(tasks)


def check_text_len(meta: DatasetMeta, tasks: Iterable[str], limits: Mapping[str, int]) -> None:
    """Every task must fit each model's instruction length ({who: max_text_len}); else say which task and how
    to get a model that takes it (a recorded instruction cannot be shortened)."""
    task, n = longest_instruction(tasks)
    for who, limit in limits.items():
        if n + 1 > limit:
            raise LeRobotDatasetError(
                f"{meta.root}: task {task!r} is {n} bytes but {who} takes instructions of at most {limit - 1} bytes "
                f"(max_text_len {limit}); use a model trained on this dataset (`edge-vla train --data "
                f"lerobot:{meta.root}` sizes the instruction from the dataset's longest task)")


def choose_episodes(meta: DatasetMeta, spec: SourceSpec, split: str,
                    max_episodes: int | None = None) -> tuple[list[int], list[int]]:
    """(the split's episodes, the held-out episodes), from the metadata alone."""
    if split not in SPLITS:
        raise LeRobotDatasetError(f"unknown split {split!r}; choose one of {SPLITS}")
    all_eps = [e.index for e in meta.episodes]
    if spec.episodes is not None:
        unknown = sorted(set(spec.episodes) - set(all_eps))
        if unknown:
            raise LeRobotDatasetError(f"{meta.root}: episode(s) {unknown} not in the dataset (it has {len(all_eps)})")
        all_eps = [e for e in all_eps if e in set(spec.episodes)]
    if not all_eps:
        raise LeRobotDatasetError(f"{meta.root}: the dataset has no episodes")
    train_eps, val_eps = split_episodes(all_eps, spec.val_fraction, spec.split_seed)
    chosen = {"train": train_eps, "val": val_eps, "all": sorted(all_eps)}[split]
    if not chosen:
        raise LeRobotDatasetError(f"{meta.root}: the {split!r} split is empty ({len(all_eps)} episode(s), val share "
                                  f"{spec.val_fraction}); record more episodes or set ?val=0.2")
    if max_episodes is not None and len(chosen) > max_episodes:
        chosen = [chosen[i] for i in np.linspace(0, len(chosen) - 1, max(1, max_episodes)).round().astype(int)]
    return chosen, val_eps


def load_dataset(source: str | SourceSpec, image_size: int, num_cameras: int, chunk_len: int, split: str = "train",
                 state_dim: int | None = None, action_dim: int | None = None, max_samples: int | None = None,
                 max_episodes: int | None = None, progress: bool = False,
                 text_limits: Mapping[str, int] | None = None) -> RecordedDataset:
    """Read `split` of the dataset into memory; every `stride`-th frame becomes one sample.

    max_episodes: read only that many of the split's episodes, evenly spread (calibration needs a few
    frames from across the recording, not all of it); max_samples: then keep that many frames, evenly spread.
    text_limits: {who: max_text_len} of the models that will read these instructions; a task too long for one
    of them is refused before any frame is decoded."""
    spec = parse_source(source)
    meta = open_meta(spec.root)
    cameras = select_cameras(meta, spec, num_cameras)
    sdim = check_feature(meta, spec.state, "state", "state", state_dim)
    adim = check_feature(meta, spec.action, "action", "action", action_dim)
    chosen, val_eps = choose_episodes(meta, spec, split, max_episodes)
    if text_limits:
        check_text_len(meta, dataset_tasks(meta, chosen), text_limits)
    period = spec.period or 1.0 / meta.fps
    by_index = {e.index: e for e in meta.episodes}
    parts: list[dict[str, np.ndarray]] = []
    for idx in progress_bar(chosen, desc=f"read {meta.root.name} ({split})", unit="episode", enabled=progress):
        parts.append(_read_episode(meta, by_index[idx], spec, cameras, image_size, chunk_len, period))
    cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    if text_limits:  # the frames' own tasks too (a task_index the episode's list does not name)
        check_text_len(meta, cat["instructions"], text_limits)
    if max_samples is not None and len(cat["states"]) > max_samples:
        keep = np.linspace(0, len(cat["states"]) - 1, max_samples).round().astype(np.int64)
        cat = {k: v[keep] for k, v in cat.items()}
    normalization = _normalization(meta, spec, cat)
    space = action_space(meta, spec.action, period, parts)
    ds_meta: dict[str, Any] = {
        "format": "lerobot", "source": source if isinstance(source, str) else str(spec), "root": str(meta.root), "codebase_version": meta.version,
        "fps": meta.fps, "cameras": cameras, "state": spec.state, "action": spec.action, "state_dim": sdim,
        "action_dim": adim, "split": split, "episodes": chosen, "val_episodes": val_eps, "stride": spec.stride,
        "action_period_s": period, "chunk_len": chunk_len, "image_size": image_size, "num_cameras": num_cameras,
        "resize": "nearest (as edge_vla.onboard.cameras.resize_nearest on the robot)",
        "normalization": normalization, "action_space": space.to_dict(),
        "state_names": meta.names(spec.state), "action_names": meta.names(spec.action),
    }
    return RecordedDataset(images=cat["images"], instructions=cat["instructions"], states=cat["states"],
                           actions=cat["actions"], episodes=cat["episodes"], meta=ds_meta, normalization=normalization)


def _read_episode(meta: DatasetMeta, ep: EpisodeInfo, spec: SourceSpec, cameras: list[str], image_size: int,
                  chunk_len: int, period: float) -> dict[str, np.ndarray]:
    rows = episode_rows(meta, ep, (spec.state, spec.action))
    n = len(rows["timestamp"])
    if n == 0:
        raise LeRobotDatasetError(f"episode {ep.index} has no rows in {ep.data_file}")
    for key in ("timestamp", spec.state, spec.action):  # before any decoding: a NaN must not train silently
        require_finite(rows[key], key, ep, rows["frame_index"])
    if n != ep.length:
        log.warning("episode %d: metadata says %d frames, %s holds %d", ep.index, ep.length, ep.data_file, n)
    frames = np.arange(0, n, spec.stride)
    images = []
    for cam in cameras:
        if cam not in ep.videos:
            raise LeRobotDatasetError(f"episode {ep.index} has no video entry for camera {cam!r} in the episode "
                                      "metadata; the dataset is incomplete")
        images.append(decode_segment(ep.videos[cam], rows["timestamp"][frames].tolist(), cam, ep.index,
                                     transform=lambda img: resize_nearest(img, image_size),
                                     frame_shape=meta.frame_shape(cam)))
    tasks = np.array([_task(meta, int(t), ep) for t in rows["task_index"][frames]])
    return {
        "images": np.ascontiguousarray(np.stack(images, axis=1)),
        "instructions": tasks,
        "states": rows[spec.state][frames].astype(np.float32),
        "actions": action_chunks(rows[spec.action], frames, chunk_len, period * meta.fps),
        "episodes": np.full(len(frames), ep.index, dtype=np.int32),
    }


def require_finite(values: np.ndarray, key: str, ep: EpisodeInfo, frame_index: np.ndarray) -> None:
    """Refuse NaN or Inf in a recorded feature, naming the episode, the frame and the file."""
    bad = ~np.isfinite(values.astype(np.float64, copy=False))
    if not bad.any():
        return
    rows = np.flatnonzero(bad.reshape(len(values), -1).any(axis=1))
    first = int(rows[0])
    dims = np.flatnonzero(bad.reshape(len(values), -1)[first])
    shown = values.reshape(len(values), -1)[first, dims].tolist()
    raise LeRobotDatasetError(
        f"episode {ep.index}, frame {int(frame_index[first])}: {key!r} is {shown[0]} (dimension(s) {dims.tolist()}; "
        f"{len(rows)} frame(s) of the episode hold NaN or Inf) in {ep.data_file}. The recording is corrupt there: "
        "re-record or repair the episode, or leave it out with ?episodes=<the other episodes>")


def _task(meta: DatasetMeta, task_index: int, ep: EpisodeInfo) -> str:
    if task_index in meta.tasks:
        return meta.tasks[task_index]
    if ep.tasks:
        return ep.tasks[0]
    raise LeRobotDatasetError(f"episode {ep.index}: task_index {task_index} is not in the task table "
                              f"({sorted(meta.tasks)}); the instruction for these frames is unknown")


def action_chunks(actions: np.ndarray, frames: np.ndarray, chunk_len: int, step: float) -> np.ndarray:
    """[len(frames), chunk_len, D]: the recorded actions at frame + k * step (in frames), k < chunk_len,
    linearly interpolated between frames and held at the last one past the episode's end (LeRobot pads
    the same way). With an integer `step` every value is a recorded one."""
    n = len(actions)
    pos = np.minimum(frames[:, None] + step * np.arange(chunk_len)[None, :], n - 1)  # [F, H] fractional frames
    if abs(step - round(step)) < 1e-9:
        return actions[np.rint(pos).astype(np.int64)].astype(np.float32)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    w = (pos - lo)[..., None]
    return ((1.0 - w) * actions[lo] + w * actions[hi]).astype(np.float32)


def episode_rows(meta: DatasetMeta, ep: EpisodeInfo, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """One episode's rows, ordered by frame_index: timestamp, frame_index, task_index and the given features."""
    pc = require("pyarrow.compute")
    table = _data_table(ep.data_file, ("timestamp", "frame_index", "episode_index", "task_index", *keys))
    table = table.filter(pc.equal(table["episode_index"], ep.index))
    order = np.argsort(np.asarray(table["frame_index"]))
    out = {k: column(table, k, ep.data_file)[order] for k in ("timestamp", "frame_index", "task_index", *keys)}
    out["timestamp"] = out["timestamp"].astype(np.float64).reshape(-1)
    out["frame_index"] = out["frame_index"].astype(np.int64).reshape(-1)
    out["task_index"] = out["task_index"].astype(np.int64).reshape(-1)
    return out


def _data_table(path: Path, columns: tuple[str, ...]) -> Any:
    if not path.is_file():
        raise LeRobotDatasetError(f"data file {path} is missing; download the dataset's data/ folder again")
    st = path.stat()
    return _read_table(path, st.st_mtime_ns, st.st_size, columns)


@lru_cache(maxsize=2)  # v3.0 files hold many episodes: read each once while its episodes are read
def _read_table(path: Path, _mtime_ns: int, _size: int, columns: tuple[str, ...]) -> Any:
    pq = require("pyarrow.parquet")
    present = set(read_parquet(path, pq.read_schema).names)
    missing = [c for c in columns if c not in present]
    if missing:
        raise LeRobotDatasetError(f"{path} lacks column(s) {missing} (it has {sorted(present)}); the dataset's "
                                  "info.json features and its data disagree, or the feature name is wrong")
    return read_parquet(path, pq.read_table, columns=list(columns))


def column(table: Any, key: str, path: Path) -> np.ndarray:
    """A column as numpy: [N] for scalars, [N, D] for list / fixed-size-list columns."""
    pa = require("pyarrow")
    col = table[key].combine_chunks()
    if pa.types.is_list(col.type) or pa.types.is_fixed_size_list(col.type) or pa.types.is_large_list(col.type):
        flat = col.flatten().to_numpy(zero_copy_only=False)
        n = len(col)
        if n and flat.size % n:
            raise LeRobotDatasetError(f"{path}: column {key!r} has rows of different lengths")
        return flat.reshape(n, -1) if n else flat.reshape(0, 0)
    return col.to_numpy(zero_copy_only=False)


def _normalization(meta: DatasetMeta, spec: SourceSpec, cat: dict[str, np.ndarray]) -> dict[str, dict[str, list]]:
    """meta/stats.json for the state and action (all episodes, as LeRobot trains); the loaded frames if absent."""
    out = {}
    for name, key, values in (("state", spec.state, cat["states"]), ("action", spec.action, cat["actions"][:, 0])):
        s = meta.stats.get(key)
        if s and "mean" in s and "std" in s:
            _require_finite_stats(meta, key, s)
            out[name] = {k: np.asarray(v, dtype=np.float64).reshape(-1).tolist() for k, v in s.items()}
            out[name]["source"] = "meta/stats.json" if meta.version != "v2.1" else "meta/episodes_stats.jsonl"
        else:
            log.warning("%s: no statistics for %r; computing them from the loaded frames", meta.root, key)
            out[name] = {"mean": values.mean(0).tolist(), "std": values.std(0).tolist(),
                         "min": values.min(0).tolist(), "max": values.max(0).tolist(), "source": "loaded frames"}
            out[name].update({q: np.quantile(values, p, axis=0).tolist() for q, p in QUANTILES.items()})
    return out


def _require_finite_stats(meta: DatasetMeta, key: str, stats: dict[str, np.ndarray]) -> None:
    """Statistics become the model's normalization and the bundle's limits: a NaN there poisons both."""
    path = meta.root / (STATS_PATH if meta.version == "v3.0" or not (meta.root / LEGACY_EPISODES_STATS_PATH).is_file()
                        else LEGACY_EPISODES_STATS_PATH)
    for stat, values in stats.items():
        arr = np.asarray(values, dtype=np.float64)
        if not np.isfinite(arr).all():
            raise LeRobotDatasetError(
                f"{path}: the {key!r} statistic {stat!r} is not finite ({arr.reshape(-1).tolist()}); recompute the "
                "dataset's statistics (or remove the file: they are then computed from the frames read)")


def action_space(meta: DatasetMeta, key: str, period: float, parts: list[dict[str, np.ndarray]]) -> ActionSpace:
    """Limits for the bundle from the recording: position range from the stats widened by 10 %, velocity and
    acceleration bounds 1.5x the largest seen between consecutive chunk actions. Review them for your robot."""
    first = np.concatenate([p["actions"][:, 0] for p in parts]).astype(np.float64)
    s = meta.stats.get(key, {})
    lo = np.asarray(s.get("min", first.min(0)), dtype=np.float64).reshape(-1)
    hi = np.asarray(s.get("max", first.max(0)), dtype=np.float64).reshape(-1)
    margin = np.maximum(0.1 * (hi - lo), 1e-3 * np.maximum(1.0, np.abs(hi)))
    vel = np.zeros_like(lo)
    acc = np.zeros_like(lo)
    for p in parts:
        a = p["actions"].astype(np.float64)  # [F, H, D]: consecutive actions of each chunk are `period` apart
        if a.shape[1] > 1:
            vel = np.maximum(vel, np.abs(np.diff(a, axis=1)).max((0, 1)) / period)
        if a.shape[1] > 2:
            acc = np.maximum(acc, np.abs(np.diff(a, n=2, axis=1)).max((0, 1)) / period ** 2)
    unit = meta.features[key].get("unit") or meta.features[key].get("units") or "as recorded"
    return ActionSpace(names=tuple(meta.names(key)), units=str(unit), lower=(lo - margin).astype(np.float32),
                       upper=(hi + margin).astype(np.float32),
                       max_velocity=np.maximum(1.5 * vel, 1e-3).astype(np.float32),
                       max_acceleration=np.maximum(1.5 * acc, 1e-3).astype(np.float32),
                       action_period_s=float(period)).validate()
