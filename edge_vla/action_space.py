"""The robot's action space as the bundle declares it: what an action is (its kind), each dimension's name,
role, units and limits.

Kinds (`ActionSpace.kind`): what the policy's numbers mean to the robot. `Policy` does not care; the
onboard loop (`edge-vla run`) streams joint-position setpoints, so it executes `absolute_joint_position`
only and refuses other kinds (`require_executable`). A manifest written before kinds existed has none:
it reads as `absolute_joint_position` with every dimension a joint (what every older bundle was).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_vla.errors import ConfigError

# kind -> what it means (for messages and docs/MANIFEST.md)
ACTION_KINDS: dict[str, str] = {
    "absolute_joint_position": "absolute joint positions",
    "delta_joint_position": "joint-position deltas",
    "joint_velocity": "joint velocities",
    "absolute_ee_pose": "absolute end-effector poses",
    "delta_ee_pose": "end-effector deltas",
    "other": "a robot-specific action",
}
DEFAULT_KIND = "absolute_joint_position"
JOINT_KINDS = ("absolute_joint_position", "delta_joint_position", "joint_velocity")
EE_KINDS = ("absolute_ee_pose", "delta_ee_pose")
# A dimension's role: a joint (joint kinds), a Cartesian end-effector coordinate (end-effector kinds), or the
# gripper, which both kinds may carry as one more dimension (its own command, e.g. open/close).
ROLES = ("joint", "ee", "gripper")


@dataclass(frozen=True)
class ActionSpace:
    """Actions of one kind (joint-position targets unless `kind` says otherwise). Limits are hard: the safety
    layer never sends anything outside them."""

    names: tuple[str, ...]
    units: str
    lower: np.ndarray  # [D] position lower limits
    upper: np.ndarray  # [D] position upper limits
    max_velocity: np.ndarray  # [D] per second
    max_acceleration: np.ndarray  # [D] per second^2
    action_period_s: float  # time between consecutive actions of a chunk
    kind: str = DEFAULT_KIND
    roles: tuple[str, ...] | None = None  # per dimension; None: every dimension is the kind's default role

    @property
    def dim(self) -> int:
        return len(self.names)

    @property
    def dim_roles(self) -> tuple[str, ...]:
        default = "ee" if self.kind in EE_KINDS else "joint"
        return self.roles if self.roles is not None else (default,) * self.dim

    def describe(self) -> str:
        """E.g. 'delta_ee_pose (end-effector deltas: dx, dy, dz; gripper: gripper)'."""
        by_role: dict[str, list[str]] = {}
        for name, role in zip(self.names, self.dim_roles):
            by_role.setdefault(role, []).append(name)
        dims = "; ".join(f"{role}: {', '.join(names)}" for role, names in by_role.items())
        return f"{self.kind} ({ACTION_KINDS.get(self.kind, self.kind)}, {dims})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "units": self.units,
            "lower": [float(v) for v in self.lower],
            "upper": [float(v) for v in self.upper],
            "max_velocity": [float(v) for v in self.max_velocity],
            "max_acceleration": [float(v) for v in self.max_acceleration],
            "action_period_s": float(self.action_period_s),
            "kind": self.kind,
            "roles": list(self.dim_roles),
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
                # Absent in manifests written before action kinds: those were all absolute joint positions.
                kind=str(d.get("kind", DEFAULT_KIND)),
                roles=tuple(str(r) for r in d["roles"]) if d.get("roles") is not None else None,
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
        if not (math.isfinite(self.action_period_s) and self.action_period_s > 0):  # NaN compares False
            raise ConfigError(f"action_space.action_period_s must be a positive finite number of seconds, got {self.action_period_s!r}")
        if self.kind not in ACTION_KINDS:
            raise ConfigError(f"action_space.kind {self.kind!r} is not one of {list(ACTION_KINDS)}")
        roles = self.dim_roles
        if len(roles) != d:
            raise ConfigError(f"action_space.roles must give one role per dimension ({d}), got {list(roles)}")
        allowed = {"gripper", "ee" if self.kind in EE_KINDS else "joint"} if self.kind != "other" else set(ROLES)
        wrong = [f"{n}={r}" for n, r in zip(self.names, roles) if r not in allowed]
        if wrong:
            raise ConfigError(f"action_space.roles {wrong}: a {self.kind} action's dimensions are "
                              f"{' or '.join(sorted(allowed))}")
        return self


def require_executable(space: ActionSpace, executable: tuple[str, ...], what: str, executor: str, why: str) -> None:
    """Refuse, in one line, a policy whose action kind `executor` cannot execute (`edge-vla run`)."""
    if space.kind not in executable:
        raise ConfigError(f"{what} declares {space.describe()} actions, but {executor} executes "
                          f"{' or '.join(executable)} only ({why}); evaluate it in its own environment (`edge-vla "
                          "evaluate`) or train and export a policy in this robot's action kind")


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
