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
import math
import zipfile
from collections import Counter
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
    """Read and check a dataset: every array the shape, type and length `save` writes, or one line saying which is
    not (a file from outside must not train half-right, or fail with an IndexError hours in)."""
    path = Path(path)
    if not path.is_file():
        raise EdgeVlaError(f"dataset {path} does not exist; make one with `edge-vla make-data -o {path}`")
    try:
        _check_declared_sizes(path)
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("images", "instructions", "states", "actions", "episodes", "meta")}
            goals = z["goals"] if "goals" in z.files else None
    # BadZipFile: a member failing its CRC; MemoryError: a declared size beyond this machine's memory.
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, MemoryError) as exc:
        raise EdgeVlaError(f"dataset {path} is not a readable edge-vla dataset ({_first_line(exc)}); "
                           "regenerate it") from exc
    meta = _meta(path, arrays.pop("meta"))
    if meta.get("format_version") != FORMAT_VERSION:
        raise EdgeVlaError(f"dataset {path} has format {meta.get('format_version')}, expected {FORMAT_VERSION}")
    if goals is not None:
        arrays["goals"] = goals
    checked = _checked_arrays(path, arrays)
    return Dataset(meta=meta, goals=checked.pop("goals", None), **checked)


# name -> (axes, what they are, the dtype kinds accepted, the dtype kept): what `save` writes, per sample.
# Numbers of another width (a converter's float64) are kept as float32, the model's dtype; text and pixels are not
# converted (float pixels may be 0..1 or 0..255: guessing would train on wrong images).
_LAYOUT: dict[str, tuple[int, str, str, type | None]] = {
    "images": (5, "samples, cameras, height, width, RGB", "u", np.uint8),
    "instructions": (1, "samples", "U", None),
    "states": (2, "samples, state", "fiu", np.float32),
    "actions": (3, "samples, chunk, action", "fiu", np.float32),
    "episodes": (1, "samples", "iu", np.int32),
    "goals": (2, "samples, goal", "fiu", np.float32),
}
_KIND_WORDS = {"u": "uint8 pixels", "U": "text", "fiu": "numbers", "iu": "integer episode ids"}


def _checked_arrays(path: Path, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays in their kept dtypes, after checking each one's axes and type and that all hold one row per sample."""
    out = {}
    for name, a in arrays.items():
        ndim, axes, kinds, keep = _LAYOUT[name]
        if a.ndim != ndim:
            raise _bad(path, f"{name} has {a.ndim} axes {list(a.shape)}; expected {ndim} ({axes})")
        if a.dtype.kind not in kinds or (keep is np.uint8 and a.dtype != np.uint8):
            raise _bad(path, f"{name} holds {a.dtype}; expected {_KIND_WORDS[kinds]}")
        if name == "images" and a.shape[-1] != 3:
            raise _bad(path, f"images has {a.shape[-1]} colour channels; expected 3 (RGB)")
        if name == "episodes" and a.size and not np.iinfo(np.int32).min <= a.min() <= a.max() <= np.iinfo(np.int32).max:
            raise _bad(path, "episodes holds ids outside int32")
        out[name] = a if keep is None else a.astype(keep, copy=False)
    lengths = {name: len(a) for name, a in out.items()}
    common = Counter(lengths.values()).most_common(1)[0][0]
    odd = [f"{name} holds {n}" for name, n in lengths.items() if n != common]
    if odd:
        raise _bad(path, f"{', '.join(odd)} rows but the other arrays hold {common}: every array holds one row per "
                         "sample (a truncated or mixed-up file)")
    if common == 0:
        raise _bad(path, "it holds no samples")
    return out


def _meta(path: Path, raw: np.ndarray) -> dict:
    try:
        meta = json.loads(str(raw))
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep to parse
        raise _bad(path, f"its meta is not JSON ({type(exc).__name__}: {_first_line(exc)[:80]})") from exc
    if not isinstance(meta, dict):
        raise _bad(path, f"its meta is {type(meta).__name__}, not a JSON object")
    return meta


_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _check_declared_sizes(path: Path) -> None:
    """Refuse a member whose .npy header declares more bytes than the member holds, before numpy allocates the
    declared size whole (a 60-byte member can declare terabytes)."""
    if not zipfile.is_zipfile(path):
        return  # np.load says what it is
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with zf.open(info) as f:
                try:
                    read_header = _HEADER_READERS.get(np.lib.format.read_magic(f))
                    if read_header is None:
                        continue  # a format version without a public header reader: np.load checks it
                    shape, _, dtype = read_header(f)
                except ValueError:
                    continue  # not an array numpy reads: np.load refuses it with its reason
                declared = math.prod(shape) * dtype.itemsize
                held = info.file_size - f.tell()
            if declared > held:
                raise _bad(path, f"{info.filename[:-4]} declares shape {list(shape)} ({declared:,} bytes) but holds "
                                 f"{held:,} bytes: a truncated or forged file")


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _bad(path: Path, problem: str) -> EdgeVlaError:
    return EdgeVlaError(f"dataset {path}: {problem}; regenerate it with `edge-vla make-data`")
