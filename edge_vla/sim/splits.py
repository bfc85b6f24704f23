"""`--env sim`, `sim:base` and `sim:hard`: which split of the project's sim an environment string names.

A dataset made on a split other than base records it in its meta (`split`, and `env` = `sim:<split>`);
base datasets carry no such key (they are the files made before splits existed), so a missing key means base.
"""

from __future__ import annotations

from typing import Any

from edge_vla.errors import ConfigError
from edge_vla.sim.scene import SPLITS

SIM_ENVS = ", ".join(["sim"] + [f"sim:{name}" for name in SPLITS])


def is_sim(env: object) -> bool:
    return isinstance(env, str) and (env == "sim" or env.startswith("sim:"))


def sim_split(env: str) -> str:
    """'sim' -> 'base', 'sim:hard' -> 'hard'; an unknown split is a one-line ConfigError."""
    if not is_sim(env):
        raise ConfigError(f"--env {env!r} is not the project's sim; use one of {SIM_ENVS}")
    name = env.partition(":")[2] or "base"
    if name not in SPLITS:
        raise ConfigError(f"--env {env!r}: unknown sim split {name!r}; use one of {SIM_ENVS}")
    return name


def sim_env(split: str) -> str:
    """The canonical --env string of a split: 'sim' for base (as before splits), else 'sim:<split>'."""
    return "sim" if split == "base" else f"sim:{split}"


def meta_split(meta: Any) -> str:
    """The split a sim dataset meta (or a checkpoint's copy of it) was made on: base unless it says otherwise."""
    if isinstance(meta, dict) and meta.get("task") == "reach":
        return str(meta.get("split", "base"))
    return "base"
