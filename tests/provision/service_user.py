"""Run robot-side steps the way the robot runs them: as an unprivileged service user, not as root.

edge-vla.service runs as its own system user. Tests drop to uid/gid 65534 (nobody/nogroup, present
on every Debian/Ubuntu machine) with util-linux's setpriv instead of creating a user on the machine.
The test tree must be traversable by that user: pytest's tmp_path lives under a 0700 directory, so
`open_dir()` makes a directory whose parents are all world-traversable.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

SERVICE_UID = SERVICE_GID = 65534
PYTHON = sys.executable  # the robot's python in these tests: the test venv's own


def why_no_service_user() -> str | None:
    """None when tests can drop to the service user here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "needs root to drop privileges to uid 65534 (setpriv --reuid)"
    if shutil.which("setpriv") is None:
        return "setpriv (util-linux) is not installed"
    return None


def as_service_user(cmd: Sequence[str], *, cwd: Path | None = None, timeout: float = 120,
                    env: dict[str, str] | None = None, outside: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    """Run `cmd` as uid/gid 65534 with no supplementary groups (and so no root capabilities).
    `outside` runs around the privilege drop, as root (e.g. `unshare --net`, which needs root)."""
    drop = ["setpriv", f"--reuid={SERVICE_UID}", f"--regid={SERVICE_GID}", "--clear-groups"]
    # A system user's HOME is not root's: nothing may depend on reading or writing /root.
    run_env = {k: v for k, v in (env if env is not None else os.environ).items()
               if not k.startswith(("PYTEST", "COV_"))}
    run_env.update(HOME="/nonexistent", PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([*outside, *drop, *cmd], cwd=cwd or "/", capture_output=True, text=True, timeout=timeout,
                          env=run_env)


def python_as_service_user(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`python -c code args...` as the service user (-I: no cwd or PYTHON* variables on sys.path)."""
    return as_service_user([PYTHON, "-I", "-c", code, *args], timeout=timeout)


def open_dir(prefix: str) -> Path:
    """A fresh directory under the system temp dir, mode 0755, whose parents the service user can traverse."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(d, 0o755)  # explicit: mkdtemp makes 0700
    for parent in d.parents:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            raise RuntimeError(f"{parent} is not traversable by other users (mode {oct(mode & 0o7777)}); "
                               "set TMPDIR to a world-traversable directory")
    return d
