"""Observation encoders: an Observation -> the graph inputs with observation roles, written in place.

The manifest's `preprocessing.kind` picks the encoder from a lazy name -> "module:Class" registry (the
python-can interface registry pattern), so a family's preprocessing module is imported only when a
bundle of that family is loaded. An encoder is built once per Policy (`from_bundle`) and `encode` writes
into the backend's bound host arrays, keyed by role (images, tokens, token_mask, state, ...).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from edge_vla.bundle import Bundle
from edge_vla.errors import BundleError, ObservationError
from edge_vla.runtime.contract import Contract
from edge_vla.runtime.types import Observation
from edge_vla.tokenizer import tokenize

ENCODERS: dict[str, str] = {
    "edge-vla-reference": "edge_vla.runtime.observation:ReferenceEncoder",
    "pi0": "edge_vla.preprocess:Pi0ObservationEncoder",
}


class ObservationEncoder(Protocol):
    @classmethod
    def from_bundle(cls, bundle: Bundle, contract: Contract) -> ObservationEncoder: ...

    def encode(self, obs: Observation, inputs: Mapping[str, np.ndarray]) -> None:
        """Write `obs` into inputs[role] in place; raise ObservationError on bad input."""
        ...


def make_encoder(bundle: Bundle, contract: Contract) -> ObservationEncoder:
    kind = contract.preprocessing.get("kind")
    target = ENCODERS.get(str(kind))
    if target is None:
        raise BundleError(f"bundle preprocessing kind {kind!r} is not known to this edge-vla (known: "
                          f"{sorted(ENCODERS)}); upgrade edge-vla")
    module, _, cls = target.partition(":")
    try:
        encoder_cls: Any = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as exc:
        raise BundleError(f"the {kind!r} preprocessing ({target}) is unavailable: {exc}") from exc
    return encoder_cls.from_bundle(bundle, contract)


class ReferenceEncoder:
    """edge-vla's own model: uint8 HWC frames -> CHW float in [0, 1]; byte tokenizer; state as is
    (the prefix graph normalises it)."""

    def __init__(self, cameras: int, height: int, width: int, state_dim: int, max_text_len: int) -> None:
        self.cameras, self.image_shape = cameras, (height, width, 3)
        self.state_dim, self.max_text_len = state_dim, max_text_len
        self._token_cache: dict[str, np.ndarray] = {}

    @classmethod
    def from_bundle(cls, bundle: Bundle, contract: Contract) -> ReferenceEncoder:
        prep = contract.preprocessing
        img, state = prep["images"], prep["state"]
        return cls(int(img["cameras"]), int(img["height"]), int(img["width"]), int(state["dim"]),
                   int(bundle.manifest["tokenizer"]["max_len"]))

    def encode(self, obs: Observation, inputs: Mapping[str, np.ndarray]) -> None:
        if not isinstance(obs, Observation):
            raise ObservationError(f"expected an Observation, got {type(obs).__name__}")
        if not isinstance(obs.images, (list, tuple)):
            raise ObservationError(f"images must be a list of {self.cameras} camera image(s), got "
                                   f"{type(obs.images).__name__}")
        if len(obs.images) != self.cameras:
            raise ObservationError(f"expected {self.cameras} camera image(s), got {len(obs.images)}")
        images = inputs["images"]
        for i, img in enumerate(obs.images):
            if not isinstance(img, np.ndarray) or img.shape != self.image_shape or img.dtype != np.uint8:
                got = f"{img.dtype} {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
                raise ObservationError(
                    f"camera {i}: expected a uint8 RGB image of shape {self.image_shape}, got {got}; "
                    "resize/convert frames before inference"
                )
            # HWC uint8 -> CHW float in [0, 1], written into the bound input buffer.
            np.multiply(img.transpose(2, 0, 1), 1.0 / 255.0, out=images[0, i], casting="unsafe")
        if not isinstance(obs.instruction, str):  # before the cache lookup: a list or dict is not even hashable
            raise ObservationError(f"the instruction must be text, not {type(obs.instruction).__name__}; pass the task "
                                   "in words, e.g. 'reach the red block'")
        tokens = self._token_cache.get(obs.instruction)
        if tokens is None:
            tokens = tokenize(obs.instruction, self.max_text_len).astype(inputs["tokens"].dtype)
            if len(self._token_cache) >= 256:  # bounded: a stream of distinct instructions must not grow memory
                self._token_cache.clear()
            self._token_cache[obs.instruction] = tokens
        inputs["tokens"][0] = tokens
        inputs["state"][0] = checked_state(obs.state, self.state_dim)


def checked_state(raw: object, dim: int) -> np.ndarray:
    """The joint state as float32 [dim]: real numbers only (strings, objects and complex numbers are refused, not
    coerced: numpy would drop an imaginary part silently), finite in float32 (1e39 is finite in float64 and inf in
    the float32 input)."""
    state = np.asarray(raw)
    if state.shape != (dim,):
        raise ObservationError(f"state must have shape ({dim},), got {state.shape}")
    if state.dtype.kind not in "fiub":
        raise ObservationError(f"state must hold real numbers, got dtype {state.dtype}; send joint positions as floats")
    with np.errstate(over="ignore", invalid="ignore"):
        state32 = state.astype(np.float32)
    if not np.all(np.isfinite(state32)):
        raise ObservationError(f"state contains NaN or Inf (in float32): {state.tolist()}; check the joint encoder feed")
    return state32
