"""Helpers the Dynamixel and Feetech tests share: hosts run as the service user, emulated buses opened by a
vendor SDK, servo lists, and a control loop driven at a fixed target."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np
import pytest
import service_user

T = TypeVar("T")

SERVICE_UID = service_user.SERVICE_UID  # robot-side code runs as the service user, not root


def run_host(*argv: str) -> subprocess.Popen[str]:
    """`python -c argv[0] argv[1:]...` with this checkout importable and as the working directory, as the service
    user where we are root (tests/service_user.py: with an interpreter and a path to the checkout it can use)."""
    if service_user.why_no_service_user() is None:  # robot-side code runs as the service user, not root
        sp = service_user.service_python()
        cmd, cwd, env = [*service_user.drop(), sp.python, "-c", *argv], sp.repo, sp.environ()
    else:
        cmd, cwd, env = [sys.executable, "-c", *argv], os.getcwd(), {**os.environ, "PYTHONPATH": os.getcwd()}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env)


def wait_line(proc: subprocess.Popen[str], want: str, timeout: float) -> None:
    """The host's next stdout line must be `want` within `timeout`; otherwise kill it and fail with its stderr."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    if line.strip() != want:
        proc.kill()
        pytest.fail(f"host did not print {want!r}: {line!r} {proc.stderr.read() if proc.stderr else ''}")


def give_to_service_user(path: str) -> None:
    """The service user owns the serial device (udev/dialout on a robot); only root can hand it over."""
    if os.geteuid() == 0:
        os.chown(path, SERVICE_UID, SERVICE_UID)


@contextmanager
def sdk_session(bus: Any, sdk: Any, protocol: float) -> Iterator[tuple[Any, Any, Any]]:
    """Run an emulated bus and open its pty with a vendor SDK: yields (bus, PortHandler, PacketHandler)."""
    with bus as b:
        port = sdk.PortHandler(b.port)
        assert port.openPort()
        yield b, port, sdk.PacketHandler(protocol)
        port.closePort()


def servo_configs(config: Callable[..., T], id_field: str, ids: Sequence[int], **kw: object) -> list[T]:
    """One emulator ServoConfig per id, answering without a return delay."""
    return [config(**{id_field: i}, return_delay=0, **kw) for i in ids]


def drive(dev: Any, target: float, n: int, sleep_s: float) -> np.ndarray:
    """n control cycles (poll, then the same target for every joint); returns the last positions sent."""
    joints = len(dev.ids)
    sent = np.zeros(joints)
    for _ in range(n):
        dev.poll_state()
        sent = dev.write_setpoints(np.full(joints, target))
        time.sleep(sleep_s)
    return sent
