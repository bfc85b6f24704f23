"""Turning sim datasets and observations into model tensors."""

from __future__ import annotations

import numpy as np
import torch

from edge_vla.config import VLAConfig
from edge_vla.errors import ConfigError
from edge_vla.runtime.types import Observation
from edge_vla.sim.dataset import Dataset
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
