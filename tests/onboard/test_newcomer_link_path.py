"""`edge-vla run --link serial://runs/motor`: a relative port path, as a newcomer writes the README's
`serial://$PWD/runs/motor` without the `$PWD`.

The pre-flight check took every path not starting with '/' for a pyserial URL (socket://, rfc2217://) and let
it through, so a missing relative port surfaced as a three-exception traceback from the control process.
Now a relative path is checked like an absolute one: one line naming it, before any model loads. Control: an
existing relative path passes the check and reaches the control process's open (a regular file is not a tty).
Runs as the service user where the test is root.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import service_user
from onboard_helpers import robot_users


@pytest.fixture
def cwd() -> Iterator[Path]:
    d = service_user.open_dir("edge-vla-relport-")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _run(cwd: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    users = robot_users()
    cmd = users.edge_vla(users.service, "run", "--expert", *args)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=users.environ(), cwd=cwd)


def test_a_missing_relative_port_is_refused_in_one_line(cwd: Path) -> None:
    proc = _run(cwd, "--link", "serial://runs/motor", "--duration", "1")
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 1, f"exit {proc.returncode}; stderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr and "[control]" not in proc.stderr, proc.stderr
    assert len(lines) == 1, f"expected one line, got {len(lines)}:\n{proc.stderr}"
    assert "no serial port runs/motor" in lines[0] and str(cwd) in lines[0], lines[0]


def test_a_port_that_is_a_regular_file_is_refused_in_one_line(cwd: Path) -> None:
    """A serial port is a character device: a regular file (a typo'd path that happens to exist, a log) passed the
    check and ended in a traceback from the control process when pyserial could not set it up as a tty."""
    (cwd / "runs").mkdir()
    port = cwd / "runs" / "motor"
    port.write_bytes(b"")
    port.chmod(0o666)
    proc = _run(cwd, "--link", "serial://runs/motor", "--duration", "1", "--link-max-age", "0.1")
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and "not a serial device" in lines[0] and "regular file" in lines[0], proc.stderr


def test_control_an_existing_relative_port_passes_the_check(cwd: Path) -> None:
    """A relative path to a real tty (a pty, as the emulator serves) passes the check and reaches the control
    process's open, which then finds nothing answering (no firmware on it)."""
    users = robot_users()
    master, slave = os.openpty()
    try:
        tty = os.ttyname(slave)
        os.chown(tty, users.service_uid, -1)  # the service user may open it, as a udev rule's dialout 0660 lets it
        (cwd / "runs").mkdir()
        (cwd / "runs" / "motor").symlink_to(tty)
        proc = _run(cwd, "--link", "serial://runs/motor", "--duration", "1", "--link-max-age", "0.1")
    finally:
        os.close(master)
        os.close(slave)
    assert "no serial port" not in proc.stderr and "not a serial device" not in proc.stderr, proc.stderr
    assert "no permission" not in proc.stderr, proc.stderr
    assert proc.returncode == 1, proc.stderr
