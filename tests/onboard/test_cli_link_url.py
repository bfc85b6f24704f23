"""`edge-vla run --link URL`: a bad or unreachable link is refused in one line, before any model loads.

Through the real CLI as a subprocess (as the service user where permissions matter). Each refusal must be
one stderr line that names what was wrong and lists the accepted forms; no traceback, no control process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from onboard_helpers import REPO, robot_users, service_user

EDGE_VLA = [sys.executable, "-m", "edge_vla.cli"]


def _run(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ if env is None else env, PYTHONPATH=str(REPO))
    return subprocess.run([*EDGE_VLA, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd="/")


def _one_line_refusal(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 1, f"exit {proc.returncode}; stderr:\n{proc.stderr}"
    assert len(lines) == 1, f"expected one line, got {len(lines)}:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr and "[control]" not in proc.stderr
    return lines[0]


@pytest.mark.parametrize(("link", "says"), [
    ("/dev/ttyACM0", "serial:///dev/ttyACM0"),  # a path: the URL it should have been
    ("serial:/dev/ttyACM0", "serial:///dev/ttyACM0"),  # one slash short
    ("foo://bar", "unknown link scheme 'foo'"),
    ("serial:///dev/ttyACM0?baud=abc", "baud"),
    ("serial:///dev/ttyNOPE0", "no serial port /dev/ttyNOPE0"),
    ("can://socketcan/nocan0", "no CAN interface nocan0"),
    ("can://socketcan/can0?node=x", "node"),
    ("can://socketcan", "interface and a channel"),
])
def test_a_bad_link_is_refused_in_one_line_with_the_accepted_forms(link: str, says: str) -> None:
    t0 = time.monotonic()
    line = _one_line_refusal(_run("run", "--expert", "--link", link, "--duration", "1"))
    assert says in line, line
    if "no serial port" not in line and "no CAN interface" not in line:
        assert "serial://" in line and "can://" in line, f"no accepted forms in: {line}"
    assert time.monotonic() - t0 < 30


@pytest.mark.parametrize(("link", "says"), [
    ("dynamixel:///dev/ttyUSB0?ids=x", "ids='x'"),  # the motor registry's own parse, before anything loads
    ("feetech:///dev/ttyUSB0?ids=1-2&bogus=1", "unknown query parameter(s) bogus"),
    ("dynamixel:///dev/ttyNOPE9?ids=1-2", "no serial port /dev/ttyNOPE9"),
])
def test_a_motor_device_url_is_checked_by_the_motor_registry_in_one_line(link: str, says: str) -> None:
    line = _one_line_refusal(_run("run", "--expert", "--link", link))
    assert says in line and link in line, line


@pytest.mark.parametrize("scheme", ["dynamixel", "feetech"])
def test_a_real_time_priority_with_a_servo_bus_is_refused_in_one_line(scheme: str) -> None:
    """The vendor SDKs busy-poll the port: a SCHED_FIFO control process starves the tty and the bus never answers
    (the fault campaign: 12 of 12 opens timed out). Control: the same command without --rt-priority gets past it."""
    link = f"{scheme}:///dev/null?ids=1-2"
    line = _one_line_refusal(_run("run", "--expert", "--link", link, "--rt-priority", "50", "--duration", "0.1"))
    assert "--rt-priority" in line and "busy-polls" in line, line
    control = _run("run", "--expert", "--link", link, "--duration", "0.1")
    assert "--rt-priority" not in control.stderr, control.stderr


def test_the_link_is_checked_before_the_bundle_loads(tmp_path: Path) -> None:
    """A missing bundle would be the first error if the model loaded first; the link's is reported instead."""
    line = _one_line_refusal(_run("run", str(tmp_path / "no-such-bundle"), "--link", "foo://bar"))
    assert "foo" in line and "bundle" not in line, line


def test_a_port_the_service_user_may_not_open_is_named_in_one_line() -> None:
    """Control case: the same file, readable and writable by the service user, passes the check (and then the
    run fails on the firmware handshake, not on the URL)."""
    users = robot_users()
    if not users.service:
        pytest.skip(service_user.why_no_service_user() or "no service user")
    d = service_user.open_dir("edge-vla-port-")
    master, slave = os.openpty()  # a real tty (a character device), root's 0600 like one without the udev rule
    try:
        tty = os.ttyname(slave)
        os.chmod(tty, 0o600)
        port = d / "tty"
        port.symlink_to(tty)  # as /dev/edge-vla-motor points at the adapter
        cmd = users.edge_vla(users.service, "run", "--expert", "--link", f"serial://{port}", "--duration", "1")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=users.environ(), cwd="/")
        line = _one_line_refusal(proc)
        assert f"no permission to open {port}" in line and "dialout" in line, line
    finally:
        import shutil

        os.close(master)
        os.close(slave)
        shutil.rmtree(d, ignore_errors=True)


def test_status_json_reports_usage_errors_as_json() -> None:
    proc = _run("status", "--json", "--timeout", "-1")
    assert proc.returncode == 2, proc
    doc = json.loads(proc.stdout)
    assert doc["ok"] is False and "--timeout" in doc["error"]
    proc = _run("status", "--json", "--control-socket", "/nonexistent/control.sock")
    assert proc.returncode == 1 and json.loads(proc.stdout)["ok"] is False
    # control: without --json the usage error stays argparse's text on stderr
    plain = _run("status", "--timeout", "-1")
    assert plain.returncode == 2 and plain.stdout == "" and "--timeout" in plain.stderr


def test_a_calibration_id_outside_the_links_range_is_refused_naming_the_calibration() -> None:
    """A LeRobot calibration file names no bus family, so it accepts Feetech's 0..253; driving id 253 over a
    Dynamixel link (0..252) was refused later by the URL parser, naming an ids= the user never wrote."""
    from types import SimpleNamespace

    from edge_vla.errors import ConfigError
    from edge_vla.onboard.cli import url_with_calibrated_ids

    units = SimpleNamespace(ids=(1, 253), joints=("shoulder", "wrist"))
    with pytest.raises(ConfigError) as err:
        url_with_calibrated_ids("dynamixel:///dev/ttyUSB0", units, "so100.json")
    msg = str(err.value)
    assert "so100.json" in msg and "wrist" in msg and "253" in msg and "0..252" in msg and "\n" not in msg
    # control: the same calibration on a Feetech link is taken, its ids in the bundle's joint order
    assert url_with_calibrated_ids("feetech:///dev/ttyUSB0", units, "so100.json") == "feetech:///dev/ttyUSB0?ids=1,253"
