"""Helpers for the onboard tests that run the real control process against the emulator on a pty, and for
the end-to-end tests that run the robot service and the operator CLI as the robot runs them: unprivileged."""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
import service_user

from edge_vla.onboard.drill import EMULATOR_LIMITS

emulator_process = pytest.importorskip("firmware_bridge.emulator_process")

REPO = Path(__file__).resolve().parents[2]


SERVICE_UID, SERVICE_GID = service_user.SERVICE_UID, service_user.SERVICE_GID  # edge-vla.service's user and group
OPERATOR_UID = 65533  # an operator: another local user, in the service's group (never a user created here)


def expert_clamps_allowed(summary: Mapping) -> int:
    """Velocity plus acceleration clamps a closed-loop run of the expert may show (its motion needs almost none).

    5, and 20 more per skipped control deadline (`missed_deadlines`, a loaded box): after a skip the next setpoint
    is a step of two periods or more, which the per-cycle limits (set for the nominal period) clamp while the
    command catches up. Measured: no clamp in any run without a skipped deadline, up to 14 after one, 29 after a
    50 ms stall of the loop (4 skipped). The bound of 5 alone flaked on a loaded 2-core box (3 runs in 8)."""
    return 5 + 20 * int(summary["missed_deadlines"])


def start_emulator(**options):
    """The emulator with a 300 ms heartbeat timeout (a shared 2-core box can starve a process for 100 ms)."""
    options.setdefault("heartbeat_timeout_ms", 300)
    return emulator_process.EmulatorProcess(joints=2, limits=EMULATOR_LIMITS, **options)


def events(emu, name: str | None = None, since: float = 0.0) -> list[dict]:
    return [e for e in emu.events() if (name is None or e["event"] == name) and e["t"] >= since]


def wait_for(pred, timeout: float, what: str, step: float = 0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# -- the robot's users: the service (uid/gid 65534) and an operator in its group (uid 65533) --------------

@dataclass(frozen=True)
class RobotUsers:
    """Command prefixes that run a step as the service user or as an operator, and the interpreter they use.

    `python` is one the service user can exec from an unprivileged process (the service spawns its control
    process and the emulator with sys.executable), with `env` giving it this checkout and this venv's packages."""

    service: tuple[str, ...]
    operator: tuple[str, ...]
    service_uid: int
    python: str
    env: Mapping[str, str]

    def edge_vla(self, user: tuple[str, ...], *args: str) -> list[str]:
        return [*user, self.python, "-m", "edge_vla.cli", *args]

    def environ(self, **extra: str) -> dict[str, str]:
        """The test's environment as a system user sees it: no HOME of root's, no pytest variables."""
        return service_user.system_environ(**self.env, **extra)


@functools.cache
def robot_users() -> RobotUsers:
    """Who runs what in the end-to-end tests: the service user and an operator where we are root, with an
    interpreter and import path the service user can use (service_user.service_python())."""
    if service_user.why_no_service_user() is not None:  # everything runs as this user (no root-only files caught)
        return RobotUsers((), (), os.getuid(), sys.executable, {"PYTHONPATH": str(REPO)})
    service = tuple(service_user.drop())
    operator = tuple(service_user.drop(OPERATOR_UID, OPERATOR_UID, (SERVICE_GID,)))  # `usermod -aG edge-vla alice`
    sp = service_user.service_python()
    return RobotUsers(service, operator, SERVICE_UID, sp.python, {"PYTHONPATH": str(sp.repo)})


def service_run_dir(prefix: str) -> Path:
    """A directory like systemd's RuntimeDirectory=edge-vla (owned by the service, mode 0750, so its group, the
    operators, may enter it), under a root-owned 0755 parent that the test removes."""
    users = robot_users()
    run_dir = service_user.open_dir(prefix) / "run"
    run_dir.mkdir(mode=0o750)
    os.chown(run_dir, users.service_uid, SERVICE_GID if users.service else os.getgid())
    return run_dir


def give_pty_to_service(emu) -> None:
    """On a robot a udev rule gives the motor controller's tty to a group the service user is in (dialout,
    mode 0660). Here the emulator (the firmware side, run as root) owns its pty: hand the slave to the service's
    group the same way, and let the service reach the port's symlink in the emulator's 0700 temp dir."""
    if not robot_users().service:
        return
    os.chmod(Path(emu.port).parent, 0o711)  # enter only: the events file and log stay unlisted
    slave = os.path.realpath(emu.port)
    os.chown(slave, 0, SERVICE_GID)
    os.chmod(slave, 0o660)
