"""Hostile calibration files: whatever path or numbers a user gives, loading ends at once in one line."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from firmware_bridge.motors.calibration import CalibrationError, load_lerobot_calibration, parse_lerobot_calibration

GOOD = {"shoulder_pan": {"id": 1, "drive_mode": 0, "homing_offset": -1470, "range_min": 1024, "range_max": 3072}}


def _load_with_deadline(path: str | Path, seconds: float = 5.0) -> BaseException | object:
    """Load in a thread: a loader that blocks (a FIFO) or reads forever (/dev/zero) fails the deadline."""
    result: list[BaseException | object] = []

    def load() -> None:
        try:
            result.append(load_lerobot_calibration(path))
        except BaseException as exc:  # handed to the test
            result.append(exc)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(seconds)
    assert result, f"loading {path} did not finish within {seconds} s"
    return result[0]


@pytest.mark.parametrize("path", ["/dev/zero", "/dev/urandom", "fifo", "dir"])
def test_a_path_that_is_not_a_regular_file_is_refused_at_once_in_one_line(path: str, tmp_path: Path) -> None:
    if path == "fifo":
        path = str(tmp_path / "cal.fifo")
        os.mkfifo(path)  # no writer: a plain read blocks forever
    elif path == "dir":
        path = str(tmp_path)
    got = _load_with_deadline(path)
    assert isinstance(got, CalibrationError), got
    assert path in str(got) and "\n" not in str(got)
    good = tmp_path / "good.json"
    good.write_text(json.dumps(GOOD))
    assert set(_load_with_deadline(good)) == {"shoulder_pan"}  # type: ignore[arg-type]  # control


@pytest.mark.parametrize("field", ["range_min", "range_max", "homing_offset"])
def test_numbers_no_servo_register_holds_are_refused_in_one_line(field: str) -> None:
    """10**400 parses as a Python int; the float arithmetic of the normalisation would overflow at run time."""
    entry = dict(GOOD["shoulder_pan"])
    entry[field] = 10 ** 400 if field != "range_min" else -(10 ** 400)
    with pytest.raises(CalibrationError) as err:
        parse_lerobot_calibration(json.dumps({"shoulder_pan": entry}), "cal.json")
    assert field in str(err.value) and "\n" not in str(err.value)
