"""Arming on the bench: `edge-vla run` outside systemd serves its control socket by default, in the user's runtime
directory, and `edge-vla arm/status` find it there (or at EDGE_VLA_CONTROL_SOCKET, read by both sides).

The run and the operator commands run as the service user (uid 65534), as on a bench robot where one user does both.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
from pathlib import Path

import pytest
from onboard_helpers import robot_users, service_user, wait_for

from edge_vla.errors import ConfigError
from edge_vla.onboard import operator


def _bench_env(users, **extra: str) -> dict[str, str]:
    env = users.environ(**extra)
    for name in ("RUNTIME_DIRECTORY", "EDGE_VLA_CONTROL_SOCKET", "XDG_RUNTIME_DIR"):
        if name not in extra:
            env.pop(name, None)
    return env


def _user_dir(users, prefix: str) -> Path:
    """A per-user runtime directory like /run/user/UID: the user's own, mode 0700."""
    d = service_user.open_dir(prefix) / "user"
    d.mkdir(mode=0o700)
    if users.service:
        os.chown(d, users.service_uid, users.service_uid)
    return d


def _start_run(users, env: dict[str, str], *extra: str) -> subprocess.Popen[str]:
    cmd = users.edge_vla(users.service, "run", "--expert", "--emulate", "--duration", "60", *extra)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd="/")


def _operator(users, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(users.edge_vla(users.service, *args), capture_output=True, text=True, env=env, cwd="/",
                          timeout=60)


def _stop(proc: subprocess.Popen[str]) -> tuple[str, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        return proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()


def test_bench_run_serves_arm_in_the_users_runtime_dir_and_a_second_run_refuses() -> None:
    users = robot_users()
    user_dir = _user_dir(users, "edge-vla-xdg-")
    env = _bench_env(users, XDG_RUNTIME_DIR=str(user_dir))
    sock = user_dir / "edge-vla" / "control.sock"
    proc = _start_run(users, env)
    try:
        wait_for(lambda: sock.is_socket() or proc.poll() is not None, 40, f"the control socket at {sock}")
        assert proc.poll() is None, _stop(proc)
        assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
        status = _operator(users, env, "status", "--json")
        assert status.returncode == 0 and json.loads(status.stdout)["phase"], status
        armed = _operator(users, env, "arm")
        assert armed.returncode == 0 and armed.stdout.startswith("ok"), armed
        # a second run on the same robot: one line, before it starts an emulator or loads anything
        second = subprocess.run(users.edge_vla(users.service, "run", "--expert", "--emulate", "--duration", "5"),
                                capture_output=True, text=True, env=env, cwd="/", timeout=60)
        lines = [ln for ln in second.stderr.splitlines() if ln.strip()]
        assert second.returncode == 1 and len(lines) == 1, second.stderr
        assert "another edge-vla is serving" in lines[0] and str(sock) in lines[0]
        assert _operator(users, env, "stop").returncode == 0
    finally:
        _, err = _stop(proc)
    try:
        assert proc.returncode == 0, err  # an operator stop is not a safety trip
        assert not sock.exists(), "the socket is removed at exit"
    finally:
        shutil.rmtree(user_dir.parent, ignore_errors=True)


def test_the_env_variable_is_read_by_run_and_by_the_operator_commands_and_a_stale_socket_is_replaced() -> None:
    users = robot_users()
    d = _user_dir(users, "edge-vla-env-")
    path = d / "bench.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # left by a run that was killed: nobody listens
    stale.close()
    if users.service:
        os.chown(path, users.service_uid, users.service_uid)
    env = _bench_env(users, EDGE_VLA_CONTROL_SOCKET=str(path), XDG_RUNTIME_DIR=str(d))
    proc = _start_run(users, env)
    try:
        def serving() -> bool:
            if proc.poll() is not None:
                return True
            return _operator(users, env, "status", "--json").returncode == 0
        wait_for(serving, 40, f"a status answer on {path}", step=0.3)
        assert proc.poll() is None, _stop(proc)
        assert not (d / "edge-vla" / "control.sock").exists(), "the env variable wins over the runtime dir"
    finally:
        _stop(proc)
        shutil.rmtree(d.parent, ignore_errors=True)


def test_default_paths_systemd_user_runtime_dir_and_tmp_fallback(tmp_path: Path) -> None:
    uid = os.getuid()
    assert operator.default_socket_path({"RUNTIME_DIRECTORY": "/run/edge-vla"}) == "/run/edge-vla/control.sock"
    assert operator.default_socket_path({"EDGE_VLA_CONTROL_SOCKET": "/x.sock", "RUNTIME_DIRECTORY": "/r"}) == "/x.sock"
    assert operator.default_socket_path({"XDG_RUNTIME_DIR": "/run/user/5"}) == "/run/user/5/edge-vla/control.sock"
    assert operator.default_socket_path({}) == f"/tmp/edge-vla-{uid}/control.sock"
    # The /tmp fallback is the user's own 0700 directory; one that another user made first is refused.
    d = tmp_path / "shared"
    d.mkdir(mode=0o777)
    os.chmod(d, 0o777)
    with pytest.raises(ConfigError, match="0700"):
        operator.prepare_socket_dir(d / "control.sock")
    mine = tmp_path / "mine" / "sub"
    operator.prepare_socket_dir(mine / "control.sock")
    assert stat.S_IMODE(mine.stat().st_mode) == 0o700
