"""systemd's sd_notify protocol, without libsystemd: one datagram to $NOTIFY_SOCKET.

edge-vla.service is `Type=notify` with `WatchdogSec=`, so the onboard loop must:
  * send READY=1 after its first good control cycle (systemd then considers the service started);
  * send WATCHDOG=1 at least every WatchdogSec/2 from the control loop itself (not a side thread,
    which would keep pinging while the loop is stuck) -- `watchdog_interval_s()` says how often;
  * send STOPPING=1 when it begins its safety stop.
If the pings stop, systemd kills the process (SIGABRT) and Restart=on-failure brings it back; the
firmware's heartbeat timeout stops the motors meanwhile.

The unit sets NotifyAccess=all, so these may come from the control-loop child process; create the
Notifier in that process (after fork/spawn: it inherits NOTIFY_SOCKET through the environment).
Outside systemd (no NOTIFY_SOCKET) every call is a cheap no-op returning False.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


def _address(env: Mapping[str, str]) -> str | None:
    addr = env.get("NOTIFY_SOCKET")
    if not addr:
        return None
    if addr.startswith("@"):  # abstract namespace socket
        return "\0" + addr[1:]
    if addr.startswith("/"):
        return addr
    log.warning("ignoring NOTIFY_SOCKET=%r: only AF_UNIX paths and @abstract names are supported", addr)
    return None


class Notifier:
    """Keeps one socket open, so that a 500 Hz loop's WATCHDOG=1 costs one sendto()."""

    def __init__(self, env: Mapping[str, str] | None = None):
        self._addr = _address(os.environ if env is None else env)
        self._sock: socket.socket | None = None
        if self._addr is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            # Never block the control loop: if the receiver's queue is full, the datagram is dropped.
            self._sock.setblocking(False)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, state: str) -> bool:
        """Send `state` (newline-separated KEY=VALUE lines). True when the datagram was sent."""
        if self._sock is None or self._addr is None:
            return False
        try:
            self._sock.sendto(state.encode("utf-8"), self._addr)
        except OSError as exc:  # never let supervision reporting crash the control loop
            log.warning("sd_notify(%r) failed: %s", state, exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1" + (f"\nSTATUS={status}" if status else ""))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def notify(state: str, env: Mapping[str, str] | None = None) -> bool:
    """One-shot sd_notify(state)."""
    with Notifier(env) as n:
        return n.notify(state)


def watchdog_interval_s(env: Mapping[str, str] | None = None) -> float | None:
    """Half of WatchdogSec when the watchdog applies to this process, else None (sd_watchdog_enabled)."""
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None  # meant for another process (e.g. a wrapper shell)
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None
