"""Trained weights that ship with edge-vla, so the demo can deploy a policy that does its task without
training for an hour first. Each asset is a checkpoint directory plus `provenance.json`: the command that
reproduces it and the sha256 of its weights, checked on every load."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from edge_vla.errors import CheckpointError

ASSETS = Path(__file__).parent / "assets"


def shipped_checkpoint(name: str = "tiny-reach") -> Path:
    """The checkpoint directory of a shipped asset, after checking its weights against provenance.json."""
    path = ASSETS / name
    prov = path / "provenance.json"
    if not prov.is_file():
        known = sorted(p.name for p in ASSETS.iterdir() if (p / "provenance.json").is_file()) if ASSETS.is_dir() else []
        raise CheckpointError(f"no shipped checkpoint {name!r} (have {known}); reinstall edge-vla or train one")
    doc = json.loads(prov.read_text())
    weights = path / "model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest() if weights.is_file() else "missing"
    if digest != doc["sha256"]:
        raise CheckpointError(
            f"shipped checkpoint {path} does not match its provenance (sha256 {digest[:12]}..., expected "
            f"{doc['sha256'][:12]}...); reinstall edge-vla or rebuild it with: {doc['command']}")
    return path


def provenance(name: str = "tiny-reach") -> dict:
    return json.loads((ASSETS / name / "provenance.json").read_text())


def write_asset(checkpoint: str | Path, command: str, notes: dict, name: str = "tiny-reach") -> Path:
    """Copy a checkpoint's weights and config into the assets (no optimizer state) with its provenance."""
    import shutil

    src, dst = Path(checkpoint), ASSETS / name
    dst.mkdir(parents=True, exist_ok=True)
    for f in ("model.safetensors", "config.json"):
        shutil.copyfile(src / f, dst / f)
    digest = hashlib.sha256((dst / "model.safetensors").read_bytes()).hexdigest()
    doc = {"command": command, "sha256": digest, **notes}
    (dst / "provenance.json").write_text(json.dumps(doc, indent=2) + "\n")
    return dst
