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
