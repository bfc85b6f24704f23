"""Fault injection on whole frames: drop, corrupt, duplicate and delay, seeded for reproducibility."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class FaultConfig:
    drop: float = 0.0  # probability per frame
    corrupt: float = 0.0  # probability per frame: 1-3 random byte changes
    duplicate: float = 0.0  # probability per frame: sent twice
    delay_prob: float = 0.0  # probability per frame: held back by delay_s
    delay_s: float = 0.0
    direction: str = "both"  # "rx" (host -> firmware), "tx" (firmware -> host) or "both"

    def active(self, direction: str) -> bool:
        return self.direction in ("both", direction) and any(
            (self.drop, self.corrupt, self.duplicate, self.delay_prob))


class FaultInjector:
    def __init__(self, config: FaultConfig, seed: int | None = None) -> None:
        self.config = config
        self._rng = random.Random(seed)
        self.counts = {"dropped": 0, "corrupted": 0, "duplicated": 0, "delayed": 0}

    def apply(self, frame: bytes, direction: str) -> list[tuple[float, bytes]]:
        """One frame -> [(extra delay in seconds, bytes)], possibly empty, possibly two copies."""
        c, rng = self.config, self._rng
        if not c.active(direction):
            return [(0.0, frame)]
        if rng.random() < c.drop:
            self.counts["dropped"] += 1
            return []
        if rng.random() < c.corrupt:
            self.counts["corrupted"] += 1
            buf = bytearray(frame)
            for _ in range(rng.randint(1, 3)):
                i = rng.randrange(len(buf))
                buf[i] = (buf[i] + rng.randint(1, 255)) & 0xFF
            frame = bytes(buf)
        delay = 0.0
        if rng.random() < c.delay_prob:
            self.counts["delayed"] += 1
            delay = c.delay_s
        out = [(delay, frame)]
        if rng.random() < c.duplicate:
            self.counts["duplicated"] += 1
            out.append((delay, frame))
        return out
