"""A transformers π0 checkpoint as a distillation teacher (`edge-vla distill --teacher PI0_DIR`) and as a sim policy
(`edge-vla evaluate PI0_DIR`).

Observations go through the robot's own π0 preprocessing (`edge_vla.preprocess.Pi0ObservationEncoder`, built
from the same plan the exporter uses: image resize/normalisation, the checkpoint's tokenizer, state statistics),
then `PI0ForConditionalGeneration.sample_actions`. Chunks come back in physical units, valid dims only.

Flow conventions. π0: x_t = t·noise + (1 − t)·action, v = noise − action, t from 1 to 0. edge-vla's FlowTeacher:
x_t = (1 − t)·noise + t·action, v = action − noise, t from 0 to 1. The same point x_t therefore sits at
t_flow = 1 − t_π0 and v_flow = −v_π0, and one Euler step of either is the same update.

Padded dims. π0 pads actions to `max_action_dim`; the teacher interface carries the valid dims only, so
`act()` zero-pads the noise and `velocity()` zero-pads x_t. The velocity field is then π0's exactly when the
padded dims are inert (`action_in_proj` ignores them and `action_out_proj` returns 0 there): the padded
coordinates stay 0 along π0's own sampler. Checkpoints `edge-vla train --family pi0` writes are inert by
construction; for any other checkpoint the teacher offers only `act()` (sample_actions), and distillation
matches its chunks without velocity matching.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from edge_vla.preprocess import STATS_EPS
from edge_vla.runtime.types import Observation

from ..teacher import ObsBatch
from .checkpoint import Pi0Source, open_pi0
from .exporter import Pi0ExportOptions, encoder_for, make_plan

log = logging.getLogger(__name__)


def padded_dims_inert(model: Any, valid: int) -> bool:
    """True when π0 ignores the padded action dims on input and returns 0 velocity on them."""
    w_in = model.embed_action_time.action_in_proj.weight
    out = model.action_out_proj
    return bool((w_in[:, valid:] == 0).all() and (out.weight[valid:] == 0).all() and (out.bias[valid:] == 0).all())


def zero_padded_dims(model: Any, valid: int) -> None:
    """Make the padded action dims inert (see padded_dims_inert); training keeps them so."""
    with torch.no_grad():
        model.embed_action_time.action_in_proj.weight[:, valid:] = 0
        model.action_out_proj.weight[valid:] = 0
        model.action_out_proj.bias[valid:] = 0


def images_to_uint8(images: Tensor) -> np.ndarray:
    """ObsBatch images (float [B, C, 3, S, S] in [0, 1], made from uint8 frames) -> uint8 [B, C, S, S, 3]."""
    return (images.detach().cpu().movedim(-3, -1) * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()


class Pi0Inputs:
    """Observations -> π0's model inputs (torch), through the robot's numpy preprocessing and tokenizer."""

    def __init__(self, src: Pi0Source, model: Any, steps: int | None = None, max_text_tokens: int = 48) -> None:
        self.plan = make_plan(src, model, Pi0ExportOptions(steps=steps, max_text_tokens=max_text_tokens))
        self.encoder = encoder_for(self.plan, src.tokenizer_json)
        self.shapes = self.plan.shapes

    def numpy(self, observations: list[Observation]) -> dict[str, np.ndarray]:
        s, n = self.shapes, len(observations)
        h, w = s.image_size
        feeds = {"images": np.zeros((n, s.num_cameras, 3, h, w), np.float32),
                 "tokens": np.zeros((n, s.prompt_len), np.int32),
                 "token_mask": np.zeros((n, s.prompt_len), np.int32),
                 "state": np.zeros((n, s.state_dim), np.float32)}
        for b, obs in enumerate(observations):
            self.encoder.encode(obs, {k: v[b:b + 1] for k, v in feeds.items()})
        return feeds

    def torch(self, observations: list[Observation], device: torch.device | str = "cpu") -> dict[str, Tensor]:
        f = self.numpy(observations)
        return {"state": torch.from_numpy(f["state"]).to(device),
                "input_ids": torch.from_numpy(f["tokens"]).long().to(device),
                "pixel_values": torch.from_numpy(f["images"]).to(device),
                "attention_mask": torch.from_numpy(f["token_mask"]).long().to(device),
                "pixel_attention_mask": torch.ones(len(observations), self.shapes.num_cameras, dtype=torch.bool,
                                                   device=device)}

    def observations(self, obs: ObsBatch) -> list[Observation]:
        frames = images_to_uint8(obs.images[:, : self.shapes.num_cameras])
        state = obs.state.detach().cpu().numpy()
        return [Observation(list(frames[i]), obs.instructions[i], state[i]) for i in range(len(obs))]


@dataclass
class Pi0Context:
    """What the velocity field needs from one observation batch: π0's prefix cache and the masks."""

    cache: Any  # transformers DynamicCache holding the prefix K/V of every language-model layer
    prefix_len: int
    state: Tensor
    attention_mask: Tensor
    pixel_attention_mask: Tensor


class Pi0Teacher:
    """A π0 checkpoint as a `Teacher`: `act(obs, noise)` is `sample_actions` from the zero-padded noise."""

    def __init__(self, src: Pi0Source, model: Any, steps: int | None = None, max_text_tokens: int = 48) -> None:
        self.src, self.model = src, model.eval()
        self.inputs = Pi0Inputs(src, model, steps, max_text_tokens)
        plan = self.inputs.plan
        cfg = self.model.config
        self.chunk_len = int(cfg.chunk_size)
        self.action_dim = plan.sidecar.action_dim
        self.padded_action_dim = int(cfg.max_action_dim)
        self.state_dim = len(plan.state_stats[0])
        self.num_cameras = plan.shapes.num_cameras
        self.num_steps = plan.steps
        mean, std = plan.action_stats
        # π0 normalizes with (x - mean) / (std + 1e-8); physical = x * action_std + action_mean undoes it.
        self._mean = torch.tensor(mean, dtype=torch.float32)
        self._std = torch.tensor(std, dtype=torch.float32) + STATS_EPS

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def action_mean(self) -> Tensor:
        return self._mean.to(self.device)

    @property
    def action_std(self) -> Tensor:
        return self._std.to(self.device)

    def model_inputs(self, obs: ObsBatch) -> dict[str, Tensor]:
        return self.inputs.torch(self.inputs.observations(obs), self.device)

    @torch.no_grad()
    def sample(self, obs: ObsBatch, noise: Tensor, steps: int | None = None) -> Tensor:
        """π0's own sampler from padded noise [B, chunk, max_action_dim] -> normalized padded chunk."""
        return self.model.sample_actions(noise=noise.to(self.device), num_steps=steps or self.num_steps,
                                         **self.model_inputs(obs))

    def to_physical(self, normalized: Tensor) -> Tensor:
        return normalized[..., : self.action_dim] * self.action_std + self.action_mean

    def pad(self, x: Tensor) -> Tensor:
        return F.pad(x, (0, self.padded_action_dim - x.shape[-1]))

    @torch.no_grad()
    def act(self, obs: ObsBatch, noise: Tensor) -> Tensor:
        return self.to_physical(self.sample(obs, self.pad(noise.to(self.device))))


class Pi0FlowTeacher(Pi0Teacher):
    """A π0 checkpoint with inert padded dims as a `FlowTeacher`: its velocity field in edge-vla's convention."""

    @torch.no_grad()
    def encode(self, obs: ObsBatch) -> Pi0Context:
        inp = self.model_inputs(obs)
        m = self.model.model
        # As sample_actions builds it: positions from the mask, one pass of the language model with a cache.
        embeds = m.embed_prefix(inp["input_ids"], inp["pixel_values"], inp["pixel_attention_mask"])
        cache = m.vlm(inputs_embeds=embeds, attention_mask=inp["attention_mask"],
                      position_ids=inp["attention_mask"].cumsum(-1) - 1,
                      token_type_ids=torch.zeros_like(embeds)[:, :, 0], use_cache=True).past_key_values
        return Pi0Context(cache, cache.get_seq_length(), inp["state"], inp["attention_mask"],
                          inp["pixel_attention_mask"])

    @torch.no_grad()
    def velocity(self, context: Pi0Context, x_t: Tensor, t: Tensor) -> Tensor:
        out = self.model(state=context.state, noise=self.pad(x_t), timestep=(1.0 - t).float(),
                         attention_mask=context.attention_mask, pixel_attention_mask=context.pixel_attention_mask,
                         past_key_values=context.cache)
        # Drop this step's action tokens from the cache, as sample_actions does.
        context.cache.crop(context.prefix_len - context.cache.get_seq_length())
        return -out.logits[..., : self.action_dim]


def load_pi0_teacher(path: str | Path, steps: int | None = None) -> Pi0Teacher:
    """A FlowTeacher when the padded action dims are inert, else a plain Teacher (chunks only)."""
    src = open_pi0(path)
    model = src.load_model()
    teacher = Pi0FlowTeacher(src, model, steps)
    if teacher.action_dim < teacher.padded_action_dim and not padded_dims_inert(model, teacher.action_dim):
        log.warning("%s: π0 reads or writes its padded action dims (%d of %d are valid), so its velocity field on the "
                    "valid dims is not its sampler's; distilling its action chunks only (no velocity matching)",
                    path, teacher.action_dim, teacher.padded_action_dim)
        return Pi0Teacher(src, model, steps)
    return teacher


class Pi0TorchPolicy:
    """A π0 checkpoint as a sim ChunkPolicy. Noise is drawn as `edge_vla.Policy` draws it for a π0 bundle
    (numpy, float32, [1, chunk, max_action_dim], same seed -> same noise), so checkpoint and bundle pair."""

    def __init__(self, teacher: Pi0Teacher, steps: int | None = None, seed: int = 0) -> None:
        self.teacher = teacher
        self.steps = steps or teacher.num_steps
        self._seed = seed
        self.rng = np.random.default_rng(seed)

    def reset(self, seed: int | None = None) -> None:
        self.rng = np.random.default_rng(self._seed if seed is None else seed)

    def __call__(self, obs: Observation) -> np.ndarray:
        t = self.teacher
        noise = self.rng.standard_normal((1, t.chunk_len, t.padded_action_dim), dtype=np.float32)
        batch = ObsBatch.from_observations([obs], t.num_cameras)
        return t.to_physical(t.sample(batch, torch.from_numpy(noise), self.steps))[0].cpu().numpy()


def pi0_chunk_flops(teacher: Pi0Teacher, obs: ObsBatch, steps: int | None = None) -> int:
    """Matmul/conv FLOPs of one chunk (prefix + N steps) for `obs` (batch 1), counted by FlopCounterMode with
    eager attention (torch's CPU SDPA kernel has no FLOP formula, and the student's attention is matmuls)."""
    model = teacher.model
    impl = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        noise = torch.zeros(len(obs), teacher.chunk_len, teacher.padded_action_dim)
        inputs = teacher.model_inputs(obs)
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            model.sample_actions(noise=noise, num_steps=steps or teacher.num_steps, **inputs)
        return int(fc.get_total_flops())
    finally:
        model.set_attn_implementation(impl)
