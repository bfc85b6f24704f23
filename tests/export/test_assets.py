"""Shipped checkpoints are checked against their provenance before anything loads them."""

import json
import shutil

import pytest

from edge_vla.errors import CheckpointError
from edge_vla.export import assets
from edge_vla.export.checkpoint import load_checkpoint


def test_the_shipped_tiny_checkpoint_loads_and_names_its_command():
    path = assets.shipped_checkpoint()
    model, _ = load_checkpoint(path)
    prov = assets.provenance()
    assert prov["command"].startswith("edge-vla make-data") and "edge-vla train" in prov["command"]
    assert model.config.preset == "tiny" and prov["steps"] > 0


def test_a_tampered_or_missing_asset_is_refused(tmp_path, monkeypatch):
    fake = tmp_path / "assets"
    shutil.copytree(assets.ASSETS / "tiny-reach", fake / "tiny-reach")
    monkeypatch.setattr(assets, "ASSETS", fake)
    weights = fake / "tiny-reach" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(CheckpointError, match="does not match its provenance"):
        assets.shipped_checkpoint()
    with pytest.raises(CheckpointError, match="no shipped checkpoint 'other'"):
        assets.shipped_checkpoint("other")
    prov = json.loads((fake / "tiny-reach" / "provenance.json").read_text())
    with pytest.raises(CheckpointError) as err:
        assets.shipped_checkpoint()
    assert prov["command"] in str(err.value)  # says how to rebuild it


def test_the_shipped_rtc_checkpoint_continues_the_prefix_it_is_given():
    """tiny-reach-rtc (issue 27) was fine-tuned for action-prefix conditioning. Given the first d actions of its own
    plan, it must return them unchanged and plan on consistently (a small jump at index d); given the same plan
    shifted, the continuation must follow the shift: the control that shows the model reads the prefix at all."""
    import numpy as np

    from edge_vla.export.torch_policy import TorchPolicy
    from edge_vla.sim.env import ReachEnv

    path = assets.shipped_checkpoint("tiny-reach-rtc")
    model, _ = load_checkpoint(path)
    assert model.config.rtc_max_delay == 4 and "--rtc-max-delay 4" in assets.provenance("tiny-reach-rtc")["command"]
    policy = TorchPolicy(model, seed=0)
    obs = ReachEnv().reset(1_000_123)
    plan = policy(obs)
    assert np.linalg.norm(plan[-1] - obs.state) > 0.1  # the chunk moves well away from the start
    d = 2
    devs = {}
    for shift in (0.0, 0.1):
        prefix = plan[:d] + np.float32(shift)
        policy.reset(1)  # other noise than the plan's: consistency must come from the prefix
        chunk = policy(obs, prefix=prefix)
        np.testing.assert_array_equal(chunk[:d], prefix)
        jump, step = np.linalg.norm(chunk[d] - chunk[d - 1]), np.linalg.norm(plan[d] - plan[d - 1])
        assert jump < step + 0.05, (shift, jump, step)  # no jump at the hand-over index
        devs[shift] = float(np.linalg.norm(chunk[d] - plan[d]))
    # its own prefix: the plan continues (measured 0.005 rad); the shifted one (0.14 rad): followed (0.117), not
    # snapped back to the unshifted plan
    assert devs[0.0] < 0.05 and devs[0.1] > 0.07, devs
