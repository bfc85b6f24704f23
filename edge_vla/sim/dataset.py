"""Demonstration datasets: expert rollouts with perturbations, stored as one .npz (no pickles).

Arrays: images uint8 [N, C, S, S, 3], instructions str [N], states float32 [N, 2],
actions float32 [N, chunk, 2] (the expert's clean plan from that state), episodes int32 [N], and
goals float32 [N, 2]: where the named block is (metres; for an auxiliary training loss, never an input).
The executed actions are perturbed (DART-style) so the data covers recoveries from small errors.
With `counterfactual` (the default) every layout is demonstrated once per block, each time with that
block named: pairs of samples that differ only in the instruction, so a policy cannot do well
without reading it (with one instruction per layout it can settle for "some block").
`split` picks the sim's split (scene.SPLITS); a hard-split dataset says so in meta["split"] and meta["env"].
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_vla.atomic import atomic_write
from edge_vla.errors import EdgeVlaError
from edge_vla.sim.env import ReachEnv
from edge_vla.sim.expert import PLAN_ACCEL, expert_chunk
from edge_vla.sim.scene import get_split

DATASET_CHUNK = 16
FORMAT_VERSION = 1


@dataclass
class Dataset:
    images: np.ndarray
    instructions: np.ndarray
    states: np.ndarray
    actions: np.ndarray
    episodes: np.ndarray
    meta: dict
    goals: np.ndarray | None = None  # [N, 2] target xy; None for data that does not know it (older files)

    def __len__(self) -> int:
        return len(self.states)

    def action_stats(self) -> dict[str, list[float]]:
        flat = self.actions.reshape(-1, self.actions.shape[-1])
        return {"mean": flat.mean(0).tolist(), "std": (flat.std(0) + 1e-6).tolist()}

    def state_stats(self) -> dict[str, list[float]]:
        return {"mean": self.states.mean(0).tolist(), "std": (self.states.std(0) + 1e-6).tolist()}


def generate(
    seeds: range, image_size: int = 64, num_cameras: int = 1, noise: float = 0.15, chunk_len: int = DATASET_CHUNK,
    counterfactual: bool = True, split: str = "base",
) -> Dataset:
    env = ReachEnv(image_size=image_size, num_cameras=num_cameras, split=split)
    images, instr, states, actions, episodes, goals = [], [], [], [], [], []
    targets: list[int | None] = list(range(get_split(split).num_blocks)) if counterfactual else [None]
    for seed in seeds:
        for k, target in enumerate(targets):
            obs = env.reset(seed, target=target)
            rng = np.random.default_rng([10_000_000 + seed, k])
            assert env.scene is not None
            done = False
            while not done:
                plan = expert_chunk(env.scene, obs.state, chunk_len)
                images.append(np.stack(obs.images))
                instr.append(obs.instruction)
                states.append(obs.state)
                actions.append(plan)
                episodes.append(seed)  # all variants of a layout share it: splits keep them together
                goals.append(env.scene.target_xy)
                executed = plan[0] + rng.normal(0.0, noise, size=2).astype(np.float32) * (rng.random() < 0.5)
                obs, _, done = env.step(executed)
    meta = {
        "format_version": FORMAT_VERSION,
        "task": "reach",
        "image_size": image_size,
        "num_cameras": num_cameras,
        "seeds": [seeds.start, seeds.stop],
        "noise": noise,
        "counterfactual": counterfactual,
        "action_period_s": env.action_period_s,
        "expert_max_accel": [float(a) for a in PLAN_ACCEL],  # plans brake within this (issue 13)
    }
    if split != "base":  # base metas stay as they were before splits existed (no key means base)
        meta |= {"split": split, "env": f"sim:{split}"}
    return Dataset(
        images=np.stack(images),
        instructions=np.array(instr),
        states=np.stack(states).astype(np.float32),
        actions=np.stack(actions).astype(np.float32),
        episodes=np.array(episodes, dtype=np.int32),
        goals=np.stack(goals).astype(np.float32),
        meta=meta,
    )


def save(ds: Dataset, path: str | Path) -> Path:
    """Write atomically: a temp file in the same directory, then rename."""
    path = Path(path)
    extra = {} if ds.goals is None else {"goals": ds.goals}
    with atomic_write(path) as f:
        np.savez_compressed(
            f, images=ds.images, instructions=ds.instructions, states=ds.states, actions=ds.actions,
            episodes=ds.episodes, meta=np.array(json.dumps(ds.meta)), **extra,
        )
    return path


def load(path: str | Path) -> Dataset:
    path = Path(path)
    if not path.is_file():
        raise EdgeVlaError(f"dataset {path} does not exist; make one with `edge-vla make-data -o {path}`")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("images", "instructions", "states", "actions", "episodes", "meta")}
            goals = z["goals"] if "goals" in z.files else None
    except (OSError, ValueError, KeyError) as exc:
        raise EdgeVlaError(f"dataset {path} is not a readable edge-vla dataset ({exc}); regenerate it") from exc
    meta = json.loads(str(arrays.pop("meta")))
    if meta.get("format_version") != FORMAT_VERSION:
        raise EdgeVlaError(f"dataset {path} has format {meta.get('format_version')}, expected {FORMAT_VERSION}")
    return Dataset(meta=meta, goals=goals, **arrays)
