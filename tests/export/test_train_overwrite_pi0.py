"""`edge-vla train --family pi0 --overwrite` over an earlier π0 run, interrupted before its first checkpoint.

π0 writes its step-0 weights straight into -o (transformers' save_pretrained), while the old run's training state
(train_state.json, optimizer.pt, goal_probe.pt) would stay until the new run's first checkpoint. Killed in between,
the directory paired fresh weights with the old run's step and optimizer, and a later --resume continued from step N
with untrained weights, without a word. --overwrite now removes the old training state before the new run writes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from pi0_tiny import TINY

from edge_vla.cli import main
from edge_vla.sim import dataset

EDGE_VLA = str(Path(sys.executable).parent / "edge-vla")
OLD_STATE = ("train_state.json", "optimizer.pt", "goal_probe.pt")


def _wait_for(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_an_interrupted_overwrite_leaves_no_old_training_state_to_resume(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    dataset.save(dataset.generate(range(2)), tmp_path / "reach.npz")
    run = tmp_path / "pi0"
    run.mkdir()
    old_weights = b"the old run's weights"
    (run / "model.safetensors").write_bytes(old_weights)
    (run / "train_state.json").write_text(json.dumps({"family": "pi0", "step": 4000, "torch_rng": []}) + "\n")
    (run / "optimizer.pt").write_bytes(b"the old run's optimizer")
    (run / "goal_probe.pt").write_bytes(b"the old run's probe")

    # A long run that checkpoints only at its end: killed once its step-0 weights are in place.
    proc = subprocess.Popen([EDGE_VLA, "-q", "train", "--family", "pi0", "--pi0-config", str(config), "--data",
                             str(tmp_path / "reach.npz"), "-o", str(run), "--train-steps", "100000",
                             "--checkpoint-every", "100000", "--batch-size", "2", "--threads", "1", "--overwrite"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})
    try:
        started = _wait_for(lambda: (run / "model.safetensors").read_bytes() != old_weights
                            or proc.poll() is not None, 120)
        assert started and proc.poll() is None, proc.communicate()[1] if proc.poll() is not None else "no start"
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
    assert [name for name in OLD_STATE if (run / name).exists()] == []
    # ... so that --resume says there is nothing to resume instead of continuing "step 4000" with fresh weights.
    assert main(["train", "--family", "pi0", "-o", str(run), "--resume", "--train-steps", "5000"]) == 1
    assert "holds no training state" in capsys.readouterr().err
