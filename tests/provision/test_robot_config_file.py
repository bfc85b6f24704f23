"""The robot configuration file (/etc/edge-vla/robot.env, or `edge-vla run --robot-config PATH`) comes from an
operator's editor: a file that is not UTF-8, not a regular file, or huge, and a value that is not a number, are
refused in one line naming the file; none of them hangs the loader or switches a safety limit off."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge_vla.errors import ConfigError
from edge_vla.provision.robot_config import RobotConfig


def _write(tmp_path: Path, body: bytes) -> Path:
    path = tmp_path / "robot.env"
    path.write_bytes(body)
    return path


def test_a_good_file_loads(tmp_path: Path) -> None:  # control for the refusals below
    cfg = RobotConfig.load(_write(tmp_path, b'# set by the integrator\nEDGE_VLA_GRIPPER_EFFORT="5"\n')).validate()
    assert cfg.gripper_effort == 5.0
    assert cfg.tracking_limits(("a", "gripper")).max_effort.tolist()[1] == float("inf")  # no gripper role named


def test_a_latin1_file_is_a_clear_error(tmp_path: Path) -> None:
    path = _write(tmp_path, "# réglé par l'intégrateur\nEDGE_VLA_RATE_HZ=50\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"robot\.env.*UTF-8"):
        RobotConfig.load(path)


@pytest.mark.parametrize("value", ["nan", "NaN", "-nan"])
def test_a_nan_gripper_effort_is_refused_not_turned_off(tmp_path: Path, value: str) -> None:
    path = _write(tmp_path, f'EDGE_VLA_GRIPPER_JOINTS="gripper"\nEDGE_VLA_GRIPPER_EFFORT="{value}"\n'.encode())
    with pytest.raises(ConfigError, match="EDGE_VLA_GRIPPER_EFFORT"):
        RobotConfig.load(path).validate()


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "robot.env"
    os.mkfifo(fifo)
    code = ("import sys\nfrom edge_vla.errors import ConfigError\nfrom edge_vla.provision.robot_config import RobotConfig\n"
            "try:\n    RobotConfig.load(sys.argv[1])\nexcept ConfigError as exc:\n    print(exc)\n    sys.exit(3)\n")
    # In a child: a loader that opens the FIFO for reading blocks until a writer comes, which would hang the test.
    try:
        done = subprocess.run([sys.executable, "-c", code, str(fifo)], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("RobotConfig.load blocked on a FIFO (waiting for a writer that never comes)")
    assert done.returncode == 3, done.stderr
    assert "robot.env" in done.stdout and "regular file" in done.stdout


def test_a_huge_file_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, b"# " + b"x" * (2 << 20) + b"\n")
    with pytest.raises(ConfigError, match=r"robot\.env.*(large|MiB)"):
        RobotConfig.load(path)
