import os

import torch

from edge_vla.config import preset
from edge_vla.export.checkpoint import load_checkpoint
from edge_vla.export.train import TrainConfig, train
from edge_vla.sim import dataset


def test_train_checkpoints_and_resumes(tmp_path):
    ds = dataset.generate(range(4))
    cfg = preset("tiny")
    out = tmp_path / "run"
    tc = TrainConfig(steps=6, batch_size=4, checkpoint_every=3, warmup=2)
    straight = train(cfg, ds, tmp_path / "straight", tc, progress=False)
    # Interrupted after 3 steps, then resumed: same weights as the uninterrupted run.
    train(cfg, ds, out, TrainConfig(steps=3, batch_size=4, checkpoint_every=3, warmup=2), progress=False)
    resumed = train(cfg, ds, out, tc, resume=True, progress=False)
    for k, v in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    model, meta = load_checkpoint(out)
    assert meta["step"] == 6
    # Normalization statistics come from the dataset and travel with the checkpoint.
    torch.testing.assert_close(model.action_mean, torch.tensor(ds.action_stats()["mean"]))


def test_thread_default_leaves_a_core_that_another_process_holds():
    """Busy cores come from /proc/stat over a window in which this process sleeps: a busy neighbour
    counts, this process's own earlier work does not (the load average counted both)."""
    import subprocess
    import sys

    from edge_vla.export.train import busy_cores, default_threads

    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        import time

        time.sleep(0.3)
        assert busy_cores(0.5) > 0.7
        assert default_threads() <= max(1, (os.cpu_count() or 1) - 1)
    finally:
        spinner.kill()
        spinner.wait()


def test_parse_overrides_types_and_errors():
    import pytest

    from edge_vla.errors import ConfigError
    from edge_vla.export.train_cli import parse_overrides

    assert parse_overrides(["vision=conv", "keypoints=8", "text_film=false", "width=64"]) == {
        "vision": "conv", "keypoints": 8, "text_film": False, "width": 64}
    with pytest.raises(ConfigError, match="not a valid int"):
        parse_overrides(["keypoints=many"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["wings=2"])
