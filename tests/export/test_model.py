import dataclasses

import pytest
import torch

from edge_vla.config import PRESETS, VLAConfig, preset
from edge_vla.errors import CheckpointError, ConfigError
from edge_vla.export.checkpoint import load_checkpoint, save_checkpoint
from edge_vla.export.model import VLA, count_parameters, fake_inputs


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_shapes_for_every_preset(name):
    cfg = preset(name)
    model = VLA(cfg).eval()
    x = fake_inputs(cfg)
    with torch.no_grad():
        kv = model.prefix_kv(x["images"], x["tokens"], x["state"])
        assert kv.shape == (cfg.expert_depth, 2, 1, cfg.expert_heads, cfg.prefix_len, cfg.head_dim)
        v = model.velocity(x["noise"], torch.zeros(1), kv)
        assert v.shape == (1, cfg.chunk_len, cfg.action_dim)
    if name == "tiny":
        acts = model.sample(x["images"], x["tokens"], x["state"], x["noise"], steps=2)
        assert acts.shape == (1, cfg.chunk_len, cfg.action_dim)


def test_preset_sizes_are_as_documented():
    sizes = {name: count_parameters(VLA(cfg)) for name, cfg in PRESETS.items()}
    assert sizes["tiny"] < 3e6 < sizes["small"] < 2e7
    assert 80e6 < sizes["base"] < 110e6  # around Octo-Base


def test_two_cameras_and_batch():
    cfg = preset("tiny", num_cameras=2)
    model = VLA(cfg).eval()
    x = fake_inputs(cfg, batch=3)
    with torch.no_grad():
        assert model.sample(x["images"], x["tokens"], x["state"], x["noise"], steps=1).shape == (3, 8, 2)


def test_bad_config_is_rejected():
    with pytest.raises(ConfigError, match="not a multiple of patch_size"):
        preset("tiny", image_size=60)
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("huge")
    with pytest.raises(ConfigError, match="unknown config keys"):
        VLAConfig.from_dict({"preset": "tiny", "wings": 2})


def test_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    cfg = preset("tiny")
    model = VLA(cfg).train()
    x = fake_inputs(cfg, batch=8)
    actions = torch.randn(8, cfg.chunk_len, cfg.action_dim)
    noise = torch.randn_like(actions)
    t = torch.rand(8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(40):
        loss = model.flow_loss(x["images"], x["tokens"], x["state"], actions, noise=noise, t=t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("solver", ["euler", "heun", "midpoint"])
def test_cached_prefix_matches_recomputed_prefix(tiny_model, solver):
    x = fake_inputs(tiny_model.config, batch=2, seed=3)
    args = (x["images"], x["tokens"], x["state"], x["noise"])
    cached = tiny_model.sample(*args, steps=5, solver=solver, cache_prefix=True)
    fresh = tiny_model.sample(*args, steps=5, solver=solver, cache_prefix=False)
    torch.testing.assert_close(cached, fresh, rtol=1e-6, atol=1e-6)


def test_checkpoint_round_trip(tmp_path, tiny_model):
    path = save_checkpoint(tiny_model, tmp_path / "ck", meta={"note": "x"})
    loaded, meta = load_checkpoint(path)
    assert meta == {"note": "x"}
    for k, v in tiny_model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)
    assert not list(tmp_path.glob(".*")), "no staging directory left behind"


def test_checkpoint_mismatch_names_the_problem(tmp_path):
    path = save_checkpoint(VLA(preset("tiny")), tmp_path / "ck")
    cfg = (path / "config.json").read_text().replace('"expert_width": 128', '"expert_width": 64')
    (path / "config.json").write_text(cfg)
    with pytest.raises(CheckpointError, match=r"config .* and tensors disagree: .*shape mismatches .*action_in"):
        load_checkpoint(path)


def test_corrupt_and_missing_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_checkpoint(tmp_path)
    path = save_checkpoint(VLA(preset("tiny")), tmp_path / "ck")
    w = path / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)
    (path / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="not a valid checkpoint config"):
        load_checkpoint(path)


def test_config_round_trip():
    cfg = preset("base")
    assert VLAConfig.from_dict(cfg.to_dict()) == cfg
    assert dataclasses.replace(cfg, num_steps=2).num_steps == 2
