"""Training-time real-time chunking (action-prefix conditioning) in the reference model.

The numerics test uses a task whose answer depends on what is tested: every chunk is one of two mirror-image
ramps, chosen at random and independently of the observation. Without a prefix a trained model must sample both
modes; given the first actions of one ramp it must continue that ramp. A model that ignored the prefix would
still split about half and half (the control).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from edge_vla.config import VLAConfig
from edge_vla.errors import ConfigError
from edge_vla.export.model import VLA, fake_inputs

H, D = 8, 2
RAMP = torch.linspace(0.2, 1.0, H)


def _config(rtc_max_delay: int) -> VLAConfig:
    return VLAConfig(preset="tiny", image_size=16, patch_size=8, width=32, depth=1, heads=2, expert_width=48,
                     expert_depth=2, expert_heads=2, max_text_len=24, chunk_len=H, action_dim=D, state_dim=2,
                     rtc_max_delay=rtc_max_delay, num_steps=10).validate()


def _chunks(sign: torch.Tensor) -> torch.Tensor:
    """[B] of +-1 -> [B, H, D]: dim 0 ramps up or down, dim 1 the opposite."""
    ramp = sign.view(-1, 1) * RAMP.view(1, -1)
    return torch.stack([ramp, -0.5 * ramp], dim=-1)


def _mode(chunks: torch.Tensor, start: int) -> torch.Tensor:
    """+1 / -1: which ramp the generated part of each chunk follows."""
    return torch.sign(chunks[:, start:, 0].mean(dim=1))


@pytest.fixture(scope="module")
def trained() -> VLA:
    torch.manual_seed(0)
    model = VLA(_config(rtc_max_delay=3))
    obs = fake_inputs(model.config, batch=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    batch = 128
    images, tokens, state = (obs[k].expand(batch, *obs[k].shape[1:]) for k in ("images", "tokens", "state"))
    for _ in range(400):
        sign = torch.randint(0, 2, (batch,)).float() * 2 - 1
        loss = model.flow_loss(images, tokens, state, _chunks(sign))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _sample(model: VLA, n: int, prefix: torch.Tensor | None = None, seed: int = 1) -> torch.Tensor:
    obs = fake_inputs(model.config, batch=1)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, H, D, generator=g)
    return model.sample(*(obs[k].expand(n, *obs[k].shape[1:]) for k in ("images", "tokens", "state")), noise,
                        prefix=prefix)


def test_the_prefix_decides_the_mode_the_rest_of_the_chunk_follows(trained: VLA) -> None:
    n = 200
    free = _mode(_sample(trained, n), 0)
    up = (free > 0).float().mean().item()
    assert 0.25 < up < 0.75, f"without a prefix the model should sample both ramps, got {up:.2f} up"  # control
    for sign in (1.0, -1.0):
        for d in (1, 2, 3):
            prefix = _chunks(torch.full((n,), sign))[:, :d]
            out = _sample(trained, n, prefix)
            assert torch.equal(out[:, :d], prefix.to(out.dtype)), "the given actions come back unchanged"
            agree = (_mode(out, d) == sign).float().mean().item()
            assert agree > 0.95, f"prefix of {d} from the {sign:+.0f} ramp: only {agree:.2f} continue it"
            # And the continuation is the ramp itself, not merely the right sign: far from the noise it came from.
            err = (out[:, d:] - _chunks(torch.full((n,), sign))[:, d:]).abs().median().item()
            assert err < 0.15, f"continuation off the ramp by {err:.3f} (median)"


def test_the_hand_over_is_continuous_with_the_prefix(trained: VLA) -> None:
    """The first generated action lies next to the last given one (what a hand-over at index d has to hide)."""
    n = 100
    prefix = _chunks(torch.ones(n))[:, :2]
    out = _sample(trained, n, prefix)
    step = (out[:, 2] - out[:, 1]).abs().median().item()
    assert step < 2 * float(RAMP[1] - RAMP[0]) + 0.05


def test_a_model_without_rtc_is_unchanged_and_refuses_a_prefix() -> None:
    cfg = _config(rtc_max_delay=0)
    torch.manual_seed(3)
    model = VLA(cfg)
    assert model.prefix_emb is None and not any("prefix_emb" in k for k in model.state_dict())
    obs = fake_inputs(cfg, batch=4)
    actions = _chunks(torch.tensor([1.0, -1.0, 1.0, -1.0]))
    # The loss is the plain flow-matching loss, with the same random draws (noise, then t) as before RTC existed.
    torch.manual_seed(5)
    loss = model.flow_loss(obs["images"], obs["tokens"], obs["state"], actions)
    torch.manual_seed(5)
    x1 = model.normalize_actions(actions)
    x0 = torch.randn_like(x1)
    t = torch.rand(4)
    x_t = (1 - t.view(-1, 1, 1)) * x0 + t.view(-1, 1, 1) * x1
    expected = F.mse_loss(model.velocity(x_t, t, model.prefix_kv(obs["images"], obs["tokens"], obs["state"])), x1 - x0)
    assert torch.allclose(loss, expected)
    with pytest.raises(ValueError, match="not trained for real-time chunking"):
        _sample(model.eval(), 2, prefix=actions[:2, :1])


def test_bad_prefixes_and_configs_are_refused(trained: VLA) -> None:
    with pytest.raises(ValueError, match=r"d <= 3"):
        _sample(trained, 2, prefix=torch.zeros(2, 4, D))
    with pytest.raises(ValueError, match="expected"):
        _sample(trained, 2, prefix=torch.zeros(2, 1, D + 1))
    with pytest.raises(ConfigError, match="rtc_max_delay"):
        dataclasses.replace(_config(0), rtc_max_delay=H).validate()
    # An empty prefix is the same as none.
    assert torch.equal(_sample(trained, 3, prefix=torch.zeros(3, 0, D)), _sample(trained, 3))


# --- export and runtime -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("precision", "time_input"), [("fp32", "table"), ("fp16", "scalar")])
def test_an_exported_rtc_bundle_takes_the_prefix_in_the_runtime(trained: VLA, tmp_path, precision: str,
                                                                 time_input: str) -> None:
    """The step graph takes the prefix mask (declared by role and in the manifest's `rtc` block), the numerics
    gate covers prefix-given chunks, and Policy.infer(prefix=...) continues the ramp the prefix started."""
    import copy

    import numpy as np

    from edge_vla.bundle import Bundle
    from edge_vla.export.exporter import ExportOptions, export_model
    from edge_vla.runtime.policy import Policy
    from edge_vla.runtime.types import Observation

    result = export_model(copy.deepcopy(trained), tmp_path / "b", ExportOptions(precision=precision,
                                                                              time_input=time_input))
    assert result.numerics.passed and "rtc_chunk" in result.numerics.graphs, result.numerics.summary()
    manifest = Bundle.open(result.bundle).manifest
    assert manifest["rtc"]["max_delay"] == 3 and manifest["rtc"]["mask_input"] == "prefix_mask"
    step = manifest["graphs"]["denoise_step"]
    assert {"name": "prefix_mask", "role": "prefix_mask"}.items() <= next(
        i for i in step["inputs"] if i["name"] == "prefix_mask").items()
    obs = fake_inputs(trained.config, batch=1)
    image = (obs["images"][0].permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
    observation = Observation(images=list(image), instruction="ramp", state=obs["state"][0].numpy())
    with Policy.load(result.bundle) as policy:
        assert policy.rtc_max_delay == 3
        free, agree = [], []
        for seed in range(40):
            policy.reset(seed)
            free.append(float(np.sign(policy.infer(observation).actions[:, 0].mean())))
            for sign in (1.0, -1.0):
                given = _chunks(torch.tensor([sign]))[0, :2].numpy()
                chunk = policy.infer(observation, prefix=given).actions
                assert np.array_equal(chunk[:2], given)
                agree.append(np.sign(chunk[2:, 0].mean()) == sign)
        assert 0.2 < np.mean(np.array(free) > 0) < 0.8  # control: without a prefix, both ramps
        assert np.mean(agree) > 0.9
        with pytest.raises(ConfigError, match="at most 3"):
            policy.infer(observation, prefix=np.zeros((4, D), np.float32))
        with pytest.raises(ConfigError, match=r"shape \[d, 2\]"):
            policy.infer(observation, prefix=np.zeros((2, 3), np.float32))


def test_hold_prefixes_train_the_start_from_rest() -> None:
    """A `hold` prefix (the arm waits d actions, as while the first chunk is computed) comes with the plan delayed
    by d as the target: captured from the velocity call at t = 1, where x_t is the target itself."""
    torch.manual_seed(0)
    model = VLA(_config(rtc_max_delay=3))
    seen: dict[str, torch.Tensor] = {}

    def capture(x_t, t, kv, mask=None):  # type: ignore[no-untyped-def]
        seen["x_t"], seen["mask"] = x_t.detach(), mask.detach()
        return torch.zeros_like(x_t, requires_grad=True)

    model.velocity = capture  # type: ignore[method-assign]
    b = 64
    obs = fake_inputs(model.config, batch=b)
    plan = _chunks(torch.ones(b))
    hold = torch.full((b, D), 0.05)
    x1 = model.normalize_actions(plan)
    kv = model.prefix_kv(obs["images"], obs["tokens"], obs["state"])
    model.prefix_flow_loss(torch.zeros_like(x1), x1, x1, torch.ones(b), kv, model.normalize_actions(hold), 1.0)
    x_t, mask = seen["x_t"], seen["mask"]
    for i in range(b):
        d = int(mask[i].sum())
        assert torch.allclose(x_t[i, :d], model.normalize_actions(hold[i]).expand(d, D))
        assert torch.allclose(x_t[i, d:], x1[i, : H - d])  # the same plan, d actions later
    assert {int(m.sum()) for m in mask} == {0, 1, 2, 3}
    # Control: hold_fraction 0 leaves the targets as they are.
    model.prefix_flow_loss(torch.zeros_like(x1), x1, x1, torch.ones(b), kv, model.normalize_actions(hold), 0.0)
    assert torch.equal(seen["x_t"], x1)
