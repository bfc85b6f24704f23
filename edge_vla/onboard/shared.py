"""Shared memory between the inference worker (parent process) and the control loop (child process).

One flat float64 `multiprocessing.RawArray`, no locks: a lock held by a process that dies (kill -9)
would freeze the other side, and the control loop must never wait on the worker. Multi-word records
(the latest state, the latest chunk, the plan the loop follows under rtc) use a seqlock: the writer
makes the sequence odd, writes, makes it even; a reader copies and retries if the sequence was odd or
changed. Single words (heartbeats, flags) are written whole (an aligned 8-byte store is single-copy
atomic on x86-64 and AArch64). Each record has exactly one writer process.

Memory ordering (why the seqlock is correct on aarch64, every Jetson): the Linux kernel's seqlock
pattern. The writer issues a full fence after making the sequence odd and before making it even; the
reader issues one after reading the sequence and before re-reading it:

    writer: seq = odd;  fence;  payload = ...;  fence;  seq = even
    reader: s1 = seq;   fence;  copy payload;   fence;  s2 = seq;  use the copy only if s1 == s2, even

On a weakly ordered CPU (ARMv8) stores can become visible to the other core out of program order and
loads can be satisfied out of order; without the fences a reader could see the new even sequence but
old payload words (or the reverse) and accept a torn record. The fence is C11
`atomic_thread_fence(memory_order_seq_cst)` (`dmb ish` on AArch64) from libatomic, called through
ctypes; CPython itself emits no barriers. On x86-64 (TSO: stores are not reordered with stores, loads
not with loads) the seqlock needs only compiler ordering, which Python's bytecode order already gives;
the fence is still used where libatomic exists. Elsewhere, without libatomic, the bus refuses to start.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import multiprocessing as mp
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_vla.onboard.scheduler import Chunk

# Control-loop status codes (STATUS word). "disarmed": torque off, nothing latched by this host (a fresh
# start: the firmware may still hold faults from before); "stopped": torque off after a trip or an
# operator stop, latched until an operator arms again.
(STATUS_STARTING, STATUS_HOMING, STATUS_RUNNING, STATUS_STOPPING, STATUS_STOPPED, STATUS_EXITED, STATUS_DISARMED,
 STATUS_ARMING) = range(8)
STATUS_NAMES = ("starting", "homing", "running", "stopping", "stopped", "exited", "disarmed", "arming")

WORKER_IDLE, WORKER_CAMERA, WORKER_INFER = 0, 1, 2

# Single words: (name, index)
_WORDS = (
    "worker_heartbeat",  # monotonic time of the worker's last sign of life (written by the worker)
    "frame_time",  # capture time of the newest camera frame the worker used (worker)
    "frame_age",  # how old that frame already was when the worker got it (worker)
    "worker_phase",  # WORKER_IDLE / WORKER_CAMERA / WORKER_INFER: where a hung worker is stuck (worker)
    "stop_request",  # > 0: the parent asks for a controlled stop and exit (parent)
    # Operator requests (edge_vla.onboard.operator): counters the parent increments; the control loop
    # answers each by raising the matching *_ack to the same count (and arm_result for an arm).
    "arm_request", "arm_ack", "arm_result",
    "clear_request", "clear_ack",
    "op_stop_request", "op_stop_ack",
    "worker_errors",  # failed inferences so far (worker)
    "status",  # STATUS_* (control)
    "armed",  # 1 while this host believes the firmware may be armed (control)
    "fw_mode", "fw_faults", "fw_status",  # the firmware's latest mode (-1: none yet), fault and status bits (control)
    "trip_kind", "trip_category", "trip_t",  # the trip that caused the latest stop (1 + FaultKind index; control)
    "stop_sent_t",  # when that stop's first STOP frame was written (control)
    "ready",  # 1 after the first good cycle (control)
    "consumed_seq",  # sync strategy: newest chunk fully played (control)
    "armed_since",  # monotonic time of the latest arm (control); chunks from before it are stale
    "cycles",  # control cycles so far (control)
)


_MEMORY_ORDER_SEQ_CST = 5


@functools.cache
def memory_fence() -> Callable[[], None]:
    """A full hardware memory barrier (C11 atomic_thread_fence(seq_cst) from libatomic)."""
    name = ctypes.util.find_library("atomic")
    fence = None
    if name:
        try:
            fence = ctypes.CDLL(name).atomic_thread_fence
        except (OSError, AttributeError):
            fence = None
    if fence is not None:
        fence.argtypes, fence.restype = [ctypes.c_int], None
        return functools.partial(fence, _MEMORY_ORDER_SEQ_CST)
    if platform.machine().lower() in ("x86_64", "amd64", "i686", "i386"):
        return lambda: None  # TSO: the seqlock's order of stores and of loads is kept by the CPU
    raise RuntimeError(f"no memory fence on {platform.machine()}: the shared-memory seqlock needs libatomic "
                       "(apt install libatomic1) on a weakly ordered CPU")


@dataclass
class StateRecord:
    positions: np.ndarray
    velocities: np.ndarray
    time: float  # host monotonic time the state frame arrived
    seq: int


@dataclass
class PlanRecord:
    """rtc: the plan the control loop follows (the newest chunk on its timeline; seq -1: none) and where on it."""

    seq: int
    position: float  # k.x: heading to the chunk's action k, x of that action's period played
    time: float  # host monotonic time of that position
    seen: int  # the newest chunk seq the loop has read (adopted or dropped)


class SharedBus:
    """Latest state (control -> worker), latest chunk (worker -> control), the plan the loop follows (control ->
    worker, rtc only), and a few words."""

    _PLAN_LEN = 5  # seq (of the record), chunk seq, position, time, newest chunk seq the loop has read

    def __init__(self, dim: int, max_chunk_len: int = 64) -> None:
        self.dim, self.max_chunk_len = dim, max_chunk_len
        self._state_len = 2 + 2 * dim  # seq, time, positions, velocities
        # seq, obs_t, period, n, publish_t, prefix base / index / length (rtc), start, actions
        self._chunk_len = 8 + dim + max_chunk_len * dim
        size = len(_WORDS) + self._state_len + self._chunk_len + self._PLAN_LEN
        self._raw = mp.RawArray("d", size)
        self._views()
        self.arr[:] = 0.0
        self.arr[self._w["consumed_seq"]] = -1.0
        self.arr[self._w["fw_mode"]] = -1.0

    def _views(self) -> None:
        self._fence = memory_fence()
        self.arr = np.frombuffer(self._raw, dtype=np.float64)
        self._w = {name: i for i, name in enumerate(_WORDS)}
        s0 = len(_WORDS)
        self._state = self.arr[s0 : s0 + self._state_len]
        c0 = s0 + self._state_len
        self._chunk = self.arr[c0 : c0 + self._chunk_len]
        self._plan = self.arr[c0 + self._chunk_len :]

    # Picklable for multiprocessing spawn: the RawArray travels, numpy views are rebuilt.
    def __getstate__(self) -> dict[str, Any]:
        return {"dim": self.dim, "max_chunk_len": self.max_chunk_len, "_state_len": self._state_len,
                "_chunk_len": self._chunk_len, "_raw": self._raw}

    def __setstate__(self, d: dict[str, Any]) -> None:
        self.__dict__.update(d)
        self._views()

    # -- single words --------------------------------------------------------------------------
    def get(self, name: str) -> float:
        return float(self.arr[self._w[name]])

    def set(self, name: str, value: float) -> None:
        self.arr[self._w[name]] = value

    def beat(self) -> None:
        self.set("worker_heartbeat", time.monotonic())

    # -- seqlocked records ---------------------------------------------------------------------
    def _write(self, rec: np.ndarray, payload: np.ndarray) -> None:
        fence = self._fence
        rec[0] += 1.0  # odd: writing
        fence()  # the odd sequence is visible before any payload word
        rec[1 : 1 + len(payload)] = payload
        fence()  # every payload word is visible before the even sequence
        rec[0] += 1.0  # even: consistent

    def _read(self, rec: np.ndarray, n: int, tries: int = 1000) -> tuple[int, np.ndarray] | None:
        fence = self._fence
        for _ in range(tries):
            s1 = rec[0]
            if int(s1) % 2:
                continue
            fence()  # the payload is read after the first sequence read
            copy = rec[1 : 1 + n].copy()
            fence()  # ... and before the second
            if rec[0] == s1:
                return int(s1) // 2, copy
        return None  # the writer is stuck mid-write (it died): treat as no data

    def write_state(self, positions: np.ndarray, velocities: np.ndarray, t: float) -> None:
        d = self.dim
        payload = np.empty(1 + 2 * d)
        payload[0] = t
        payload[1 : 1 + d] = positions
        payload[1 + d :] = velocities
        self._write(self._state, payload)

    def read_state(self) -> StateRecord | None:
        got = self._read(self._state, self._state_len - 1)
        if got is None or got[0] == 0:
            return None
        seq, p = got
        d = self.dim
        return StateRecord(positions=p[1 : 1 + d], velocities=p[1 + d :], time=float(p[0]), seq=seq)

    def chunk_seq(self) -> int:
        return int(self._chunk[0]) // 2

    def publish_chunk(self, actions: np.ndarray, period: float, obs_timestamp: float, start_state: np.ndarray,
                      prefix: tuple[int, int, int] | None = None) -> int:
        """`prefix` (rtc): (base chunk seq, index, d): the chunk's first d actions are that chunk's actions from
        `index` on."""
        acts = np.asarray(actions, np.float64)
        n, d = acts.shape
        if d != self.dim or n > self.max_chunk_len or n < 1:
            raise ValueError(f"chunk of shape {acts.shape} does not fit [1..{self.max_chunk_len}, {self.dim}]")
        payload = np.empty(7 + d + n * d)
        payload[:7] = (obs_timestamp, period, n, time.monotonic(), *(prefix or (-1, 0, 0)))
        payload[7 : 7 + d] = start_state
        payload[7 + d :] = acts.reshape(-1)
        self._write(self._chunk, payload)
        return self.chunk_seq()

    def read_chunk(self) -> tuple[Chunk, float] | None:
        """(chunk, publish time) of the newest chunk, or None before the first."""
        got = self._read(self._chunk, self._chunk_len - 1)
        if got is None or got[0] == 0:
            return None
        seq, p = got
        d = self.dim
        n = int(p[2])
        chunk = Chunk(actions=p[7 + d : 7 + d + n * d].reshape(n, d), period=float(p[1]), obs_timestamp=float(p[0]),
                      start_state=p[7 : 7 + d].copy(), seq=seq, prefix_base=int(p[4]), prefix_index=int(p[5]),
                      prefix_len=int(p[6]))
        return chunk, float(p[3])

    def publish_plan(self, seq: int, position: float, t: float, seen: int) -> None:
        """rtc: the loop follows chunk `seq` (-1: none), at `position` actions along it (RtcScheduler.plan_position)
        at time t; `seen` is the newest chunk it has read from this bus (adopted or not)."""
        self._write(self._plan, np.array([seq, position, t, seen], np.float64))

    def read_plan(self) -> PlanRecord | None:
        """What the loop last published with publish_plan; None before the first."""
        got = self._read(self._plan, self._PLAN_LEN - 1)
        if got is None or got[0] == 0:
            return None
        p = got[1]
        return PlanRecord(seq=int(p[0]), position=float(p[1]), time=float(p[2]), seen=int(p[3]))
