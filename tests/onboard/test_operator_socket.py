"""The operator control socket probed the way a hostile user on the robot would: malformed and oversized
lines, lines cut off at EOF, idle, slow and flooding clients, and a CLI facing a dead, foreign or lying
socket. A stop from another client must still be acknowledged promptly, and nothing malformed is acted on.

The server runs as the service would: a separate process under an unprivileged uid (65534, via setpriv),
serving a real SharedBus through the real BusOperator and ControlSocketServer. A small stand-in for the
control loop in that process acknowledges each operator request and prints what it was asked to do
("acted op_stop 1"), so a test can tell a request that was applied from one that was ignored.

Run as a script (`python test_operator_socket.py serve SOCKET [options]`) this file is that server.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

SERVICE_UID = 65534  # the robot service's user in these tests (nobody); never a user created on this machine
OPERATOR_UID = 65533  # another local user: an operator when given the service's group, a stranger without it
STOP_BOUND_S = 1.0  # a stop must be acknowledged within this, whatever other clients do (the old server: ~5 s)


# -- the server process (runs as SERVICE_UID) ------------------------------------------------------------

def _serve_main(argv: list[str]) -> None:
    from edge_vla.onboard.operator import BusOperator, ControlSocketServer
    from edge_vla.onboard.shared import SharedBus

    ap = argparse.ArgumentParser()
    ap.add_argument("socket")
    ap.add_argument("--no-arm-ack", action="store_true", help="never acknowledge an arm (an arm that hangs)")
    ap.add_argument("--request-deadline", type=float, default=None)
    ap.add_argument("--max-connections", type=int, default=None)
    args = ap.parse_args(argv)
    limits = {k: v for k, v in (("request_deadline_s", args.request_deadline),
                                ("max_connections", args.max_connections)) if v is not None}
    bus = SharedBus(2)
    server = ControlSocketServer(args.socket, BusOperator(bus), **limits).start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    print("ready", flush=True)
    seen = {"arm": 0, "clear": 0, "op_stop": 0}
    while not done.wait(0.001):  # the control loop's side of the bus: act on each request once, then ack it
        for word, last in seen.items():
            n = int(bus.get(f"{word}_request"))
            if n > last:
                seen[word] = n
                print(f"acted {word} {n}", flush=True)
                if not (word == "arm" and args.no_arm_ack):
                    bus.set(f"{word}_ack", n)
    server.close()


# -- test helpers -------------------------------------------------------------------------------------------

def _drop_to(uid: int, *groups: int) -> list[str]:
    """Run as `uid` (primary group = uid) with exactly `groups` as supplementary groups."""
    import service_user  # tests/service_user.py (test side only: this file also runs as the server script)

    return service_user.drop(uid, uid, groups)


def _service_python():
    """The interpreter and import path with which the unprivileged users run this checkout."""
    import service_user

    return service_user.service_python()


class Served:
    """The server subprocess; `acted` lists what its control-loop stand-in was asked to do, in order."""

    def __init__(self, proc: subprocess.Popen[str], path: Path) -> None:
        self.proc, self.path = proc, path
        self.acted: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.acted.append(line.strip())
                self._cond.notify_all()

    def wait_for(self, entry: str, timeout: float = 5.0) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: entry in self.acted, timeout):
                raise AssertionError(f"the server never printed {entry!r} (got {self.acted})")

    def requests(self) -> list[str]:
        with self._cond:
            return [a for a in self.acted if a.startswith("acted ")]


@contextlib.contextmanager
def serve(*options: str) -> Iterator[Served]:
    if os.geteuid() != 0:
        import pytest
        pytest.skip("needs root to drop to the service's uid with setpriv")
    base = Path(tempfile.mkdtemp(prefix="edge-vla-op-"))
    base.chmod(0o755)
    run_dir = base / "run"  # like systemd's RuntimeDirectory=edge-vla, RuntimeDirectoryMode=0750
    run_dir.mkdir(mode=0o750)
    os.chown(run_dir, SERVICE_UID, SERVICE_UID)
    path = run_dir / "control.sock"
    sp = _service_python()
    proc = subprocess.Popen([*_drop_to(SERVICE_UID), sp.python, str(sp.path(Path(__file__))), "serve", str(path),
                             *options], cwd=base, env=sp.environ(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    served = Served(proc, path)
    try:
        served.wait_for("ready", 20.0)
        yield served
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=10)
        finally:
            proc.kill()
            shutil.rmtree(base, ignore_errors=True)
    assert "Traceback" not in err, f"the control socket server raised:\n{err}"


def connect(path: Path, timeout: float = 3.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(str(path))
    return sock


def read_reply(sock: socket.socket) -> bytes:
    """Everything up to the first newline (or EOF): the server's one-line reply."""
    data = b""
    while not data.endswith(b"\n"):
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:  # the server closed with our unread bytes queued: the reply came first
            break
        if not chunk:
            break
        data += chunk
    return data


def ask(path: Path, payload: bytes, *, end_input: bool = False) -> bytes:
    with connect(path) as sock:
        sock.sendall(payload)
        if end_input:
            sock.shutdown(socket.SHUT_WR)
        return read_reply(sock)


def refusal(reply: bytes) -> str:
    """The error of a one-line {"ok": false, "error": ...} reply (fails the test on anything else)."""
    assert reply.endswith(b"\n") and reply.count(b"\n") == 1, f"not one reply line: {reply[:200]!r}"
    got = json.loads(reply)
    assert got["ok"] is False and isinstance(got["error"], str) and got["error"], got
    return got["error"]


def timed_stop(path: Path) -> float:
    """Seconds until a stop through the real client (SocketOperator) is acknowledged."""
    from edge_vla.onboard.operator import SocketOperator

    t0 = time.monotonic()
    reply = SocketOperator(path, timeout=3 * STOP_BOUND_S).stop()
    elapsed = time.monotonic() - t0
    assert reply["ok"], reply
    return elapsed


# -- the server survives any line and acts on none that is malformed ------------------------------------

HOSTILE_LINES = {
    "deep list nesting": b"[" * 4000 + b"\n",
    "deep object nesting": b'{"cmd": ' * 500 + b"\n",
    "not UTF-8": b'{"cmd": "st\xffop"}\n',
    "a lone surrogate": b'{"cmd": "\\ud800"}\n',
    "NUL in the command": b'{"cmd": "stop\x00"}\n',
    "not JSON": b"stop\n",
    "an empty line": b"\n",
    "a JSON list": b'["stop"]\n',
    "a JSON string": b'"stop"\n',
    "null": b"null\n",
    "cmd a list": b'{"cmd": ["stop"]}\n',
    "cmd a huge integer": b'{"cmd": ' + b"9" * 4000 + b"}\n",
    "cmd an overflowing float": b'{"cmd": 1e999999}\n',
    "cmd NaN": b'{"cmd": NaN}\n',
    "no cmd": b"{}\n",
    "an unknown command": b'{"cmd": "STOP"}\n',
    "a duplicate cmd": b'{"cmd": "status", "cmd": "arm"}\n',
    "an unknown field": b'{"cmd": "arm", "force": true}\n',
}


def test_hostile_lines_are_refused_and_a_stop_still_gets_through() -> None:
    with serve() as srv:
        wrong = []
        for name, line in HOSTILE_LINES.items():
            try:
                error = refusal(ask(srv.path, line))
            except (AssertionError, OSError, ValueError) as exc:
                wrong.append(f"{name}: {type(exc).__name__}: {exc}")
            else:
                assert "\n" not in error
        # Control case: a well-formed stop from another client is applied, promptly, and it is the only
        # request the control loop ever saw (every hostile line above was answered before it was sent).
        elapsed = timed_stop(srv.path)
        srv.wait_for("acted op_stop 1")
        assert not wrong, "mishandled: " + "; ".join(wrong)
        assert srv.requests() == ["acted op_stop 1"], f"a malformed request was acted on: {srv.requests()}"
        assert elapsed < STOP_BOUND_S, f"stop took {elapsed:.2f} s"


def test_oversize_and_unterminated_lines_are_refused_never_parsed() -> None:
    stop = b'{"cmd": "stop"}'
    with serve() as srv:
        # A stop padded past 4 KiB: whitespace JSON would parse, so a truncating server acts on it.
        error = refusal(ask(srv.path, stop + b" " * 5000))
        assert "4096" in error, error
        error = refusal(ask(srv.path, stop + b" " * 5000 + b"\n"))
        assert "4096" in error, error
        # A stop the client ends (EOF) before its newline: never acted on.
        error = refusal(ask(srv.path, stop, end_input=True))
        assert "newline" in error, error
        assert srv.requests() == [], f"an unframed line was acted on: {srv.requests()}"
        # Control case: the same stop, padded to just under the limit, with its newline, is applied.
        got = json.loads(ask(srv.path, stop + b" " * (4095 - len(stop)) + b"\n"))
        assert got["ok"], got
        srv.wait_for("acted op_stop 1")
        assert srv.requests() == ["acted op_stop 1"]


# -- no client can hold up a stop ----------------------------------------------------------------------

def _slow_loris(sock: socket.socket, done: threading.Event, interval: float) -> None:
    """One byte of an endless (but valid JSON whitespace) line per interval, until told to stop."""
    with contextlib.suppress(OSError):
        while not done.wait(interval):
            sock.send(b" ")


def test_idle_and_slow_loris_clients_do_not_delay_a_stop() -> None:
    with serve("--request-deadline", "1.0") as srv:
        idle = connect(srv.path)
        loris = connect(srv.path)
        loris.send(b'{"cmd":')
        done = threading.Event()
        sender = threading.Thread(target=_slow_loris, args=(loris, done, 0.2), daemon=True)
        sender.start()
        try:
            elapsed = timed_stop(srv.path)
            assert elapsed < STOP_BOUND_S, f"a stop waited {elapsed:.2f} s behind an idle and a slow client"
            srv.wait_for("acted op_stop 1")
            # Both are cut off at the request deadline, told why; neither line is ever acted on.
            for sock in (idle, loris):
                sock.settimeout(3.0)
                assert "1 s" in refusal(read_reply(sock))
        finally:
            done.set()
            sender.join()
            idle.close()
            loris.close()
        assert srv.requests() == ["acted op_stop 1"]


def test_an_arm_in_progress_does_not_hold_up_a_stop() -> None:
    with serve("--no-arm-ack") as srv, connect(srv.path, timeout=10) as arming:
        arming.sendall(b'{"cmd": "arm"}\n')  # the control loop never answers this one: it waits its 5 s
        srv.wait_for("acted arm 1")
        elapsed = timed_stop(srv.path)
        assert elapsed < STOP_BOUND_S, f"a stop waited {elapsed:.2f} s behind an arm in progress"
        srv.wait_for("acted op_stop 1")


def test_a_connection_flood_is_bounded_and_a_stop_still_gets_through() -> None:
    limit, flood = 8, 40
    with serve("--max-connections", str(limit)) as srv:
        socks = []
        try:
            for _ in range(flood):
                socks.append(connect(srv.path, timeout=2.0))
            elapsed = timed_stop(srv.path)
            assert elapsed < STOP_BOUND_S, f"a stop waited {elapsed:.2f} s behind a flood of connections"
            srv.wait_for("acted op_stop 1")
            # The oldest idle connections were closed to make room, each told why (never silently dropped).
            deadline = time.monotonic() + 3.0
            answered: set[socket.socket] = set()
            while len(answered) < flood - limit and time.monotonic() < deadline:
                ready, _, _ = select.select([s for s in socks if s not in answered], [], [], 0.1)
                answered.update(ready)
            assert len(answered) >= flood - limit, f"only {len(answered)} of the flood were answered"
            evicted = sum("too many" in refusal(read_reply(sock)) for sock in answered)
            assert evicted >= flood - limit, f"{evicted} told 'too many connections'"
        finally:
            for sock in socks:
                sock.close()
        assert srv.requests() == ["acted op_stop 1"]


# -- the CLI: one line (or {"ok": false} under --json), a non-zero exit, never a traceback ---------------

def _cli(*args: str, user: list[str] | None = None) -> subprocess.Popen[str]:
    """`edge-vla ARGS` as this user, or as `user` (a setpriv prefix) with the interpreter it can run."""
    python, env = sys.executable, None
    if user:
        sp = _service_python()
        python, env = sp.python, sp.environ()
    return subprocess.Popen([*(user or []), python, "-m", "edge_vla.cli", *args], cwd="/", env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _check_failure(rc: int | None, out: str, err: str, json_mode: bool, case: str) -> str:
    """One failure of the CLI as the contract says; returns its error line."""
    assert rc not in (0, None), f"{case}: exit {rc}"
    assert "Traceback" not in out + err, f"{case}: {err}"
    if json_mode:
        got = json.loads(out)
        assert got["ok"] is False and isinstance(got["error"], str) and "\n" not in got["error"], f"{case}: {got}"
        return got["error"]
    assert out == "" and err.endswith("\n") and err.count("\n") == 1, f"{case}: not one line: {err!r}"
    return err


def _check_cli_failure(proc: subprocess.Popen[str], json_mode: bool, case: str) -> str:
    out, err = proc.communicate(timeout=30)
    return _check_failure(proc.returncode, out, err, json_mode, case)


class FakeServer:
    """A socket that lies: answers every connection with `reply` (None: accept and never answer)."""

    def __init__(self, path: Path, reply: bytes | None) -> None:
        self.reply = reply
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(16)
        self.held: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            if self.reply is None:
                self.held.append(conn)
                continue
            with conn, contextlib.suppress(OSError):  # a client that stops reading is its own business
                conn.recv(4096)
                conn.sendall(self.reply)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for conn in self.held:
            conn.close()


def test_cli_failures_are_one_line_or_json_never_a_traceback(tmp_path: Path, capsys) -> None:
    from edge_vla import cli

    replies = {
        "server closed without answering": b"",
        "reply is not JSON": b"<html>\n",
        "reply is not UTF-8": b"\xff\xfe\n",
        "reply is a JSON list": b"[1, 2]\n",
        "reply is nested too deeply": b"[" * 200_000 + b"\n",
        "reply is too long": b" " * (2 << 20),
        "reply cut off": b'{"ok": tr',
        "status reply missing fields": b'{"armed": 1}\n',
        "status reply with wrong types": b'{"phase": "running", "armed": true, "trip": 5, "firmware": []}\n',
        "stop reply without ok": b'{"status": {}}\n',
        "refused": b'{"ok": false, "error": "busy:\\ntry again"}\n',
        "no answer": None,
    }
    fakes = []
    (tmp_path / "a-file").write_text("not a socket")
    cases: dict[str, list[str]] = {
        "no socket": ["--control-socket", str(tmp_path / "missing.sock")],
        "a regular file": ["--control-socket", str(tmp_path / "a-file")],
        "a path under a file": ["--control-socket", str(tmp_path / "a-file" / "control.sock")],
        "a path too long for a socket": ["--control-socket", str(tmp_path / ("x" * 200))],
    }
    for i, (case, reply) in enumerate(replies.items()):
        path = tmp_path / f"fake{i}.sock"
        fakes.append(FakeServer(path, reply))
        cases[case] = ["--control-socket", str(path), "--timeout", "0.3"]
    # The real CLI, as a process, where nothing is listening: one line, or JSON.
    procs = {js: _cli("stop", *cases["no socket"], *(["--json"] if js else [])) for js in (False, True)}
    errors = {("no socket", "stop", js): _check_cli_failure(p, js, f"no socket json={js}") for js, p in procs.items()}
    try:
        # Against sockets that lie, the same CLI entry point in this process (a Python start each is too slow).
        for case, args in cases.items():
            for cmd in ("stop",) if case == "no answer" else ("status", "stop"):
                for js in (False, True):
                    rc = cli.main([cmd, *args, *(["--json"] if js else [])])
                    got = capsys.readouterr()
                    errors[(case, cmd, js)] = _check_failure(rc, got.out, got.err, js, f"{case} {cmd} json={js}")
    finally:
        for fake in fakes:
            fake.close()
    assert "not running" in errors[("no socket", "stop", False)]
    assert "0.3 s" in errors[("no answer", "stop", True)]
    assert "busy: try again" in errors[("refused", "status", False)]
    expected = {"a path under a file": "not running", "a path too long for a socket": "cannot connect",
                "server closed without answering": "without answering", "reply is not JSON": "not a JSON object",
                "reply is not UTF-8": "not a JSON object", "reply is a JSON list": "not a JSON object",
                "reply is nested too deeply": "not a JSON object", "reply is too long": "longer than",
                "reply cut off": "cut off", "status reply missing fields": "malformed",
                "status reply with wrong types": "malformed", "stop reply without ok": 'no "ok"'}
    for case, words in expected.items():  # each lie is named as such, not mistaken for a timeout
        cmd = "status" if "status reply" in case else "stop"
        assert words in errors[(case, cmd, True)], (case, errors[(case, cmd, True)])


def test_cli_keeps_the_socket_permission_model() -> None:
    """The service's user and group may use the socket (0660, in a 0750 directory); anyone else gets one line."""
    with serve() as srv:
        st = os.stat(srv.path)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_uid == SERVICE_UID, (oct(st.st_mode), st.st_uid)
        member = _drop_to(OPERATOR_UID, SERVICE_UID)  # an operator in the service's group
        stranger = _drop_to(OPERATOR_UID)
        runs = {
            "member status": _cli("status", "--json", "--control-socket", str(srv.path), user=member),
            "member stop": _cli("stop", "--control-socket", str(srv.path), user=member),
            "stranger stop": _cli("stop", "--control-socket", str(srv.path), user=stranger),
            "stranger stop --json": _cli("stop", "--json", "--control-socket", str(srv.path), user=stranger),
        }
        out, err = runs["member status"].communicate(timeout=30)
        assert runs["member status"].returncode == 0 and json.loads(out)["phase"] == "starting", err
        out, err = runs["member stop"].communicate(timeout=30)
        assert runs["member stop"].returncode == 0 and out.startswith("ok"), err
        srv.wait_for("acted op_stop 1")
        assert "no permission" in _check_cli_failure(runs["stranger stop"], False, "stranger")
        assert "no permission" in _check_cli_failure(runs["stranger stop --json"], True, "stranger --json")
        assert srv.requests() == ["acted op_stop 1"], "a stranger's stop reached the control loop"


if __name__ == "__main__" and sys.argv[1:2] == ["serve"]:
    _serve_main(sys.argv[2:])
