"""The robot description a π0 checkpoint does not hold (`--sidecar robot.json`, documented in docs/PI0.md).

{
  "action": {"names": ["shoulder", ...], "units": "rad", "kind": "absolute_joint_position",  # roles: optional
             "lower": [...], "upper": [...], "max_velocity": [...], "max_acceleration": [...]},
  "state_names": ["shoulder", ...],          # optional; its length must match the state statistics
  "cameras": ["base", "wrist"],              # optional camera names, in the order the policy takes them
  "control": {"action_period_s": 0.02},      # time between consecutive actions of a chunk
  "stats": {"state": {"mean": [...], "std": [...]}, "action": {"mean": [...], "std": [...]}}  # optional
}

The number of action names is the number of valid action dims: the first `len(names)` of π0's padded
`max_action_dim`. Statistics in the sidecar override the processor's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_vla.action_space import ACTION_KINDS, ActionSpace
from edge_vla.errors import ConfigError

from .checkpoint import finite_numbers, preview, read_json_file

MAX_SIDECAR_BYTES = 1 << 20  # a robot description is a few kB


@dataclass
class RobotSidecar:
    action_space: ActionSpace
    kind: str
    state_names: list[str] | None = None
    cameras: list[str] | None = None
    stats: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)
    source: str = "default"

    @property
    def action_dim(self) -> int:
        return self.action_space.dim


def default_sidecar(action_dim: int, action_period_s: float = 0.02) -> RobotSidecar:
    """No sidecar: generic joint names and wide limits (the safety layer still clamps to them)."""
    d = action_dim
    space = ActionSpace(tuple(f"joint_{i}" for i in range(d)), "rad", np.full(d, -np.pi, np.float32),
                        np.full(d, np.pi, np.float32), np.full(d, 2.0, np.float32), np.full(d, 20.0, np.float32),
                        action_period_s).validate()
    return RobotSidecar(space, "absolute_joint_position", source="default (no --sidecar: generic names, ±π limits)")


def load_sidecar(path: str | Path) -> RobotSidecar:
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise ConfigError(f"sidecar {path} does not exist")
    # Bounded and non-blocking: `--sidecar` naming a FIFO blocked forever, one naming /dev/zero read until memory
    # ran out, a document nested too deeply was a RecursionError traceback.
    data = read_json_file(path, MAX_SIDECAR_BYTES, ConfigError, "sidecar", "give the sidecar JSON file itself")
    return parse_sidecar(data, str(path))


def parse_sidecar(data: Any, source: str = "sidecar") -> RobotSidecar:
    """Every field is checked for its type here, so a hand-edited file gives one ConfigError naming the field."""
    if not isinstance(data, dict) or not isinstance(data.get("action"), dict):
        raise ConfigError(f"{source}: needs an 'action' object (names, units, lower, upper, ...); see docs/PI0.md")
    act = data["action"]
    names = act.get("names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{source}: action.names must be a non-empty list of strings")
    d = len(names)
    kind = act.get("kind", "absolute_joint_position")
    if not isinstance(kind, str) or kind not in ACTION_KINDS:
        raise ConfigError(f"{source}: action.kind {preview(kind)} is not one of {list(ACTION_KINDS)}")
    roles = act.get("roles")
    if roles is not None and (not isinstance(roles, list) or len(roles) != d or
                              not all(isinstance(r, str) for r in roles)):
        raise ConfigError(f"{source}: action.roles must list {d} roles (joint, ee or gripper; one per action name)")
    units = act.get("units", "rad")
    if not isinstance(units, str):
        raise ConfigError(f"{source}: action.units must be a string such as \"rad\", got {preview(units)}")
    control = _object(data, "control", source)
    period = control.get("action_period_s", 0.02)
    if not _number(period) or period <= 0:
        raise ConfigError(f"{source}: control.action_period_s must be a positive number of seconds, got "
                          f"{preview(period)}")

    def vec(key: str, default: float) -> np.ndarray:
        values = finite_numbers(act.get(key, [default] * d), f"{source}: action.{key}", ConfigError)
        if len(values) != d:
            raise ConfigError(f"{source}: action.{key} must list {d} numbers (one per action name)")
        return np.asarray(values, np.float32)

    try:
        space = ActionSpace(tuple(names), units, vec("lower", -np.pi), vec("upper", np.pi), vec("max_velocity", 2.0),
                            vec("max_acceleration", 20.0), float(period), kind,
                            tuple(roles) if roles is not None else None).validate()
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    stats: dict[str, tuple[list[float], list[float]]] = {}
    all_stats = _object(data, "stats", source)
    for key, want in (("state", None), ("action", d)):
        s = all_stats.get(key)
        if s is None:
            continue
        if not isinstance(s, dict):
            raise ConfigError(f"{source}: stats.{key} must be an object with mean and std lists, got {preview(s)}")
        mean = finite_numbers(s.get("mean"), f"{source}: stats.{key}.mean", ConfigError)
        std = finite_numbers(s.get("std"), f"{source}: stats.{key}.std", ConfigError)
        if len(mean) != len(std) or (want and len(mean) != want):
            raise ConfigError(f"{source}: stats.{key} needs mean and std lists of equal length"
                              + (f" ({want}, one per action name)" if want else ""))
        if any(v <= 0 for v in std):
            raise ConfigError(f"{source}: stats.{key}.std must be positive")
        stats[key] = (mean, std)
    cams = data.get("cameras")
    if cams is not None and (not isinstance(cams, list) or not all(isinstance(c, str) for c in cams)):
        raise ConfigError(f"{source}: cameras must be a list of names")
    state_names = data.get("state_names")
    if state_names is not None and (not isinstance(state_names, list) or
                                    not all(isinstance(n, str) for n in state_names)):
        raise ConfigError(f"{source}: state_names must be a list of names")
    return RobotSidecar(space, kind, state_names, cams, stats, source)


def _object(data: dict[str, Any], key: str, source: str) -> dict[str, Any]:
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: {key} must be a JSON object, got {preview(value)}; see docs/PI0.md")
    return value


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
