"""π0 prompts tokenized on the robot with the `tokenizers` library alone (no transformers, no torch).

`PI0Processor` builds the prompt string `"<image>" * (image_seq_len * cameras) + bos + instruction + "\\n"`
and tokenizes it with the checkpoint's tokenizer (no extra BOS/EOS). The bundle ships that tokenizer's
`tokenizer.json`; this module does the same with `tokenizers.Tokenizer`, then pads on the right to the
bundle's static prompt length (pad id, mask 0), which π0 ignores through its attention mask.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_vla.errors import BundleError, ObservationError
from edge_vla.optional import require


@dataclass(frozen=True)
class PromptLayout:
    """How PI0Processor lays out a prompt (stored in the bundle manifest's `tokenizer` section)."""

    image_token: str
    image_seq_len: int
    num_cameras: int
    bos_token: str
    pad_id: int
    max_len: int  # static prompt length, image tokens included

    @property
    def image_tokens(self) -> int:
        return self.image_seq_len * self.num_cameras


class PromptTokenizer:
    """instruction -> (token ids, attention mask), both int32 [max_len], as the π0 prefix graph takes them."""

    def __init__(self, tokenizer_json: str | Path, layout: PromptLayout, cache_size: int = 128) -> None:
        tokenizers = require("tokenizers")
        path = Path(tokenizer_json)
        if not path.is_file():
            raise BundleError(f"tokenizer file {path} is missing; re-export the bundle")
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises plain Exception subclasses
            raise BundleError(f"cannot read tokenizer {path}: {exc}; re-export the bundle") from exc
        self.layout = layout
        for special in (layout.image_token, layout.bos_token):
            if self._tok.token_to_id(special) is None:
                raise BundleError(f"tokenizer {path} has no {special!r} token; it is not the checkpoint's π0 tokenizer")
        self.image_token_id = int(self._tok.token_to_id(layout.image_token))
        self._image_prefix = layout.image_token * layout.image_tokens
        self._cache: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._cache_size = cache_size

    def prompt(self, instruction: str) -> str:
        return f"{self._image_prefix}{self.layout.bos_token}{instruction}\n"

    def encode(self, instruction: str) -> tuple[np.ndarray, np.ndarray]:
        hit = self._cache.get(instruction)
        if hit is not None:
            self._cache.move_to_end(instruction)
            return hit
        if not isinstance(instruction, str):
            raise ObservationError(f"instruction must be a string, got {type(instruction).__name__}")
        ids = self._tok.encode(self.prompt(instruction)).ids
        n, limit = len(ids), self.layout.max_len
        if n > limit:
            raise ObservationError(
                f"instruction {instruction[:60]!r} is {n - self.layout.image_tokens} text tokens; this bundle takes "
                f"at most {limit - self.layout.image_tokens}. Shorten it or re-export with a larger --max-text-tokens"
            )
        tokens = np.full(limit, self.layout.pad_id, dtype=np.int32)
        tokens[:n] = ids
        mask = np.zeros(limit, dtype=np.int32)
        mask[:n] = 1
        tokens.flags.writeable = mask.flags.writeable = False
        self._cache[instruction] = (tokens, mask)
        if len(self._cache) > self._cache_size:  # bounded: a stream of distinct instructions must not grow memory
            self._cache.popitem(last=False)
        return tokens, mask
