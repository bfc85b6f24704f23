"""π0 observation preprocessing in numpy, exactly as transformers' `PI0ImageProcessor` does it.

Per camera frame (H x W x 3 uint8 RGB):
1. resize keeping the aspect ratio so the frame fits `max_height` x `max_width` with one side touching it
   (`get_image_size_for_max_height_width`), bicubic with antialiasing, bit for bit as the processor's
   `torchvision.transforms.v2.functional.resize` does it to a uint8 frame on a CPU: torchvision hands the uint8
   tensor to ATen's native uint8 kernel (`_upsample_bicubic2d_aa`, PIL's algorithm: Keys cubic, a = -0.5, support
   widened by the scale when shrinking, weights in int16 fixed point), width pass then height pass, each
   rounded to uint8; a dimension whose size does not change is not filtered;
2. rescale and normalise: (x / 255 - 0.5) / 0.5 (ImageNet "standard" mean/std), float32;
3. pad on the bottom and right with 0 to `pad_height` x `pad_width`.

State: (state - mean) / (std + 1e-8) with the processor's statistics, zero-padded to `max_state_dim`.
The instruction goes through `edge_vla.hf_tokenizer.PromptTokenizer`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from edge_vla.bundle import Bundle
from edge_vla.errors import BundleError, ObservationError
from edge_vla.hf_tokenizer import PromptLayout, PromptTokenizer
from edge_vla.runtime.types import Observation

STATS_EPS = 1e-8  # PI0Processor.normalize divides by (std + 1e-8)


def fit_size(height: int, width: int, max_height: int, max_width: int) -> tuple[int, int]:
    """transformers' get_image_size_for_max_height_width: keep the aspect ratio, touch one bound."""
    scale = min(max_height / height, max_width / width)
    return int(height * scale), int(width * scale)


def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


_MAX_PRECISION = 22  # ATen's cap on the fixed-point bits: it keeps 255 x sum|weights| inside int32


@lru_cache(maxsize=16)
def resize_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """ATen's uint8 antialiased bicubic weights for one dimension (align_corners=False), as
    `HelperInterpCubic::compute_index_ranges_int16_weights` computes them: float64 taps normalised per output,
    one fixed-point precision for the dimension (the most bits that keep the largest weight under 2^15), then
    each weight rounded half away from zero.

    Returns (index [out_size, taps] of the input sample each tap reads, clipped into range; weight
    [out_size, taps] int32 holding int16 values, 0 past an output's own taps; precision in bits)."""
    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    max_taps = int(np.ceil(support)) * 2 + 1
    first = np.zeros(out_size, np.int64)
    weights = np.zeros((out_size, max_taps), np.float64)
    for i in range(out_size):
        center = scale * (i + 0.5)
        xmin = max(int(center - support + 0.5), 0)  # C++ casts truncate toward zero, as int() does
        size = min(max(min(int(center + support + 0.5), in_size) - xmin, 0), max_taps)
        k = _cubic((np.arange(size) + xmin - center + 0.5) * invscale)
        total = k.sum()
        weights[i, :size] = k / total if total != 0.0 else k
        first[i] = xmin
    wt_max = float(weights.max())
    precision = 0
    while precision < _MAX_PRECISION and int(0.5 + wt_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = weights * (1 << precision)
    fixed = np.trunc(scaled + np.where(scaled < 0, -0.5, 0.5)).astype(np.int32)
    used = int(np.flatnonzero(fixed.any(axis=0)).max()) + 1 if fixed.any() else 1
    index = np.minimum(first[:, None] + np.arange(used), in_size - 1)
    return index, fixed[:, :used], precision


def _resize_axis(image: np.ndarray, axis: int, out_size: int) -> np.ndarray:
    """One separable pass over axis 0 (height) or 1 (width) of a uint8 HWC image: per output sample,
    (2^(p-1) + sum of input x weight) >> p, clamped to 0..255 (int32 accumulation, exact)."""
    index, weight, precision = resize_taps(image.shape[axis], out_size)
    shape = list(image.shape)
    shape[axis] = out_size
    acc = np.full(shape, 1 << (precision - 1), np.int32)
    for k in range(index.shape[1]):  # a handful of taps (13 for 640 -> 224): gather + multiply-add each
        if axis == 1:
            acc += image[:, index[:, k], :] * weight[None, :, k, None]
        else:
            acc += image[index[:, k], :, :] * weight[:, k, None, None]
    return np.clip(acc >> precision, 0, 255).astype(np.uint8)


def resize_bicubic_aa(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 HWC -> uint8 HWC at (height, width): width pass, then height pass (ATen's order), each to uint8."""
    if image.shape[1] != width:
        image = _resize_axis(image, 1, width)
    if image.shape[0] != height:
        image = _resize_axis(image, 0, height)
    return np.ascontiguousarray(image)


@dataclass(frozen=True)
class ImageSpec:
    max_height: int
    max_width: int
    pad_height: int
    pad_width: int
    scale: float = 1.0 / 255.0
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @classmethod
    def from_manifest(cls, img: Mapping[str, Any]) -> ImageSpec:
        return cls(int(img["max_height"]), int(img["max_width"]), int(img["height"]), int(img["width"]),
                   float(img["scale"]), tuple(img["mean"]), tuple(img["std"]))


def preprocess_image(image: np.ndarray, spec: ImageSpec, out: np.ndarray | None = None) -> np.ndarray:
    """One uint8 HWC RGB frame -> float32 [3, pad_height, pad_width], written into `out` when given."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ObservationError(f"expected an H x W x 3 uint8 RGB image, got {got}")
    h, w = fit_size(image.shape[0], image.shape[1], spec.max_height, spec.max_width)
    if h < 1 or w < 1:
        raise ObservationError(f"image {image.shape[:2]} is too thin to resize to fit {spec.max_height}x{spec.max_width}")
    resized = resize_bicubic_aa(image, h, w)
    if out is None:
        out = np.empty((3, spec.pad_height, spec.pad_width), dtype=np.float32)
    # The processor fuses rescale and normalise as (x - mean / scale) / (std / scale), in float32.
    mean = (np.asarray(spec.mean, np.float32) * np.float32(1.0 / spec.scale))[:, None, None]
    std = (np.asarray(spec.std, np.float32) * np.float32(1.0 / spec.scale))[:, None, None]
    out[...] = 0.0
    out[:, :h, :w] = (resized.transpose(2, 0, 1).astype(np.float32) - mean) / std
    return out


class Pi0ObservationEncoder:
    """Observation -> the π0 graphs' observation inputs (images, tokens, token_mask, state), in place."""

    def __init__(self, cameras: list[str], image: ImageSpec, tokenizer: PromptTokenizer, state_mean: np.ndarray,
                 state_std: np.ndarray, state_pad_to: int) -> None:
        self.cameras, self.image, self.tokenizer = cameras, image, tokenizer
        self.state_mean = state_mean.astype(np.float32)
        self.state_div = state_std.astype(np.float32) + np.float32(STATS_EPS)  # float32, as the processor
        self.state_dim, self.state_pad_to = len(state_mean), state_pad_to

    @classmethod
    def from_bundle(cls, bundle: Bundle, contract: Any = None) -> Pi0ObservationEncoder:
        m = bundle.manifest
        try:
            prep, tok, norm = m["preprocessing"], m["tokenizer"], m["normalization"]["state"]
            img = prep["images"]
            layout = PromptLayout(tok["image_token"], int(tok["image_seq_len"]), int(img["cameras"]),
                                  tok["bos_token"], int(tok["pad_id"]), int(tok["max_len"]))
            tokenizer = PromptTokenizer(bundle.path(tok["file"]), layout)
            names = list(img.get("names") or [f"cam{i}" for i in range(layout.num_cameras)])
            return cls(names, ImageSpec.from_manifest(img), tokenizer, np.asarray(norm["mean"]),
                       np.asarray(norm["std"]), int(prep["state"]["pad_to"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"bundle {bundle.root}: π0 preprocessing section is incomplete ({exc!r}); "
                              "re-export the bundle") from exc

    def encode(self, obs: Observation, inputs: Mapping[str, np.ndarray]) -> None:
        if not isinstance(obs, Observation):
            raise ObservationError(f"expected an Observation, got {type(obs).__name__}")
        if len(obs.images) != len(self.cameras):
            raise ObservationError(f"this π0 bundle takes {len(self.cameras)} camera image(s) {self.cameras}, got "
                                   f"{len(obs.images)}; pass one frame per camera, in that order")
        images = inputs["images"]
        for i, frame in enumerate(obs.images):
            try:
                preprocess_image(frame, self.image, out=images[0, i])
            except ObservationError as exc:
                raise ObservationError(f"camera {self.cameras[i]!r}: {exc}") from None
        tokens, mask = self.tokenizer.encode(obs.instruction)
        inputs["tokens"][0] = tokens
        inputs["token_mask"][0] = mask
        state = np.asarray(obs.state, dtype=np.float64)
        if state.shape != (self.state_dim,):
            raise ObservationError(f"state must have shape ({self.state_dim},), got {state.shape}")
        if not np.all(np.isfinite(state)):
            raise ObservationError(f"state contains NaN or Inf: {state.tolist()}; check the joint encoder feed")
        row = inputs["state"][0]
        row[...] = 0.0
        row[: self.state_dim] = (state.astype(np.float32) - self.state_mean) / self.state_div
