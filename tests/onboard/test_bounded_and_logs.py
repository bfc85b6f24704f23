"""Bounded memory in the real-time process, and logs an operator can read (planned end vs fault)."""

from __future__ import annotations

import logging

import numpy as np

from edge_vla.onboard.telemetry import CycleStats, summarize
from edge_vla.onboard.watchdog import FaultKind, Watchdog
from edge_vla.onboard.worker import WorkerStats


def _footprint(obj) -> int:
    """Bytes held by the array-like attributes of a stats object (what grows if it is unbounded)."""
    total = 0
    for value in vars(obj).values():
        if hasattr(value, "nbytes"):
            total += value.nbytes
        elif hasattr(value, "buffer_info"):
            total += value.buffer_info()[1] * value.itemsize
        elif isinstance(value, (list, tuple)):
            total += 8 * len(value)
        elif hasattr(value, "__dict__"):
            total += _footprint(value)
    return total


def test_cycle_stats_memory_is_flat_and_percentiles_stay_accurate() -> None:
    stats = CycleStats(0.002)
    rng = np.random.default_rng(0)
    lateness = rng.exponential(50e-6, 200_000)
    t = 0.0
    for i in range(10_000):
        t += 0.002
        stats.add(t, lateness[i], 1e-4, 0)
    early = _footprint(stats)
    for i in range(10_000, 200_000):
        t += 0.002
        stats.add(t, lateness[i], 1e-4, 0)
    assert _footprint(stats) == early, "CycleStats grows with the number of cycles"
    s = summarize(stats, 0, {}, [])
    exact = np.percentile(lateness * 1e3, 99)
    assert abs(s["wake_lateness"]["p99_ms"] - exact) / exact < 0.03  # log buckets: within a few percent
    assert s["wake_lateness"]["max_ms"] == np.max(lateness) * 1e3
    assert s["cycles"] == 200_000


def test_worker_latency_memory_is_flat() -> None:
    w = WorkerStats()
    for i in range(1_000):
        w.record_latency(10.0 + i % 7)
    early = _footprint(w)
    for i in range(100_000):
        w.record_latency(10.0 + i % 7)
    assert _footprint(w) == early
    d = w.as_dict()
    assert 9.5 < d["infer_p50_ms"] < 16.5 and d["infer_p99_ms"] <= 16.5 * 1.03


def test_planned_end_is_info_and_a_fault_is_error(caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="edge_vla.onboard.watchdog")
    wd = Watchdog()
    wd.arm(0.0)
    wd.trip(FaultKind.OPERATOR_STOP, "duration reached", 1.0)
    planned = [r for r in caplog.records if "duration reached" in r.getMessage()]
    assert planned and all(r.levelno == logging.INFO for r in planned)
    assert "stopped (duration reached)" in planned[0].getMessage()
    assert not any(r.levelno >= logging.WARNING for r in caplog.records)
    caplog.clear()
    wd = Watchdog()
    wd.arm(0.0)
    wd.trip(FaultKind.CAMERA_STALE, "camera frame 600 ms old", 2.0)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert errors and "camera_stale" in errors[0].getMessage() and "category 1" in errors[0].getMessage()
