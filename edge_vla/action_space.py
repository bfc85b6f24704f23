"""The robot's action space as the bundle declares it: joint names, units and limits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_vla.errors import ConfigError


@dataclass(frozen=True)
class ActionSpace:
    """Joint-position targets. Limits are hard: the safety layer never sends anything outside them."""

    names: tuple[str, ...]
    units: str
    lower: np.ndarray  # [D] position lower limits
    upper: np.ndarray  # [D] position upper limits
    max_velocity: np.ndarray  # [D] per second
    max_acceleration: np.ndarray  # [D] per second^2
    action_period_s: float  # time between consecutive actions of a chunk

    @property
    def dim(self) -> int:
        return len(self.names)

    def to_dict(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "units": self.units,
            "lower": [float(v) for v in self.lower],
            "upper": [float(v) for v in self.upper],
            "max_velocity": [float(v) for v in self.max_velocity],
            "max_acceleration": [float(v) for v in self.max_acceleration],
            "action_period_s": float(self.action_period_s),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ActionSpace:
        try:
            space = cls(
                names=tuple(d["names"]),
                units=str(d["units"]),
                lower=np.asarray(d["lower"], dtype=np.float32),
                upper=np.asarray(d["upper"], dtype=np.float32),
                max_velocity=np.asarray(d["max_velocity"], dtype=np.float32),
                max_acceleration=np.asarray(d["max_acceleration"], dtype=np.float32),
                action_period_s=float(d["action_period_s"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"action_space is malformed ({exc!r}); re-export the bundle") from exc
        return space.validate()

    def validate(self) -> ActionSpace:
        d = self.dim
        for name in ("lower", "upper", "max_velocity", "max_acceleration"):
            arr = getattr(self, name)
            if arr.shape != (d,) or not np.all(np.isfinite(arr)):
                raise ConfigError(f"action_space.{name} must be {d} finite numbers, got {arr.tolist()}")
        if np.any(self.lower >= self.upper):
            raise ConfigError("action_space lower limits must be below upper limits")
        if np.any(self.max_velocity <= 0) or np.any(self.max_acceleration <= 0):
            raise ConfigError("action_space velocity and acceleration limits must be positive")
        if self.action_period_s <= 0:
            raise ConfigError("action_space.action_period_s must be positive")
        return self


def sim_action_space() -> ActionSpace:
    """The sim arm's joints (also what the demo's motor-controller emulator is configured with)."""
    from edge_vla.sim.env import ACTION_PERIOD_S
    from edge_vla.sim.scene import JOINT_ACCEL_LIMIT, JOINT_LOWER, JOINT_NAMES, JOINT_UPPER, JOINT_VEL_LIMIT

    return ActionSpace(
        names=JOINT_NAMES,
        units="rad",
        lower=JOINT_LOWER.copy(),
        upper=JOINT_UPPER.copy(),
        max_velocity=JOINT_VEL_LIMIT.copy(),
        max_acceleration=JOINT_ACCEL_LIMIT.copy(),
        action_period_s=ACTION_PERIOD_S,
    ).validate()
