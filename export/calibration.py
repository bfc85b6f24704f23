"""Observations for INT8 calibration and numerics checks, and the graph feeds made from them."""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from edge_vla.config import VLAConfig
from edge_vla.errors import EdgeVlaError
from edge_vla.runtime.flow import REFERENCE_FLOW, integrate
from edge_vla.sim import dataset
from edge_vla.sim.metaworld import is_metaworld
from edge_vla.sim.splits import is_sim, sim_split

from .data import TensorDataset
from .lerobot import open_meta, parse_source
from .lerobot.hooks import calibration_data, check_calibration_source, is_lerobot_source
from .model import VLA
from .onnx_graphs import StepTime, kv_names, split_kv

CALIB_SEED_BASE = 500_000  # away from training seeds and from held-out evaluation seeds


def check_source(source: str | Path | None, config: VLAConfig | None = None, count: int = 32) -> None:
    """Refuse a --calib that cannot be read, in one line and before any export work: a missing file or folder,
    a folder without .npz files, a file that is not an .npz dataset, an unknown sim split, a LeRobot dataset
    that is absent (and, given the model's config, one whose cameras, sizes or tasks the model cannot take)."""
    if source is None or is_metaworld(source):
        return
    if is_sim(source):
        _as_calib(source, lambda: sim_split(str(source)))
        return
    if is_lerobot_source(source):
        text = str(source)
        if config is None:  # the family is not known yet: the dataset must at least be there
            _as_calib(source, lambda: open_meta(parse_source(text).root))
        else:
            _as_calib(source, lambda: check_calibration_source(text, config, count))
        return
    path = Path(source)
    if path.is_dir():
        files = sorted(path.glob("*.npz"))
        if not files:
            raise EdgeVlaError(f"--calib {path}: the folder holds no .npz datasets; pass a dataset from `edge-vla "
                               "make-data`, a folder of them, or lerobot:PATH")
    elif path.is_file():
        files = [path]
    else:
        raise EdgeVlaError(f"--calib {path}: no such file or folder; pass a .npz dataset from `edge-vla make-data`, "
                           "a folder of them, or lerobot:PATH")
    for f in files:
        if not zipfile.is_zipfile(f):
            raise EdgeVlaError(f"--calib {f}: not an .npz dataset (make one with `edge-vla make-data -o {f.name}`), "
                               "or pass lerobot:PATH for a LeRobot dataset")


def _as_calib(source: str | Path, check: Callable[[], object]) -> None:
    """Run a check, its error prefixed with the option that named the source."""
    try:
        check()
    except EdgeVlaError as exc:
        raise EdgeVlaError(f"--calib {source}: {exc}") from exc


def load_observations(config: VLAConfig, source: str | Path | None, count: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """images/tokens/state tensors for `count` observations: the sim's by default, a user .npz / folder,
    lerobot:PATH (frames from a LeRobot dataset's training episodes), metaworld:TASKS (fresh expert
    episodes on calibration seeds, every 4th step rendered) or sim / sim:hard (a split of the sim)."""
    if is_lerobot_source(source):
        ds = calibration_data(str(source), config, count)
    elif is_metaworld(source):
        from edge_vla.sim import metaworld

        spec = metaworld.MetaWorldSpec.parse(str(source))
        n = metaworld.episodes_for(count, len(spec.tasks))
        ds = metaworld.generate(spec, range(metaworld.CALIB_SEED_BASE + seed, metaworld.CALIB_SEED_BASE + seed + n),
                                config.image_size, config.num_cameras, frame_every=4)
    elif source is None or is_sim(source):
        ds = dataset.generate(range(CALIB_SEED_BASE + seed, CALIB_SEED_BASE + seed + max(1, count // 4)),
                              config.image_size, config.num_cameras,
                              split="base" if source is None else sim_split(str(source)))
    else:
        path = Path(source)
        files = sorted(path.glob("*.npz")) if path.is_dir() else [path]
        if not files:
            raise EdgeVlaError(f"no .npz observation files in {path}")
        parts = [dataset.load(f) for f in files]
        ds = dataset.Dataset(
            images=np.concatenate([p.images for p in parts]),
            instructions=np.concatenate([p.instructions for p in parts]),
            states=np.concatenate([p.states for p in parts]),
            actions=np.concatenate([p.actions for p in parts]),
            episodes=np.concatenate([p.episodes for p in parts]),
            meta=parts[0].meta,
        )
    data = TensorDataset(ds, config)
    idx = torch.from_numpy(np.random.default_rng(seed).permutation(len(data))[:count])
    images, tokens, state, _ = data.batch(idx)
    return {"images": images, "tokens": tokens, "state": state}


def prefix_feeds(obs: dict[str, torch.Tensor]) -> list[dict[str, np.ndarray]]:
    return [{k: v[i : i + 1].numpy() for k, v in obs.items()} for i in range(len(obs["state"]))]


@torch.no_grad()
def step_feeds(model: VLA, obs: dict[str, torch.Tensor], steps: int, limit: int, seed: int = 0,
               step_time: StepTime | None = None) -> list[dict[str, np.ndarray]]:
    """The step graph's inputs along real Euler trajectories, so calibration sees the activations it will serve."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    step_time = step_time or StepTime(model, "scalar")
    feeds: list[dict[str, np.ndarray]] = []
    n = len(obs["state"])
    per_obs = max(1, min(steps, limit // max(n, 1)))
    for i in range(n):
        kv = model.prefix_kv(obs["images"][i : i + 1], obs["tokens"][i : i + 1], obs["state"][i : i + 1])
        x = torch.randn(1, cfg.chunk_len, cfg.action_dim, generator=g)
        chosen = set(torch.randperm(steps, generator=g)[:per_obs].tolist())
        feeds += _trajectory_feeds(model, kv, x, steps, chosen, step_time)
        if len(feeds) >= limit:
            break
    return feeds[:limit]


def _trajectory_feeds(model: VLA, kv: torch.Tensor, x: torch.Tensor, steps: int, chosen: set[int],
                      step_time: StepTime) -> list[dict[str, np.ndarray]]:
    """The step graph's feeds at the chosen steps of one Euler trajectory from x."""
    kv_feed = {name: t.numpy() for name, t in zip(kv_names(model), split_kv(kv), strict=True)}
    feeds: list[dict[str, np.ndarray]] = []

    def record(step: int, _stage: int, x_in: torch.Tensor, t: float, _v: torch.Tensor) -> None:
        if step in chosen:
            feeds.append({"x_t": x_in.numpy().copy(), **step_time.feed(t), **kv_feed})

    integrate(lambda x_in, t: model.velocity(x_in, torch.full((1,), t), kv), x, REFERENCE_FLOW, steps, "euler", record)
    return feeds
