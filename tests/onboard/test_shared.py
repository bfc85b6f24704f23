"""The shared-memory seqlock between processes: never a torn record, with a real hardware fence."""

from __future__ import annotations

import multiprocessing as mp
import time

import numpy as np

from edge_vla.onboard.shared import SharedBus, memory_fence


def _writer(bus: SharedBus, stop, n: int) -> None:
    k = 0
    while not stop.is_set() and k < n:
        k += 1
        v = np.full(bus.dim, float(k))
        bus.write_state(v, v, float(k))  # every word of one record carries the same k


def test_memory_fence_is_a_real_barrier_here() -> None:
    fence = memory_fence()
    fence()  # libatomic's atomic_thread_fence through ctypes (a no-op only on x86 without libatomic)


def test_concurrent_reads_never_see_a_torn_state_record() -> None:
    bus = SharedBus(dim=16)
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    proc = ctx.Process(target=_writer, args=(bus, stop, 10_000_000))
    proc.start()
    try:
        deadline = time.monotonic() + 30
        while bus.read_state() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # the spawned writer is importing
        # 2 s of reading, longer (up to 30 s) until the writer was seen 20 times: a loaded box may give it
        # little CPU time in the first 2 s
        seen, t_read = set(), time.monotonic()
        while len(seen) < 2000 and (time.monotonic() < t_read + 2.0 or
                                    (len(seen) <= 20 and time.monotonic() < t_read + 30.0)):
            rec = bus.read_state()
            if rec is None:
                continue
            k = rec.time
            assert np.all(rec.positions == k) and np.all(rec.velocities == k), "torn record"
            seen.add(k)
        assert len(seen) > 20, "the writer never raced the reader"
    finally:
        stop.set()
        proc.join(10)
