"""Byte-level instruction tokenizer shipped with every model: no vocabulary file, no downloads.

Ids: 0 = pad, 1 = end of text, byte b -> b + 2. Text is lower-cased and whitespace-normalised so
that "Reach the RED block " and "reach the red block" give the same tokens.
"""

from __future__ import annotations

import numpy as np

from edge_vla.errors import ObservationError

PAD_ID = 0
EOS_ID = 1
VOCAB_SIZE = 258


def normalize(text: str) -> str:
    return " ".join(text.lower().split())


def _clip(text: str, keep: int = 60) -> str:
    """The instruction as quoted in an error: its start, so the line names it without echoing kilobytes of it."""
    return repr(text) if len(text) <= keep else f"{text[:keep]!r}... ({len(text)} characters)"


def tokenize(text: str, max_len: int) -> np.ndarray:
    """int64 [max_len] token ids; raises if the instruction does not fit."""
    if not isinstance(text, str) or not text.strip():
        raise ObservationError("the instruction is missing or empty; pass the task in words, e.g. 'reach the red block'")
    try:
        data = normalize(text).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate ("\ud800"): JSON carries it, UTF-8 does not
        raise ObservationError(f"the instruction {_clip(text)} is not valid text (it holds a lone surrogate, which "
                               "UTF-8 cannot encode); send it as UTF-8 text") from None
    if len(data) + 1 > max_len:
        raise ObservationError(
            f"instruction is {len(data)} bytes but this model takes at most {max_len - 1}: {_clip(text)}; shorten it"
        )
    ids = np.full(max_len, PAD_ID, dtype=np.int64)
    ids[: len(data)] = np.frombuffer(data, dtype=np.uint8).astype(np.int64) + 2
    ids[len(data)] = EOS_ID
    return ids


def detokenize(ids: np.ndarray) -> str:
    out = bytearray()
    for i in np.asarray(ids).tolist():
        if i == EOS_ID:
            break
        if i >= 2:
            out.append(i - 2)
    return out.decode("utf-8", errors="replace")
