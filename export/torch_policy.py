"""The PyTorch model as a sim ChunkPolicy (what users run today: eager, prefix cached)."""

from __future__ import annotations

import numpy as np
import torch

from edge_vla.runtime.types import Observation

from .data import observation_tensors
from .model import VLA


class TorchPolicy:
    """Noise is drawn exactly as `edge_vla.Policy` draws it (numpy, float32, same seed -> same noise), so a
    checkpoint and its bundles can be evaluated pair by pair on the same noise."""

    def __init__(self, model: VLA, steps: int | None = None, solver: str = "euler", seed: int = 0) -> None:
        self.model = model.eval()
        self.steps = steps or model.config.num_steps
        self.solver = solver
        self._seed = seed
        self.rng = np.random.default_rng(seed)

    def reset(self, seed: int | None = None) -> None:
        self.rng = np.random.default_rng(self._seed if seed is None else seed)

    @property
    def rtc_max_delay(self) -> int:
        """How many leading actions a call may be given (real-time chunking); 0 for a model not trained for it."""
        return self.model.config.rtc_max_delay

    def __call__(self, obs: Observation, prefix: np.ndarray | None = None) -> np.ndarray:
        """One chunk [H, D]; with `prefix` [d, D] (RTC models) it starts with those actions, unchanged."""
        cfg = self.model.config
        images, tokens, state = observation_tensors(obs, cfg)
        noise = torch.from_numpy(self.rng.standard_normal((1, cfg.chunk_len, cfg.action_dim), dtype=np.float32))
        given = None if prefix is None or len(prefix) == 0 else torch.from_numpy(
            np.asarray(prefix, dtype=np.float32)).unsqueeze(0)
        with torch.inference_mode():
            actions = self.model.sample(images, tokens, state, noise, steps=self.steps, solver=self.solver,
                                        prefix=given)
        return actions[0].numpy()
