"""Chrome / Perfetto trace of one inference per configuration (Trace Event Format, JSON object form).

Each configuration is a process (pid) with one thread; every stage is a complete event (ph "X") with
ts/dur in microseconds. The policy reports durations, not start times, so stages are laid end to end
in execution order; ode_total and total are parents that enclose their stages, which Perfetto draws as
nesting. Open the file at https://ui.perfetto.dev or chrome://tracing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edge_vla.bundle import write_json_atomic


def _event(name: str, ts_us: float, dur_us: float, pid: int, cat: str) -> dict[str, Any]:
    return {"name": name, "cat": cat, "ph": "X", "ts": round(ts_us, 3), "dur": round(max(dur_us, 0.0), 3),
            "pid": pid, "tid": 1}


def run_events(timings_ms: dict[str, float], pid: int, start_us: float = 0.0) -> list[dict[str, Any]]:
    """The events of one `policy.infer` call from its `timings_ms`."""
    us = {k: 1e3 * v for k, v in timings_ms.items()}
    if "chunk_graph" in us:  # TensorRT: prefix and every step in one CUDA graph launch, timed as one stage
        events = [_event("preprocess", start_us, us["preprocess"], pid, "host"),
                  _event("chunk_graph", start_us + us["preprocess"], us["chunk_graph"], pid, "graph"),
                  _event("postprocess", start_us + us["preprocess"] + us["chunk_graph"], us["postprocess"], pid,
                         "host")]
        end = start_us + us["preprocess"] + us["chunk_graph"] + us["postprocess"]
        return [_event("total", start_us, max(us["total"], end - start_us), pid, "policy.infer"), *events]
    steps = sorted((k for k in us if k.startswith("step_")), key=lambda k: int(k.split("_")[1]))
    step_sum = sum(us[k] for k in steps)
    ode = max(us.get("ode_total", step_sum), step_sum)
    events = [_event("preprocess", start_us, us["preprocess"], pid, "host")]
    t = start_us + us["preprocess"]
    events.append(_event("prefix", t, us["prefix"], pid, "graph"))
    t += us["prefix"]
    events.append(_event("ode_total", t, ode, pid, "ode"))
    st = t + ode - step_sum  # the gap before step_0 is drawing the noise
    for k in steps:
        events.append(_event(k, st, us[k], pid, "graph"))
        st += us[k]
    t += ode
    events.append(_event("postprocess", t, us["postprocess"], pid, "host"))
    t += us["postprocess"]
    # rounding can make the stages add up to a hair more than the measured total; keep nesting valid
    total = max(us["total"], t - start_us)
    events.insert(0, _event("total", start_us, total, pid, "policy.infer"))
    return events


def chrome_trace(runs: list[tuple[str, dict[str, float]]]) -> dict[str, Any]:
    """One process per (label, timings_ms) pair, named by its label."""
    events: list[dict[str, Any]] = []
    for pid, (label, timings) in enumerate(runs, start=1):
        events.append({"name": "process_name", "ph": "M", "pid": pid, "tid": 1, "args": {"name": label}})
        events.append({"name": "process_sort_index", "ph": "M", "pid": pid, "tid": 1, "args": {"sort_index": pid}})
        events.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": 1, "args": {"name": "policy.infer"}})
        events += run_events(timings, pid)
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"source": "edge-vla profile", "note": "one representative (median-total) run each"}}


def write_trace(path: str | Path, runs: list[tuple[str, dict[str, float]]]) -> Path:
    path = Path(path)
    write_json_atomic(path, chrome_trace(runs))
    return path
