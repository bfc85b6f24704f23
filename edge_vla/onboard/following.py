"""Following (tracking) error on the host: a category-1 trip when a joint does not follow its command.

A collision or a blocked joint shows as a growing |commanded - measured| position while the PD loop
builds torque. Joints with the gripper role are blocked by design when they close on an object, so
they get an effort limit instead. The firmware enforces its own (category 0) limits; this is the
host's earlier, gentler line.

Limits come from the robot configuration (edge_vla.provision.robot_config); a bundle may narrow them
(`narrowed`), never widen them. A limit of inf turns the check off for that joint.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_vla.errors import ConfigError


@dataclass(frozen=True)
class TrackingLimits:
    max_position_error: np.ndarray  # rad (or m) per joint; inf: off (gripper-role joints)
    max_effort: np.ndarray  # N*m (or N) per joint; inf: off (every non-gripper joint)
    debounce: int = 3  # cycles in a row over the limit: one noisy sample is not a collision

    @classmethod
    def from_robot(cls, names: tuple[str, ...], position_error: float | list[float],
                   gripper_joints: tuple[str, ...] = (), gripper_effort: float = float("inf"),
                   debounce: int = 3) -> TrackingLimits:
        n = len(names)
        pos = np.broadcast_to(np.asarray(position_error, np.float64), (n,)).copy() if np.size(position_error) in (1, n) \
            else None
        if pos is None:
            raise ConfigError(f"following-error limits: {np.size(position_error)} values for {n} joints "
                              f"({', '.join(names)}); give one value or one per joint")
        unknown = [g for g in gripper_joints if g not in names and not (g.isdigit() and int(g) < n)]
        if unknown:
            raise ConfigError(f"gripper joint(s) {unknown} are not among the action space's joints {list(names)}")
        effort = np.full(n, np.inf)
        for g in gripper_joints:
            j = int(g) if g.isdigit() else names.index(g)
            pos[j] = np.inf
            effort[j] = gripper_effort if gripper_effort > 0 else np.inf
        return cls(pos, effort, debounce).validate()

    def validate(self) -> TrackingLimits:
        for name in ("max_position_error", "max_effort"):
            arr = getattr(self, name)
            if np.any(np.isnan(arr)) or np.any(arr <= 0):
                raise ConfigError(f"{name} must be > 0 per joint (inf turns it off), got {arr.tolist()}")
        if self.debounce < 1:
            raise ConfigError(f"following-error debounce must be >= 1 cycle, got {self.debounce}")
        return self

    def narrowed(self, position_error: np.ndarray | None = None, effort: np.ndarray | None = None) -> TrackingLimits:
        """Tighter limits from a bundle: the element-wise minimum, so a bundle can never widen them."""
        pos = self.max_position_error if position_error is None else np.minimum(self.max_position_error,
                                                                                  np.asarray(position_error, float))
        eff = self.max_effort if effort is None else np.minimum(self.max_effort, np.asarray(effort, float))
        return TrackingLimits(pos, eff, self.debounce).validate()


class TrackingCheck:
    """Per-cycle check; returns (position reason, effort reason), each None when within limits."""

    def __init__(self, limits: TrackingLimits) -> None:
        self.limits = limits
        n = len(limits.max_position_error)
        self._over_pos = np.zeros(n, np.int64)
        self._over_eff = np.zeros(n, np.int64)

    def reset(self) -> None:
        self._over_pos[:] = 0
        self._over_eff[:] = 0

    def check(self, commanded: np.ndarray, measured: np.ndarray, effort: np.ndarray | None,
              names: tuple[str, ...]) -> tuple[str | None, str | None]:
        lim = self.limits
        err = np.abs(np.asarray(commanded, np.float64) - np.asarray(measured, np.float64))
        over = err > lim.max_position_error
        self._over_pos = np.where(over, self._over_pos + 1, 0)
        pos_reason = eff_reason = None
        hit = np.flatnonzero(self._over_pos >= lim.debounce)
        if hit.size:
            j = int(hit[0])
            pos_reason = (f"joint {names[j]} is {err[j]:.3f} from its command (limit {lim.max_position_error[j]:.3f}) "
                          f"for {int(self._over_pos[j])} cycles: blocked or in a collision")
        if effort is not None:
            e = np.abs(np.asarray(effort, np.float64))
            self._over_eff = np.where(e > lim.max_effort, self._over_eff + 1, 0)
            hit = np.flatnonzero(self._over_eff >= lim.debounce)
            if hit.size:
                j = int(hit[0])
                eff_reason = f"gripper {names[j]} effort {e[j]:.2f} over its limit {lim.max_effort[j]:.2f}"
        return pos_reason, eff_reason
