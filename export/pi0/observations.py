"""Observations for the numerics gate and INT8 calibration: the user's recorded frames (`--calib`) or a
seeded synthetic set (smooth random frames at a camera-like 240 x 320, instructions, state near the mean)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_vla.errors import ConfigError
from edge_vla.runtime.types import Observation

INSTRUCTIONS = ["pick up the red block", "put the cube in the bowl", "open the top drawer", "push the green button",
                "stack the blue block on the red block", "close the gripper"]


def synthetic(n: int, cameras: int, state_mean: np.ndarray, state_std: np.ndarray, seed: int,
              frame: tuple[int, int] = (240, 320)) -> list[Observation]:
    g = np.random.default_rng(seed)
    obs = []
    for i in range(n):
        frames = []
        for _ in range(cameras):
            base = g.normal(0, 6, (*frame, 3)).cumsum(0).cumsum(1) / 40  # smooth, image-like structure
            frames.append(np.clip(128 + base - base.mean() + g.normal(0, 8, base.shape), 0, 255).astype(np.uint8))
        state = (state_mean + state_std * g.normal(0, 1, len(state_mean))).astype(np.float32)
        obs.append(Observation(frames, INSTRUCTIONS[i % len(INSTRUCTIONS)], state))
    return obs


def from_npz(path: str | Path, cameras: int, state_dim: int, limit: int) -> list[Observation]:
    """A .npz with images uint8 [N, cameras, H, W, 3], state float [N, state_dim], instructions str [N]."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            images, state, instr = data["images"], data["state"], data["instructions"]
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"calibration set {path}: {exc!r}; expected a .npz with images [N, cameras, H, W, 3] "
                          "uint8, state [N, state_dim] and instructions [N] (str)") from exc
    if images.ndim != 5 or images.shape[1] != cameras or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ConfigError(f"calibration set {path}: images are {images.dtype}{list(images.shape)}, expected uint8 "
                          f"[N, {cameras}, H, W, 3]")
    if state.shape != (len(images), state_dim) or len(instr) != len(images):
        raise ConfigError(f"calibration set {path}: state {list(state.shape)} / instructions {len(instr)} do not "
                          f"match {len(images)} observations of state_dim {state_dim}")
    n = min(limit, len(images))
    return [Observation(list(images[i]), str(instr[i]), state[i].astype(np.float32)) for i in range(n)]
