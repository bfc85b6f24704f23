"""Progress of long loops (training, distillation, reading datasets): a tqdm bar on a terminal, a few log lines
anywhere else.

tqdm redraws its bar ~10 times a second with carriage returns; in a log file or a CI capture every redraw is
kept, ~113 bytes a step (450 KB for a 4,000-step training). So the bar is drawn only where stderr is a terminal
and tqdm is installed (it is an `export` extra: robot installs have none, and this module must import without
it). Elsewhere one INFO line goes to the `edge_vla.progress` logger every `EVERY_PERCENT` percent, and one at
the end, with the rate and the time left.

Both follow the logging level, so `edge-vla --quiet` (WARNING) silences both. The bar is also drawn when a
Python caller has not configured logging at all (tqdm's behaviour before this module existed).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Generic, TextIO, TypeVar

log = logging.getLogger("edge_vla.progress")

T = TypeVar("T")

EVERY_PERCENT = 5
# Without a known total there are no percentages: a line at most this often instead.
UNKNOWN_TOTAL_INTERVAL_S = 30.0


def format_duration(seconds: float) -> str:
    """Short human duration: 45s, 3m07s, 2h05m."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _format_rate(per_s: float, unit: str) -> str:
    if per_s <= 0 or not math.isfinite(per_s):
        return f"? {unit}/s"
    return f"{per_s:.3g} {unit}/s" if per_s >= 1 else f"{1 / per_s:.3g} s/{unit}"


def _logging_configured() -> bool:
    return bool(logging.getLogger().handlers)


def _draw_bar(stream: TextIO) -> bool:
    """A bar only on a terminal, with tqdm installed, and unless the logging level silences progress."""
    if not (hasattr(stream, "isatty") and stream.isatty()):
        return False
    if _logging_configured() and not log.isEnabledFor(logging.INFO):
        return False
    try:
        import tqdm  # noqa: F401  (an `export` extra: absent on robots)
    except ImportError:
        return False
    return True


class Progress(Generic[T]):
    """Iterate over `iterable`, reporting progress; the subset of tqdm's interface the project uses
    (`for x in bar`, `set_postfix`, `close`), so loops read the same in both modes."""

    def __init__(self, iterable: Iterable[T], desc: str, unit: str = "it", total: int | None = None,
                 initial: int = 0, enabled: bool = True, stream: TextIO | None = None,
                 every_percent: float = EVERY_PERCENT) -> None:
        self.iterable = iterable
        self.desc = desc
        self.unit = unit
        if total is None and hasattr(iterable, "__len__"):
            total = initial + len(iterable)  # type: ignore[arg-type]
        self.total = total
        self.n = initial
        self.initial = initial
        self.every_percent = every_percent
        self.postfix: dict[str, str] = {}
        stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self._bar: Any = None
        self._redirect: AbstractContextManager[Any] = nullcontext()
        if enabled and _draw_bar(stream):
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._bar = tqdm(iterable, desc=desc, unit=unit, total=total, initial=initial, file=stream)
            # Log lines written while the bar is up go above it instead of through it.
            self._redirect = logging_redirect_tqdm()
        self._t0 = time.perf_counter()
        self._last_bucket = self._bucket(initial)
        self._last_line_t = self._t0
        self._closed = False
        self._redirecting = False

    @property
    def drawing_bar(self) -> bool:
        return self._bar is not None

    def __iter__(self) -> Iterator[T]:
        if self._bar is not None:
            self._redirect.__enter__()
            self._redirecting = True
            try:
                yield from self._bar
            finally:
                self.close()
            return
        try:
            for item in self.iterable:
                yield item
                self.n += 1
                if self.enabled and self._due():
                    self._log_line()
        finally:
            self.close()

    def set_postfix(self, values: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        """Shown after the counts (the bar's postfix, or the end of each log line)."""
        self.postfix = {k: str(v) for k, v in {**(values or {}), **kwargs}.items()}
        if self._bar is not None:
            self._bar.set_postfix(self.postfix)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        if self._redirecting:  # the handlers go back to the terminal only once the bar is gone
            self._redirecting = False
            self._redirect.__exit__(None, None, None)

    # -- line mode ---------------------------------------------------------------------------
    def _bucket(self, n: int) -> int:
        if not self.total:
            return 0
        return int(100 * n / self.total // self.every_percent)

    def _due(self) -> bool:
        if self.total:
            bucket = self._bucket(self.n)
            due = bucket > self._last_bucket or self.n == self.total
            self._last_bucket = max(bucket, self._last_bucket)
            return due
        return time.perf_counter() - self._last_line_t >= UNKNOWN_TOTAL_INTERVAL_S

    def _log_line(self) -> None:
        now = time.perf_counter()
        self._last_line_t = now
        elapsed = now - self._t0
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else float("inf")
        if self.total:
            left = (self.total - self.n) / rate if rate > 0 else float("inf")
            counts = f"{self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%)"
            timing = f"{_format_rate(rate, self.unit)}, " + (
                f"done in {format_duration(elapsed)}" if self.n >= self.total else f"{format_duration(left)} left")
        else:
            counts, timing = f"{self.n} {self.unit}", f"{_format_rate(rate, self.unit)}, {format_duration(elapsed)}"
        post = "".join(f", {k} {v}" for k, v in self.postfix.items())
        log.info("%s: %s, %s%s", self.desc, counts, timing, post)


def progress(iterable: Iterable[T], desc: str, unit: str = "it", total: int | None = None, initial: int = 0,
             enabled: bool = True, stream: TextIO | None = None) -> Progress[T]:
    """Iterate over `iterable` with a bar on a terminal, or a log line every few percent elsewhere.

    `initial` counts items already done (a resumed training), so `total` and the percentages are of the whole
    job; `enabled=False` reports nothing (e.g. on every rank but the first)."""
    return Progress(iterable, desc, unit=unit, total=total, initial=initial, enabled=enabled, stream=stream)
