"""The operator interface: arm, clear faults, stop, status. One small API, two clients.

Arming is an operator act. The control loop starts disarmed, and stays disarmed after any (re)start
(a crash, a systemd restart, a reconnect) until someone arms it through this interface:

    op = runner.operator                     # in-process (tests, the demo, closed-loop evaluation)
    op = SocketOperator("/run/edge-vla/control.sock")   # another process (the CLI, a GUI, a teleop tool)
    op.arm()           # CLEAR_FAULTS then ARM; returns once the firmware reports ARMED, or why not
    op.clear_faults()  # acknowledge latched faults without arming
    op.stop()          # category-1 stop now; the loop stays up, latched, until the next arm()
    op.status()        # phase, armed, firmware mode and faults, the last trip

Every call returns a dict: {"ok": bool, "error": str (when not ok), "status": {...}}; status() returns
the status dict itself.

Control socket (served by the running `edge-vla run`, see `ControlSocketServer`): a Unix stream
socket, by default `$RUNTIME_DIRECTORY/control.sock` under systemd (the unit's RuntimeDirectory,
/run/edge-vla/control.sock), else `$XDG_RUNTIME_DIR/edge-vla/control.sock` on a bench (or /tmp/edge-vla-UID,
0700), or EDGE_VLA_CONTROL_SOCKET in both the run and the operator commands; mode 0660: only the service's user and group may connect. Protocol: one
request per connection, one JSON object per line each way. Request {"cmd": "arm" | "clear_faults" |
"stop" | "status"} (nothing else in it); the reply is the dict above. A request line is at most 4096
bytes with its newline and must arrive whole within 2 s of connecting; anything else (a longer line, a
line cut off by EOF before its newline, not UTF-8, not that object) is refused with {"ok": false,
"error": ...} and the connection closed: never truncated, guessed at or acted on. Clients are served
concurrently (up to 64 connections; when full the oldest one still sending its line is closed to let a
newcomer in), and each command runs on its own, so no client, idle, slow, or arming, delays a stop.
The server logs each command and each refusal with the caller's uid (SO_PEERCRED).

Bench mode (`ControlConfig.arm_on_start`, `edge-vla run --arm-on-start`) arms once at start through the
same request path, for tests, the demo and evaluation. It is refused under systemd (INVOCATION_ID or
NOTIFY_SOCKET set) unless the unit sets EDGE_VLA_ALLOW_ARM_ON_START=1 explicitly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from edge_vla.errors import ConfigError
from edge_vla.files import file_kind
from edge_vla.onboard import shared as sh
from edge_vla.onboard.errors import OnboardError

log = logging.getLogger(__name__)

DEFAULT_SOCKET = "/run/edge-vla/control.sock"
SOCKET_ENV = "EDGE_VLA_CONTROL_SOCKET"
ALLOW_ARM_ON_START_ENV = "EDGE_VLA_ALLOW_ARM_ON_START"
COMMANDS = ("arm", "clear_faults", "stop", "status")

# Result codes the control loop writes for an arm request (bus word "arm_result").
ARM_RESULTS = ("armed", "not disarmed (already armed or still stopping)", "refused by the firmware",
               "no answer from the firmware", "link down", "enable input is off")
ARM_OK = 0


class OperatorError(OnboardError):
    """The operator interface could not reach the control loop, or a command was malformed."""


def under_systemd(env: Mapping[str, str]) -> bool:
    return bool(env.get("INVOCATION_ID") or env.get("NOTIFY_SOCKET"))


def check_bench_mode(env: Mapping[str, str] | None = None) -> None:
    """Refuse arm-on-start under systemd unless the unit explicitly allows it."""
    env = os.environ if env is None else env
    if under_systemd(env) and env.get(ALLOW_ARM_ON_START_ENV) != "1":
        raise ConfigError("--arm-on-start (bench mode) is refused under systemd: a restarted service must come up "
                          f"disarmed. Arm with `edge-vla arm`, or set {ALLOW_ARM_ON_START_ENV}=1 in the unit "
                          "for a bench rig that has no one to arm it")


def default_socket_path(env: Mapping[str, str] | None = None) -> str:
    """Where `edge-vla run` serves its control socket when --control-socket is not given.

    EDGE_VLA_CONTROL_SOCKET, else systemd's RuntimeDirectory (/run/edge-vla/control.sock for the unit), else the
    user's runtime directory ($XDG_RUNTIME_DIR/edge-vla/control.sock, a bench run from a login shell), else a
    per-user directory /tmp/edge-vla-UID (mode 0700, checked by `prepare_socket_dir`)."""
    env = os.environ if env is None else env
    if env.get(SOCKET_ENV):
        return env[SOCKET_ENV]
    if env.get("RUNTIME_DIRECTORY"):  # set by systemd from the unit's RuntimeDirectory=
        return str(Path(env["RUNTIME_DIRECTORY"].split(":")[0]) / "control.sock")
    return str(user_socket_dir(env) / "control.sock")


def user_socket_dir(env: Mapping[str, str] | None = None) -> Path:
    """The bench default's directory: private to this user (XDG_RUNTIME_DIR is 0700 by the spec; /tmp is not)."""
    env = os.environ if env is None else env
    if env.get("XDG_RUNTIME_DIR"):
        return Path(env["XDG_RUNTIME_DIR"]) / "edge-vla"
    return Path(f"/tmp/edge-vla-{os.getuid()}")


def client_socket_paths(env: Mapping[str, str] | None = None) -> list[str]:
    """Where the operator commands look, in order: the env variable or systemd's directory when set; else the
    robot service's socket (/run/edge-vla/control.sock), then this user's bench socket."""
    env = os.environ if env is None else env
    if env.get(SOCKET_ENV) or env.get("RUNTIME_DIRECTORY"):
        return [default_socket_path(env)]
    return list(dict.fromkeys([DEFAULT_SOCKET, default_socket_path(env)]))


def prepare_socket_dir(path: str | os.PathLike[str]) -> None:
    """Make the bench socket's directory private (0700, this user's) or refuse: in /tmp another user could have
    made it first and would then control the robot's arming."""
    d = Path(path).parent
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(d)
    except OSError as exc:
        raise ConfigError(f"cannot make the control socket directory {d} ({exc.strerror or exc}); pass "
                          "--control-socket PATH or set EDGE_VLA_CONTROL_SOCKET") from None
    if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and st.st_mode & 0o077:
        # Ours but open to others (e.g. made by another edge-vla tool sharing /tmp/edge-vla-UID): tighten it.
        # Nobody else can have put anything in it unless it was group/other-writable, so then still refuse.
        if st.st_mode & 0o022:
            raise ConfigError(f"the control socket directory {d} is writable by others (mode "
                              f"{stat.S_IMODE(st.st_mode):o}; it must be 0700): remove it, or pass --control-socket "
                              "PATH or set EDGE_VLA_CONTROL_SOCKET")
        os.chmod(d, 0o700)
        st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise ConfigError(f"the control socket directory {d} must be a directory of yours with mode 0700 (it is "
                          f"uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}): remove it, or pass --control-socket "
                          "PATH or set EDGE_VLA_CONTROL_SOCKET")


def socket_in_use(path: str | os.PathLike[str]) -> bool:
    """True if a process answers on `path` (a live edge-vla); False if nothing is there or it is stale."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


class Operator(Protocol):
    def arm(self, timeout: float = 5.0) -> dict[str, Any]: ...
    def clear_faults(self, timeout: float = 2.0) -> dict[str, Any]: ...
    def stop(self, timeout: float = 2.0) -> dict[str, Any]: ...
    def status(self) -> dict[str, Any]: ...


def bus_status(bus: sh.SharedBus) -> dict[str, Any]:
    """The loop's status as the operator sees it, from the shared words the control process writes."""
    from edge_vla.onboard.watchdog import FaultKind
    from firmware_bridge.protocol import Fault, Mode

    kinds = list(FaultKind)
    k = int(bus.get("trip_kind"))
    trip = None if k <= 0 else {"kind": kinds[k - 1].value, "category": int(bus.get("trip_category")),
                                "t": bus.get("trip_t"), "stop_sent_t": bus.get("stop_sent_t")}
    mode = int(bus.get("fw_mode"))
    firmware = None
    if mode >= 0:
        bits = Fault(int(bus.get("fw_faults")))
        status = int(bus.get("fw_status"))
        firmware = {"mode": Mode(mode).name, "fault_bits": int(bits),
                    "faults": [f.name for f in Fault if f and f in bits],
                    # the hardware enable input (protocol 1.1 Status bits: ENABLE_INPUT 0x1, ENABLE_REQUIRED 0x4)
                    "enable_input": bool(status & 0x1), "enable_required": bool(status & 0x4)}
    last_arm = int(bus.get("arm_result"))
    return {
        "phase": sh.STATUS_NAMES[int(bus.get("status"))],
        "armed": bus.get("armed") > 0,
        "cycles": int(bus.get("cycles")),
        "trip": trip,
        "firmware": firmware,
        "last_arm": None if bus.get("arm_ack") <= 0 else ARM_RESULTS[last_arm],
        "worker_errors": int(bus.get("worker_errors")),
    }


class BusOperator:
    """The operator API in the process that owns the SharedBus (the runner): requests are counters the
    control loop answers in a later cycle, so nothing here can block the loop."""

    def __init__(self, bus: sh.SharedBus, alive: Callable[[], bool] = lambda: True) -> None:
        self.bus, self.alive = bus, alive
        self._lock = threading.Lock()  # the socket thread and the caller's thread may both ask

    def _request(self, word: str, timeout: float) -> bool:
        with self._lock:
            n = self.bus.get(f"{word}_request") + 1
            self.bus.set(f"{word}_request", n)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.bus.get(f"{word}_ack") >= n:
                return True
            if not self.alive():
                return False
            time.sleep(0.005)
        return False

    def _reply(self, ok: bool, error: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"ok": ok, "status": self.status()}
        if not ok:
            out["error"] = error or "no answer from the control loop"
        return out

    def arm(self, timeout: float = 5.0) -> dict[str, Any]:
        if not self._request("arm", timeout):
            return self._reply(False, "the control loop did not answer the arm request in time")
        code = int(self.bus.get("arm_result"))
        return self._reply(code == ARM_OK, None if code == ARM_OK else f"not armed: {ARM_RESULTS[code]}")

    def clear_faults(self, timeout: float = 2.0) -> dict[str, Any]:
        return self._reply(self._request("clear", timeout))

    def stop(self, timeout: float = 2.0) -> dict[str, Any]:
        return self._reply(self._request("op_stop", timeout))

    def status(self) -> dict[str, Any]:
        return bus_status(self.bus)

    def call(self, cmd: str) -> dict[str, Any]:
        if cmd not in COMMANDS:
            return {"ok": False, "error": f"unknown command {cmd!r}; use one of {', '.join(COMMANDS)}"}
        return self.status() if cmd == "status" else getattr(self, cmd)()


# -- the control socket: server ------------------------------------------------------------------------
#
# Threat model: anyone who can connect (the service's user and group, socket mode 0660 in a 0750
# directory) may send anything, slowly, or not at all, on many connections at once. None of that may
# stop the server, delay a stop from another client, or get a request acted on that was not one whole,
# well-formed line. So: one event-loop thread reads every connection without blocking (selectors), frames
# strictly, and hands each complete, valid request to its own short-lived thread, because an arm may wait
# up to 5 s for the control loop and must not hold up a stop behind it.

MAX_REQUEST_BYTES = 4096  # one request line, its newline included
REQUEST_DEADLINE_S = 2.0  # from connect to a complete line: a slow (or idle) client is cut off after this
MAX_CONNECTIONS = 64  # connections held at once, waiting for a line or for their command's reply
MAX_SLOW_COMMANDS = 4  # arm / clear_faults in progress at once (each may wait seconds); stop is never refused
REPLY_SEND_TIMEOUT_S = 1.0  # a client that does not read its reply is dropped after this
_SLOW_COMMANDS = ("arm", "clear_faults")
_LISTEN_BACKLOG = 128
_LOOP_TICK_S = 0.2  # how soon the loop notices close()
_ACCEPT_BACKOFF_S = 0.1  # after accept() fails for want of resources (EMFILE, ENFILE, ENOBUFS)


class RequestError(ValueError):
    """A request line the server refuses; the message says what was wrong, in one line."""


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    dup = next((k for k in keys if keys.count(k) > 1), None)
    if dup is not None:  # json keeps the last one silently: {"cmd": "status", "cmd": "arm"} would arm
        raise RequestError(f"duplicate field {dup!r}")
    return dict(pairs)


def parse_request(line: bytes) -> str:
    """The command of one request line (without its newline), or RequestError saying what was wrong."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(f"request is not UTF-8 (byte {exc.start})") from None
    try:
        req = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except RequestError:
        raise
    except RecursionError:  # the C decoder's guard against deep nesting; never let it reach the loop
        raise RequestError("request is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, or an integer too long to convert
        raise RequestError(f"request is not valid JSON ({exc})") from None
    if not isinstance(req, dict):
        raise RequestError(f"request must be a JSON object, not {type(req).__name__}")
    unknown = sorted(set(req) - {"cmd"})
    if unknown:
        raise RequestError(f"unknown field(s) {', '.join(map(repr, unknown))}; a request has only \"cmd\"")
    cmd = req.get("cmd")
    if not isinstance(cmd, str):
        raise RequestError(f'"cmd" must be a string, not {type(cmd).__name__}')
    if cmd not in COMMANDS:
        raise RequestError(f"unknown command {cmd!r}; use one of {', '.join(COMMANDS)}")
    return cmd


def _error_line(error: str) -> bytes:
    return (json.dumps({"ok": False, "error": error + '; send one JSON line like {"cmd": "status"}'}) + "\n").encode()


@dataclass
class _Pending:
    """A connection still sending its request line (owned by the event-loop thread)."""

    sock: socket.socket
    deadline: float
    buf: bytearray = field(default_factory=bytearray)


class ControlSocketServer:
    """Serves an Operator on a Unix socket (mode 0660), one JSON line per connection each way.

    Many clients at once, none able to delay another: see the threat model above. Limits (keyword
    arguments, defaults above): `max_connections` held at once (when full, the oldest connection still
    sending its line is closed, with a reply saying why, so a newcomer (maybe a stop) always gets in),
    `request_deadline_s` for a whole line, `max_slow_commands` arms/clear_faults in progress.
    """

    def __init__(self, path: str | os.PathLike[str], operator: BusOperator, mode: int = 0o660, *,
                 max_connections: int = MAX_CONNECTIONS, request_deadline_s: float = REQUEST_DEADLINE_S,
                 max_slow_commands: int = MAX_SLOW_COMMANDS) -> None:
        self.path = Path(path)
        self.operator = operator
        self.mode = mode
        self.max_connections = max_connections
        self.request_deadline_s = request_deadline_s
        self.max_slow_commands = max_slow_commands
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._pending: dict[socket.socket, _Pending] = {}  # in arrival order: the first is the oldest
        self._busy_lock = threading.Lock()  # guards the two counters below (loop thread + command threads)
        self._running = 0  # commands being answered, each in its own thread
        self._running_slow = 0
        self._accept_paused_until = 0.0  # while accept() fails for want of resources (loop thread only)

    def start(self) -> ControlSocketServer:
        self.path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        self._remove_stale_socket()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._bind_and_publish(sock)
        except BaseException:
            sock.close()
            raise
        sock.setblocking(False)
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name="edge-vla-control-socket", daemon=True)
        self._thread.start()
        log.info("operator control socket at %s (mode %o)", self.path, self.mode)
        return self

    def _bind_and_publish(self, sock: socket.socket) -> None:
        """Bind, listen, and only then let the path appear. bind() creates the path and listen() comes after: a
        client in between was refused (ECONNREFUSED: "not running here"), and a second start probing it then
        removed it as stale. So: bind a temporary name in the same directory, listen, and link the path to it;
        link() fails where something appeared at the path meanwhile (another start), which is refused."""
        temp = self.path.parent / f".{os.getpid()}-{threading.get_ident() % 10000}"
        bound = self._bind(sock, temp)
        try:
            os.chmod(bound, self.mode)
            sock.listen(_LISTEN_BACKLOG)
            if bound == temp:
                try:
                    os.link(temp, self.path)
                except FileExistsError:
                    raise OperatorError(f"another edge-vla is serving {self.path}; stop it first (one robot, one "
                                        "loop)") from None
        finally:
            if bound == temp:
                temp.unlink(missing_ok=True)

    def _bind(self, sock: socket.socket, temp: Path) -> Path:
        """Bind `temp`, or the path itself where only the temporary name is too long for AF_UNIX (107 bytes; the
        path then appears a moment before the socket listens, as it always did). Returns what was bound."""
        old = os.umask(0o777 & ~self.mode)  # never a moment with wider permissions than `mode`
        try:
            try:
                sock.bind(str(temp))
                return temp
            except OSError as exc:
                if exc.errno is not None:  # errno None: "AF_UNIX path too long"
                    raise
            sock.bind(str(self.path))
            return self.path
        finally:
            os.umask(old)

    def _remove_stale_socket(self) -> None:
        """Clear the path for bind(): remove a socket nobody answers on (left by a process that died); refuse
        anything else. A mistyped --control-socket naming a file, a directory or a symlink must not cost it."""
        if why := not_a_socket(self.path):
            raise OperatorError(why)
        if not os.path.lexists(self.path):
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(self.path))
            except OSError:
                self.path.unlink(missing_ok=True)  # stale (another start may have removed it meanwhile)
                return
        raise OperatorError(f"another edge-vla is serving {self.path}; stop it first (one robot, one loop)")

    # -- the event loop (one thread; never blocks on a client) --

    def _serve(self) -> None:
        listener = self._sock
        assert listener is not None
        sel = selectors.DefaultSelector()
        sel.register(listener, selectors.EVENT_READ)
        try:
            while not self._stop.is_set():
                for key, _ in sel.select(timeout=self._next_wakeup()):
                    try:
                        if key.fileobj is listener:
                            self._accept(sel, listener)
                        elif key.fileobj in self._pending:  # not closed earlier in this same round
                            self._read(sel, self._pending[key.fileobj])  # type: ignore[index]
                    except Exception:  # a bug must cost one connection, never the operator channel
                        log.exception("control socket: unexpected error; dropping that connection")
                        if key.fileobj is not listener:
                            self._drop(sel, key.fileobj)  # type: ignore[arg-type]
                self._expire(sel)
                if self._accept_paused_until and time.monotonic() >= self._accept_paused_until:
                    self._accept_paused_until = 0.0
                    sel.register(listener, selectors.EVENT_READ)
        finally:
            for sock in list(self._pending):
                self._refuse(sel, sock, "the control loop is shutting down")
            sel.close()
            listener.close()

    def _next_wakeup(self) -> float:
        if not self._pending:
            return _LOOP_TICK_S
        oldest = next(iter(self._pending.values())).deadline  # deadlines grow in arrival order
        return min(_LOOP_TICK_S, max(0.0, oldest - time.monotonic()))

    def _accept(self, sel: selectors.BaseSelector, listener: socket.socket) -> None:
        for _ in range(self.max_connections):  # bounded: a flood cannot keep the loop in accept()
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. EMFILE: keep serving those already connected
                # The listener stays readable while accept() fails: pause it briefly, or the loop spins.
                log.warning("control socket: cannot accept (%s); pausing new connections for %g s", exc,
                            _ACCEPT_BACKOFF_S)
                sel.unregister(listener)
                self._accept_paused_until = time.monotonic() + _ACCEPT_BACKOFF_S
                return
            conn.setblocking(False)
            if not self._make_room(sel):
                self._send_and_close(conn, _error_line("busy: too many connections; try again"))
                continue
            self._pending[conn] = _Pending(conn, time.monotonic() + self.request_deadline_s)
            sel.register(conn, selectors.EVENT_READ)
            self._read(sel, self._pending[conn])  # a client usually sent its line before we accepted

    def _make_room(self, sel: selectors.BaseSelector) -> bool:
        """Room for one more connection: evict the oldest one still sending its line if need be."""
        with self._busy_lock:
            held = len(self._pending) + self._running
        if held < self.max_connections:
            return True
        if not self._pending:
            return False  # all held connections are commands in progress: they end within seconds
        oldest = next(iter(self._pending))
        self._refuse(sel, oldest, f"too many connections ({self.max_connections}); closed this one, which had "
                                  "not sent its request, to let a newer one in")
        return True

    def _read(self, sel: selectors.BaseSelector, p: _Pending) -> None:
        try:
            chunk = p.sock.recv(MAX_REQUEST_BYTES - len(p.buf))  # never buffer more than one line's worth
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(sel, p.sock)
            return
        if not chunk:
            if p.buf:
                self._refuse(sel, p.sock, "request ended without a newline; not acted on")
            else:
                self._drop(sel, p.sock)  # connected and left (e.g. start()'s probe for a live server)
            return
        p.buf += chunk
        end = p.buf.find(b"\n")
        if end < 0:
            if len(p.buf) >= MAX_REQUEST_BYTES:
                self._refuse(sel, p.sock, f"request longer than {MAX_REQUEST_BYTES} bytes; not acted on")
            return
        line = bytes(p.buf[:end])
        try:
            cmd = parse_request(line)
        except RequestError as exc:
            self._refuse(sel, p.sock, str(exc))
            return
        self._dispatch(sel, p.sock, cmd)

    def _expire(self, sel: selectors.BaseSelector) -> None:
        now = time.monotonic()
        late = [s for s, p in self._pending.items() if p.deadline <= now]
        for sock in late:
            self._refuse(sel, sock, f"no complete request line within {self.request_deadline_s:g} s; send it "
                                    "as soon as you connect")

    def _dispatch(self, sel: selectors.BaseSelector, sock: socket.socket, cmd: str) -> None:
        slow = cmd in _SLOW_COMMANDS
        with self._busy_lock:
            refused = slow and self._running_slow >= self.max_slow_commands
            if not refused:
                self._running += 1
                self._running_slow += slow
        if refused:
            self._refuse(sel, sock, f"busy: {self.max_slow_commands} arm/clear_faults requests already in "
                                    "progress; try again")
            return
        self._forget(sel, sock)
        uid = _peer_uid(sock)
        if cmd != "status":
            log.info("operator %s from uid %s", cmd, uid)
        threading.Thread(target=self._answer, args=(sock, cmd, slow), name=f"edge-vla-operator-{cmd}",
                         daemon=True).start()

    def _answer(self, sock: socket.socket, cmd: str, slow: bool) -> None:
        """One command, in its own thread: a stop never waits for an arm that waits for the loop."""
        try:
            try:
                reply = self.operator.call(cmd)
            except Exception as exc:  # the operator's own failure: say so, keep serving
                log.exception("control socket: %s failed", cmd)
                reply = {"ok": False, "error": f"internal error while handling {cmd!r}: {exc}"}
            sock.settimeout(REPLY_SEND_TIMEOUT_S)
            sock.sendall((json.dumps(reply) + "\n").encode())
        except OSError as exc:
            log.info("control socket: could not reply to %s (%s)", cmd, exc)
        finally:
            sock.close()
            with self._busy_lock:
                self._running -= 1
                self._running_slow -= slow

    # -- closing connections --

    def _forget(self, sel: selectors.BaseSelector, sock: socket.socket) -> None:
        self._pending.pop(sock, None)
        with contextlib.suppress(KeyError, ValueError):
            sel.unregister(sock)

    def _drop(self, sel: selectors.BaseSelector, sock: socket.socket) -> None:
        self._forget(sel, sock)
        sock.close()

    def _refuse(self, sel: selectors.BaseSelector, sock: socket.socket, error: str) -> None:
        log.warning("control socket: refused a request from uid %s: %s", _peer_uid(sock), error)
        self._forget(sel, sock)
        self._send_and_close(sock, _error_line(error))

    @staticmethod
    def _send_and_close(sock: socket.socket, data: bytes) -> None:
        """Best effort, never blocking: one short line fits in a fresh socket's send buffer."""
        with contextlib.suppress(OSError):
            sock.send(data)
        sock.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)  # the loop closes the listening socket and pending connections
            self._thread = None
        self._sock = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def not_a_socket(path: str | os.PathLike[str]) -> str | None:
    """Why the control socket cannot be bound at `path` because something else lies there (a file, a directory,
    a symlink...), in one line; None where nothing or a socket is there."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISSOCK(st.st_mode):
        return None
    return (f"{path} exists and is {file_kind(st.st_mode)}, not a control socket; edge-vla replaces only a stale "
            "socket there: pass another --control-socket")


def _peer_uid(conn: socket.socket) -> int | str:
    try:
        _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                             struct.calcsize("3i")))
        return uid
    except (OSError, AttributeError):
        return "?"


# -- the control socket: client ------------------------------------------------------------------------

MAX_REPLY_BYTES = 1 << 20  # a status reply is well under 1 KiB


class SocketOperator:
    """The operator API over the control socket of a running `edge-vla run`.

    Every failure (no socket, no permission, no answer in `timeout` seconds in all, a reply that is not
    one JSON object line) raises OperatorError with one line saying what happened and what to do.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, timeout: float = 10.0) -> None:
        # Without a path: the first candidate that exists (the service's, then this user's bench socket).
        self.looked_at = [str(path)] if path else client_socket_paths()
        self.path = next((p for p in self.looked_at if os.path.exists(p)), self.looked_at[0])
        self.timeout = timeout

    def call(self, cmd: str) -> dict[str, Any]:
        """The reply to one command: a dict (status for "status", {"ok", "error"?, "status"?} otherwise)."""
        deadline = time.monotonic() + self.timeout
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.timeout)
                self._connect(sock)
                sock.sendall((json.dumps({"cmd": cmd}) + "\n").encode())
                data = self._read_line(sock, deadline)
        except TimeoutError:
            raise OperatorError(f"no answer from the control loop at {self.path} within {self.timeout:g} s: "
                                "is edge-vla hung? check `journalctl -u edge-vla`") from None
        except OSError as exc:
            raise OperatorError(f"lost the connection to {self.path} ({exc.strerror or exc}) before the reply "
                                f"to {cmd!r}") from None
        if not data:
            raise OperatorError(f"the control loop closed {self.path} without answering {cmd!r}")
        if not data.endswith(b"\n"):
            raise OperatorError(f"the reply to {cmd!r} from {self.path} was cut off")
        return self._parse(data, cmd)

    def _connect(self, sock: socket.socket) -> None:
        try:
            sock.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as exc:
            where = " or ".join(self.looked_at) if not os.path.exists(self.path) else self.path
            raise OperatorError(f"edge-vla is not running here (no control socket at {where}): start the service "
                                "(systemctl start edge-vla) or `edge-vla run`, or pass --control-socket PATH") from exc
        except PermissionError as exc:
            raise OperatorError(f"no permission to use {self.path}: run as the service's user or add yourself to its "
                                "group") from exc
        except BlockingIOError as exc:  # the listen backlog is full
            raise OperatorError(f"the control socket {self.path} is busy (too many connections); try again") from exc
        except TimeoutError:
            raise
        except OSError as exc:  # e.g. a path too long for a Unix socket
            raise OperatorError(f"cannot connect to {self.path}: {exc.strerror or exc}") from exc

    def _read_line(self, sock: socket.socket, deadline: float) -> bytes:
        data = b""
        while not data.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            sock.settimeout(remaining)  # one deadline for the whole reply, not one per recv
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            if len(data) > MAX_REPLY_BYTES:
                raise OperatorError(f"the reply from {self.path} is longer than {MAX_REPLY_BYTES} bytes; "
                                    "is that an edge-vla control socket?")
        return data

    def _parse(self, data: bytes, cmd: str) -> dict[str, Any]:
        try:
            reply = json.loads(data)
        except (ValueError, RecursionError):  # also UnicodeDecodeError
            reply = None
        if not isinstance(reply, dict):
            raise OperatorError(f"the reply to {cmd!r} from {self.path} is not a JSON object; is that an edge-vla "
                                "control socket?")
        return reply

    def arm(self, timeout: float = 5.0) -> dict[str, Any]:
        return self.call("arm")

    def clear_faults(self, timeout: float = 2.0) -> dict[str, Any]:
        return self.call("clear_faults")

    def stop(self, timeout: float = 2.0) -> dict[str, Any]:
        return self.call("stop")

    def status(self) -> dict[str, Any]:
        return self.call("status")
