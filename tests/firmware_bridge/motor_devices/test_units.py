"""The unit layer (firmware_bridge.motors.units): a bundle's action units <-> the device's radians, per joint,
through a LeRobot calibration, agreeing exactly with LeRobot's own normalisation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from firmware_bridge.motors.base import MotorError
from firmware_bridge.motors.calibration import CalibrationError, LeRobotMotor, NormMode
from firmware_bridge.motors.units import (
    ActionUnits,
    JointUnits,
    UnitMap,
    UnitSpec,
    choose_units,
)

RES = 4096  # STS3215 and the Dynamixel X series: LeRobot's model_resolution_table

# A LeRobot calibration's motor: range inside one turn (what `record_ranges_of_motion` yields), either drive mode.
motors = st.builds(lambda lo, span, dm, hoff: LeRobotMotor("m", 1, dm, hoff, lo, lo + span),
                   st.integers(0, 4000), st.integers(1, 4095), st.sampled_from([0, 1]), st.integers(-2047, 2047)
                   ).filter(lambda m: m.range_max <= 4095)
modes = st.sampled_from(list(NormMode))
joints = st.builds(lambda m, mode, apply: JointUnits("j", m, mode, apply, RES), motors, modes, st.booleans())
values = st.floats(-250.0, 250.0, allow_nan=False)


def lerobot_kw(j: JointUnits) -> dict[str, object]:
    return {"apply_drive_mode": j.apply_drive_mode, "resolution": RES}


@given(joints, values)
@example(JointUnits("j", LeRobotMotor("m", 1, 1, 0, 1024, 3072), NormMode.RANGE_M100_100, True, RES), 24.7)
def test_units_to_radians_reaches_the_servo_as_exactly_lerobots_unnormalize_ticks(j: JointUnits, v: float) -> None:
    """The device turns the radians back into ticks with its own rounding: that must be LeRobot's tick."""
    rad = j.to_radians(v)
    assert j.calibration.to_ticks(rad) == j.motor.unnormalize(v, j.mode, **lerobot_kw(j))  # type: ignore[arg-type]


@given(joints, st.data())
def test_present_ticks_read_back_as_exactly_lerobots_normalize(j: JointUnits, data: st.DataObject) -> None:
    """States: the device reports radians of an integer tick; the layer gives LeRobot's _normalize of it."""
    ticks = data.draw(st.integers(-500, 4600))
    rad = j.calibration.to_radians(ticks)
    assert j.from_radians(rad) == j.motor.normalize(ticks, j.mode, **lerobot_kw(j))  # type: ignore[arg-type]


@given(joints, values)
def test_units_radians_units_round_trip_within_lerobots_own_truncation(j: JointUnits, v: float) -> None:
    back = j.from_radians(j.to_radians(v))
    kw = lerobot_kw(j)
    assert back == j.motor.normalize(j.motor.unnormalize(v, j.mode, **kw), j.mode, **kw)  # type: ignore[arg-type]
    if j.mode is NormMode.DEGREES:
        expected = v  # no clamp in DEGREES (LeRobot): only the truncation to a whole tick
    else:
        expected = min(100.0, max(-100.0 if j.mode is NormMode.RANGE_M100_100 else 0.0, v))
        lo, hi = j.range_in_units()
        expected = min(hi, max(lo, expected))
    assert abs(back - expected) <= abs(j.slope()) * j.calibration.rad_per_tick() * (1 + 1e-9)  # one tick


@given(motors, st.integers(-500, 4600), st.booleans())
def test_degrees_are_exactly_radians_times_180_over_pi_under_that_calibration(m: LeRobotMotor, ticks: int,
                                                                              apply: bool) -> None:
    j = JointUnits("j", m, NormMode.DEGREES, apply, RES)
    rad = j.calibration.to_radians(ticks)
    lerobot_degrees = m.normalize(ticks, NormMode.DEGREES, apply_drive_mode=apply, resolution=RES)
    assert math.degrees(rad) == pytest.approx(lerobot_degrees, rel=1e-12, abs=1e-9)
    assert j.from_radians(rad) == lerobot_degrees
    assert j.slope() == pytest.approx(180 / math.pi, rel=1e-12)


@given(joints, st.integers(0, 4094))
def test_velocity_slope_is_the_affine_maps_slope(j: JointUnits, ticks: int) -> None:
    m = j.motor
    if j.mode is not NormMode.DEGREES and not m.range_min <= ticks < m.range_max:
        return  # the RANGE modes are flat (clamped) outside the calibrated range
    kw = lerobot_kw(j)
    step = m.normalize(ticks + 1, j.mode, **kw) - m.normalize(ticks, j.mode, **kw)  # type: ignore[arg-type]
    assert j.slope() * j.calibration.rad_per_tick() == pytest.approx(step, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize(("mode", "drive", "value", "expected"), [
    (NormMode.RANGE_M100_100, 0, 250.0, 3072), (NormMode.RANGE_M100_100, 0, -1e9, 1024),
    (NormMode.RANGE_M100_100, 1, 250.0, 1024), (NormMode.RANGE_0_100, 0, -5.0, 1024),
    (NormMode.RANGE_0_100, 0, 150.0, 3072), (NormMode.RANGE_0_100, 1, 150.0, 1024),
    (NormMode.DEGREES, 0, 100.0, int(100 * 4095 / 360 + 2048)),  # DEGREES: no clamp (LeRobot); the device clamps
])
def test_clamps_are_lerobots(mode: NormMode, drive: int, value: float, expected: int) -> None:
    j = JointUnits("j", LeRobotMotor("m", 1, drive, 0, 1024, 3072), mode, True, RES)
    assert j.calibration.to_ticks(j.to_radians(value)) == expected


def test_drive_mode_is_applied_only_where_lerobots_bus_applies_it() -> None:
    """Feetech (APPLY_DRIVE_MODE) flips the RANGE modes; Dynamixel (the servo reverses itself) does not."""
    from firmware_bridge.motors.dynamixel import DynamixelDevice
    from firmware_bridge.motors.feetech import FeetechDevice

    m = LeRobotMotor("shoulder_pan", 1, 1, 0, 1024, 3072)
    spec = UnitSpec(ActionUnits.LEROBOT_RANGE, ("shoulder_pan.pos",), (m,), (NormMode.RANGE_M100_100,))
    ticks = [UnitMap.for_backend(spec, cls).joints[0].to_ticks(50.0) for cls in (FeetechDevice, DynamixelDevice)]
    assert ticks == [m.unnormalize(50.0, NormMode.RANGE_M100_100, apply_drive_mode=True),
                     m.unnormalize(50.0, NormMode.RANGE_M100_100, apply_drive_mode=False)]
    assert ticks[0] != ticks[1]  # control: the drive mode really changes the tick


SO101 = {n: LeRobotMotor(n, i, 0, 0, 800 + 10 * i, 3200 - 10 * i) for i, n in enumerate(
    ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper"), start=1)}
JOINTS = tuple(f"{n}.pos" for n in SO101)


@pytest.mark.parametrize(("units", "body", "gripper"), [
    (ActionUnits.LEROBOT_RANGE, NormMode.RANGE_M100_100, NormMode.RANGE_0_100),
    (ActionUnits.DEGREES, NormMode.DEGREES, NormMode.RANGE_0_100),  # use_degrees keeps the gripper 0..100
    (ActionUnits.RAD, None, None),
])
def test_lerobot_joint_names_map_to_motors_with_lerobots_norm_modes(units: ActionUnits, body: NormMode | None,
                                                                    gripper: NormMode | None) -> None:
    spec = UnitSpec.build(SO101, JOINTS, None, units)
    assert spec.ids == (1, 2, 3, 4, 5, 6)
    assert spec.modes == (body,) * 5 + (gripper,)
    assert [m.name for m in spec.motors] == list(SO101)


def test_joints_in_another_order_take_their_ids_from_the_calibration() -> None:
    spec = UnitSpec.build(SO101, ("gripper", "shoulder_pan.pos"), ("gripper", "joint"), ActionUnits.LEROBOT_RANGE)
    assert spec.ids == (6, 1) and spec.modes == (NormMode.RANGE_0_100, NormMode.RANGE_M100_100)


def test_a_joint_without_a_calibration_motor_is_refused_in_one_line_naming_it() -> None:
    with pytest.raises(CalibrationError) as err:
        UnitSpec.build(SO101, ("shoulder_pan.pos", "elbow.pos", "wrist.pos"), None, ActionUnits.LEROBOT_RANGE)
    msg = str(err.value)
    assert "joint(s) elbow.pos, wrist.pos (it lists shoulder_pan, " in msg and "\n" not in msg


def test_two_joints_on_one_servo_are_refused_and_a_long_calibration_is_listed_briefly() -> None:
    with pytest.raises(CalibrationError, match="joints 'gripper' and 'gripper.pos' both map to calibration motor"):
        UnitSpec.build(SO101, ("gripper", "gripper.pos"), None, ActionUnits.LEROBOT_RANGE)
    many = {f"m{i}": LeRobotMotor(f"m{i}", i, 0, 0, 0, 4095) for i in range(200)}
    with pytest.raises(CalibrationError) as err:
        UnitSpec.build(many, ("elbow.pos",), None, ActionUnits.RAD)
    assert "m11 and 188 more" in str(err.value) and "m12," not in str(err.value)


@pytest.mark.parametrize(("declared", "requested", "available", "chosen", "says"), [
    ("rad", None, list(ActionUnits), ActionUnits.RAD, None),
    ("Degrees", None, list(ActionUnits), ActionUnits.DEGREES, None),
    ("as recorded", "lerobot-range", list(ActionUnits), ActionUnits.LEROBOT_RANGE, None),
    ("as recorded", None, list(ActionUnits), None, "say which units the policy acts in with --action-units"),
    ("rad", "degrees", list(ActionUnits), None, "--action-units degrees contradicts the bundle, which declares"),
    ("degrees", None, [ActionUnits.RAD], None, "without --calibration the servos produce only rad"),
    ("as recorded", None, [ActionUnits.RAD], None, "'as recorded'"),
])
def test_units_are_the_bundles_or_the_flags_and_refused_in_one_line(declared: str, requested: str | None,
                                                                    available: list[ActionUnits],
                                                                    chosen: ActionUnits | None,
                                                                    says: str | None) -> None:
    if says is None:
        assert choose_units(declared, requested, available) is chosen
        return
    with pytest.raises(CalibrationError) as err:
        choose_units(declared, requested, available)
    assert says in str(err.value) and "\n" not in str(err.value)


def _map(units: ActionUnits = ActionUnits.LEROBOT_RANGE) -> UnitMap:
    from firmware_bridge.motors.feetech import FeetechDevice

    return UnitMap.for_backend(UnitSpec.build(SO101, JOINTS, None, units), FeetechDevice)


def test_limits_may_narrow_the_calibrated_range_and_become_the_devices_radians() -> None:
    umap = _map()
    limits = [(-100.0, 100.0)] * 5 + [(0.0, 100.0)]
    rad = umap.limits_to_radians(limits)
    for j, (lo, hi) in zip(umap.joints, rad, strict=True):  # exactly the calibrated range, in the device's radians
        assert (j.calibration.to_ticks(lo), j.calibration.to_ticks(hi)) == (j.motor.range_min, j.motor.range_max)
    narrowed = umap.limits_to_radians([(-50.0, 20.0)] * 5 + [(10.0, 90.0)])
    assert all(lo_n > lo and hi_n < hi for (lo_n, hi_n), (lo, hi) in zip(narrowed, rad, strict=True))


@pytest.mark.parametrize(("units", "joint", "limits"), [
    (ActionUnits.LEROBOT_RANGE, 0, (-110.0, 100.0)),  # LeRobot's reader widens recorded limits by 10 %
    (ActionUnits.LEROBOT_RANGE, 5, (0.0, 100.5)),
    (ActionUnits.DEGREES, 2, (-200.0, 10.0)),
    (ActionUnits.RAD, 1, (-0.1, 3.2)),
])
def test_limits_wider_than_the_calibration_are_refused_naming_the_joint_and_both_ranges(
        units: ActionUnits, joint: int, limits: tuple[float, float]) -> None:
    umap = _map(units)
    ok = [j.range_in_units() for j in umap.joints]
    ok = [(lo + 1e-6 * (hi - lo), hi - 1e-6 * (hi - lo)) for lo, hi in ok]
    umap.limits_to_radians(ok)  # control: inside the range is accepted
    ok[joint] = limits
    with pytest.raises(CalibrationError) as err:
        umap.limits_to_radians(ok)
    msg, m = str(err.value), umap.joints[joint].motor
    assert f"joint {JOINTS[joint]!r}" in msg and f"{limits[0]:g}..{limits[1]:g}" in msg
    assert f"range_min..range_max {m.range_min}..{m.range_max}" in msg and "\n" not in msg


def test_setpoints_that_are_not_numbers_are_refused_naming_the_joint_not_clamped_to_range_min() -> None:
    umap = _map()
    good = np.zeros(6)
    assert np.all(np.isfinite(umap.to_radians(good)))  # control
    for bad in (math.nan, math.inf, -math.inf):
        v = good.copy()
        v[2] = bad
        with pytest.raises(MotorError, match="non-finite position .* for joint 'elbow_flex.pos'"):
            umap.to_radians(v)
    deg = _map(ActionUnits.DEGREES)
    with pytest.raises(MotorError, match="elbow_flex.pos"):
        deg.to_radians(np.array([0, 0, 1e308, 0, 0, 0]))  # int(inf) inside LeRobot's DEGREES arithmetic
    with pytest.raises(ValueError, match="6 joint positions"):
        umap.to_radians(np.zeros(5))


def test_vectors_match_the_per_joint_maps() -> None:
    umap = _map()
    v = np.array([-100.0, -33.3, 0.0, 42.0, 99.9, 55.5])
    rad = umap.to_radians(v)
    assert [j.to_radians(x) for j, x in zip(umap.joints, v, strict=True)] == rad.tolist()
    assert umap.from_radians(rad).tolist() == [j.from_radians(r) for j, r in zip(umap.joints, rad, strict=True)]
    assert umap.velocities_from_radians(np.ones(6)).tolist() == [j.slope() for j in umap.joints]
