"""Knowledge distillation (teacher -> small student) and step distillation (10 ODE steps -> 1-2).

Stage 1, knowledge distillation (DAgger-style):
  round 0  targets from the teacher on the dataset's observations;
  round r  targets from the teacher on the observations visited in closed loop by a mixture of
           teacher and student (round 1: the teacher alone, then the student acts more each round);
  each round trains the student on everything gathered so far, with
    - flow matching on the teacher's action chunks (fresh noise), and
    - velocity matching: the student's velocity at the teacher's own Euler path points (x_t, t)
      against the teacher's velocity there. Students and teachers have different prefixes, so
      outputs are matched, never internals;
    - where every observation knows where the named block is (sim data), the same goal-location
      auxiliary loss as `edge-vla train` (the student's training-only goal head): without it the tiny
      conv student learns the task from behaviour cloning about as badly as from scratch (README).
Stage 2, step distillation by reflow: the teacher's 10-step sampler maps noise x_0 to x_1; the
  student is fine-tuned on the straight paths between those pairs, so 1-2 Euler steps suffice.
  Reflow keeps the network signature velocity(x_t, t, prefix_kv) unchanged, so the ONNX export and
  the runtime's ODE loop need nothing new (a shortcut model would need a step-size input).

Scale-out: see distributed.py (torchrun sets RANK/WORLD_SIZE; nothing here changes).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edge_vla.config import VLAConfig
from edge_vla.errors import ConfigError, EdgeVlaError
from edge_vla.progress import progress as progress_bar
from edge_vla.runtime.flow import REFERENCE_FLOW, integrate
from edge_vla.runtime.types import Observation
from edge_vla.sim.dataset import Dataset
from edge_vla.sim.env import ReachEnv
from edge_vla.sim.evaluate import EXECUTE, check_execute

from .checkpoint import save_checkpoint
from .distributed import DistContext, init_from_env
from .model import VLA
from .teacher import FlowTeacher, ObsBatch, Teacher, Tokens, VLATeacher, has_velocity
from .train import NonFiniteLossError, TrainConfig, describe_batch, lr_at, non_finite_message

log = logging.getLogger(__name__)

# Closed-loop collection seeds: disjoint from training data (0..) and held-out evaluation (1_000_000..).
DAGGER_SEED_BASE = 2_000_000


class DistillError(EdgeVlaError):
    """Distillation cannot run as configured."""


@dataclass
class DistillConfig:
    steps: int = 1500                # knowledge-distillation optimizer steps, over all rounds
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup: int = 100
    velocity_weight: float = 1.0     # 0 disables velocity matching (it is skipped for non-flow teachers)
    samples_per_obs: int = 1         # teacher samples (noise draws) per observation
    dagger_rounds: int = 1           # closed-loop collection rounds after the dataset round
    dagger_episodes: int = 20        # episodes per round (split across ranks)
    dagger_beta: float = 0.5         # teacher's share of chunks decays as beta ** (round - 1)
    execute: int = EXECUTE           # actions executed per chunk in closed loop (as in evaluation)
    reflow_steps: int = 0            # step-distillation optimizer steps (0: skip)
    reflow_lr: float = 5e-4
    fast_steps: int = 2              # ODE steps the step-distilled student is configured for
    max_obs: int | None = None       # cap on dataset observations (None: all)
    goal_weight: float = 0.5         # goal-location auxiliary loss where the pool has goals (0: off)
    target_batch: int = 256          # teacher batch size while generating targets
    split: str = "base"              # the sim split DAgger rolls out in (the dataset's, see distill_cli)
    seed: int = 0
    threads: int | None = None
    device: str = "auto"


@dataclass
class ObsPool:
    """Observations kept compact (uint8 images) and turned into float ObsBatches per minibatch."""

    images: np.ndarray          # uint8 [N, C, S, S, 3]
    instructions: list[str]
    states: np.ndarray          # float32 [N, state_dim]
    goals: np.ndarray | None = None  # float32 [N, 2] where the named block is (metres), if known for every row

    def __len__(self) -> int:
        return len(self.states)

    def batch(self, idx: Iterable[int] | np.ndarray) -> ObsBatch:
        ids = np.asarray(list(idx) if not isinstance(idx, np.ndarray) else idx, dtype=np.int64)
        return ObsBatch.from_arrays(self.images[ids], [self.instructions[i] for i in ids], self.states[ids])

    def goal_batch(self, idx: np.ndarray) -> Tensor | None:
        return None if self.goals is None else torch.from_numpy(self.goals[np.asarray(idx, dtype=np.int64)])

    def subset(self, idx: Iterable[int]) -> ObsPool:
        ids = np.asarray(list(idx), dtype=np.int64)
        return ObsPool(self.images[ids], [self.instructions[i] for i in ids], self.states[ids],
                       None if self.goals is None else self.goals[ids])

    def extend(self, other: ObsPool) -> ObsPool:
        # Goals survive only if both parts know them: a partly-known goal loss would bias the batches.
        goals = None if self.goals is None or other.goals is None else np.concatenate([self.goals, other.goals])
        return ObsPool(np.concatenate([self.images, other.images]), self.instructions + other.instructions,
                       np.concatenate([self.states, other.states]), goals)

    @staticmethod
    def from_dataset(ds: Dataset, max_obs: int | None = None, seed: int = 0) -> ObsPool:
        n = len(ds)
        ids = np.arange(n) if not max_obs or max_obs >= n else np.sort(
            np.random.default_rng(seed).choice(n, max_obs, replace=False))
        goals = None if ds.goals is None else ds.goals[ids].astype(np.float32)
        return ObsPool(ds.images[ids], [str(s) for s in ds.instructions[ids]], ds.states[ids].astype(np.float32),
                       goals)

    @staticmethod
    def from_observations(observations: list[Observation], num_cameras: int,
                          goals: np.ndarray | None = None) -> ObsPool:
        return ObsPool(np.stack([np.stack(o.images[:num_cameras]) for o in observations]),
                       [o.instruction for o in observations],
                       np.stack([np.asarray(o.state, dtype=np.float32) for o in observations]),
                       None if goals is None else np.asarray(goals, dtype=np.float32))


@dataclass
class Targets:
    """Teacher outputs in the student's normalized action space, one row per (observation, noise)."""

    obs_index: Tensor                 # long [M] into the ObsPool
    noise: Tensor                     # [M, H, D] x_0
    actions: Tensor                   # [M, H, D] the teacher's x_1 from that x_0
    path_x: Tensor | None = None      # [M, K, H, D] the teacher's Euler path points x_{t_k}
    path_v: Tensor | None = None      # [M, K, H, D] the teacher's velocity there
    path_t: Tensor | None = None      # [K] t_k = k / K

    def __len__(self) -> int:
        return int(self.obs_index.shape[0])

    def extend(self, other: Targets) -> Targets:
        def cat(a: Tensor | None, b: Tensor | None) -> Tensor | None:
            return None if a is None or b is None else torch.cat([a, b])

        return Targets(torch.cat([self.obs_index, other.obs_index]), torch.cat([self.noise, other.noise]),
                       torch.cat([self.actions, other.actions]), cat(self.path_x, other.path_x),
                       cat(self.path_v, other.path_v), self.path_t)


@torch.no_grad()
def generate_targets(teacher: Teacher, pool: ObsPool, action_mean: Tensor, action_std: Tensor,
                     samples_per_obs: int = 1, seed: int = 0, batch_size: int = 256, index_offset: int = 0,
                     with_path: bool = True, progress: bool = False) -> Targets:
    """Run the teacher on every observation in `pool` from seeded noise; record its Euler path if it has one."""
    gen = torch.Generator().manual_seed(seed)
    flow = with_path and has_velocity(teacher)
    rows: dict[str, list[Tensor]] = {"i": [], "x0": [], "x1": [], "px": [], "pv": []}
    order = np.repeat(np.arange(len(pool)), samples_per_obs)
    path_t = None
    for start in progress_bar(range(0, len(order), batch_size), desc="teacher targets", unit="batch",
                              enabled=progress):
        ids = order[start:start + batch_size]
        obs = pool.batch(ids)
        x0 = torch.randn(len(ids), teacher.chunk_len, teacher.action_dim, generator=gen)
        if flow:
            assert isinstance(teacher, FlowTeacher)
            x1_phys, px, pv, path_t = _teacher_path(teacher, obs, x0)
            # Velocities are compared in the student's space: rescale if the normalizations differ.
            scale = (teacher.action_std.cpu() / action_std).view(1, 1, 1, -1)
            rows["px"].append(_renorm(px, teacher, action_mean, action_std))
            rows["pv"].append(pv * scale)
        else:
            x1_phys = teacher.act(obs, x0).cpu().float()
        rows["i"].append(torch.as_tensor(ids + index_offset))
        rows["x0"].append(x0)
        rows["x1"].append((x1_phys - action_mean) / action_std)
    return Targets(torch.cat(rows["i"]), torch.cat(rows["x0"]), torch.cat(rows["x1"]),
                   torch.cat(rows["px"]) if flow else None, torch.cat(rows["pv"]) if flow else None, path_t)


def _teacher_path(teacher: FlowTeacher, obs: ObsBatch, x0: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The teacher's Euler path (flow t: 0 -> 1, the FlowTeacher convention): every (x_t, v) it visits."""
    ctx = teacher.encode(obs)
    dev = teacher.action_mean.device
    k = teacher.num_steps
    xs: list[Tensor] = []
    vs: list[Tensor] = []

    def velocity(x: Tensor, t: float) -> Tensor:
        return teacher.velocity(ctx, x, torch.full((x.shape[0],), t, device=dev))

    def record(_step: int, _stage: int, x: Tensor, _t: float, v: Tensor) -> None:
        xs.append(x.cpu())
        vs.append(v.cpu())

    x = integrate(velocity, x0.to(dev), REFERENCE_FLOW, k, "euler", record)
    phys = (x * teacher.action_std + teacher.action_mean).cpu()
    path_t = torch.from_numpy(REFERENCE_FLOW.half_grid(k)[0:-1:2]).float()  # t_i = i / k
    return phys, torch.stack(xs, 1), torch.stack(vs, 1), path_t


def _renorm(x_teacher: Tensor, teacher: FlowTeacher, mean: Tensor, std: Tensor) -> Tensor:
    """A point in the teacher's normalized space -> the same physical point in the student's."""
    phys = x_teacher * teacher.action_std.cpu() + teacher.action_mean.cpu()
    return (phys - mean) / std


class StudentObjective(nn.Module):
    """The student's training loss as a module's forward, so DistributedDataParallel can sync its gradients."""

    def __init__(self, student: VLA) -> None:
        super().__init__()
        self.student = student

    def forward(self, images: Tensor, tokens: Tensor, state: Tensor, actions: Tensor, noise: Tensor, t: Tensor,
                path_x: Tensor | None = None, path_t: Tensor | None = None, path_v: Tensor | None = None,
                velocity_weight: float = 0.0, goals: Tensor | None = None,
                goal_weight: float = 0.0) -> tuple[Tensor, dict[str, float]]:
        s = self.student
        prefix = s.embed_prefix(images, tokens, state)
        kv = torch.stack([blk.prefix_kv(prefix) for blk in s.expert])  # computed once, used by every term
        tt = t.view(-1, 1, 1)
        x_t = (1 - tt) * noise + tt * actions
        if s.config.rtc_max_delay > 0:  # real-time chunking: a random clean prefix, loss on the rest (VLA.flow_loss)
            loss = loss_a = s.prefix_flow_loss(noise, actions, x_t, t, kv)
        else:
            loss = loss_a = F.mse_loss(s.velocity(x_t, t, kv), actions - noise)
        stats = {"action": float(loss_a.detach())}
        if goals is not None and goal_weight > 0 and s.goal is not None:
            # As in VLA.flow_loss: table-normalised units, so the term is O(1) like the flow loss.
            loss_g = F.mse_loss(s.goal(prefix.mean(dim=1)), (goals - 0.5) / 0.25)
            stats["goal"] = float(loss_g.detach())
            loss = loss + goal_weight * loss_g
        if path_x is None or path_v is None or path_t is None or velocity_weight <= 0:
            return loss, stats
        loss_v = F.mse_loss(s.velocity(path_x, path_t, kv), path_v)
        stats["velocity"] = float(loss_v.detach())
        return loss + velocity_weight * loss_v, stats


def rollout_observations(act: Callable[[Observation], np.ndarray], seeds: Iterable[int], image_size: int,
                         num_cameras: int, execute: int = EXECUTE) -> list[Observation]:
    """Every observation a policy visits in closed loop on the given seeded episodes."""
    return rollout_with_goals(act, seeds, image_size, num_cameras, execute)[0]


def rollout_with_goals(act: Callable[[Observation], np.ndarray], seeds: Iterable[int], image_size: int,
                       num_cameras: int, execute: int = EXECUTE, split: str = "base") -> tuple[list[Observation], np.ndarray]:
    """rollout_observations, plus where the named block was in each of them ([N, 2] metres)."""
    check_execute(execute)
    env = ReachEnv(image_size=image_size, num_cameras=num_cameras, split=split)
    seen: list[Observation] = []
    goals: list[np.ndarray] = []
    for seed in seeds:
        obs = env.reset(seed)
        goal = np.asarray(env.scene.target_xy, dtype=np.float32)
        done = False
        while not done:
            seen.append(obs)
            chunk = np.asarray(act(obs), dtype=np.float32)
            for a in chunk[:execute]:
                obs, _, done = env.step(a)
                if done:
                    break
                seen.append(obs)
            # The last observation appended before replanning is the next chunk's input; drop the duplicate.
            if not done:
                seen.pop()
        goals.extend([goal] * (len(seen) - len(goals)))
    return seen, np.stack(goals) if goals else np.zeros((0, 2), np.float32)


def chunk_policy(teacher: Teacher, num_cameras: int, seed: int = 0) -> Callable[[Observation], np.ndarray]:
    gen = torch.Generator().manual_seed(seed)

    def act(obs: Observation) -> np.ndarray:
        noise = torch.randn(1, teacher.chunk_len, teacher.action_dim, generator=gen)
        return teacher.act(ObsBatch.from_observations([obs], num_cameras), noise)[0].cpu().numpy()

    return act


def mixed_policy(teacher_act: Callable[[Observation], np.ndarray], student_act: Callable[[Observation], np.ndarray],
                 beta: float, seed: int) -> Callable[[Observation], np.ndarray]:
    """DAgger's mixture: each chunk comes from the teacher with probability beta, else from the student."""
    rng = np.random.default_rng(seed)
    return lambda obs: teacher_act(obs) if rng.random() < beta else student_act(obs)


@dataclass
class DistillResult:
    student: VLA                       # knowledge-distilled (runs at the teacher's step count)
    fast_student: VLA | None = None    # after step distillation (configured for cfg.fast_steps)
    history: list[dict[str, float]] = field(default_factory=list)
    observations: int = 0
    targets: int = 0


class Distiller:
    """Holds the observation pool and the teacher targets gathered so far; trains the student on them."""

    def __init__(self, teacher: Teacher, student: VLA, pool: ObsPool, cfg: DistillConfig,
                 ctx: DistContext | None = None, progress: bool = True) -> None:
        self.teacher, self.student, self.cfg = teacher, student, cfg
        self.ctx = ctx or DistContext()
        self.progress = progress and self.ctx.is_main
        scfg = student.config
        if pool.images.shape[1] < scfg.num_cameras or pool.images.shape[2] != scfg.image_size:
            raise ConfigError(f"observations are {pool.images.shape[1]} camera(s) at {pool.images.shape[2]}px, "
                              f"the student needs {scfg.num_cameras} at {scfg.image_size}px; regenerate the data "
                              f"with `edge-vla make-data --image-size {scfg.image_size}`")
        if (teacher.chunk_len, teacher.action_dim) != (scfg.chunk_len, scfg.action_dim):
            raise ConfigError(f"teacher chunks are {teacher.chunk_len}x{teacher.action_dim}, the student's "
                              f"{scfg.chunk_len}x{scfg.action_dim}; give the student the teacher's chunk_len "
                              "and action_dim")
        self.pool = pool.subset(self.ctx.shard(len(pool)))  # each rank labels and trains on its shard
        self.tokens = Tokens(scfg.max_text_len)
        self.gen = torch.Generator().manual_seed(cfg.seed + 7919 * self.ctx.rank)
        self.targets: Targets | None = None
        self.history: list[dict[str, float]] = []
        self._last_batch: tuple[Tensor, Tensor] = (torch.zeros(0, dtype=torch.long), torch.zeros(0))
        self._norm(pool)

    def _norm(self, pool: ObsPool) -> None:
        """Student normalization: the teacher's action space when it has one (velocities then compare
        directly), else the data's; state statistics from the observations."""
        s = self.student
        with torch.no_grad():
            if isinstance(self.teacher, FlowTeacher):
                s.action_mean.copy_(self.teacher.action_mean.detach().cpu())
                s.action_std.copy_(self.teacher.action_std.detach().cpu())
            # From the whole pool, not this rank's shard, so every rank normalizes alike.
            s.state_mean.copy_(torch.from_numpy(pool.states.mean(0)))
            s.state_std.copy_(torch.from_numpy(pool.states.std(0) + 1e-6))

    # --- targets ---------------------------------------------------------------------------------------
    def add_observations(self, pool: ObsPool, seed: int) -> int:
        offset = len(self.pool) if self.targets is not None else 0
        if self.targets is not None:
            self.pool = self.pool.extend(pool)
        s = self.student
        fit_norm = not isinstance(self.teacher, FlowTeacher) and self.targets is None
        mean, std = s.action_mean.detach().cpu(), s.action_std.detach().cpu()
        if fit_norm:  # generate in physical units, then fit the student's action normalization on them
            mean, std = torch.zeros_like(mean), torch.ones_like(std)
        new = generate_targets(self.teacher, pool, mean, std, self.cfg.samples_per_obs, seed, self.cfg.target_batch,
                               offset, with_path=self.cfg.velocity_weight > 0, progress=self.progress)
        if fit_norm:
            flat = new.actions.reshape(-1, new.actions.shape[-1])
            s.action_mean.copy_(flat.mean(0))
            s.action_std.copy_(flat.std(0) + 1e-6)
            new.actions = (new.actions - s.action_mean.cpu()) / s.action_std.cpu()
        self.targets = new if self.targets is None else self.targets.extend(new)
        return len(new)

    def collect_closed_loop(self, round_idx: int) -> int:
        """Round r >= 1: the teacher acts with probability beta ** (r - 1); the teacher labels every state."""
        cfg, scfg = self.cfg, self.student.config
        beta = cfg.dagger_beta ** (round_idx - 1)
        episodes = self.ctx.shard(cfg.dagger_episodes)
        seeds = [DAGGER_SEED_BASE + 10_000 * round_idx + i for i in episodes]
        seed = cfg.seed + 1000 * round_idx + self.ctx.rank
        teacher_act = chunk_policy(self.teacher, scfg.num_cameras, seed)
        student_act = chunk_policy(VLATeacher(copy.deepcopy(self.student).eval()), scfg.num_cameras, seed)
        act = teacher_act if beta >= 1.0 else mixed_policy(teacher_act, student_act, beta, seed)
        visited, goals = rollout_with_goals(act, seeds, scfg.image_size, scfg.num_cameras, cfg.execute, cfg.split)
        if not visited:
            return 0
        log.info("DAgger round %d (teacher share %.2f): %d states from %d episodes", round_idx, beta, len(visited),
                 len(seeds))
        return self.add_observations(ObsPool.from_observations(visited, scfg.num_cameras, goals), seed)

    # --- training --------------------------------------------------------------------------------------
    def _batch(self, targets: Targets, bs: int, device: torch.device) -> tuple[ObsBatch, Tensor]:
        rows = torch.randint(0, len(targets), (bs,), generator=self.gen)
        obs = self.pool.batch(targets.obs_index[rows].numpy())
        self._last_batch = (targets.obs_index[rows], obs.state)  # named if this batch's loss is not finite
        return obs.to(device), rows

    def _goal_kw(self, targets: Targets, rows: Tensor, device: torch.device) -> dict:
        goals = self.pool.goal_batch(targets.obs_index[rows].numpy())
        if goals is None or self.cfg.goal_weight <= 0 or self.student.goal is None:
            return {}
        return {"goals": goals.to(device), "goal_weight": self.cfg.goal_weight}

    def _inputs(self, obs: ObsBatch) -> tuple[Tensor, Tensor, Tensor]:
        n = self.student.config.num_cameras
        return obs.images[:, :n], self.tokens(obs.instructions, obs.state.device), obs.state

    def _fit(self, steps: int, start: int, total: int, lr: float, step_fn: Callable[[int], tuple[Tensor, dict]],
             opt: torch.optim.Optimizer, desc: str) -> None:
        tc = TrainConfig(steps=total, lr=lr, warmup=min(self.cfg.warmup, max(1, total // 10)))
        bar = progress_bar(range(start, start + steps), desc=desc, unit="step", enabled=self.progress)
        for step in bar:
            for g in opt.param_groups:
                g["lr"] = lr_at(step, tc)
            loss, stats = step_fn(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            # Checked after backward: under DDP the gradient norm is the same on every rank, so all stop together.
            grad_norm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
            if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
                bar.close()
                rows, states = self._last_batch
                raise NonFiniteLossError(non_finite_message(
                    f"distillation ({desc}) stopped at step {step + 1} of {total}", loss.detach().cpu(),
                    grad_norm.detach().cpu(), describe_batch(rows, None, states, None, "observations"),
                    "no student checkpoint was written", "lower --lr (--reflow-lr for reflow), or check the data and "
                    "the teacher for NaN/Inf"))
            opt.step()
            if step % 20 == 0:
                self.history.append({"step": step, "stage": desc, **stats})
                bar.set_postfix({k: f"{v:.4f}" for k, v in stats.items()})

    def train_kd(self, objective: nn.Module, opt: torch.optim.Optimizer, steps: int, start: int, total: int) -> None:
        if self.targets is None or steps <= 0:
            return
        targets, cfg, dev = self.targets, self.cfg, self.ctx.device
        use_v = targets.path_x is not None and cfg.velocity_weight > 0

        def step_fn(_: int) -> tuple[Tensor, dict]:
            obs, rows = self._batch(targets, cfg.batch_size, dev)
            actions = targets.actions[rows].to(dev)
            noise = torch.randn(actions.shape, generator=self.gen).to(dev)  # fresh: plain flow matching
            t = torch.rand(len(rows), generator=self.gen).to(dev)
            kw = self._goal_kw(targets, rows, dev)
            if use_v:
                assert targets.path_x is not None and targets.path_v is not None and targets.path_t is not None
                k = torch.randint(0, targets.path_x.shape[1], (len(rows),), generator=self.gen)
                kw |= {"path_x": targets.path_x[rows, k].to(dev), "path_v": targets.path_v[rows, k].to(dev),
                       "path_t": targets.path_t[k].float().to(dev), "velocity_weight": cfg.velocity_weight}
            return objective(*self._inputs(obs), actions, noise, t, **kw)

        self._fit(steps, start, total, cfg.lr, step_fn, opt, "distill")

    def reflow(self, objective: nn.Module, steps: int) -> None:
        """Straight paths between the teacher's (noise, action) pairs; t drawn half uniformly and half
        on the 1- and 2-step Euler grid {0, 0.5}, where a few-step sampler evaluates the field."""
        if self.targets is None:
            raise DistillError("reflow needs teacher targets; run knowledge distillation first")
        targets, cfg, dev = self.targets, self.cfg, self.ctx.device
        opt = torch.optim.AdamW(objective.parameters(), lr=cfg.reflow_lr, weight_decay=cfg.weight_decay)

        def step_fn(_: int) -> tuple[Tensor, dict]:
            obs, rows = self._batch(targets, cfg.batch_size, dev)
            n = len(rows)
            t = torch.rand(n, generator=self.gen)
            grid = torch.tensor([0.0, 0.5])[torch.randint(0, 2, (n,), generator=self.gen)]
            t = torch.where(torch.rand(n, generator=self.gen) < 0.5, grid, t)
            return objective(*self._inputs(obs), targets.actions[rows].to(dev), targets.noise[rows].to(dev), t.to(dev),
                             **self._goal_kw(targets, rows, dev))

        self._fit(steps, 0, steps, cfg.reflow_lr, step_fn, opt, "reflow")


def new_student(config: VLAConfig, seed: int = 0, init: VLA | None = None, goals: bool = False) -> VLA:
    """The student; with a training-only goal head only when every observation has a goal target (`goals`):
    a head without a gradient is a parameter that DistributedDataParallel refuses."""
    config = dataclasses.replace(config, goal_head=config.goal_head and goals)
    torch.manual_seed(seed)  # identical initial weights on every rank
    student = VLA(config)
    if init is not None:
        theirs = dataclasses.replace(init.config, goal_head=config.goal_head)
        if theirs != config:
            raise ConfigError(f"--student-init (preset {init.config.preset!r}) differs from the student "
                              f"({config.preset!r}): {'; '.join(theirs.differences(config))}; pass a checkpoint of the student's "
                              "configuration (the same preset, --set and data)")
        weights = {k: v for k, v in init.state_dict().items() if config.goal_head or not k.startswith("goal.")}
        student.load_state_dict(weights, strict=not (config.goal_head and init.goal is None))
    return student.train()


def distill(teacher: Teacher, student_config: VLAConfig, pool: ObsPool, cfg: DistillConfig,
            out: str | Path | None = None, student_init: VLA | None = None, progress: bool = True,
            ctx: DistContext | None = None, data_meta: dict | None = None) -> DistillResult:
    """Knowledge distillation with DAgger rounds, then optional reflow. Writes checkpoints when `out` is given:
    `out` holds the final student (step-distilled if cfg.reflow_steps > 0) and `<out>_kd` the
    knowledge-distilled one. Runs data-parallel when launched by torchrun. `data_meta` (the dataset's meta)
    goes into the checkpoints, so that an export of a student distilled on recorded data knows its action space."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    own_ctx = ctx is None
    ctx = ctx or init_from_env(cfg.device)
    try:
        return _distill(teacher, student_config, pool, cfg, out, student_init, progress, ctx, data_meta)
    finally:
        if own_ctx:
            ctx.close()


def _distill(teacher: Teacher, student_config: VLAConfig, pool: ObsPool, cfg: DistillConfig,
             out: str | Path | None, student_init: VLA | None, progress: bool, ctx: DistContext,
             data_meta: dict | None = None) -> DistillResult:
    t0 = time.perf_counter()
    goals = pool.goals is not None and cfg.goal_weight > 0
    student = new_student(student_config, cfg.seed, student_init, goals=goals).to(ctx.device)
    teacher_model = getattr(teacher, "model", None)  # VLATeacher and the π0 teacher hold a torch module
    if isinstance(teacher_model, nn.Module):
        teacher_model.to(ctx.device)
    d = Distiller(teacher, student, pool, cfg, ctx, progress)
    d.add_observations(d.pool, cfg.seed)
    objective = ctx.wrap(StudentObjective(student))
    opt = torch.optim.AdamW(objective.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    rounds = cfg.dagger_rounds + 1
    per_round = [cfg.steps // rounds + (1 if r < cfg.steps % rounds else 0) for r in range(rounds)]
    done = 0
    for r in range(rounds):
        if r > 0:
            student.eval()
            d.collect_closed_loop(r)
            student.train()
        d.train_kd(objective, opt, per_round[r], done, cfg.steps)
        done += per_round[r]
    student.eval()
    assert d.targets is not None
    n_obs, n_targets = int(ctx.all_mean(len(d.pool)) * ctx.world_size), int(ctx.all_mean(len(d.targets))
                                                                          * ctx.world_size)
    result = DistillResult(student=student, history=d.history, observations=n_obs, targets=n_targets)
    meta = {"distill": {**dataclasses.asdict(cfg), "observations": n_obs, "targets": n_targets,
                        "world_size": ctx.world_size, "teacher": type(teacher).__name__}}
    if data_meta is not None:
        meta["dataset"] = data_meta
    kd_copy = copy.deepcopy(student) if cfg.reflow_steps > 0 else student
    if cfg.reflow_steps > 0:
        student.train()
        d.reflow(objective, cfg.reflow_steps)
        student.eval()
        fast = VLA(dataclasses.replace(student.config, num_steps=cfg.fast_steps))
        fast.load_state_dict(student.state_dict())
        result.student, result.fast_student = kd_copy, fast.eval()
    meta["distill"]["seconds"] = time.perf_counter() - t0
    if out is not None and ctx.is_main:
        out = Path(out)
        if result.fast_student is not None:
            save_checkpoint(result.student.cpu(), out.with_name(out.name + "_kd"), meta=meta | {"stage": "kd"})
            save_checkpoint(result.fast_student.cpu(), out, meta=meta | {"stage": "reflow"})
        else:
            save_checkpoint(result.student.cpu(), out, meta=meta | {"stage": "kd"})
    ctx.barrier()
    return result


# --- evaluation helpers ------------------------------------------------------------------------------
@torch.no_grad()
def action_error(model: Teacher, teacher: Teacher, pool: ObsPool, seed: int = 0, batch_size: int = 256) -> float:
    """RMSE (physical units) between two policies' chunks from the same noise on the same observations."""
    gen = torch.Generator().manual_seed(seed)
    sq, n = 0.0, 0
    for start in range(0, len(pool), batch_size):
        obs = pool.batch(range(start, min(start + batch_size, len(pool))))
        noise = torch.randn(len(obs), teacher.chunk_len, teacher.action_dim, generator=gen)
        diff = model.act(obs, noise).cpu() - teacher.act(obs, noise).cpu()
        sq += float((diff ** 2).sum())
        n += diff.numel()
    return (sq / max(n, 1)) ** 0.5
