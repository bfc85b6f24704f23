"""What the workstation commands do differently for a MetaWorld dataset, checkpoint or bundle (kept here so the
CLIs change by a line). The sim (the default) passes through every function unchanged.

A MetaWorld dataset's meta records its environment (`env`, e.g. `metaworld:mt10?cameras=corner2,gripperPOV`)
and action space; training copies the dataset meta into the checkpoint, export into the bundle's provenance,
so every later command finds the environment without being told. The sim's hard split works the same way:
its dataset meta says `split: hard`, and `target_env` / `export_options` read it from there.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from edge_vla.action_space import ActionSpace
from edge_vla.config import VLAConfig
from edge_vla.errors import EdgeVlaError
from edge_vla.sim.dataset import Dataset
from edge_vla.sim.metaworld import MetaWorldSpec, camera_entries, is_metaworld
from edge_vla.sim.splits import meta_split, sim_env
from edge_vla.tokenizer import normalize


def dataset_env(meta: dict[str, Any] | None) -> str | None:
    """The environment a dataset meta came from: a `metaworld:...` spec, or None for the sim (and recorded data)."""
    if isinstance(meta, dict) and meta.get("task") == "metaworld" and is_metaworld(meta.get("env")):
        return str(meta["env"])
    return None


def instruction_bytes(text: object) -> int:
    """Bytes an instruction takes in the model's byte tokenizer (after its case and whitespace folding)."""
    return len(normalize(str(text)).encode("utf-8"))


def longest_instruction(instructions: Iterable[object]) -> tuple[str, int]:
    """The instruction with the most tokenizer bytes and that count; ("", 0) for none."""
    best, most = "", 0
    for text in set(map(str, instructions)):
        n = instruction_bytes(text)
        if n > most or (n == most and text < best):
            best, most = text, n
    return best, most


def text_len_for(instructions: Iterable[object]) -> int:
    """max_text_len that fits every instruction: the longest one's bytes plus the end mark."""
    return longest_instruction(instructions)[1] + 1


def training_config(cfg: VLAConfig, ds: Dataset) -> VLAConfig:
    """The instruction length grows to the data's longest instruction (tokenizer bytes plus the end mark), for
    any dataset; MetaWorld data also fixes the model's state, action and camera counts (4, 4 and the dataset's
    cameras)."""
    cfg = dataclasses.replace(cfg, max_text_len=max(cfg.max_text_len, text_len_for(ds.instructions))).validate()
    if dataset_env(ds.meta) is None:
        return cfg
    # Data that records MetaWorld's object and goal positions sizes the goal head (an auxiliary training target).
    goal_dim = cfg.goal_dim if ds.goals is None else int(ds.goals.shape[1])
    return dataclasses.replace(cfg, state_dim=int(ds.states.shape[1]), action_dim=int(ds.actions.shape[-1]),
                               num_cameras=int(ds.images.shape[1]), goal_dim=goal_dim).validate()


def student_config(student: VLAConfig, teacher: VLAConfig, data_meta: dict[str, Any] | None) -> VLAConfig:
    """A student distilled on MetaWorld observations sees the teacher's cameras (its instruction length is
    settled for every dataset by distill_cli)."""
    if dataset_env(data_meta) is None:
        return student
    return dataclasses.replace(student, num_cameras=teacher.num_cameras).validate()


def export_options(opts: Any, meta: dict[str, Any]) -> Any:
    """For a checkpoint trained or distilled on MetaWorld: the bundle declares MetaWorld's action space
    (end-effector deltas and a gripper) and camera names, and INT8 calibration and the numerics check draw
    fresh MetaWorld observations (calibration seeds) unless --calib names a dataset."""
    env = dataset_env(meta.get("dataset"))
    if env is None:
        split = meta_split(meta.get("dataset"))
        if split == "base":
            return opts
        # A sim split other than base: calibrate and check numerics on that split's observations.
        return dataclasses.replace(opts, calib=opts.calib or sim_env(split),
                                   observations=opts.observations or sim_env(split))
    data = meta["dataset"]
    spec = MetaWorldSpec.parse(env)
    cams = spec.cameras or spec.camera_names(int(data.get("num_cameras", 1)))
    return dataclasses.replace(
        opts,
        action_space=opts.action_space or ActionSpace.from_dict(data["action_space"]),
        cameras=opts.cameras or tuple(camera_entries(cams, int(data.get("image_size", 64)))),
        calib=opts.calib or env,
        observations=opts.observations or env,
    )


def target_env(target: str) -> str | None:
    """The environment a checkpoint or bundle directory was trained in: a MetaWorld spec, `sim:<split>` for a
    sim split other than base, None for the base sim (or not a model)."""
    path = Path(target.partition("@")[0])
    meta: Any = None
    try:
        if (path / "manifest.json").is_file():
            meta = (json.loads((path / "manifest.json").read_text()).get("provenance") or {}).get("dataset")
        elif (path / "config.json").is_file():
            from .checkpoint import read_config

            meta = read_config(path)[1].get("dataset")
    except (OSError, ValueError, EdgeVlaError):  # not an edge-vla checkpoint (e.g. transformers π0): the sim
        return None
    env = dataset_env(meta)
    if env is None and meta_split(meta) != "base":
        return sim_env(meta_split(meta))
    return env


def resolve_env(env: str | None, targets: list[str]) -> str:
    """--env as given, else the environment the first model target was trained in, else the sim."""
    if env is not None:
        return env
    for t in targets:
        found = target_env(t)
        if found is not None:
            return found
    return "sim"
