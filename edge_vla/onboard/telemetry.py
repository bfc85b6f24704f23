"""Telemetry: per-cycle records and events to a file tools can open, plus the summary at exit.

Format: MCAP (`.mcap`, JSON-encoded channels, opens in Foxglove / `mcap cat --json`) when the `mcap`
package is installed; otherwise, and for any other suffix, JSON lines: one object per line,
{"topic": ..., "t": <monotonic s>, ...fields}. Asking for `.mcap` without the package falls back to
`<path>.jsonl` with a warning rather than failing the run.

The control loop never waits on the disk: records go into an in-memory queue and are written in the
cycle's slack (`drain(budget_s)`), a few at a time, then flushed at exit.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from pathlib import Path
from typing import IO, Any

from edge_vla.onboard.histogram import LogHistogram
from edge_vla.optional import available, require

log = logging.getLogger(__name__)

TOPICS = {
    "/control/cycle": "one control cycle: timing, requested and sent setpoints, measured state, clamps",
    "/control/chunk": "a chunk adopted by the scheduler",
    "/watchdog/event": "arm, trip, stop complete, re-arm",
    "/control/summary": "the run summary, written once at exit",
    "/serve/request": "one edge-vla serve request: connection, request number, timings or the error",
}


class _JsonLines:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._f: IO[str] = open(path, "w", buffering=1 << 16)  # noqa: SIM115

    def write(self, topic: str, t: float, data: dict[str, Any]) -> None:
        self._f.write(json.dumps({"topic": topic, "t": t, **data}) + "\n")

    def close(self) -> None:
        self._f.close()


class _Mcap:
    def __init__(self, path: Path) -> None:
        writer_mod = require("mcap.writer")
        self.path = path
        self._f = open(path, "wb")  # noqa: SIM115
        # Small uncompressed chunks: finishing one is a memcpy + CRC, never a compression stall.
        self._w = writer_mod.Writer(self._f, chunk_size=64 * 1024, compression=writer_mod.CompressionType.NONE)
        self._w.start(profile="", library="edge-vla")
        schema = self._w.register_schema(name="json", encoding="jsonschema", data=b'{"type": "object"}')
        self._channels = {
            topic: self._w.register_channel(topic=topic, message_encoding="json", schema_id=schema,
                                            metadata={"description": desc})
            for topic, desc in TOPICS.items()
        }
        self._seq = 0

    def write(self, topic: str, t: float, data: dict[str, Any]) -> None:
        ns = int(t * 1e9)
        self._seq += 1
        self._w.add_message(self._channels[topic], log_time=ns, data=json.dumps(data).encode(), publish_time=ns,
                            sequence=self._seq)

    def close(self) -> None:
        self._w.finish()
        self._f.close()


class Telemetry:
    """Queue records cheaply; write them when there is time."""

    MAX_QUEUED = 100_000

    def __init__(self, path: str | Path | None) -> None:
        self.path: Path | None = None
        self._sink: _JsonLines | _Mcap | None = None
        # Bounded: if the loop never has slack to write, old records go (counted), memory does not grow.
        self._queue: deque[tuple[str, float, dict[str, Any]]] = deque(maxlen=self.MAX_QUEUED)
        self.written = 0
        self.dropped = 0
        if path is None:
            return
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.suffix == ".mcap":
            if available("mcap"):
                self._sink = _Mcap(p)
            else:
                p = p.with_suffix(".jsonl")
                log.warning("the mcap package is not installed (pip install 'edge-vla[telemetry]'); "
                            "writing JSON lines to %s instead", p)
                self._sink = _JsonLines(p)
        else:
            self._sink = _JsonLines(p)
        self.path = p

    def record(self, topic: str, t: float, data: dict[str, Any]) -> None:
        if self._sink is not None:
            if len(self._queue) == self.MAX_QUEUED:
                self.dropped += 1
            self._queue.append((topic, t, data))

    @property
    def enabled(self) -> bool:
        return self._sink is not None

    def drain(self, budget_s: float) -> int:
        """Write queued records for at most `budget_s` seconds; returns how many were written."""
        if self._sink is None or budget_s <= 0:
            return 0
        end = time.monotonic() + budget_s
        n = 0
        while self._queue and time.monotonic() < end:
            self._sink.write(*self._queue.popleft())
            n += 1
        self.written += n
        return n

    def close(self) -> None:
        if self._sink is None:
            return
        while self._queue:
            self._sink.write(*self._queue.popleft())
            self.written += 1
        self._sink.close()
        self._sink = None


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a telemetry file (MCAP or JSON lines) as {"topic", "t", ...fields}."""
    p = Path(path)
    if p.suffix != ".mcap":
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    reader_mod = require("mcap.reader")
    out = []
    with open(p, "rb") as f:
        for _schema, channel, message in reader_mod.make_reader(f).iter_messages():
            out.append({"topic": channel.topic, "t": message.log_time / 1e9, **json.loads(message.data)})
    return out


class CycleStats:
    """Timing statistics kept for the summary: fixed memory (log-bucket histograms), whatever the run length."""

    def __init__(self, period: float) -> None:
        self.period = period
        self.lateness = LogHistogram()  # wake-up after the deadline (s)
        self.period_error = LogHistogram()  # |actual period between consecutive cycle starts - nominal| (s)
        self.compute = LogHistogram()  # cycle work time (s)
        self._last_start: float | None = None
        self.cycles = 0
        self.t_first = self.t_last = 0.0

    def add(self, start: float, lateness: float, compute: float, skipped_before: int) -> None:
        if self._last_start is not None and skipped_before == 0:
            self.period_error.record(start - self._last_start - self.period)
        elif self._last_start is None:
            self.t_first = start
        self._last_start = start
        self.t_last = start
        self.lateness.record(lateness)
        self.compute.record(compute)
        self.cycles += 1


def summarize(stats: CycleStats, missed: int, clamps: dict[str, int], trips: list[dict],
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
    span = max(stats.t_last - stats.t_first, 1e-9)
    minutes = span / 60.0
    return {
        "rate_hz_target": 1.0 / stats.period,
        "rate_hz_achieved": (stats.cycles - 1) / span if stats.cycles > 1 else 0.0,
        "cycles": stats.cycles,
        "duration_s": span,
        "period_error": stats.period_error.summary(),
        "wake_lateness": stats.lateness.summary(),
        "compute": stats.compute.summary(),
        "missed_deadlines": missed,
        "missed_per_minute": missed / minutes if minutes > 0 else 0.0,
        "clamps": dict(clamps),
        "trips": trips,
        **(extra or {}),
    }


def format_summary(s: dict[str, Any]) -> str:
    """The one-screen summary printed at exit."""

    def pct(d: dict[str, float]) -> str:
        return "n/a" if not d else f"p50 {d['p50_ms']:.3f}  p99 {d['p99_ms']:.3f}  max {d['max_ms']:.3f} ms"

    clamps = ", ".join(f"{k} {v}" for k, v in s.get("clamps", {}).items() if v) or "none"
    lines = [
        "-- edge-vla run summary " + "-" * 40,
        f"rate           {s['rate_hz_achieved']:.1f} Hz achieved of {s['rate_hz_target']:.0f} Hz, "
        f"{s['cycles']} cycles in {s['duration_s']:.1f} s",
        f"period error   {pct(s['period_error'])}",
        f"wake lateness  {pct(s['wake_lateness'])}",
        f"cycle compute  {pct(s['compute'])}",
        f"missed         {s['missed_deadlines']} deadlines ({s['missed_per_minute']:.1f}/min), skipped not replayed",
        f"clamps         {clamps}",
    ]
    for key in ("chunks", "link", "realtime", "stop"):
        if s.get(key):
            lines.append(f"{key:<14} " + ", ".join(f"{k} {v}" for k, v in s[key].items()))
    trips = s.get("trips", [])
    if not trips:
        lines.append("trips          none")
    for trip in trips:
        lines.append(f"trip           cat {trip['category']} {trip['kind']} at t={trip['t']:.3f}: {trip['reason']}")
    if s.get("telemetry"):
        lines.append(f"telemetry      {s['telemetry']}")
    return "\n".join(lines)
