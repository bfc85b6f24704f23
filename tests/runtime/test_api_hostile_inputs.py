"""Inputs a client can send through the Python API or a server (an openpi `prompt` is any JSON string) that ended
in a plain Python error instead of the one-line ObservationError the loop and the server report; and a training
checkpoint given where a bundle is expected."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_vla.errors import BundleError, ObservationError
from edge_vla.runtime.policy import Policy
from edge_vla.runtime.types import Observation
from edge_vla.tokenizer import tokenize


def _obs(instruction: object) -> Observation:
    return Observation(images=[np.zeros((64, 64, 3), np.uint8)], instruction=instruction,  # type: ignore[arg-type]
                       state=np.zeros(2, np.float32))


def test_an_instruction_with_a_lone_surrogate_is_an_observation_error() -> None:
    """JSON can carry "\\ud800", which no UTF-8 encoder takes: it was a UnicodeEncodeError from the tokenizer."""
    assert tokenize("reach the red block", 32)[0] > 1  # control
    with pytest.raises(ObservationError, match="UTF-8"):
        tokenize("reach \ud800 block", 32)


@pytest.mark.parametrize("instruction", [["reach", "the", "block"], {"task": "reach"}, 42])
def test_an_instruction_that_is_not_text_is_an_observation_error(tiny_bundle: Path, instruction: object) -> None:
    """A list or dict was used as the encoder's cache key first: TypeError: unhashable."""
    with Policy.load(tiny_bundle, threads=1) as policy:
        assert policy.infer(_obs("reach the red block")).actions.shape[0] > 0  # control
        with pytest.raises(ObservationError, match="instruction"):
            policy.infer(_obs(instruction))


def test_a_training_checkpoint_given_as_a_bundle_says_to_export_it(tmp_path: Path) -> None:
    ckpt = tmp_path / "runs_tiny"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"config": {}}')
    (ckpt / "model.safetensors").write_bytes(b"")
    with pytest.raises(BundleError, match=r"training checkpoint, not a bundle: export it first"):
        Policy.load(ckpt)
    with pytest.raises(BundleError, match="not an edge-vla bundle"):  # control: an empty directory is just not one
        Policy.load(tmp_path)


@pytest.mark.parametrize(("images", "state", "named"), [
    (None, np.zeros(2, np.float32), "images"),                          # TypeError from len()
    ("not a list", np.zeros(2, np.float32), "images"),
    ([np.zeros((64, 64, 3), np.uint8)], np.array(["0", "1"]), "state"),   # TypeError from isfinite
    ([np.zeros((64, 64, 3), np.uint8)], np.array([1 + 2j, 0j]), "state"),  # the imaginary part was dropped silently
    ([np.zeros((64, 64, 3), np.uint8)], np.array([1e39, 0.0]), "state"),   # finite float64, inf in float32
])
def test_images_and_state_of_the_wrong_kind_are_observation_errors(tiny_bundle: Path, images: object, state: object,
                                                                   named: str) -> None:
    with Policy.load(tiny_bundle, threads=1) as policy:
        with pytest.raises(ObservationError, match=named):
            policy.infer(Observation(images=images, instruction="reach the red block", state=state))  # type: ignore[arg-type]
        assert policy.infer(_obs("reach the red block")).actions.shape[0] > 0  # the policy still serves
