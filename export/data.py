"""Turning sim datasets and observations into model tensors, and loading one or several datasets for training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edge_vla.config import VLAConfig
from edge_vla.errors import ConfigError
from edge_vla.runtime.types import Observation
from edge_vla.sim import dataset
from edge_vla.sim.dataset import Dataset
from edge_vla.sim.metaworld import MetaWorldSpec, is_metaworld
from edge_vla.tokenizer import tokenize


def require_finite(ds: Dataset, source: str) -> None:
    """Refuse NaN or Inf in a dataset's states or actions, naming the first sample, its episode and the file:
    one such value turns the normalization, and so every loss, into NaN."""
    for name, values in (("state", ds.states), ("action", ds.actions)):
        bad = ~np.isfinite(np.asarray(values, dtype=np.float64).reshape(len(values), -1)).all(axis=1)
        if bad.any():
            rows = np.flatnonzero(bad)
            raise ConfigError(f"{source}: sample {int(rows[0])} (episode {int(ds.episodes[rows[0]])}) holds a "
                              f"non-finite {name} ({len(rows)} sample(s) do); the dataset is corrupt: regenerate it "
                              "with `edge-vla make-data`")


# Meta fields that must agree for datasets to train one model together: the environment, the sim's split, the
# frames' cameras and size, the state and action spaces. MetaWorld specs (`env`) are compared by _same_env.
SAME_META = ("task", "split", "cameras", "image_size", "num_cameras", "action_space", "state_names", "action_period_s")


def is_dataset_list(source: str) -> bool:
    """`A.npz,B.npz`: several datasets to train on together (a file whose own name holds a comma is one dataset)."""
    return "," in source and not Path(source).exists()


def load_training_data(source: str) -> Dataset:
    """One dataset, or `A.npz,B.npz,...` concatenated (e.g. demonstrations and DAgger rounds)."""
    if not is_dataset_list(source):
        return dataset.load(source)
    paths = [p.strip() for p in source.split(",")]
    if any(not p for p in paths):
        raise ConfigError(f"--data {source!r}: an empty name in the list; give A.npz,B.npz")
    for p in paths:  # every name checked before any (large) file is read
        if not Path(p).is_file():
            raise ConfigError(f"--data: dataset {p} does not exist; make it with `edge-vla make-data -o {p}` (a list of "
                              "datasets is never generated)")
    return concatenate([(p, dataset.load(p)) for p in paths])


def concatenate(parts: list[tuple[str, Dataset]]) -> Dataset:
    """Samples of every part, in order; episode ids shifted so no two parts share one (whole episodes stay together
    in the validation split, which takes the highest ids, per task for MetaWorld: the last part's last episodes).
    The meta is the first part's, with `parts` naming each file, its sample count and meta."""
    (first_path, first), rest = parts[0], parts[1:]
    for path, part in rest:
        _check_same(first_path, first, path, part)
    episodes, offset = [], 0
    for _, part in parts:
        episodes.append(part.episodes.astype(np.int64) + offset)
        offset = int(episodes[-1].max()) + 1 if len(part) else offset
    goals = None if first.goals is None else np.concatenate([p.goals for _, p in parts])
    meta = dict(first.meta) | {"parts": [{"path": path, "samples": len(part), "meta": part.meta} for path, part in parts]}
    return Dataset(
        images=np.concatenate([p.images for _, p in parts]),
        instructions=np.concatenate([p.instructions for _, p in parts]),
        states=np.concatenate([p.states for _, p in parts]),
        actions=np.concatenate([p.actions for _, p in parts]),
        episodes=np.concatenate(episodes).astype(np.int32),
        goals=goals, meta=meta,
    )


def _check_same(first_path: str, first: Dataset, path: str, part: Dataset) -> None:
    """One line naming the first thing that differs between `part` and the first dataset."""
    def shape(a: np.ndarray | None) -> object:
        return None if a is None else tuple(a.shape[1:])

    diffs = [(k, part.meta.get(k), first.meta.get(k)) for k in SAME_META if part.meta.get(k) != first.meta.get(k)]
    diffs += _env_diff(part.meta.get("env"), first.meta.get("env"))
    diffs += [(k, shape(getattr(part, k)), shape(getattr(first, k))) for k in ("images", "states", "actions", "goals")
              if shape(getattr(part, k)) != shape(getattr(first, k))]
    if diffs:
        key, theirs, ours = diffs[0]
        raise ConfigError(f"--data: {path} differs from {first_path} in {key} ({theirs!r} vs {ours!r}); datasets trained "
                          "together come from the same --env, --cameras and --image-size")


def _env_diff(theirs: object, ours: object) -> list[tuple[str, object, object]]:
    """MetaWorld: the same cameras, and no task the first dataset lacks (its env stays the model's); the horizon
    may differ (a DAgger round may cut episodes shorter). Anything else: the same string."""
    if not (is_metaworld(theirs) and is_metaworld(ours)):
        return [] if theirs == ours else [("env", theirs, ours)]
    a, b = MetaWorldSpec.parse(str(theirs)), MetaWorldSpec.parse(str(ours))
    if a.cameras != b.cameras:
        return [("env cameras", a.cameras, b.cameras)]
    extra = [t for t in a.tasks if t not in b.tasks]
    return [("env tasks", extra, "absent")] if extra else []


class TensorDataset:
    """The dataset as tensors shaped for one config (cameras, image size, chunk length)."""

    def __init__(self, ds: Dataset, config: VLAConfig) -> None:
        n, cams, size = ds.images.shape[0], ds.images.shape[1], ds.images.shape[2]
        if size != config.image_size or cams < config.num_cameras:
            raise ConfigError(
                f"dataset has {cams} camera(s) at {size}px but preset {config.preset!r} needs "
                f"{config.num_cameras} at {config.image_size}px; regenerate with "
                f"`edge-vla make-data --image-size {config.image_size} --cameras {config.num_cameras}`"
            )
        if ds.actions.shape[1] < config.chunk_len:
            raise ConfigError(f"dataset chunks hold {ds.actions.shape[1]} actions, the model needs {config.chunk_len}")
        self.images = torch.from_numpy(np.ascontiguousarray(ds.images[:, : config.num_cameras]))  # uint8 NHWC
        vocab = {s: tokenize(s, config.max_text_len) for s in np.unique(ds.instructions)}
        self.tokens = torch.from_numpy(np.stack([vocab[s] for s in ds.instructions]).astype(np.int32))
        self.states = torch.from_numpy(ds.states)
        self.actions = torch.from_numpy(ds.actions[:, : config.chunk_len].copy())
        self.goals = None if getattr(ds, "goals", None) is None else torch.from_numpy(ds.goals)
        self.n = n

    def __len__(self) -> int:
        return self.n

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return images_to_float(self.images[idx]), self.tokens[idx], self.states[idx], self.actions[idx]


def images_to_float(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [..., C, S, S, 3] -> float [..., C, 3, S, S] in [0, 1]."""
    return images_u8.movedim(-1, -3).float().div_(255.0)


def observation_tensors(obs: Observation, config: VLAConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images = torch.from_numpy(np.stack(obs.images[: config.num_cameras]))[None]
    tokens = torch.from_numpy(tokenize(obs.instruction, config.max_text_len).astype(np.int32))[None]
    state = torch.from_numpy(np.asarray(obs.state, dtype=np.float32))[None]
    return images_to_float(images), tokens, state
