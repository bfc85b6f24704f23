"""The instruction comes from a client (openpi `prompt`, the operator): an over-long one is refused in one short
line, not echoed whole into the reply, the log and telemetry."""

from __future__ import annotations

import pytest

from edge_vla.errors import ObservationError
from edge_vla.tokenizer import tokenize


def test_an_over_long_instruction_is_refused_in_a_short_line() -> None:
    assert tokenize("reach the red block", 32)[0] > 1  # control: one that fits is tokenized
    with pytest.raises(ObservationError, match="instruction is 4096 bytes but this model takes at most 31") as err:
        tokenize("x" * 4096, 32)
    assert len(str(err.value)) < 300 and "\n" not in str(err.value)
