"""Telemetry: per-cycle records and events to a file tools can open, plus the summary at exit.

Format: MCAP (`.mcap`, JSON-encoded channels, opens in Foxglove / `mcap cat --json`) when the `mcap`
package is installed; otherwise, and for any other suffix, JSON lines: one object per line,
{"topic": ..., "t": <monotonic s>, ...fields}. Asking for `.mcap` without the package falls back to
`<path>.jsonl` with a warning rather than failing the run.

The control loop never waits on the disk: records go into an in-memory queue and are written in the
cycle's slack (`drain(budget_s)`), a few at a time, then flushed at exit. Nor does it fail with the disk: a
write error (a full disk, a pulled USB stick) stops the telemetry with one logged line and the run goes on.
`read_records` gives back every whole record of a file a killed run left cut short.
"""

from __future__ import annotations

import contextlib
import json
import logging
import stat
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from struct import error as struct_error
from typing import IO, Any

from edge_vla.errors import ConfigError
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

    def abandon(self) -> None:
        """Close after a write error: what the kernel refused is lost; the lines before it stay readable."""
        with contextlib.suppress(OSError):
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

    def abandon(self) -> None:
        """Close after a write error without finishing (that would write again): the file keeps its whole chunks,
        which read_records recovers (`mcap recover` rebuilds the index)."""
        with contextlib.suppress(OSError):
            self._f.close()


def _refuse_blocking_target(p: Path) -> None:
    """A FIFO (or socket, or directory) at the telemetry path: opening a FIFO for writing waits for a reader, so
    `edge-vla run` would sit there and fail much later for another reason. A regular file or a character device
    (/dev/null) is fine."""
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        return
    if not (stat.S_ISREG(mode) or stat.S_ISCHR(mode)):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise ConfigError(f"--telemetry {p} is {kind}: opening it would block or fail; give the path of a file "
                          "(e.g. runs/run.mcap)")


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
        self.failed: str | None = None  # why writing stopped mid-run (e.g. "No space left on device")
        if path is None:
            return
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        _refuse_blocking_target(p)
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
        elif self.failed is not None:
            self.dropped += 1  # after a write error: counted, not queued

    @property
    def enabled(self) -> bool:
        return self._sink is not None

    def drain(self, budget_s: float) -> int:
        """Write queued records for at most `budget_s` seconds; returns how many were written."""
        if self._sink is None or budget_s <= 0:
            return 0
        end = time.monotonic() + budget_s
        n = 0
        while self._queue and time.monotonic() < end and self._write(self._queue.popleft()):
            n += 1
        return n

    def close(self) -> None:
        if self._sink is None:
            return
        while self._queue and self._write(self._queue.popleft()):
            pass
        if self._sink is None:  # the last writes failed: already abandoned
            return
        try:
            self._sink.close()  # flushes the buffer, which may be what finds the disk full
        except OSError as exc:
            self._give_up(exc, lost=0)
        self._sink = None

    def _write(self, rec: tuple[str, float, dict[str, Any]]) -> bool:
        """Write one record; False (and the telemetry stopped) when the disk refused it."""
        assert self._sink is not None
        try:
            self._sink.write(*rec)
        except OSError as exc:
            self._give_up(exc, lost=1)
            return False
        self.written += 1
        return True

    def _give_up(self, exc: OSError, lost: int) -> None:
        """A write error is not retried (a full disk stays full; each retry would cost the loop's slack): the
        queue is dropped, recording stops (`enabled` is False) and the run goes on without telemetry. The
        records in the file's buffer when the error came are lost too; those before are readable."""
        sink, self._sink = self._sink, None
        self.failed = exc.strerror or str(exc)
        self.dropped += lost + len(self._queue)
        self._queue.clear()
        if sink is not None:
            sink.abandon()
        log.error("telemetry to %s stopped: %s; the run goes on without it (the file keeps the records up to its "
                  "last whole write); free space or give --telemetry another disk", self.path, self.failed)


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a telemetry file (MCAP or JSON lines) as {"topic", "t", ...fields}.

    A file cut short (the run was killed or lost power before closing it) gives back every whole record
    before the cut, with one warning; damage anywhere else is a ValueError naming the file and the place."""
    p = Path(path)
    if p.suffix != ".mcap":
        return _read_json_lines(p)
    return _read_mcap(p)


def _json_object(raw: bytes) -> dict[str, Any]:
    """One record's JSON; ValueError saying what is wrong with it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not UTF-8") from None
    try:
        obj = json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply to be a telemetry record") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"not a JSON object (a {type(obj).__name__})")
    return obj


def _read_json_lines(p: Path) -> list[dict[str, Any]]:
    data = p.read_bytes()
    lines = data.split(b"\n")
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(_json_object(line))
        except ValueError as exc:
            if i == len(lines) - 1:  # no newline after it: the writer was stopped mid-record
                log.warning("%s was cut short in its last record (%d bytes skipped); %d whole records read",
                            p, len(line), len(out))
                break
            raise ValueError(f"{p}: line {i + 1}: {exc}; the file is damaged there (not a cut-short run), "
                             "so it is not read past it") from None
    return out


def _read_mcap(p: Path) -> list[dict[str, Any]]:
    reader_mod = require("mcap.reader")
    exceptions = require("mcap.exceptions")
    with open(p, "rb") as f:
        try:
            return list(_mcap_records(p, reader_mod.make_reader(f).iter_messages()))
        except exceptions.InvalidMagic:
            raise ValueError(f"{p}: not an MCAP file (no MCAP magic at its start); JSON lines need a .jsonl "
                             "suffix") from None
        except (exceptions.McapError, struct_error):  # a cut inside a record's length field
            pass  # no usable summary at the end: a file whose writer never finished; read it front to back
        f.seek(0)
        out: list[dict[str, Any]] = []
        try:
            for rec in _mcap_records(p, reader_mod.NonSeekingReader(f).iter_messages(log_time_order=False)):
                out.append(rec)
        except (exceptions.McapError, struct_error):  # a cut inside a record's length field
            log.warning("%s was cut short (its writer never finished it): %d whole records read up to the cut; "
                        "`mcap recover` rebuilds its index for other tools", p, len(out))
    return out


def _mcap_records(p: Path, messages: Iterator[Any]) -> Iterator[dict[str, Any]]:
    for _schema, channel, message in messages:
        try:
            fields = _json_object(message.data)
        except ValueError as exc:
            raise ValueError(f"{p}: message {message.sequence} on {channel.topic}: {exc}") from None
        yield {"topic": channel.topic, "t": message.log_time / 1e9, **fields}


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
