"""Distillation mechanics on a micro problem: a randomly initialized (perturbed) teacher, sim observations."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from edge_vla.config import preset
from edge_vla.errors import ConfigError, EdgeVlaError
from edge_vla.export.checkpoint import load_checkpoint, save_checkpoint
from edge_vla.export.distill import (
    DistillConfig,
    ObsPool,
    action_error,
    distill,
    generate_targets,
    new_student,
    rollout_observations,
    rollout_with_goals,
)
from edge_vla.export.model import VLA
from edge_vla.export.teacher import FlowTeacher, FunctionTeacher, ObsBatch, Teacher, VLATeacher
from edge_vla.sim import dataset

MICRO = dict(image_size=16, patch_size=8, mlp_ratio=2, chunk_len=8)
STUDENT = preset("tiny", width=32, depth=1, heads=2, expert_width=32, expert_depth=1, expert_heads=2, **MICRO)
TEACHER = preset("small", width=48, depth=2, heads=2, expert_width=48, expert_depth=2, expert_heads=2, **MICRO)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py: two loaded cores


@pytest.fixture(scope="module")
def pool() -> ObsPool:
    return ObsPool.from_dataset(dataset.generate(range(4), image_size=16))


@pytest.fixture(scope="module")
def heldout() -> ObsPool:
    return ObsPool.from_dataset(dataset.generate(range(100, 102), image_size=16))


@pytest.fixture(scope="module")
def teacher(pool: ObsPool) -> VLATeacher:
    """A random teacher whose velocity depends on x_t, t and the observation (adaLN-zero init would give v = 0)."""
    torch.manual_seed(1)
    model = VLA(TEACHER)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
        model.state_mean.copy_(torch.from_numpy(pool.states.mean(0)))
        model.state_std.copy_(torch.from_numpy(pool.states.std(0)))
        model.action_mean.fill_(0.5)
        model.action_std.fill_(0.3)
    return VLATeacher(model.eval())


@pytest.fixture(scope="module")
def distilled(teacher: VLATeacher, pool: ObsPool):
    cfg = DistillConfig(steps=120, batch_size=32, lr=3e-3, warmup=10, dagger_rounds=1, dagger_episodes=2,
                        samples_per_obs=2, reflow_steps=100, reflow_lr=2e-3, fast_steps=1, device="cpu")
    return distill(teacher, STUDENT, pool, cfg, progress=False)


def test_protocols() -> None:
    vla = VLATeacher(VLA(STUDENT))
    fn = FunctionTeacher(lambda obs, noise: torch.zeros(len(obs), 8, 2), chunk_len=8, action_dim=2)
    assert isinstance(vla, FlowTeacher) and isinstance(vla, Teacher)
    assert isinstance(fn, Teacher) and not isinstance(fn, FlowTeacher)


def test_targets_follow_the_teacher_path(teacher: VLATeacher, pool: ObsPool) -> None:
    small = pool.subset(range(6))
    tg = generate_targets(teacher, small, teacher.action_mean, teacher.action_std, samples_per_obs=2, seed=3)
    assert len(tg) == 12 and tg.path_x is not None and tg.path_v is not None
    assert tg.path_x.shape == (12, TEACHER.num_steps, 8, 2)
    # The recorded path is the teacher's own Euler integration: its end is the recorded action.
    end = tg.path_x[:, -1] + tg.path_v[:, -1] / TEACHER.num_steps
    assert torch.allclose(end, tg.actions, atol=1e-5)
    obs = small.batch(tg.obs_index[:4].numpy())
    phys = teacher.act(obs, tg.noise[:4])
    assert torch.allclose((phys - teacher.action_mean) / teacher.action_std, tg.actions[:4], atol=1e-4)


def test_distillation_reduces_action_error(distilled, teacher: VLATeacher, pool: ObsPool, heldout: ObsPool) -> None:
    untrained = new_student(STUDENT, seed=0).eval()
    untrained.load_state_dict({**untrained.state_dict(), **{k: v for k, v in distilled.student.state_dict().items()
                                                             if k.endswith(("_mean", "_std"))}})
    before = action_error(VLATeacher(untrained), teacher, heldout)
    after = action_error(VLATeacher(distilled.student), teacher, heldout)
    assert after < 0.7 * before, (before, after)
    assert distilled.observations > len(pool)  # the DAgger round added visited states
    assert distilled.targets == 2 * distilled.observations  # samples_per_obs=2
    assert any("velocity" in h for h in distilled.history)


def test_step_distilled_one_step_is_closer_to_teacher(distilled, teacher: VLATeacher, heldout: ObsPool) -> None:
    assert distilled.fast_student is not None and distilled.fast_student.config.num_steps == 1
    kd_1 = action_error(VLATeacher(distilled.student, steps=1), teacher, heldout)
    fast_1 = action_error(VLATeacher(distilled.fast_student, steps=1), teacher, heldout)
    assert fast_1 < kd_1, (kd_1, fast_1)


def test_function_teacher_without_velocity(pool: ObsPool) -> None:
    target = torch.tensor([0.3, -0.2])
    fn = FunctionTeacher(lambda obs, noise: target.expand(len(obs), 8, 2) + 0.1 * obs.state[:, None, :],
                         chunk_len=8, action_dim=2)
    cfg = DistillConfig(steps=30, batch_size=16, warmup=5, dagger_rounds=0, device="cpu")
    res = distill(fn, STUDENT, pool, cfg, progress=False)
    assert not any("velocity" in h for h in res.history)
    assert torch.isfinite(res.student.action_std).all() and (res.student.action_std > 0).all()


def test_rollout_collects_every_visited_state() -> None:
    calls = []

    def hold(obs):
        calls.append(obs)
        return np.repeat(obs.state[None], 8, 0)

    seen = rollout_observations(hold, [5], image_size=16, num_cameras=1, execute=4)
    assert len(seen) == 30  # the episode times out after 30 steps; each state is recorded once
    assert len(calls) == 8 and all(any(c is s for s in seen) for c in calls)


def test_mismatched_chunks_are_refused(pool: ObsPool, teacher: VLATeacher) -> None:
    cfg = DistillConfig(steps=1, dagger_rounds=0, device="cpu")
    with pytest.raises(ConfigError, match="chunk_len"):
        distill(teacher, dataclasses.replace(STUDENT, chunk_len=4), pool, cfg, progress=False)
    with pytest.raises(EdgeVlaError, match="make-data"):
        distill(teacher, dataclasses.replace(STUDENT, image_size=32), pool, cfg, progress=False)


def test_checkpoints_round_trip(tmp_path, teacher: VLATeacher, pool: ObsPool) -> None:
    cfg = DistillConfig(steps=4, batch_size=8, warmup=1, dagger_rounds=0, reflow_steps=2, fast_steps=2, device="cpu")
    distill(teacher, STUDENT, pool.subset(range(20)), cfg, out=tmp_path / "student", progress=False)
    fast, meta = load_checkpoint(tmp_path / "student")
    kd, _ = load_checkpoint(tmp_path / "student_kd")
    assert fast.config.num_steps == 2 and kd.config.num_steps == STUDENT.num_steps
    assert meta["stage"] == "reflow" and meta["distill"]["reflow_steps"] == 2
    save_checkpoint(kd, tmp_path / "again")  # a distilled student is an ordinary checkpoint


def test_obs_batch_from_observations() -> None:
    seen = rollout_observations(lambda o: np.repeat(o.state[None], 8, 0), [1], 16, 1, execute=8)[:3]
    b = ObsBatch.from_observations(seen, num_cameras=1)
    assert b.images.shape == (3, 1, 3, 16, 16) and b.images.max() <= 1.0 and len(b) == 3


def test_student_init_must_match_and_is_loaded() -> None:
    init = VLA(STUDENT)
    with torch.no_grad():
        init.action_out.weight.fill_(0.5)
    assert torch.equal(new_student(STUDENT, init=init).action_out.weight, init.action_out.weight)
    with pytest.raises(ConfigError, match="student-init"):
        new_student(STUDENT, init=VLA(dataclasses.replace(STUDENT, expert_depth=2)))


def test_goal_loss_trains_the_student_goal_head_where_data_has_goals(distilled, pool: ObsPool) -> None:
    # The sim's pool knows where the named block is, and the DAgger round's rollouts record it too.
    assert pool.goals is not None and pool.goals.shape == (len(pool), 2)
    assert distilled.student.goal is not None
    goal_losses = [h["goal"] for h in distilled.history if h.get("stage") == "distill"]
    assert len(goal_losses) >= 3 and goal_losses[-1] < goal_losses[0], goal_losses


def test_no_goal_head_without_goals(pool: ObsPool) -> None:
    fn = FunctionTeacher(lambda obs, noise: torch.zeros(len(obs), 8, 2) + 0.1 * obs.state[:, None, :],
                         chunk_len=8, action_dim=2)
    blind = dataclasses.replace(pool, goals=None)
    res = distill(fn, STUDENT, blind, DistillConfig(steps=4, batch_size=8, warmup=1, dagger_rounds=0, device="cpu"),
                  progress=False)
    assert res.student.goal is None and not any("goal" in h for h in res.history)
    # A partly known goal set is dropped rather than biasing the batches.
    assert pool.extend(blind).goals is None


def test_rollout_goals_are_the_named_block() -> None:
    seen, goals = rollout_with_goals(lambda o: np.repeat(o.state[None], 8, 0), [3, 4], 16, 1, execute=8)
    assert goals.shape == (len(seen), 2)
    from edge_vla.sim.env import ReachEnv

    env = ReachEnv(image_size=16, num_cameras=1)
    env.reset(4)
    assert np.allclose(goals[-1], env.scene.target_xy) and not np.allclose(goals[0], goals[-1])
