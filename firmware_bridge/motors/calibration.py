"""Ticks <-> radians per joint, and LeRobot calibration files with LeRobot's exact normalisation.

Our own calibration is three numbers per joint: the tick at joint zero (`offset`), the direction (+1/-1)
and the ticks per turn (4096 on the Dynamixel X series: 12-bit absolute encoder, 0.088 deg per tick).

LeRobot calibration files (SO-100/101, Koch: `~/.cache/huggingface/lerobot/calibration/.../NAME.json`)
hold per motor `id`, `drive_mode`, `homing_offset`, `range_min`, `range_max`. LeRobot writes the homing
offset into the servo (Dynamixel: Present_Position = actual + Homing_Offset(20)), so the positions a servo
reports already include it: the functions here never add it again; the backend only checks that the
servo's register still holds the file's value. `normalize`/`unnormalize` reproduce LeRobot's
`MotorsBus._normalize/_unnormalize` (src/lerobot/motors/motors_bus.py) line for line, including its
clamping, its `int()` truncation, and DEGREES' use of resolution - 1 and of no clamp and no drive mode.
"""

from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from firmware_bridge.motors.base import MotorError
from firmware_bridge.motors.registry import ID_SPACES

X_SERIES_TICKS_PER_TURN = 4096
MAX_CALIBRATION_BYTES = 1 << 20  # a calibration file for a few dozen motors is a few kB
REGISTER_LIMIT = 1 << 31  # positions and offsets are at most 4-byte registers: anything larger is no servo's


class CalibrationError(MotorError, ValueError):
    """A calibration is missing, malformed or does not fit the device."""


@dataclass(frozen=True)
class JointCalibration:
    """rad = direction * (ticks - offset) * 2*pi / ticks_per_turn."""

    offset: float = X_SERIES_TICKS_PER_TURN / 2  # the X series' mid-range tick: joint zero at 180 deg
    direction: int = 1
    ticks_per_turn: float = X_SERIES_TICKS_PER_TURN

    def __post_init__(self) -> None:
        if self.direction not in (1, -1):
            raise CalibrationError(f"joint direction must be +1 or -1, got {self.direction}")
        if not 0 < self.ticks_per_turn < math.inf:  # inf reads every position as 0 rad; NaN passes "> 0" checks
            raise CalibrationError(f"ticks per turn must be a positive finite number, got {self.ticks_per_turn}")
        if not math.isfinite(self.offset):
            raise CalibrationError(f"the joint's offset must be a finite number of ticks, got {self.offset}")

    def to_radians(self, ticks: float) -> float:
        return self.direction * (ticks - self.offset) * (2.0 * math.pi / self.ticks_per_turn)

    def to_ticks(self, radians: float) -> int:
        return round(self.offset + self.direction * radians * self.ticks_per_turn / (2.0 * math.pi))

    def rad_per_tick(self) -> float:
        return 2.0 * math.pi / self.ticks_per_turn


class NormMode(str, Enum):
    """LeRobot's MotorNormMode values."""

    DEGREES = "degrees"
    RANGE_M100_100 = "range_m100_100"
    RANGE_0_100 = "range_0_100"


@dataclass(frozen=True)
class LeRobotMotor:
    """One motor of a LeRobot calibration file."""

    name: str
    id: int
    drive_mode: int
    homing_offset: int
    range_min: int
    range_max: int

    def normalize(self, raw: int, mode: NormMode, *, apply_drive_mode: bool,
                  resolution: int = X_SERIES_TICKS_PER_TURN) -> float:
        """LeRobot's _normalize for one motor: ticks (homing already applied by the servo) -> action units."""
        min_, max_ = self.range_min, self.range_max
        drive_mode = apply_drive_mode and self.drive_mode
        bounded = min(max_, max(min_, raw))
        if mode is NormMode.RANGE_M100_100:
            norm = (((bounded - min_) / (max_ - min_)) * 200) - 100
            return -norm if drive_mode else norm
        if mode is NormMode.RANGE_0_100:
            norm = ((bounded - min_) / (max_ - min_)) * 100
            return 100 - norm if drive_mode else norm
        mid = (min_ + max_) / 2
        return (raw - mid) * 360 / (resolution - 1)

    def unnormalize(self, value: float, mode: NormMode, *, apply_drive_mode: bool,
                    resolution: int = X_SERIES_TICKS_PER_TURN) -> int:
        """LeRobot's _unnormalize for one motor: action units -> goal ticks."""
        min_, max_ = self.range_min, self.range_max
        drive_mode = apply_drive_mode and self.drive_mode
        if mode is NormMode.RANGE_M100_100:
            value = -value if drive_mode else value
            bounded = min(100.0, max(-100.0, value))
            return int(((bounded + 100) / 200) * (max_ - min_) + min_)
        if mode is NormMode.RANGE_0_100:
            value = 100 - value if drive_mode else value
            bounded = min(100.0, max(0.0, value))
            return int((bounded / 100) * (max_ - min_) + min_)
        mid = (min_ + max_) / 2
        return int((value * (resolution - 1) / 360) + mid)

    def joint_calibration(self, resolution: int = X_SERIES_TICKS_PER_TURN) -> JointCalibration:
        """Radians that agree with LeRobot's DEGREES mode: zero at mid-range, resolution - 1 ticks per turn."""
        return JointCalibration(offset=(self.range_min + self.range_max) / 2, direction=1,
                                ticks_per_turn=resolution - 1)


def _motor(path: str, name: str, entry: object) -> LeRobotMotor:
    if not isinstance(entry, dict):
        raise CalibrationError(f"{path}: motor {name!r} is not an object with id, drive_mode, homing_offset, "
                               "range_min, range_max")
    fields = ("id", "drive_mode", "homing_offset", "range_min", "range_max")
    missing = [f for f in fields if f not in entry]
    if missing:
        raise CalibrationError(f"{path}: motor {name!r} lacks {', '.join(missing)}; re-run LeRobot's calibrate")
    bad = [f for f in fields if not isinstance(entry[f], int) or isinstance(entry[f], bool)]
    if bad:
        raise CalibrationError(f"{path}: motor {name!r}: {', '.join(bad)} must be integers")
    huge = [f for f in fields[2:] if not -REGISTER_LIMIT < entry[f] < REGISTER_LIMIT]
    if huge:  # a 400-digit integer parses, then overflows the float arithmetic of the normalisation
        raise CalibrationError(f"{path}: motor {name!r}: {', '.join(huge)} must be servo ticks (below 2**31 in "
                               "magnitude); is this a LeRobot calibration file?")
    motor = LeRobotMotor(name, *(int(entry[f]) for f in fields))
    if motor.range_min >= motor.range_max:
        raise CalibrationError(f"{path}: motor {name!r}: range_min {motor.range_min} must be below range_max "
                               f"{motor.range_max}; re-run LeRobot's calibrate")
    # The file does not say which servo family it is for: the widest servo range (Feetech's) here; the link's
    # URL then checks each id against its own scheme (Dynamixel: 0..252).
    if problem := ID_SPACES["feetech"].problem(motor.id):
        raise CalibrationError(f"{path}: motor {name!r}: {problem}")
    if motor.drive_mode not in (0, 1):
        raise CalibrationError(f"{path}: motor {name!r}: drive_mode must be 0 or 1, not {motor.drive_mode}")
    return motor


def parse_lerobot_calibration(text: str | bytes, source: str = "<calibration>") -> dict[str, LeRobotMotor]:
    """Motors by name, in file order; one-line CalibrationError for anything else."""
    if len(text) > MAX_CALIBRATION_BYTES:
        raise CalibrationError(f"{source}: {len(text)} bytes is too large for a calibration file "
                               f"(limit {MAX_CALIBRATION_BYTES}); is this the right file?")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: hostile deep nesting
        raise CalibrationError(f"{source}: not valid JSON ({type(exc).__name__}: {str(exc)[:80]})") from None
    if not isinstance(data, dict) or not data:
        raise CalibrationError(f"{source}: expected an object of motors by name, e.g. "
                               '{"shoulder_pan": {"id": 1, ...}}')
    motors = {str(name): _motor(source, str(name), entry) for name, entry in data.items()}
    ids = [m.id for m in motors.values()]
    if len(set(ids)) != len(ids):
        raise CalibrationError(f"{source}: two motors share an id ({sorted(ids)}); each servo has its own id")
    return motors


def load_lerobot_calibration(path: str | Path) -> dict[str, LeRobotMotor]:
    """A regular file of at most MAX_CALIBRATION_BYTES. Opened without blocking (a FIFO with no writer would
    block open() and read() forever) and read with a bound, so /dev/zero, a pipe or a file that grows while
    read ends at once in one line."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise CalibrationError(f"cannot read calibration {p}: {exc.strerror or exc}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CalibrationError(f"calibration {p} is not a regular file; give the .json file LeRobot's "
                                   "calibrate wrote (~/.cache/huggingface/lerobot/calibration/...)")
        data = bytearray()
        while len(data) <= MAX_CALIBRATION_BYTES:
            chunk = os.read(fd, MAX_CALIBRATION_BYTES + 1 - len(data))
            if not chunk:
                break
            data += chunk
    except OSError as exc:
        raise CalibrationError(f"cannot read calibration {p}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_CALIBRATION_BYTES:
        raise CalibrationError(f"{p}: more than {MAX_CALIBRATION_BYTES} bytes is too large for a calibration file; "
                               "is this the right file?")
    return parse_lerobot_calibration(bytes(data), str(p))
