"""Helpers for the onboard tests that run the real control process against the emulator on a pty, and for
the end-to-end tests that run the robot service and the operator CLI as the robot runs them: unprivileged."""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
import sysconfig
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from edge_vla.onboard.drill import EMULATOR_LIMITS

emulator_process = pytest.importorskip("firmware_bridge.emulator_process")

REPO = Path(__file__).resolve().parents[2]
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # what systemd units run with


def _load_service_user():
    """tests/provision/service_user.py (uid 65534 and a temp dir it can enter), shared rather than copied."""
    spec = importlib.util.spec_from_file_location("service_user", REPO / "tests" / "provision" / "service_user.py")
    assert spec is not None and spec.loader is not None
    module = sys.modules.setdefault("service_user", importlib.util.module_from_spec(spec))
    if not hasattr(module, "open_dir"):
        spec.loader.exec_module(module)
    return module


service_user = _load_service_user()
SERVICE_UID, SERVICE_GID = service_user.SERVICE_UID, service_user.SERVICE_GID  # edge-vla.service's user and group
OPERATOR_UID = 65533  # an operator: another local user, in the service's group (never a user created here)


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

def _drop(uid: int, gid: int, groups: tuple[int, ...] = ()) -> list[str]:
    extra = ["--groups", ",".join(map(str, groups))] if groups else ["--clear-groups"]
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", *extra]


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
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PYTEST", "COV_", "NOTIFY_SOCKET", "INVOCATION_ID", "WATCHDOG_"))}
        env.update(self.env, HOME="/nonexistent", PYTHONDONTWRITEBYTECODE="1", **extra)
        return env


def _site_dirs() -> list[str]:
    paths = sysconfig.get_paths()
    return list(dict.fromkeys([paths["purelib"], paths["platlib"]]))


def _can_run(prefix: list[str], python: str, env: dict[str, str]) -> bool:
    # Exec from an already unprivileged shell, as the service's own children are: `setpriv` keeps root's
    # capabilities until its execve, so `setpriv ... python` alone can start an interpreter whose children fail.
    probe = [*prefix, "/bin/sh", "-c", 'exec "$0" -c "import edge_vla.cli, firmware_bridge, numpy, serial"', python]
    return subprocess.run(probe, cwd="/", env=env, capture_output=True, timeout=60).returncode == 0


@functools.cache
def robot_users() -> RobotUsers:
    """Who runs what in the end-to-end tests; skips if no interpreter is usable by the service user."""
    why = service_user.why_no_service_user()
    if why is not None:  # not root: everything runs as this user (the tests then cannot catch root-only files)
        return RobotUsers((), (), os.getuid(), sys.executable, {"PYTHONPATH": str(REPO)})
    service = tuple(_drop(SERVICE_UID, SERVICE_GID))
    operator = tuple(_drop(OPERATOR_UID, OPERATOR_UID, (SERVICE_GID,)))  # `usermod -aG edge-vla alice`
    # The test venv's python first (a CI venv is usually world-readable); else, when it lives where the service
    # user cannot go (a pyenv under /root), the system's python of the same minor version with this venv's
    # site-packages on PYTHONPATH: the robot's venv is made from its system python too (tests/provision).
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    system = [str(p) for d in SYSTEM_PATH.split(":") if (p := Path(d) / version).is_file()][:1]
    for python, path in [(sys.executable, [str(REPO)]), *((s, [str(REPO), *_site_dirs()]) for s in system)]:
        users = RobotUsers(service, operator, SERVICE_UID, python, {"PYTHONPATH": os.pathsep.join(path)})
        if _can_run(list(service), python, users.environ()):
            return users
    pytest.skip(f"uid {SERVICE_UID} can execute neither {sys.executable} nor a system {version} that imports "
                f"this venv's packages")


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
