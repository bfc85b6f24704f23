"""A bundle's action units <-> a servo device's radians, per joint, through a LeRobot calibration.

A policy trained on LeRobot data acts in LeRobot's units, not radians. LeRobot's SO-100/SO-101 and Koch
followers declare per motor (src/lerobot/robots/so101_follower/so101_follower.py, so100_follower/
so100_follower.py, koch_follower/koch_follower.py):

    norm_mode_body = MotorNormMode.DEGREES if config.use_degrees else MotorNormMode.RANGE_M100_100
    "shoulder_pan" .. "wrist_roll": Motor(i, model, norm_mode_body)
    "gripper":                      Motor(6, model, MotorNormMode.RANGE_0_100)   # also with use_degrees

so the body joints act in -100..100 of the calibrated range (or degrees) and the gripper in 0..100 of its range.
`ActionUnits` names these choices: `lerobot-range` (RANGE_M100_100 body, RANGE_0_100 gripper), `degrees`
(DEGREES body, RANGE_0_100 gripper) and `rad` (every joint in radians about the calibration's mid-range).

Per joint the layer goes units -> goal ticks with LeRobot's own `_unnormalize` (src/lerobot/motors/
motors_bus.py, reproduced by `LeRobotMotor.unnormalize`: its clamps to -100..100 / 0..100 and its `int()`
truncation) -> radians through the device's `JointCalibration` (`LeRobotMotor.joint_calibration`: zero at
mid-range, resolution - 1 ticks per turn). That last step is lossless for integer ticks (the device's
`to_ticks` rounds them back exactly), so the servo receives exactly the tick LeRobot would have written.
States go back the same way: radians -> ticks -> LeRobot's `_normalize` (which clamps to the calibrated
range in the RANGE modes). In DEGREES mode LeRobot applies neither a clamp nor the drive mode, and its
value is (ticks - mid) * 360 / (resolution - 1), which under that calibration is exactly radians * 180/pi.
Velocities scale by the affine map's slope per joint (units per radian). Whether the drive mode flips the
RANGE modes is the bus's choice in LeRobot (`apply_drive_mode`: True on FeetechMotorsBus, False on
DynamixelMotorsBus, where the servo's own Drive Mode register reverses it), read from the backend class.

The homing offset is not here: LeRobot writes it into the servo, whose Present Position already includes it;
the backend only checks the register against the file (`ServoBusDevice.expected_homing`).

Pure (numpy and the standard library); the link adapter (`link_adapter.MotorDeviceLink`) applies it, so the
control loop sees the bundle's units and learns nothing about ticks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np

from firmware_bridge.motors.base import MotorError
from firmware_bridge.motors.calibration import (
    X_SERIES_TICKS_PER_TURN,
    CalibrationError,
    JointCalibration,
    LeRobotMotor,
    NormMode,
)

LEROBOT_SUFFIX = ".pos"  # LeRobot names a joint's action "shoulder_pan.pos" (Robot._motors_ft)
GRIPPER_MOTOR = "gripper"  # the one motor LeRobot's followers normalise to RANGE_0_100
LISTED_MOTORS = 12  # a refusal names at most this many of a calibration's motors (one readable line)
LIMIT_TOLERANCE_TICKS = 1e-3  # float32 limits in the manifest: far below a tick, far above rounding


class ActionUnits(str, Enum):
    """What a bundle's joint-position actions are measured in."""

    LEROBOT_RANGE = "lerobot-range"  # LeRobot's default: -100..100 body, 0..100 gripper
    DEGREES = "degrees"  # LeRobot's use_degrees=True: degrees body, 0..100 gripper
    RAD = "rad"  # radians about the calibration's mid-range (the sim and this project's own bundles)


# How a manifest may spell them (its `action_space.units` is free text; LeRobot datasets often carry none)
UNIT_SPELLINGS: dict[str, ActionUnits] = {
    "lerobot-range": ActionUnits.LEROBOT_RANGE, "range_m100_100": ActionUnits.LEROBOT_RANGE,
    "degrees": ActionUnits.DEGREES, "degree": ActionUnits.DEGREES, "deg": ActionUnits.DEGREES,
    "rad": ActionUnits.RAD, "radian": ActionUnits.RAD, "radians": ActionUnits.RAD,
}
UNCALIBRATED_UNITS = (ActionUnits.RAD,)  # the default calibration (tick 2048 = 0 rad) produces only radians


def choose_units(declared: str, requested: str | None, available: Sequence[ActionUnits]) -> ActionUnits:
    """The units a run drives in: the bundle's declared units, or `--action-units` where the bundle declares
    none this layer knows (a LeRobot-read bundle says "as recorded"). One-line CalibrationError otherwise."""
    known = UNIT_SPELLINGS.get(declared.strip().lower())
    wanted = ActionUnits(requested) if requested is not None else None
    calibrated = len(available) > 1
    if known is not None and wanted is not None and wanted is not known:
        raise CalibrationError(f"--action-units {wanted.value} contradicts the bundle, which declares its actions in "
                               f"{declared!r}; drop --action-units, or re-export the bundle with the units it was "
                               "trained in")
    chosen = known or wanted
    if chosen is None:
        options = "|".join(u.value for u in ActionUnits) if calibrated else "rad (with --calibration PATH also " \
            "lerobot-range or degrees)"
        raise CalibrationError(f"the bundle declares its actions in {declared!r}, which says nothing the servos can "
                               f"use; say which units the policy acts in with --action-units {options} (LeRobot's "
                               "SO-100/101 and Koch followers: lerobot-range; with use_degrees=True: degrees)")
    if chosen not in available:
        raise CalibrationError(f"the bundle acts in {chosen.value}, but without --calibration the servos produce only "
                               "rad (the default calibration: tick 2048 = 0 rad); give the arm's LeRobot calibration "
                               "file with --calibration PATH")
    return chosen


def motor_name(joint: str) -> str:
    """The calibration motor a bundle joint drives: LeRobot's "shoulder_pan.pos" is motor "shoulder_pan"."""
    return joint[: -len(LEROBOT_SUFFIX)] if joint.endswith(LEROBOT_SUFFIX) else joint


def norm_mode(units: ActionUnits, gripper: bool) -> NormMode | None:
    """LeRobot's norm mode for one joint (None: radians, no LeRobot normalisation)."""
    if units is ActionUnits.RAD:
        return None
    if gripper:
        return NormMode.RANGE_0_100
    return NormMode.RANGE_M100_100 if units is ActionUnits.LEROBOT_RANGE else NormMode.DEGREES


@dataclass(frozen=True)
class UnitSpec:
    """What a run chose, independent of the backend: per bundle joint (in order) its calibration motor and
    LeRobot norm mode. Picklable: it travels to the control process in the link's keyword arguments."""

    units: ActionUnits
    joints: tuple[str, ...]
    motors: tuple[LeRobotMotor, ...]
    modes: tuple[NormMode | None, ...]

    @classmethod
    def build(cls, calibration: Mapping[str, LeRobotMotor], joints: Sequence[str], roles: Sequence[str] | None,
              units: ActionUnits, source: str = "the calibration") -> UnitSpec:
        """Map bundle joints to calibration motors by name; every joint must have one (one line naming the
        missing). A joint is the gripper when its motor is LeRobot's "gripper" or the bundle's role says so."""
        missing = [j for j in joints if motor_name(j) not in calibration]
        if missing:
            listed = list(calibration)
            shown = ", ".join(listed[:LISTED_MOTORS]) + (f" and {len(listed) - LISTED_MOTORS} more"
                                                         if len(listed) > LISTED_MOTORS else "")
            raise CalibrationError(
                f"{source} has no motor for the bundle's joint(s) {', '.join(missing)} (it lists {shown}); a joint "
                f"named NAME or NAME{LEROBOT_SUFFIX} drives calibration motor NAME")
        seen: dict[str, str] = {}
        for j in joints:
            if motor_name(j) in seen:  # "gripper" and "gripper.pos": one servo commanded twice per cycle
                raise CalibrationError(f"the bundle's joints {seen[motor_name(j)]!r} and {j!r} both map to calibration "
                                       f"motor {motor_name(j)!r}; each joint drives its own servo")
            seen[motor_name(j)] = j
        roles = tuple(roles) if roles is not None else ("joint",) * len(joints)
        motors = tuple(calibration[motor_name(j)] for j in joints)
        modes = tuple(norm_mode(units, m.name == GRIPPER_MOTOR or r == "gripper")
                      for m, r in zip(motors, roles, strict=True))
        return cls(units, tuple(joints), motors, modes)

    @property
    def ids(self) -> tuple[int, ...]:
        return tuple(m.id for m in self.motors)

    @property
    def by_name(self) -> dict[str, LeRobotMotor]:
        return {m.name: m for m in self.motors}


@dataclass(frozen=True)
class JointUnits:
    """One joint: bundle units <-> goal ticks (LeRobot's functions) <-> the device's radians."""

    name: str
    motor: LeRobotMotor
    mode: NormMode | None  # None: radians
    apply_drive_mode: bool
    resolution: int = X_SERIES_TICKS_PER_TURN

    @property
    def calibration(self) -> JointCalibration:
        return self.motor.joint_calibration(self.resolution)

    def to_ticks(self, value: float) -> int:
        """Goal ticks for an action: LeRobot's _unnormalize (clamped, truncated); radians: the device's rounding."""
        if self.mode is None:
            return self.calibration.to_ticks(value)
        return self.motor.unnormalize(value, self.mode, apply_drive_mode=self.apply_drive_mode,
                                      resolution=self.resolution)

    def from_ticks(self, ticks: int) -> float:
        """An action-unit value for a present position: LeRobot's _normalize."""
        if self.mode is None:
            return self.calibration.to_radians(ticks)
        return self.motor.normalize(ticks, self.mode, apply_drive_mode=self.apply_drive_mode,
                                    resolution=self.resolution)

    def to_radians(self, value: float) -> float:
        """The device's radians for an action; the device's own to_ticks gives back exactly to_ticks(value)."""
        if self.mode is None:
            return float(value)
        return self.calibration.to_radians(self.to_ticks(value))

    def from_radians(self, radians: float) -> float:
        if self.mode is None:
            return float(radians)
        return self.from_ticks(self.calibration.to_ticks(radians))

    def ticks_unclamped(self, value: float) -> float:
        """The affine map units -> ticks without LeRobot's clamps and truncation (for limits)."""
        m, span = self.motor, self.motor.range_max - self.motor.range_min
        flip = self.apply_drive_mode and bool(m.drive_mode)
        if self.mode is NormMode.RANGE_M100_100:
            return ((-value if flip else value) + 100) / 200 * span + m.range_min
        if self.mode is NormMode.RANGE_0_100:
            return (100 - value if flip else value) / 100 * span + m.range_min
        cal = self.calibration
        if self.mode is NormMode.DEGREES:
            return value * (self.resolution - 1) / 360 + cal.offset
        return cal.offset + cal.direction * value * cal.ticks_per_turn / (2 * math.pi)

    def slope(self) -> float:
        """Units per radian (velocities): d(units)/d(ticks) x d(ticks)/d(rad)."""
        if self.mode is None:
            return 1.0
        m, cal = self.motor, self.calibration
        ticks_per_rad = cal.direction * cal.ticks_per_turn / (2 * math.pi)
        if self.mode is NormMode.DEGREES:  # LeRobot's DEGREES ignores the drive mode: 180/pi exactly
            return 360 / (self.resolution - 1) * ticks_per_rad
        full = 200 if self.mode is NormMode.RANGE_M100_100 else 100
        sign = -1 if self.apply_drive_mode and m.drive_mode else 1
        return sign * full / (m.range_max - m.range_min) * ticks_per_rad

    def range_in_units(self) -> tuple[float, float]:
        lo, hi = self.from_ticks(self.motor.range_min), self.from_ticks(self.motor.range_max)
        return (lo, hi) if lo <= hi else (hi, lo)


@dataclass(frozen=True)
class UnitMap:
    """Every joint of a bundle, for one backend (its drive-mode rule and resolution)."""

    units: ActionUnits
    joints: tuple[JointUnits, ...]

    @classmethod
    def for_backend(cls, spec: UnitSpec, backend: Any) -> UnitMap:
        """The backend class says whether LeRobot's bus applies the drive mode (`APPLY_DRIVE_MODE`, absent: False,
        as on DynamixelMotorsBus) and its ticks per turn (`LEROBOT_TICKS_PER_TURN`, absent: the X series' 4096)."""
        apply = bool(getattr(backend, "APPLY_DRIVE_MODE", False))
        resolution = int(getattr(backend, "LEROBOT_TICKS_PER_TURN", None) or X_SERIES_TICKS_PER_TURN)
        return cls(spec.units, tuple(JointUnits(n, m, mode, apply, resolution)
                                     for n, m, mode in zip(spec.joints, spec.motors, spec.modes, strict=True)))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(j.name for j in self.joints)

    @property
    def calibrations(self) -> tuple[JointCalibration, ...]:
        return tuple(j.calibration for j in self.joints)

    def to_radians(self, values: Any) -> np.ndarray:
        """Setpoints in the bundle's units -> the device's radians. Refuses a non-finite value (LeRobot's clamp
        would turn NaN into range_min) and one whose ticks overflow, naming the joint."""
        arr = np.asarray(values, dtype=np.float64)
        if arr.shape != (len(self.joints),):
            raise ValueError(f"{len(self.joints)} joint positions expected, got shape {arr.shape}")
        out = np.empty_like(arr)
        for k, joint in enumerate(self.joints):
            value = float(arr[k])
            if not math.isfinite(value):
                raise MotorError(f"setpoints refused: non-finite position {value} for joint {joint.name!r}")
            try:
                out[k] = joint.to_radians(value)
            except OverflowError:
                raise MotorError(f"setpoints refused: {value:g} {self.units.value} for joint {joint.name!r} is no "
                                 "servo position") from None
        return out

    def from_radians(self, radians: Any) -> np.ndarray:
        arr = np.asarray(radians, dtype=np.float64)
        return np.array([j.from_radians(float(r)) for j, r in zip(self.joints, arr, strict=True)])

    def slopes(self) -> np.ndarray:
        return np.array([j.slope() for j in self.joints])

    def velocities_from_radians(self, rad_s: Any) -> np.ndarray:
        return self.slopes() * np.asarray(rad_s, dtype=np.float64)

    def tick_limits(self, limits: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
        """The bundle's limits (its units) as ticks, sorted; refuses, in one line naming the joint and both
        ranges, limits that reach outside the calibration's range_min..range_max: the bundle may narrow the
        calibrated range, never widen it."""
        out = []
        for joint, (lo, hi) in zip(self.joints, limits, strict=True):
            t_lo, t_hi = sorted((joint.ticks_unclamped(float(lo)), joint.ticks_unclamped(float(hi))))
            m = joint.motor
            if t_lo < m.range_min - LIMIT_TOLERANCE_TICKS or t_hi > m.range_max + LIMIT_TOLERANCE_TICKS:
                c_lo, c_hi = joint.range_in_units()
                raise CalibrationError(
                    f"joint {joint.name!r}: the bundle allows {float(lo):g}..{float(hi):g} {self.units.value} "
                    f"(ticks {t_lo:.1f}..{t_hi:.1f}) but the calibration's range is {c_lo:g}..{c_hi:g} "
                    f"{self.units.value} (range_min..range_max {m.range_min}..{m.range_max}); a bundle may narrow "
                    "the calibrated range, never widen it: narrow the bundle's action_space limits or re-calibrate")
            out.append((t_lo, t_hi))
        return out

    def limits_to_radians(self, limits: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
        """The device's joint limits (rad) for the bundle's limits (its units), checked by tick_limits."""
        return [tuple(sorted((j.calibration.to_radians(t_lo), j.calibration.to_radians(t_hi))))  # type: ignore[misc]
                for j, (t_lo, t_hi) in zip(self.joints, self.tick_limits(limits), strict=True)]


__all__ = ["ActionUnits", "JointUnits", "UnitMap", "UnitSpec", "choose_units", "motor_name", "norm_mode"]
