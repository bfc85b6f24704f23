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
