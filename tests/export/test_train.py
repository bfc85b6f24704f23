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


def _cli(argv: list[str]) -> int:
    from edge_vla.cli import main

    threads = torch.get_num_threads()
    try:
        return main(argv)
    finally:
        torch.set_num_threads(threads)


def _all_finite(path) -> bool:
    from safetensors.torch import load_file

    return all(torch.isfinite(t).all() for t in load_file(path / "model.safetensors").values())


def test_divergent_training_stops_and_keeps_the_last_finite_checkpoint(tmp_path, capsys):
    """A learning rate far too high: the loss overflows within a few steps. Training stops at the first
    non-finite loss or gradient, names the step and the batch, and never writes the non-finite weights."""
    import re

    data = tmp_path / "reach.npz"
    dataset.save(dataset.generate(range(2)), data)
    out = tmp_path / "run"
    rc = _cli(["train", "--data", str(data), "--steps", "6", "--batch-size", "4", "--lr", "1e10",
               "--checkpoint-every", "1", "--threads", "1", "-o", str(out)])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    err = lines[-1]  # progress bars go to stderr before the error, which must be one line
    assert rc == 1 and [line for line in lines if ": error: " in line] == [err], lines
    found = re.search(r"training stopped at step (\d+) of 6: the (loss|gradient norm) is (nan|inf)", err)
    assert found, err
    assert re.search(r"batch of 4 samples \[[\d, ]+\] \(episodes \[[\d, ]+\]\)", err), err
    stopped = int(found.group(1))
    assert stopped > 1  # the first step is finite at this rate; the next one overflows
    assert f"the checkpoint in {out} stays at step {stopped - 1}" in err, err
    _, meta = load_checkpoint(out)  # the last checkpoint before the failure, whole and finite
    assert meta["step"] == stopped - 1 and _all_finite(out)


def test_checkpoints_with_non_finite_tensors_are_neither_written_nor_loaded(tmp_path):
    import pytest
    from safetensors.torch import save_file

    from edge_vla.errors import CheckpointError
    from edge_vla.export.checkpoint import save_checkpoint
    from edge_vla.export.model import VLA

    model = VLA(preset("tiny"))
    good = save_checkpoint(model, tmp_path / "ckpt", meta={"step": 1})
    before = (good / "model.safetensors").read_bytes()
    with torch.no_grad():
        model.action_out.weight[0, 0] = float("nan")
    bad_name = "action_out.weight"
    with pytest.raises(CheckpointError, match=rf"non-finite values in {bad_name}"):
        save_checkpoint(model, good, meta={"step": 2})
    assert (good / "model.safetensors").read_bytes() == before  # the old checkpoint is untouched
    # One written by something else (or an older edge-vla) is refused on load, naming the tensor.
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, good / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"non-finite values in {bad_name}.*retrain"):
        load_checkpoint(good)


def test_non_finite_sample_in_a_dataset_file_is_refused_before_training(tmp_path, capsys):
    """One NaN state makes the normalization, and so every loss, NaN: refused up front, naming sample and file."""
    import numpy as np

    ds = dataset.generate(range(2))
    ds.states[5, 0] = np.nan
    dataset.save(ds, tmp_path / "bad.npz")
    assert _cli(["train", "--data", str(tmp_path / "bad.npz"), "--steps", "2", "--threads", "1",
                 "-o", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{tmp_path / 'bad.npz'}: sample 5 (episode {int(ds.episodes[5])}) holds a non-finite state" in err, err
    assert not (tmp_path / "run").exists()


def test_tiny_data_says_it_has_no_validation_split_instead_of_nan(tmp_path, caplog):
    """Two layouts hold out no episode: the step summary says so (it printed "validation loss nan")."""
    import logging

    ds = dataset.generate(range(2))
    with caplog.at_level(logging.INFO, logger="edge_vla.export.train"):
        train(preset("tiny"), ds, tmp_path / "run", TrainConfig(steps=2, batch_size=4, checkpoint_every=2, warmup=1),
              progress=False)
    summaries = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step 2:")]
    assert summaries and all("nan" not in m for m in summaries), summaries
    assert "no validation split" in summaries[0]
    assert load_checkpoint(tmp_path / "run")[1]["val_loss"] is None


def test_init_fine_tunes_a_trained_model_into_real_time_chunking(tmp_path):
    """--init: the trained weights and normalization carry over; RTC's prefix embedding starts fresh; any other
    config difference is refused."""
    import dataclasses

    import pytest

    from edge_vla.errors import ConfigError

    ds = dataset.generate(range(2))
    cfg = preset("tiny")
    base = train(cfg, ds, tmp_path / "base", TrainConfig(steps=2, batch_size=4, warmup=1), progress=False)
    rtc_cfg = dataclasses.replace(cfg, rtc_max_delay=3)
    tuned = train(rtc_cfg, ds, tmp_path / "rtc", TrainConfig(steps=1, batch_size=4, warmup=1, lr=0.0),
                  progress=False, init=base)
    assert tuned.prefix_emb is not None
    for k, v in base.state_dict().items():  # lr 0: exactly the init's weights (and its normalization buffers)
        torch.testing.assert_close(tuned.state_dict()[k], v)
    model, _ = load_checkpoint(tmp_path / "rtc")
    assert model.config.rtc_max_delay == 3
    with pytest.raises(ConfigError, match="width 128 vs 64"):
        train(dataclasses.replace(cfg, width=64), ds, tmp_path / "bad", TrainConfig(steps=1, batch_size=4),
              progress=False, init=base)


def test_a_multi_task_validation_split_holds_out_episodes_of_every_task():
    """`train --data ALL.npz,EXTRA.npz` where the last file holds only some tasks (e.g. more demonstrations of the
    tasks that fail): the highest episode ids are all that file's, so the validation loss and goal probe measured
    those tasks alone. With one group label per sample (the instruction) a task they miss gives its own last
    episodes; where they miss none (one make-data file: its ids interleave the tasks) the split is the plain one,
    so every shipped checkpoint still reproduces from its command."""
    import numpy as np

    from edge_vla.export.train import split_episodes

    tasks = np.array(["reach", "push", "door"])
    first_eps = np.repeat(np.arange(60), 5)  # make-data numbers episodes interleaved: episode k*3+i is task i
    first_tasks = tasks[first_eps % 3]
    extra_eps = np.repeat(np.arange(60, 100), 5)  # a second file of 40 reach episodes, ids shifted by concatenate
    episodes = np.concatenate([first_eps, extra_eps])
    groups = np.concatenate([first_tasks, np.full(len(extra_eps), "reach")])
    _, plain = split_episodes(episodes, 0.1)
    assert set(groups[plain.numpy()]) == {"reach"}  # the old behaviour: one task validated
    train_idx, val_idx = split_episodes(episodes, 0.1, groups=groups)
    val_eps = set(episodes[val_idx.numpy()].tolist())
    assert set(groups[val_idx.numpy()]) == {"reach", "push", "door"}
    # the plain split (the highest 10%: 90..99, all reach), and each task it missed gives its highest 10%
    assert val_eps == set(range(90, 100)) | {55, 58} | {56, 59}
    assert sorted(train_idx.tolist() + val_idx.tolist()) == list(range(len(episodes)))
    assert set(episodes[train_idx.numpy()].tolist()).isdisjoint(val_eps)
    # one make-data file alone: the plain split, sample for sample
    first_only = split_episodes(first_eps, 0.1, groups=first_tasks)
    assert all(torch.equal(a, b) for a, b in zip(first_only, split_episodes(first_eps, 0.1), strict=True))


def test_the_goal_probe_error_samples_the_whole_validation_split(monkeypatch):
    """goal_error_cm took the first 512 validation samples: with a per-task split that is the first task only."""
    import numpy as np

    from edge_vla.export import train as train_mod

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.goal = object()

        def goal_xy(self, prefix):
            return prefix

        def embed_prefix(self, images, tokens, state):
            return state

    class Data:
        goals = torch.zeros(2000, 3)
        states = torch.cat([torch.zeros(600, 3), torch.ones(1400, 3)])  # error 0 cm, then 173 cm

        def batch(self, idx):
            return None, None, self.states[idx], None

    err = train_mod.goal_error_cm(Head(), Data(), torch.arange(2000))
    assert err is not None and err > 100, err  # the median over the whole split, not its first 512 (all zero)
    assert train_mod.goal_error_cm(Head(), Data(), torch.arange(2000)) == err  # a fixed sample: comparable
    assert np.isfinite(err)
