"""A streaming histogram with logarithmic buckets (HDR-style): fixed memory, percentiles to ~1 %.

The real-time process runs for days under `mlockall`: its statistics must not grow with the number of
cycles. Each value lands in bucket floor(log(v / lowest) / log(growth)); a percentile is read back as the
geometric middle of its bucket, so the relative error is at most sqrt(growth) - 1 (1 % at the default
growth of 1.02). Exact count, sum and max are kept beside the buckets. About 8 KB per histogram.
"""

from __future__ import annotations

import math

import numpy as np


class LogHistogram:
    def __init__(self, lowest: float = 1e-7, highest: float = 1e3, growth: float = 1.02) -> None:
        if not 0 < lowest < highest or growth <= 1:
            raise ValueError(f"need 0 < lowest < highest and growth > 1, got {lowest}, {highest}, {growth}")
        self.lowest, self.growth = lowest, growth
        self._inv_log_g = 1.0 / math.log(growth)
        # bucket 0: below `lowest` (reported as 0); the last bucket also takes everything above `highest`
        self._n = math.ceil(math.log(highest / lowest) * self._inv_log_g) + 2
        self.counts = np.zeros(self._n, np.int64)
        self.count = 0
        self.total = 0.0
        self.max = 0.0

    def record(self, value: float) -> None:
        v = abs(value)
        if v != v:  # NaN: counted nowhere (a timing is never NaN; guard anyway)
            return
        i = 0 if v < self.lowest else min(self._n - 1, 1 + int(math.log(v / self.lowest) * self._inv_log_g))
        self.counts[i] += 1
        self.count += 1
        self.total += v
        if v > self.max:
            self.max = v

    def percentile(self, q: float) -> float:
        if self.count == 0:
            return 0.0
        rank = max(1, math.ceil(q / 100.0 * self.count))
        i = int(np.searchsorted(np.cumsum(self.counts), rank))
        if i == 0:
            return 0.0
        mid = self.lowest * self.growth ** (i - 1 + 0.5)
        return min(mid, self.max)

    def summary(self, scale: float = 1e3, qs: tuple[float, ...] = (50, 99), unit: str = "ms") -> dict[str, float]:
        """{"p50_ms": ..., "p99_ms": ..., "max_ms": ...} (scale 1e3: seconds in, milliseconds out); {} if empty."""
        if self.count == 0:
            return {}
        out = {f"p{q:g}_{unit}": self.percentile(q) * scale for q in qs}
        out[f"max_{unit}"] = self.max * scale
        return out
