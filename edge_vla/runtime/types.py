"""The data that crosses the Policy API: observations in, action chunks (physical units) out."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Observation:
    """One observation. `images` are HxWx3 uint8 RGB, one per camera, in the bundle's camera order."""

    images: list[np.ndarray]
    instruction: str
    state: np.ndarray  # proprioceptive state in physical units (joint positions, rad), float32 [state_dim]
    timestamp: float = 0.0  # time.monotonic() when the observation was captured (oldest camera frame)


@dataclass
class ActionChunk:
    """H future actions in physical units (joint position targets, rad), one per `action_period_s`."""

    actions: np.ndarray  # float32 [chunk_len, action_dim]
    action_period_s: float
    obs_timestamp: float = 0.0  # the observation this chunk came from (for latency compensation)
    timings_ms: dict[str, float] = field(default_factory=dict)  # per stage: preprocess, prefix, step_i, ...

    @property
    def horizon_s(self) -> float:
        return len(self.actions) * self.action_period_s
