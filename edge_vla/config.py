"""Model configuration: a frozen dataclass family with size presets (openpi habit).

The config is plain data (no torch) so that the runtime can read it back from a bundle manifest.
The export side builds the PyTorch model and fake inputs from it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from edge_vla.errors import ConfigError


@dataclass(frozen=True)
class VLAConfig:
    """A pi0-style VLA: vision + text + state -> prefix (trunk); action expert denoises an H x D chunk."""

    preset: str = "tiny"
    # Observation.
    image_size: int = 64
    num_cameras: int = 1
    patch_size: int = 8
    max_text_len: int = 24
    state_dim: int = 2
    # Action chunk.
    action_dim: int = 2
    chunk_len: int = 8
    # Trunk (prefix).
    width: int = 128
    depth: int = 2
    heads: int = 4
    # Action expert.
    expert_width: int = 128
    expert_depth: int = 2
    expert_heads: int = 4
    mlp_ratio: int = 4
    # Language conditions vision before the trunk (FiLM on the patch tokens from the pooled instruction),
    # so "which block is red" is a per-patch feature instead of a composition the trunk must learn.
    text_film: bool = True
    # Vision stem. "patch": one linear patch embedding (ViT). "conv": a small conv stem at full resolution
    # whose first layer is FiLM-modulated by the instruction (colour selection is a per-pixel operation),
    # a strided conv to the same patch grid, and `keypoints` spatial-softmax keypoints per camera as extra
    # tokens (the expected image coordinates of learned feature maps: where the named block is).
    vision: str = "patch"
    keypoints: int = 0
    stem_channels: int = 16
    # Training only: a head that reads where the named block is from the prefix (an auxiliary loss that
    # gives localisation a direct gradient). Never exported: the prefix graph ends at the K/V.
    goal_head: bool = False
    # Width of the goal head's target: 2 (the sim: the named block's xy) or, on MetaWorld, 6 (the object's and
    # the goal's xyz, privileged simulator fields used only as this training target, never as an input).
    goal_dim: int = 2
    # Real-time chunking, trained (action-prefix conditioning, arXiv 2512.05964): up to this many leading actions
    # of a chunk can be given to the model clean (the actions that execute while it thinks), marked by a learned
    # embedding on their action tokens (a mask, so the per-chunk flow time and its adaLN stay as they are); the
    # rest is generated consistent with them. 0: not trained for it (every bundle before RTC).
    rtc_max_delay: int = 0
    # Sampler.
    num_steps: int = 10

    # Byte-level tokenizer: 0 = pad, 1 = end of text, bytes map to 2..257.
    @property
    def vocab_size(self) -> int:
        return 258

    @property
    def tokens_per_camera(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + self.keypoints

    @property
    def prefix_len(self) -> int:
        return self.num_cameras * self.tokens_per_camera + self.max_text_len + 1

    @property
    def head_dim(self) -> int:
        return self.expert_width // self.expert_heads

    def validate(self) -> VLAConfig:
        problems = []
        if self.image_size % self.patch_size:
            problems.append(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            problems.append(f"width {self.width} is not divisible by heads {self.heads}")
        if self.expert_width % self.expert_heads:
            problems.append(f"expert_width {self.expert_width} is not divisible by expert_heads {self.expert_heads}")
        if self.vision not in ("patch", "conv"):
            problems.append(f"vision must be 'patch' or 'conv', got {self.vision!r}")
        if self.vision == "patch" and self.keypoints:
            problems.append("keypoints need vision='conv' (they come from the conv stem's feature maps)")
        if self.vision == "conv" and (self.patch_size % 2 or self.image_size % 2):
            problems.append("vision='conv' needs an even patch_size and image_size (its second conv has stride 2)")
        if not 0 <= self.rtc_max_delay < self.chunk_len:
            problems.append(f"rtc_max_delay must be 0..chunk_len - 1 ({self.chunk_len - 1}), got {self.rtc_max_delay}")
        if self.goal_dim < 1:
            problems.append("goal_dim must be >= 1")
        if self.keypoints < 0 or self.stem_channels < 1:
            problems.append("keypoints must be >= 0 and stem_channels >= 1")
        for name in ("num_cameras", "depth", "expert_depth", "chunk_len", "action_dim", "state_dim", "num_steps"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        if problems:
            raise ConfigError("invalid VLAConfig: " + "; ".join(problems))
        return self

    def differences(self, other: VLAConfig) -> list[str]:
        """'field mine vs theirs' for every field that differs (for errors naming a config mismatch)."""
        return [f"{f.name} {getattr(self, f.name)!r} vs {getattr(other, f.name)!r}"
                for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VLAConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; this edge-vla knows {sorted(known)}")
        return cls(**data).validate()


PRESETS: dict[str, VLAConfig] = {
    # A TinyVLA-sized student that trains on a 2-core CPU (~1.4M parameters). The conv stem with
    # instruction FiLM and keypoints, and the goal-location loss, took the sim task from 16% (same stem,
    # no goal loss) to 62% after 1000 steps: README "Policy quality".
    "tiny": VLAConfig(preset="tiny", vision="conv", keypoints=8, goal_head=True),
    # A larger teacher (~10M parameters).
    "small": VLAConfig(
        preset="small", width=256, depth=4, heads=8,
        expert_width=256, expert_depth=4, expert_heads=8,
        vision="conv", keypoints=8, stem_channels=32, goal_head=True,
    ),
    # Octo-Base sized (~90M parameters) for export and latency work with untrained weights.
    "base": VLAConfig(
        preset="base", image_size=224, num_cameras=2, patch_size=16, max_text_len=32,
        width=768, depth=8, heads=12, expert_width=512, expert_depth=6, expert_heads=8,
        chunk_len=16,
    ),
}


def preset(name: str, **overrides: Any) -> VLAConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides).validate()
