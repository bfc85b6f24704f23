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
/run/edge-vla/control.sock), mode 0660: only the service's user and group may connect. Protocol: one
JSON object per line each way. Request {"cmd": "arm" | "clear_faults" | "stop" | "status"}; the reply
is the dict above. The server logs each command with the caller's uid (SO_PEERCRED).

Bench mode (`ControlConfig.arm_on_start`, `edge-vla run --arm-on-start`) arms once at start through the
same request path, for tests, the demo and evaluation. It is refused under systemd (INVOCATION_ID or
NOTIFY_SOCKET set) unless the unit sets EDGE_VLA_ALLOW_ARM_ON_START=1 explicitly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from edge_vla.errors import ConfigError
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
    env = os.environ if env is None else env
    if env.get(SOCKET_ENV):
        return env[SOCKET_ENV]
    if env.get("RUNTIME_DIRECTORY"):  # set by systemd from the unit's RuntimeDirectory=
        return str(Path(env["RUNTIME_DIRECTORY"].split(":")[0]) / "control.sock")
    return DEFAULT_SOCKET


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


class ControlSocketServer:
    """Serves an Operator on a Unix socket (mode 0660), one JSON line per request, in a daemon thread."""

    def __init__(self, path: str | os.PathLike[str], operator: BusOperator, mode: int = 0o660) -> None:
        self.path = Path(path)
        self.operator = operator
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.mode = mode

    def start(self) -> ControlSocketServer:
        self.path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(self.path))
            except OSError:
                self.path.unlink()  # stale: left by a process that died
            else:
                probe.close()
                raise OperatorError(f"another edge-vla is serving {self.path}; stop it first (one robot, one loop)")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o777 & ~self.mode)  # never a moment with wider permissions than `mode`
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, self.mode)
        sock.listen(4)
        sock.settimeout(0.2)
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name="edge-vla-control-socket", daemon=True)
        self._thread.start()
        log.info("operator control socket at %s (mode %o)", self.path, self.mode)
        return self

    def _serve(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5.0)
                try:
                    self._handle(conn)
                except (OSError, ValueError) as exc:
                    log.warning("control socket: bad request (%s)", exc)

    def _handle(self, conn: socket.socket) -> None:
        data = b""
        while not data.endswith(b"\n") and len(data) < 4096:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        try:
            req = json.loads(data.decode() or "{}")
            cmd = str(req.get("cmd", ""))
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
            reply: dict[str, Any] = {"ok": False, "error": 'malformed request; send one JSON line like {"cmd": "status"}'}
        else:
            if cmd != "status":
                log.info("operator %s from uid %s", cmd, _peer_uid(conn))
            reply = self.operator.call(cmd)
        conn.sendall((json.dumps(reply) + "\n").encode())

    def close(self) -> None:
        self._stop.set()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _peer_uid(conn: socket.socket) -> int | str:
    try:
        _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                             struct.calcsize("3i")))
        return uid
    except (OSError, AttributeError):
        return "?"


class SocketOperator:
    """The operator API over the control socket of a running `edge-vla run`."""

    def __init__(self, path: str | os.PathLike[str] | None = None, timeout: float = 10.0) -> None:
        self.path = str(path or default_socket_path())
        self.timeout = timeout

    def call(self, cmd: str) -> dict[str, Any]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise OperatorError(f"edge-vla is not running here (no control socket at {self.path}): start the service "
                                "(systemctl start edge-vla) or pass --socket PATH") from exc
        except PermissionError as exc:
            raise OperatorError(f"no permission to use {self.path}: run as the service's user or add yourself to its "
                                "group") from exc
        with sock:
            sock.sendall((json.dumps({"cmd": cmd}) + "\n").encode())
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        if not data:
            raise OperatorError(f"the control loop closed {self.path} without answering {cmd!r}")
        return json.loads(data)

    def arm(self, timeout: float = 5.0) -> dict[str, Any]:
        return self.call("arm")

    def clear_faults(self, timeout: float = 2.0) -> dict[str, Any]:
        return self.call("clear_faults")

    def stop(self, timeout: float = 2.0) -> dict[str, Any]:
        return self.call("stop")

    def status(self) -> dict[str, Any]:
        return self.call("status")
