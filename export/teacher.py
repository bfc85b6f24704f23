"""Teachers for distillation: anything that maps an observation batch to an action chunk.

A plain `Teacher` only returns action chunks (physical units). A `FlowTeacher` also exposes its
velocity field in a normalized action space, so a student can match it at the same (x_t, t) even
though the student's own prefix (its internals) differs. `VLATeacher` adapts this project's VLA;
docs/DISTILL.md shows adapters for LeRobot- and openpi-style policies.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from edge_vla.runtime.types import Observation
from edge_vla.tokenizer import tokenize

from .data import images_to_float
from .model import VLA


@dataclass
class ObsBatch:
    """A batch of observations in a model-neutral form (each model tokenizes with its own config).

    images: float [B, C, 3, S, S] in [0, 1]; instructions: B strings; state: float [B, state_dim] (rad).
    """

    images: Tensor
    instructions: list[str]
    state: Tensor

    def __len__(self) -> int:
        return int(self.state.shape[0])

    def index(self, idx: Tensor | Sequence[int] | slice) -> ObsBatch:
        if isinstance(idx, slice):
            return ObsBatch(self.images[idx], self.instructions[idx], self.state[idx])
        ids = torch.as_tensor(idx, dtype=torch.long)
        return ObsBatch(self.images[ids], [self.instructions[i] for i in ids.tolist()], self.state[ids])

    def to(self, device: torch.device | str) -> ObsBatch:
        return ObsBatch(self.images.to(device), self.instructions, self.state.to(device))

    @staticmethod
    def cat(batches: Sequence[ObsBatch]) -> ObsBatch:
        return ObsBatch(torch.cat([b.images for b in batches]), [s for b in batches for s in b.instructions],
                        torch.cat([b.state for b in batches]))

    @staticmethod
    def from_observations(observations: Sequence[Observation], num_cameras: int) -> ObsBatch:
        images = torch.from_numpy(np.stack([np.stack(o.images[:num_cameras]) for o in observations]))
        state = torch.from_numpy(np.stack([np.asarray(o.state, dtype=np.float32) for o in observations]))
        return ObsBatch(images_to_float(images), [o.instruction for o in observations], state)

    @staticmethod
    def from_arrays(images_u8: np.ndarray, instructions: Sequence[str], states: np.ndarray) -> ObsBatch:
        """uint8 [N, C, S, S, 3] images (the sim dataset layout), N strings, float [N, state_dim]."""
        return ObsBatch(images_to_float(torch.from_numpy(np.ascontiguousarray(images_u8))), list(instructions),
                        torch.from_numpy(np.asarray(states, dtype=np.float32)))


@runtime_checkable
class Teacher(Protocol):
    """Any policy: observation batch (+ the noise it should start from, if it samples) -> action chunk."""

    chunk_len: int
    action_dim: int

    def act(self, obs: ObsBatch, noise: Tensor) -> Tensor:
        """-> float [B, chunk_len, action_dim] in physical units. Deterministic teachers ignore `noise`
        (standard normal, [B, chunk_len, action_dim])."""
        ...


@runtime_checkable
class FlowTeacher(Teacher, Protocol):
    """A flow-matching teacher (x_t = (1 - t) x_0 + t x_1, x_0 noise, t: 0 -> 1) with its velocity field.

    Velocities live in the teacher's normalized action space: physical = x * action_std + action_mean.
    """

    num_steps: int
    action_mean: Tensor
    action_std: Tensor

    def encode(self, obs: ObsBatch) -> Any:
        """Everything the velocity field needs from the observation (a prefix KV cache), computed once."""
        ...

    def velocity(self, context: Any, x_t: Tensor, t: Tensor) -> Tensor:
        """x_t [B, H, D] normalized, t [B] -> velocity [B, H, D]."""
        ...


def has_velocity(teacher: Teacher) -> bool:
    return isinstance(teacher, FlowTeacher)


class Tokens:
    """Instruction -> token ids, cached: a dataset holds a handful of distinct instructions."""

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self._cache: dict[str, np.ndarray] = {}

    def __call__(self, instructions: Sequence[str], device: torch.device | str = "cpu") -> Tensor:
        rows = []
        for s in instructions:
            if s not in self._cache:
                self._cache[s] = tokenize(s, self.max_len).astype(np.int32)
            rows.append(self._cache[s])
        return torch.from_numpy(np.stack(rows)).to(device)


class VLATeacher:
    """This project's VLA as a FlowTeacher (prefix computed once per batch, Euler sampler)."""

    def __init__(self, model: VLA, steps: int | None = None, solver: str = "euler") -> None:
        self.model = model.eval()
        cfg = model.config
        self.chunk_len, self.action_dim = cfg.chunk_len, cfg.action_dim
        self.num_steps = steps or cfg.num_steps
        self.solver = solver
        self.state_dim = cfg.state_dim
        self.tokens = Tokens(cfg.max_text_len)

    @property
    def action_mean(self) -> Tensor:
        return self.model.action_mean

    @property
    def action_std(self) -> Tensor:
        return self.model.action_std

    def _inputs(self, obs: ObsBatch) -> tuple[Tensor, Tensor, Tensor]:
        dev = self.model.action_mean.device
        return obs.images[:, : self.model.config.num_cameras].to(dev), self.tokens(obs.instructions, dev), \
            obs.state.to(dev)

    @torch.no_grad()
    def act(self, obs: ObsBatch, noise: Tensor) -> Tensor:
        return self.model.sample(*self._inputs(obs), noise, steps=self.num_steps, solver=self.solver)

    @torch.no_grad()
    def encode(self, obs: ObsBatch) -> Tensor:
        return self.model.prefix_kv(*self._inputs(obs))

    @torch.no_grad()
    def velocity(self, context: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        return self.model.velocity(x_t, t, context)


class FunctionTeacher:
    """Wraps `fn(obs, noise) -> actions [B, H, D]` (physical units) as a Teacher without a velocity field."""

    def __init__(self, fn: Callable[[ObsBatch, Tensor], Tensor], chunk_len: int, action_dim: int) -> None:
        self.fn, self.chunk_len, self.action_dim = fn, chunk_len, action_dim

    @torch.no_grad()
    def act(self, obs: ObsBatch, noise: Tensor) -> Tensor:
        return torch.as_tensor(self.fn(obs, noise), dtype=torch.float32)
