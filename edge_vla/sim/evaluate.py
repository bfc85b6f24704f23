"""Closed-loop evaluation: success rate with a Wilson confidence interval over seeded episodes.

Every contender runs the same episode seeds and, where it has a `reset(seed)` hook, the same noise
per episode, so two results can be compared pair by pair (`paired_difference`), which resolves far
smaller differences than two overlapping marginal intervals. `target_shift` renames the target to
another block of the same layout: success under a shifted instruction is the instruction sensitivity.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from edge_vla.errors import ConfigError
from edge_vla.runtime.types import Observation
from edge_vla.sim.env import ReachEnv
from edge_vla.sim.expert import expert_chunk
from edge_vla.sim.scene import JOINT_LOWER, JOINT_UPPER

# Held-out seeds start here; training data uses seeds below it.
EVAL_SEED_BASE = 1_000_000

ChunkPolicy = Callable[[Observation], np.ndarray]  # observation -> [H, action_dim] joint targets (rad)
Reseed = Callable[[int], None]  # restart a policy's noise stream for an episode seed


@dataclass(frozen=True)
class EvalResult:
    name: str
    episodes: int
    successes: int
    ci_low: float
    ci_high: float
    mean_steps: float
    seed_base: int = EVAL_SEED_BASE
    target_shift: int = 0
    outcomes: tuple[int, ...] = ()  # per episode, 1 = success, in seed order


    @property
    def success_rate(self) -> float:
        return self.successes / max(self.episodes, 1)

    def as_dict(self) -> dict:
        return {**asdict(self), "outcomes": list(self.outcomes), "success_rate": self.success_rate}

    def __str__(self) -> str:
        return (
            f"{self.name}: success {100 * self.success_rate:.1f}% "
            f"(95% CI {100 * self.ci_low:.1f}-{100 * self.ci_high:.1f}%, {self.successes}/{self.episodes}), "
            f"mean steps {self.mean_steps:.1f}"
        )


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


# Actions played from each chunk before the policy replans, unless a caller says otherwise.
EXECUTE = 4


def check_execute(execute: int) -> int:
    """`execute`, if a closed loop with it makes progress (0 actions per chunk would replan forever)."""
    if execute < 1:
        raise ConfigError(f"--execute {execute}: play at least 1 action per chunk")
    return execute


def evaluate(
    policy: ChunkPolicy,
    episodes: int = 50,
    seed_base: int = EVAL_SEED_BASE,
    image_size: int = 64,
    num_cameras: int = 1,
    execute: int = EXECUTE,
    name: str = "policy",
    env: ReachEnv | None = None,
    target_shift: int = 0,
    reseed: Reseed | None = None,
    split: str = "base",
) -> EvalResult:
    """Run `episodes` seeded episodes; each chunk's first `execute` actions run before replanning.

    `target_shift` k names block (target + k) mod (blocks in the scene) of the same layout instead of the
    sampled one; `reseed(seed)` is called before each episode (pass `Policy.reset`) so contenders share noise.
    `split` is the sim's split (ignored when `env` is given: the env's own)."""
    check_execute(execute)
    env = env or ReachEnv(image_size=image_size, num_cameras=num_cameras, split=split)
    outcomes, steps = [], []
    for i in range(episodes):
        seed = seed_base + i
        obs = env.reset(seed)
        assert env.scene is not None
        blocks = len(env.scene.block_colors)
        if target_shift % blocks:
            obs = env.reset(seed, target=(env.scene.target + target_shift) % blocks)
        if reseed is not None:
            reseed(seed)
        done = success = False
        while not done:
            chunk = np.asarray(policy(obs), dtype=np.float32)
            for action in chunk[:execute]:
                obs, success, done = env.step(action)
                if done:
                    break
        outcomes.append(int(success))
        steps.append(env.t)
    successes = sum(outcomes)
    lo, hi = wilson_interval(successes, episodes)
    return EvalResult(name, episodes, successes, lo, hi, float(np.mean(steps)) if steps else 0.0,
                      seed_base, target_shift, tuple(outcomes))


def evaluate_expert(episodes: int = 50, seed_base: int = EVAL_SEED_BASE, target_shift: int = 0,
                    split: str = "base") -> EvalResult:
    """The scripted expert reads the scene (which a learned policy cannot), so it gets the env."""
    env = ReachEnv(split=split)

    def act(obs: Observation) -> np.ndarray:
        assert env.scene is not None
        return expert_chunk(env.scene, obs.state, 8)

    return evaluate(act, episodes, seed_base, name="expert", env=env, target_shift=target_shift)


@dataclass(frozen=True)
class PairedDifference:
    """Success of `a` minus success of `b` on the same episodes, with a 95% CI for paired proportions."""

    a: str
    b: str
    episodes: int
    only_a: int  # episodes a solved and b did not
    only_b: int
    diff: float
    ci_low: float
    ci_high: float

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (f"{self.a} - {self.b}: {100 * self.diff:+.1f} points (paired 95% CI {100 * self.ci_low:+.1f} to "
                f"{100 * self.ci_high:+.1f}; discordant {self.only_a} vs {self.only_b} of {self.episodes})")


def paired_difference(a: EvalResult, b: EvalResult) -> PairedDifference:
    """Newcombe's hybrid score interval (method 10, Stat. Med. 1998) for a difference of paired proportions.

    It uses the Wilson interval of each rate and the correlation of the pairs, so two contenders that
    fail on the same hard episodes get a much tighter interval than their marginal intervals suggest."""
    if (a.seed_base, a.target_shift, a.episodes) != (b.seed_base, b.target_shift, b.episodes) or (
        len(a.outcomes) != a.episodes or len(b.outcomes) != b.episodes
    ):
        raise ValueError(f"{a.name!r} and {b.name!r} did not run the same episodes; evaluate both with the same "
                         "episodes, seed_base and target_shift")
    n = a.episodes
    x, y = np.asarray(a.outcomes, dtype=bool), np.asarray(b.outcomes, dtype=bool)
    both, only_a, only_b = int(np.sum(x & y)), int(np.sum(x & ~y)), int(np.sum(~x & y))
    neither = n - both - only_a - only_b
    p1, p2 = (both + only_a) / n, (both + only_b) / n
    l1, u1 = wilson_interval(both + only_a, n)
    l2, u2 = wilson_interval(both + only_b, n)
    margins = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    phi = (both * neither - only_a * only_b) / math.sqrt(margins) if margins else 0.0
    theta = p1 - p2
    lower = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    upper = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return PairedDifference(a.name, b.name, n, only_a, only_b, theta, max(-1.0, theta - lower), min(1.0, theta + upper))


def random_policy(seed: int = 0, chunk_len: int = 8) -> ChunkPolicy:
    rng = np.random.default_rng(seed)

    def act(obs: Observation) -> np.ndarray:
        return rng.uniform(JOINT_LOWER, JOINT_UPPER, size=(chunk_len, 2)).astype(np.float32)

    return act
