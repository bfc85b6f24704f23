"""Real-time process setup (SCHED_FIFO, CPU affinity, mlockall), the CPU split between the control loop and
inference, and absolute-deadline pacing."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import math
import os
import resource
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from edge_vla.errors import ConfigError

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


AUTO, NONE = "auto", "none"
DEFAULT_FIFO_PRIORITY = 50  # --rt-priority auto: the demo's; above the emulator's 40 (a stand-in for firmware)
_CAP_SYS_NICE = 1 << 23
GRANT_FIFO = ("edge-vla.service grants it with LimitRTPRIO=95; a manual run needs an rtprio line in "
              "/etc/security/limits.conf or CAP_SYS_NICE")


def fifo_permitted(priority: int, rtprio_limit: int | None = None, cap_eff: int | None = None) -> str | None:
    """None where this process may ask for SCHED_FIFO `priority` (RLIMIT_RTPRIO, or CAP_SYS_NICE), else why not.
    A cgroup without real-time runtime can still refuse it: the control process then says so."""
    limit = resource.getrlimit(resource.RLIMIT_RTPRIO)[0] if rtprio_limit is None else rtprio_limit
    caps = _effective_caps() if cap_eff is None else cap_eff
    if limit == resource.RLIM_INFINITY or limit >= priority or caps & _CAP_SYS_NICE:
        return None
    return f"RLIMIT_RTPRIO {limit} < {priority} and no CAP_SYS_NICE"


def _effective_caps() -> int:
    try:
        status = Path("/proc/self/status").read_text()
        return int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("CapEff:")), 16)
    except (OSError, StopIteration, ValueError):
        return 0


def resolve_fifo(requested: str | int | None, motor: bool,
                 permitted: Callable[[int], str | None] = fifo_permitted) -> tuple[int | None, str]:
    """--rt-priority -> (SCHED_FIFO priority or None, how the loop is scheduled, for the start line).

    auto (the default): SCHED_FIFO 50 where permitted, else SCHED_OTHER saying why; never for servo links, whose
    vendor SDKs busy-poll the port (a real-time poller starves the tty it waits on). A number is asked for as
    given (the control process warns if the kernel refuses it); none: SCHED_OTHER."""
    text = str(requested).strip().lower() if requested is not None else NONE
    if text == NONE:
        return None, "SCHED_OTHER (--rt-priority none)"
    if text == AUTO:
        if motor:
            return None, ("SCHED_OTHER (a servo link: its SDK busy-polls the port, which a SCHED_FIFO loop would "
                          "starve)")
        why = permitted(DEFAULT_FIFO_PRIORITY)
        if why is not None:
            return None, f"SCHED_OTHER (SCHED_FIFO not permitted: {why}; {GRANT_FIFO})"
        return DEFAULT_FIFO_PRIORITY, f"SCHED_FIFO priority {DEFAULT_FIFO_PRIORITY}"
    if not text.isdigit() or not 1 <= int(text) <= 99:
        raise ConfigError(f"--rt-priority {requested!r}: give a SCHED_FIFO priority 1-99, '{AUTO}' (SCHED_FIFO "
                          f"{DEFAULT_FIFO_PRIORITY} where permitted) or '{NONE}'")
    return int(text), f"SCHED_FIFO priority {int(text)} requested"


@dataclass(frozen=True)
class ThreadPlan:
    """Where the control loop and inference run (`edge-vla run --cpus / --inference-cpus`).

    Inference is the whole main process: the worker thread, the backend's intra-op threads (onnxruntime creates
    them with the session, before the worker exists), numpy's BLAS pool, the operator socket. The control loop is
    its own process, pinned by itself (RealtimeConfig.cpus)."""

    loop_cpus: tuple[int, ...] | None  # None: not pinned
    inference_cpus: tuple[int, ...] | None  # None: not pinned
    inference_threads: int  # the backend's intra-op threads: one per inference CPU
    available: tuple[int, ...]  # the CPUs this process may use (its affinity mask at start)
    note: str = ""  # why the split is not made (one CPU): said in the start line, as a warning
    loop_sched: str = ""  # how the loop is scheduled (resolve_fifo's words), for the start line

    def line(self, loop_pid: int | None, worker_tid: int | None, engine: str, loop_sched: str = "") -> str:
        """The one start line: who runs where, and how to change it."""
        loop = f"control loop (pid {loop_pid}) {_where(self.loop_cpus)}, {self.loop_sched or loop_sched}"
        inference = f"inference (worker tid {worker_tid}, {engine}) {_where(self.inference_cpus)}"
        if self.note:
            return f"threads: {self.note}: {loop}; {inference}"
        return (f"threads: {loop}; {inference}; change with --cpus / --inference-cpus (auto, none or a CPU list) "
                "and --rt-priority")


def _where(cpus: tuple[int, ...] | None) -> str:
    return "not pinned" if cpus is None else f"on CPU {cpu_list(cpus)}"


def cpu_list(cpus: Iterable[int]) -> str:
    """The kernel's spelling of a CPU set (taskset -c, Cpus_allowed_list): 0-3,6."""
    ranges: list[list[int]] = []
    for c in sorted(set(cpus)):
        if ranges and c == ranges[-1][1] + 1:
            ranges[-1][1] = c
        else:
            ranges.append([c, c])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in ranges)


def parse_cpus(text: str, flag: str, available: Iterable[int]) -> tuple[int, ...]:
    """'1', '2,3' or '0-3' -> CPUs, each one this process may use; else one-line ConfigError naming `flag`."""
    allowed, cpus = set(available), set()
    hint = f"give CPUs from {cpu_list(allowed)} like 1, 2,3 or 0-3, or '{AUTO}' or '{NONE}'"
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()) or (sep and int(hi) < int(lo)):
            raise ConfigError(f"{flag} {text!r}: {hint}")
        cpus.update(range(int(lo), int(hi if sep else lo) + 1))
    missing = sorted(cpus - allowed)
    if missing:
        raise ConfigError(f"{flag} {text}: CPU {cpu_list(missing)} is not available to this process (its affinity "
                          f"mask, set by taskset or the unit's CPUAffinity=, allows {cpu_list(allowed)}); {hint}")
    return tuple(sorted(cpus))


def hyperthread_siblings(cpu: int) -> set[int]:
    """The hardware threads sharing `cpu`'s core (itself included), from sysfs; {cpu} where it does not say."""
    path = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
    try:
        return set(parse_cpus(path.read_text().strip(), str(path), range(4096))) | {cpu}
    except (OSError, ConfigError):
        return {cpu}


def plan_threads(loop: str = AUTO, inference: str = AUTO, available: Iterable[int] | None = None,
                 siblings: Callable[[int], set[int]] = hyperthread_siblings) -> ThreadPlan:
    """The CPU split. Default (auto) on 2 or more CPUs: the loop on the last CPU this process may use (CPU 0
    takes more interrupts), inference on the others, leaving the loop core's hyperthread siblings idle where
    another core remains; one intra-op thread per inference CPU. On one CPU nothing is pinned."""
    avail = tuple(sorted(os.sched_getaffinity(0) if available is None else set(available)))
    if loop == AUTO and inference == AUTO and len(avail) < 2:
        return ThreadPlan(None, None, 1, avail, note=f"1 CPU available ({cpu_list(avail)}): the control loop and "
                          "inference share it, not pinned: expect missed deadlines while inference runs; give the "
                          "robot computer 2 or more CPUs")
    if loop == NONE:
        loop_cpus = None
    elif loop == AUTO:
        loop_cpus = (avail[-1],)
    else:
        loop_cpus = parse_cpus(loop, "--cpus", avail)
    if inference == NONE:
        inference_cpus = None
    elif inference == AUTO:
        taken = set(loop_cpus or ())
        rest = [c for c in avail if c not in taken]
        idle = set().union(*(siblings(c) for c in taken)) if taken else set()
        inference_cpus = tuple(c for c in rest if c not in idle) or tuple(rest) or None
    else:
        inference_cpus = parse_cpus(inference, "--inference-cpus", avail)
    threads = len(inference_cpus) if inference_cpus else len(avail)
    return ThreadPlan(loop_cpus, inference_cpus, threads, avail)


def pin_threads(cpus: Iterable[int]) -> int:
    """Pin every thread of this process to `cpus` (threads made later inherit their creator's mask, so they follow);
    the number of threads pinned. sched_setaffinity(0) alone would move only the calling thread, leaving the
    onnxruntime and BLAS pools made before it where they were. Raises OSError where the kernel refuses."""
    target, pinned = set(cpus), set()
    while True:  # again until a pass finds none: a thread may start while the list is read
        tids = {int(t) for t in os.listdir("/proc/self/task")} - pinned
        if not tids:
            return len(pinned)
        for tid in tids:
            with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
                os.sched_setaffinity(tid, target)
            pinned.add(tid)


def name_thread(tid: int, name: str) -> None:
    """Thread `tid` of this process gets the kernel name `name` (top -H, ps -L, /proc/PID/task/TID/comm; 15 bytes)."""
    with contextlib.suppress(OSError):  # only a label: a kernel without it changes nothing else
        Path(f"/proc/self/task/{tid}/comm").write_bytes(name.encode()[:15])


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
