"""Real-time process setup (SCHED_FIFO, CPU affinity, mlockall) and absolute-deadline pacing."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
import os
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

_MCL_CURRENT, _MCL_FUTURE = 1, 2


@dataclass(frozen=True)
class RealtimeConfig:
    fifo_priority: int | None = None  # 1..99; None: leave the scheduler alone
    cpus: tuple[int, ...] | None = None  # pin the control process to these CPUs
    lock_memory: bool = False  # mlockall(MCL_CURRENT | MCL_FUTURE): no page faults mid-cycle


def apply_realtime(cfg: RealtimeConfig) -> dict[str, str]:
    """Apply what is permitted; say clearly, once, what was not. Returns {feature: outcome}."""
    outcome: dict[str, str] = {}
    if cfg.fifo_priority is not None:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(cfg.fifo_priority))
            outcome["sched_fifo"] = f"priority {cfg.fifo_priority}"
            log.info("control loop runs SCHED_FIFO priority %d", cfg.fifo_priority)
        except (PermissionError, OSError, AttributeError) as exc:
            outcome["sched_fifo"] = f"not permitted ({exc})"
            log.warning(
                "SCHED_FIFO priority %d not permitted (%s): running SCHED_OTHER, expect more jitter. Grant it with "
                "`setcap cap_sys_nice+ep` on the interpreter, an rtprio line in /etc/security/limits.conf, or "
                "LimitRTPRIO= in the systemd unit", cfg.fifo_priority, exc)
    if cfg.cpus:
        try:
            os.sched_setaffinity(0, set(cfg.cpus))
            outcome["affinity"] = f"cpus {sorted(cfg.cpus)}"
            log.info("control loop pinned to CPUs %s", sorted(cfg.cpus))
        except (OSError, ValueError, AttributeError) as exc:
            outcome["affinity"] = f"not permitted ({exc})"
            log.warning("CPU affinity %s not applied (%s); the loop may share a core with inference", cfg.cpus, exc)
    if cfg.lock_memory:
        outcome["mlockall"] = _mlockall()
    return outcome


def _mlockall() -> str:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        rc = libc.mlockall(_MCL_CURRENT | _MCL_FUTURE)
    except (OSError, AttributeError) as exc:
        log.warning("mlockall unavailable (%s): page faults may add latency", exc)
        return f"unavailable ({exc})"
    if rc != 0:
        err = ctypes.get_errno()
        log.warning(
            "mlockall not permitted (%s): page faults may add latency. Raise `ulimit -l` (LimitMEMLOCK= in "
            "systemd) or grant CAP_IPC_LOCK", os.strerror(err))
        return f"not permitted ({os.strerror(err)})"
    log.info("memory locked (mlockall)")
    return "locked"


class DeadlineClock:
    """Absolute monotonic deadlines: t0 + k * period. Missed deadlines are skipped, never replayed."""

    def __init__(self, period: float, spin_s: float = 0.0002, start: float | None = None) -> None:
        self.period = period
        self.spin_s = spin_s
        self.next = (time.monotonic() if start is None else start) + period
        self.missed = 0  # deadlines skipped in total
        self.consecutive = 0  # cycles in a row that started late enough to skip a deadline

    def wait(self) -> float:
        """Sleep to the next deadline; return the lateness of the wake-up (s). Skips passed deadlines."""
        now = time.monotonic()
        if now >= self.next + self.period:
            # At least one whole deadline passed while we worked: skip to the next future one.
            skip = math.floor((now - self.next) / self.period)
            self.next += skip * self.period
            self.missed += skip
            self.consecutive += 1
        else:
            self.consecutive = 0
        sleep = self.next - now - self.spin_s
        if sleep > 0:
            time.sleep(sleep)
        while time.monotonic() < self.next:  # short spin: sleep() alone wakes ~50-100 us late
            pass
        deadline = self.next
        self.next += self.period
        return time.monotonic() - deadline

    def slack(self) -> float:
        """Seconds until the next deadline (negative: already late)."""
        return self.next - time.monotonic()
