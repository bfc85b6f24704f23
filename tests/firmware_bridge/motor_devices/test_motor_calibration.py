"""Ticks <-> radians and LeRobot calibration files (LeRobot's exact normalisation)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware_bridge.motors.calibration import (
    CalibrationError,
    JointCalibration,
    LeRobotMotor,
    NormMode,
    load_lerobot_calibration,
    parse_lerobot_calibration,
)
from firmware_bridge.motors.dynamixel import DynamixelDevice

ticks = st.integers(-(1 << 20), 1 << 20)
cals = st.builds(JointCalibration, offset=st.integers(-4096, 8192).map(float), direction=st.sampled_from([1, -1]),
                 ticks_per_turn=st.sampled_from([4096.0, 4095.0, 1024.0]))


@given(cals, ticks)
def test_ticks_radians_ticks_is_exact(cal: JointCalibration, t: int) -> None:
    assert cal.to_ticks(cal.to_radians(t)) == t


@given(cals, st.floats(-20.0, 20.0))
def test_radians_ticks_radians_within_half_a_tick(cal: JointCalibration, rad: float) -> None:
    assert abs(cal.to_radians(cal.to_ticks(rad)) - rad) <= cal.rad_per_tick() / 2 + 1e-12


def test_direction_and_offset() -> None:
    cal = JointCalibration(offset=2048, direction=-1)
    assert cal.to_radians(2048 + 1024) == pytest.approx(-math.pi / 2)
    assert cal.to_ticks(math.pi / 2) == 1024
    with pytest.raises(CalibrationError):
        JointCalibration(direction=0)
    for bad in (math.inf, math.nan, -math.inf):  # inf: every position reads 0 rad, and arm overflows
        with pytest.raises(CalibrationError, match="ticks per turn"):
            JointCalibration(ticks_per_turn=bad)
    with pytest.raises(CalibrationError, match="offset"):
        JointCalibration(offset=math.nan)


SO101 = {"shoulder_pan": {"id": 1, "drive_mode": 0, "homing_offset": -1470, "range_min": 1024, "range_max": 3072},
         "gripper": {"id": 6, "drive_mode": 1, "homing_offset": 12, "range_min": 2000, "range_max": 3400}}


def test_lerobot_worked_example() -> None:
    """The worked value in LeRobot's own docs: raw 2301, range 1024..3072 -> 24.7 (RANGE_M100_100)."""
    pan = parse_lerobot_calibration(json.dumps(SO101))["shoulder_pan"]
    assert pan.normalize(2301, NormMode.RANGE_M100_100, apply_drive_mode=True) == pytest.approx(24.707, abs=1e-3)
    assert pan.normalize(2048, NormMode.DEGREES, apply_drive_mode=True) == pytest.approx(0.0)
    assert pan.normalize(2048 + 1023, NormMode.DEGREES, apply_drive_mode=False) == pytest.approx(89.934, abs=1e-3)


motors = st.builds(lambda lo, span, dm: LeRobotMotor("m", 1, dm, 0, lo, lo + span),
                   st.integers(0, 3000), st.integers(1, 4000), st.sampled_from([0, 1]))


@given(motors, st.integers(-500, 8000), st.booleans())
def test_lerobot_ranges_clamp_and_flip(m: LeRobotMotor, raw: int, apply: bool) -> None:
    flip = apply and m.drive_mode
    body = m.normalize(raw, NormMode.RANGE_M100_100, apply_drive_mode=apply)
    grip = m.normalize(raw, NormMode.RANGE_0_100, apply_drive_mode=apply)
    assert -100 <= body <= 100 and 0 <= grip <= 100
    assert m.normalize(m.range_min, NormMode.RANGE_M100_100, apply_drive_mode=apply) == (100 if flip else -100)
    assert m.normalize(m.range_max, NormMode.RANGE_0_100, apply_drive_mode=apply) == (0 if flip else 100)


@given(motors, st.data(), st.booleans(), st.sampled_from(list(NormMode)))
def test_lerobot_unnormalize_inverts_within_one_tick(m: LeRobotMotor, data: st.DataObject, apply: bool,
                                                     mode: NormMode) -> None:
    raw = data.draw(st.integers(m.range_min, m.range_max))
    back = m.unnormalize(m.normalize(raw, mode, apply_drive_mode=apply), mode, apply_drive_mode=apply)
    assert abs(back - raw) <= 1  # LeRobot truncates with int(): at most one tick off


def test_lerobot_unnormalize_truncates_like_lerobot() -> None:
    m = LeRobotMotor("m", 1, 0, 0, 0, 3)
    assert m.unnormalize(0.0, NormMode.RANGE_M100_100, apply_drive_mode=False) == 1  # int(1.5)
    assert m.unnormalize(-1.0, NormMode.DEGREES, apply_drive_mode=False) == int(-4095 / 360 + 1.5)


@given(motors, st.integers(-500, 8000))
def test_joint_calibration_agrees_with_lerobot_degrees(m: LeRobotMotor, raw: int) -> None:
    deg = m.normalize(raw, NormMode.DEGREES, apply_drive_mode=False)
    assert math.degrees(m.joint_calibration().to_radians(raw)) == pytest.approx(deg, abs=1e-9)


def test_loader_reads_a_file_and_feeds_the_backend(tmp_path: Path) -> None:
    path = tmp_path / "follower.json"
    path.write_text(json.dumps(SO101))
    motors_ = load_lerobot_calibration(path)
    dev = DynamixelDevice("/dev/null", [1, 6], lerobot_calibration=motors_, joint_limits=[(-1, 1)] * 2)
    assert dev.names == ("shoulder_pan", "gripper")
    assert dev.calibration[0].offset == 2048 and dev.expected_homing == {1: -1470, 6: 12}


@pytest.mark.parametrize(("text", "says"), [
    ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
    ("{", "not valid JSON"),
    ("[]", "expected an object of motors"),
    (json.dumps({"a": {"id": 1}}), "lacks drive_mode, homing_offset, range_min, range_max"),
    (json.dumps({"a": {**SO101["gripper"], "range_min": 3400}}), "range_min 3400 must be below"),
    (json.dumps({"a": {**SO101["gripper"], "id": True}}), "must be integers"),
    (json.dumps({"a": {**SO101["gripper"], "id": 3.0}}), "must be integers"),
    (json.dumps({"a": SO101["gripper"], "b": SO101["gripper"]}), "share an id"),
    (json.dumps({"a": 5}), "is not an object"),
    (" " * (2 << 20), "too large"),
])
def test_loader_refuses_hostile_files_in_one_line(text: str, says: str) -> None:
    with pytest.raises(CalibrationError) as err:
        parse_lerobot_calibration(text, "cal.json")
    assert says in str(err.value) and "\n" not in str(err.value)


def test_loader_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match="cannot read calibration"):
        load_lerobot_calibration(tmp_path / "nope.json")


def test_lerobot_calibration_must_cover_every_id() -> None:
    with pytest.raises(Exception, match="no motor with id 3"):
        DynamixelDevice("/dev/null", [1, 3], lerobot_calibration=parse_lerobot_calibration(json.dumps(SO101)))
