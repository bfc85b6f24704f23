"""π0 as a distillation teacher and a reduced π0 trained on the sim (small configs, offline, seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from pi0_tiny import TINY  # noqa: E402

from edge_vla import cli  # noqa: E402
from edge_vla.export.checkpoint import load_checkpoint  # noqa: E402
from edge_vla.export.distill import ObsPool, _teacher_path  # noqa: E402
from edge_vla.export.families import load_teacher  # noqa: E402
from edge_vla.export.pi0.checkpoint import open_pi0  # noqa: E402
from edge_vla.export.pi0.teacher import (  # noqa: E402
    Pi0FlowTeacher,
    Pi0Inputs,
    load_pi0_teacher,
    padded_dims_inert,
    pi0_chunk_flops,
)
from edge_vla.export.pi0.testing import make_checkpoint, tiny_pi0_config  # noqa: E402
from edge_vla.export.pi0.train import (  # noqa: E402
    GoalProbe,
    TrainData,
    flow_loss,
    init_checkpoint,
    sim_pi0_config,
    train_step,
)
from edge_vla.export.teacher import FlowTeacher, Teacher  # noqa: E402
from edge_vla.sim import dataset  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def sim_data(tmp_path_factory) -> Path:
    return dataset.save(dataset.generate(range(2)), tmp_path_factory.mktemp("data") / "reach.npz")


@pytest.fixture(scope="module")
def sim_pi0(tmp_path_factory, sim_data) -> Path:
    """A random reduced π0 as `edge-vla train --family pi0` initialises it (inert padded dims, sim processor)."""
    out = tmp_path_factory.mktemp("pi0") / "sim"
    init_checkpoint(dataset.load(sim_data), out, sim_pi0_config(**TINY))
    return out


def obs_batch(sim_data: Path, n: int = 3):
    return ObsPool.from_dataset(dataset.load(sim_data)).batch(range(0, 6 * n, 6))


def test_chunks_match_sample_actions_in_physical_units(sim_pi0, sim_data):
    """The adapter's chunk equals transformers' sampler fed independently built inputs and the same noise."""
    from transformers import PreTrainedTokenizerFast

    teacher = load_teacher(str(sim_pi0))
    assert isinstance(teacher, FlowTeacher) and teacher.chunk_len == 8 and teacher.action_dim == 2
    obs = obs_batch(sim_data)
    noise = torch.randn(len(obs), 8, 2, generator=torch.Generator().manual_seed(1))
    got = teacher.act(obs, noise)
    assert got.shape == (len(obs), 8, 2)

    proc = json.loads((sim_pi0 / "processor_config.json").read_text())
    tok = PreTrainedTokenizerFast.from_pretrained(sim_pi0)
    prompts = ["<image>" * 16 + tok.bos_token + s + "\n" for s in obs.instructions]
    text = tok(prompts, padding="max_length", max_length=16 + 48, return_tensors="pt")
    pixels = (obs.images * 255).round() / 255 * 2 - 1  # 64 px frames: no resize, (x / 255 - 0.5) / 0.5
    state = (obs.state - torch.tensor(proc["state_mean"])) / (torch.tensor(proc["state_std"]) + 1e-8)
    with torch.no_grad():
        ref = teacher.model.sample_actions(
            state=torch.nn.functional.pad(state, (0, 30)), input_ids=text["input_ids"], pixel_values=pixels,
            noise=torch.nn.functional.pad(noise, (0, 30)), attention_mask=text["attention_mask"],
            pixel_attention_mask=torch.ones(len(obs), 1, dtype=torch.bool))
    mean, std = torch.tensor(proc["actions_mean"]), torch.tensor(proc["actions_std"]) + 1e-8
    torch.testing.assert_close(got, ref[..., :2] * std + mean, atol=1e-5, rtol=1e-5)
    assert ref[..., 2:].abs().max() == 0  # inert padded dims stay exactly 0 along π0's sampler


def test_velocity_field_path_is_the_sampler(sim_pi0, sim_data):
    """Distillation integrates the teacher's velocity (t: 0 -> 1, edge-vla's convention); it lands on act()."""
    teacher = load_pi0_teacher(sim_pi0)
    obs = obs_batch(sim_data)
    x0 = torch.randn(len(obs), 8, 2, generator=torch.Generator().manual_seed(2))
    end, xs, vs, ts = _teacher_path(teacher, obs, x0)
    assert xs.shape == vs.shape == (len(obs), 10, 8, 2) and ts[0] == 0
    torch.testing.assert_close(end, teacher.act(obs, x0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xs[:, 0], x0)


def test_a_checkpoint_with_live_padded_dims_gives_chunks_only(tmp_path, sim_data):
    """A π0 that reads its padded dims (transformers' random init) is not offered as a velocity field."""
    path = make_checkpoint(tmp_path / "live", tiny_pi0_config(), num_cameras=1, state_dim=2, action_dim=2)
    teacher = load_pi0_teacher(path)
    assert not padded_dims_inert(teacher.model, 2)
    assert isinstance(teacher, Teacher) and not isinstance(teacher, FlowTeacher)
    out = teacher.act(obs_batch(sim_data, 2), torch.zeros(2, 8, 2))  # 64 px frames resized to its 56 px
    assert out.shape == (2, 8, 2) and torch.isfinite(out).all()


def test_distill_and_compare_cli_with_a_pi0_teacher(sim_pi0, sim_data, tmp_path):
    rc = cli.main(["distill", "--teacher", str(sim_pi0), "--student-preset", "tiny", "-o", str(tmp_path / "student"),
                   "--data", str(sim_data), "--max-obs", "8", "--steps", "2", "--batch-size", "4",
                   "--dagger-episodes", "1", "--reflow-steps", "1", "--threads", "1", "--device", "cpu"])
    assert rc == 0
    student, meta = load_checkpoint(tmp_path / "student")
    teacher = load_pi0_teacher(sim_pi0)
    assert (student.config.chunk_len, student.config.action_dim) == (8, 2)
    assert meta["distill"]["teacher"] == "Pi0FlowTeacher" and meta["stage"] == "reflow"
    torch.testing.assert_close(student.action_std, teacher.action_std)  # the teacher's action space is kept
    table = tmp_path / "table.md"
    rc = cli.main(["compare", "--teacher", str(sim_pi0), "--student", str(tmp_path / "student_kd"), "--fast-student",
                   str(tmp_path / "student"), "--episodes", "1", "--error-obs", "4", "-o", str(table)])
    assert rc == 0
    lines = table.read_text().splitlines()
    assert lines[2].startswith("| teacher π0 (10 steps) |") and "| 1.000x |" in lines[2]
    assert "reflow (1 step)" in table.read_text()


def test_chunk_flops_count_prefix_steps_and_attention(sim_pi0, sim_data):
    from torch.utils.flop_counter import FlopCounterMode

    teacher = load_pi0_teacher(sim_pi0)
    impl = teacher.model.config._attn_implementation
    obs = obs_batch(sim_data, 1)
    one, two = pi0_chunk_flops(teacher, obs, 1), pi0_chunk_flops(teacher, obs, 2)
    assert 0 < two - one < one  # a step costs something, less than the prefix
    assert teacher.model.config._attn_implementation == impl  # restored after counting
    with FlopCounterMode(display=False) as fc, torch.no_grad():  # torch's CPU SDPA kernel is not counted
        teacher.model.sample_actions(noise=torch.zeros(1, 8, 32), num_steps=1, **teacher.model_inputs(obs))
    assert one > fc.get_total_flops()  # eager attention's matmuls are


def test_train_steps_lower_the_loss_on_a_fixed_batch(tmp_path, sim_data):
    ds = dataset.load(sim_data)
    model = init_checkpoint(ds, tmp_path / "p", sim_pi0_config(**TINY))
    src = open_pi0(tmp_path / "p")
    data = TrainData(ds, Pi0Inputs(src, model, max_text_tokens=8), model.config)
    batch = data.batch(np.arange(0, 48, 6))
    g = torch.Generator().manual_seed(0)
    noise, t = torch.randn(batch["actions"].shape, generator=g), torch.rand(8, generator=g)
    model.train()
    before = float(flow_loss(model, batch, 2, noise, t).detach())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(8):
        train_step(model, opt, batch, 2, noise, t)
    after = float(flow_loss(model, batch, 2, noise, t).detach())
    assert after < 0.7 * before, (before, after)
    assert padded_dims_inert(model, 2)


def test_goal_probe_learns_where_the_named_block_is(tmp_path, sim_data):
    """The training-only probe reads the VLM's hidden states; training with it lowers its loss, and the flow
    loss still trains (the probe's gradient goes into the VLM, not around it)."""
    ds = dataset.load(sim_data)
    model = init_checkpoint(ds, tmp_path / "p", sim_pi0_config(**TINY))
    data = TrainData(ds, Pi0Inputs(open_pi0(tmp_path / "p"), model, max_text_tokens=8), model.config)
    idx = np.arange(0, 48, 6)
    batch, goals = data.batch(idx), data.goals(idx)
    assert goals is not None and goals.shape == (8, 2)
    probe = GoalProbe(model).train()
    model.train()
    opt = torch.optim.AdamW([*model.parameters(), *probe.parameters()], lr=1e-3)
    g = torch.Generator().manual_seed(0)
    noise, t = torch.randn(batch["actions"].shape, generator=g), torch.rand(8, generator=g)

    def goal_loss() -> float:
        with torch.no_grad():
            flow_loss(model, batch, 2, noise, t)
            return float(probe.loss(batch["attention_mask"], goals))

    before = goal_loss()
    for _ in range(8):
        train_step(model, opt, batch, 2, noise, t, probe=probe, goals=goals, goal_weight=1.0)
    assert goal_loss() < 0.7 * before
    opt.zero_grad(set_to_none=True)
    flow_loss(model, batch, 2, noise, t)
    probe.loss(batch["attention_mask"], goals).backward()  # the probe's term alone reaches the vision tower
    vision = model.model.vlm.vision_tower if hasattr(model.model.vlm, "vision_tower") else model.model.vlm
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in vision.parameters())
    with pytest.raises(RuntimeError, match="before a π0 forward"):
        probe.loss(batch["attention_mask"], goals)


def test_train_cli_writes_a_checkpoint_that_exports_evaluates_and_resumes(tmp_path, sim_data, capsys):
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    out = tmp_path / "pi0"
    args = ["train", "--family", "pi0", "--pi0-config", str(cfg), "--data", str(sim_data), "-o", str(out),
            "--batch-size", "4", "--threads", "1", "--checkpoint-every", "2"]
    assert cli.main([*args, "--steps", "2"]) == 0
    assert cli.main([*args, "--steps", "3", "--resume"]) == 0
    state = json.loads((out / "train_state.json").read_text())
    assert state["step"] == 3 and state["family"] == "pi0" and np.isfinite(state["loss"])
    assert (out / "goal_probe.pt").is_file()  # the sim data knows the goals; the probe resumes with the model
    assert isinstance(load_teacher(str(out)), Pi0FlowTeacher)

    assert cli.main(["export", str(out), "-o", str(tmp_path / "bundle")]) == 0
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["family"] == "pi0" and manifest["action_space"]["names"] == ["shoulder", "elbow"]
    assert manifest["control"]["action_period_s"] == pytest.approx(0.1)  # the sim's, from robot.json
    capsys.readouterr()
    assert cli.main(["evaluate", str(out), str(tmp_path / "bundle"), "--episodes", "1"]) == 0
    printed = capsys.readouterr().out
    assert "π0 checkpoint" in printed and "paired:" in printed


def test_config_sizes_and_bad_config():
    from edge_vla.errors import ConfigError
    from edge_vla.export.pi0.train import resolve_config

    wide = sim_pi0_config(**resolve_config("wide"))
    assert wide["vlm_config"]["text_config"]["hidden_size"] == 256
    assert wide["vlm_config"]["text_config"]["head_dim"] == wide["dit_config"]["head_dim"]  # the expert reads its K/V
    assert resolve_config(None) == resolve_config("reduced") == {}
    with pytest.raises(ConfigError, match="neither a size"):
        resolve_config("huge")


def test_pi0_family_refuses_recorded_data(tmp_path, capsys):
    assert cli.main(["train", "--family", "pi0", "--data", "lerobot:/nowhere", "-o", str(tmp_path / "x")]) == 1
    assert "sim datasets" in capsys.readouterr().err
