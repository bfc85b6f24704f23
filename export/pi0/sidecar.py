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

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_vla.action_space import ACTION_KINDS, ActionSpace
from edge_vla.errors import ConfigError


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
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"sidecar {path} does not exist") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"sidecar {path} is not valid JSON ({exc})") from exc
    return parse_sidecar(data, str(path))


def parse_sidecar(data: Any, source: str = "sidecar") -> RobotSidecar:
    if not isinstance(data, dict) or not isinstance(data.get("action"), dict):
        raise ConfigError(f"{source}: needs an 'action' object (names, units, lower, upper, ...); see docs/PI0.md")
    act = data["action"]
    names = act.get("names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{source}: action.names must be a non-empty list of strings")
    d = len(names)
    kind = act.get("kind", "absolute_joint_position")
    if kind not in ACTION_KINDS:
        raise ConfigError(f"{source}: action.kind {kind!r} is not one of {list(ACTION_KINDS)}")
    roles = act.get("roles")
    if roles is not None and (not isinstance(roles, list) or len(roles) != d):
        raise ConfigError(f"{source}: action.roles must list {d} roles (joint, ee or gripper; one per action name)")
    period = (data.get("control") or {}).get("action_period_s", 0.02)

    def vec(key: str, default: float) -> list[float]:
        v = act.get(key, [default] * d)
        if not isinstance(v, list) or len(v) != d:
            raise ConfigError(f"{source}: action.{key} must list {d} numbers (one per action name)")
        return [float(x) for x in v]

    try:
        space = ActionSpace(tuple(names), str(act.get("units", "rad")), np.asarray(vec("lower", -np.pi), np.float32),
                            np.asarray(vec("upper", np.pi), np.float32), np.asarray(vec("max_velocity", 2.0), np.float32),
                            np.asarray(vec("max_acceleration", 20.0), np.float32), float(period), kind,
                            tuple(str(r) for r in roles) if roles is not None else None).validate()
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    stats: dict[str, tuple[list[float], list[float]]] = {}
    for key, want in (("state", None), ("action", d)):
        s = (data.get("stats") or {}).get(key)
        if s is None:
            continue
        mean, std = s.get("mean"), s.get("std")
        if not isinstance(mean, list) or not isinstance(std, list) or len(mean) != len(std) or (want and len(mean) != want):
            raise ConfigError(f"{source}: stats.{key} needs mean and std lists of equal length"
                              + (f" ({want}, one per action name)" if want else ""))
        if any(float(v) <= 0 for v in std):
            raise ConfigError(f"{source}: stats.{key}.std must be positive")
        stats[key] = ([float(v) for v in mean], [float(v) for v in std])
    cams = data.get("cameras")
    if cams is not None and (not isinstance(cams, list) or not all(isinstance(c, str) for c in cams)):
        raise ConfigError(f"{source}: cameras must be a list of names")
    return RobotSidecar(space, kind, data.get("state_names"), cams, stats, source)
