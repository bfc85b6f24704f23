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


CONV = dict(vision="conv", keypoints=4)


def test_conv_stem_shapes_two_cameras_and_batch():
    cfg = preset("tiny", num_cameras=2, **CONV)
    assert cfg.tokens_per_camera == 64 + 4 and cfg.prefix_len == 2 * 68 + cfg.max_text_len + 1
    model = VLA(cfg).eval()
    x = fake_inputs(cfg, batch=3)
    with torch.no_grad():
        kv = model.prefix_kv(x["images"], x["tokens"], x["state"])
        assert kv.shape == (cfg.expert_depth, 2, 3, cfg.expert_heads, cfg.prefix_len, cfg.head_dim)
        assert model.sample(x["images"], x["tokens"], x["state"], x["noise"], steps=1).shape == (3, 8, 2)


def test_conv_stem_keypoints_are_image_coordinates():
    """A keypoint channel that responds to one pixel's colour reports that pixel's position in [-1, 1]."""
    cfg = preset("tiny", **CONV)
    stem = VLA(cfg).stem.eval()
    with torch.no_grad():
        stem.conv1.weight.zero_()
        stem.conv1.bias.zero_()
        stem.conv1.weight[0, 0, 1, 1] = 1.0  # channel 0 = the red input
        stem.conv2.weight.zero_()
        stem.conv2.bias.zero_()
        stem.conv2.weight[0, 0, 1, 1] = 1.0  # stride 2: samples even pixels
        stem.kp_logits.weight.zero_()
        stem.kp_logits.bias.zero_()
        stem.kp_logits.weight[:, 0] = 50.0  # every keypoint peaks on channel 0
        img = torch.zeros(1, 3, 64, 64)
        img[0, 0, 40, 10] = 1.0  # row 40, column 10 -> stride-2 cell (20, 5)
        attn = torch.softmax(stem.kp_logits(torch.relu(stem.conv2(torch.relu(stem.conv1(img))))).flatten(2), -1)
        xy = torch.stack([(attn * stem.kp_x).sum(-1), (attn * stem.kp_y).sum(-1)], -1)[0, 0]
    cell = 2 / 32
    assert torch.allclose(xy, torch.tensor([-1 + 5.5 * cell, -1 + 20.5 * cell]), atol=1e-3)


def test_conv_stem_instruction_changes_the_features():
    """The FiLM after the first conv makes the visual tokens depend on the instruction (once trained)."""
    cfg = preset("tiny", **CONV)
    model = VLA(cfg).eval()
    torch.nn.init.normal_(model.stem.film[-1].weight, std=0.5)  # zero-initialised: the identity at start
    x = fake_inputs(cfg)
    other = x["tokens"].clone()
    other[0, 4] = (other[0, 4] + 7) % 250 + 2
    with torch.no_grad():
        a = model.prefix_kv(x["images"], x["tokens"], x["state"])[..., : cfg.tokens_per_camera, :]
        b = model.prefix_kv(x["images"], other, x["state"])[..., : cfg.tokens_per_camera, :]
    assert not torch.allclose(a, b, atol=1e-4)


def test_conv_config_errors():
    with pytest.raises(ConfigError, match="keypoints need vision='conv'"):
        preset("tiny", vision="patch", keypoints=4)
    with pytest.raises(ConfigError, match="vision must be"):
        preset("tiny", vision="vit")


def test_goal_head_adds_a_loss_and_stays_out_of_the_prefix_kv():
    torch.manual_seed(0)
    cfg = preset("tiny", goal_head=True, **CONV)
    model = VLA(cfg).train()
    x = fake_inputs(cfg, batch=4)
    actions, noise, t = torch.randn(4, 8, 2), torch.randn(4, 8, 2), torch.rand(4)
    goals = torch.rand(4, 2)
    flow = model.flow_loss(x["images"], x["tokens"], x["state"], actions, noise=noise, t=t)
    both = model.flow_loss(x["images"], x["tokens"], x["state"], actions, noise=noise, t=t, goals=goals, goal_weight=1.0)
    assert both > flow
    probe = model.goal_xy(model.embed_prefix(x["images"], x["tokens"], x["state"]))
    assert torch.allclose(both - flow, torch.nn.functional.mse_loss((probe - 0.5) / 0.25, (goals - 0.5) / 0.25),
                          atol=1e-5)
    plain = VLA(dataclasses.replace(cfg, goal_head=False))
    assert {k for k in model.state_dict() if not k.startswith("goal.")} == set(plain.state_dict())
