"""Closed-loop evaluation: success rate with a Wilson confidence interval over seeded episodes."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from edge_vla.runtime.types import Observation
from edge_vla.sim.env import ReachEnv
from edge_vla.sim.expert import expert_chunk
from edge_vla.sim.scene import JOINT_LOWER, JOINT_UPPER

# Held-out seeds start here; training data uses seeds below it.
EVAL_SEED_BASE = 1_000_000

ChunkPolicy = Callable[[Observation], np.ndarray]  # observation -> [H, action_dim] joint targets (rad)


@dataclass(frozen=True)
class EvalResult:
    name: str
    episodes: int
    successes: int
    ci_low: float
    ci_high: float
    mean_steps: float

    @property
    def success_rate(self) -> float:
        return self.successes / max(self.episodes, 1)

    def as_dict(self) -> dict:
        return {**asdict(self), "success_rate": self.success_rate}

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


def evaluate(
    policy: ChunkPolicy,
    episodes: int = 50,
    seed_base: int = EVAL_SEED_BASE,
    image_size: int = 64,
    num_cameras: int = 1,
    execute: int = 4,
    name: str = "policy",
    env: ReachEnv | None = None,
) -> EvalResult:
    """Run `episodes` seeded episodes; each chunk's first `execute` actions run before replanning."""
    env = env or ReachEnv(image_size=image_size, num_cameras=num_cameras)
    successes, steps = 0, []
    for i in range(episodes):
        obs = env.reset(seed_base + i)
        done = success = False
        while not done:
            chunk = np.asarray(policy(obs), dtype=np.float32)
            for action in chunk[:execute]:
                obs, success, done = env.step(action)
                if done:
                    break
        successes += int(success)
        steps.append(env.t)
    lo, hi = wilson_interval(successes, episodes)
    return EvalResult(name, episodes, successes, lo, hi, float(np.mean(steps)))


def evaluate_expert(episodes: int = 50, seed_base: int = EVAL_SEED_BASE) -> EvalResult:
    """The scripted expert reads the scene (which a learned policy cannot), so it gets the env."""
    env = ReachEnv()

    def act(obs: Observation) -> np.ndarray:
        assert env.scene is not None
        return expert_chunk(env.scene, obs.state, 8)

    return evaluate(act, episodes, seed_base, name="expert", env=env)


def random_policy(seed: int = 0, chunk_len: int = 8) -> ChunkPolicy:
    rng = np.random.default_rng(seed)

    def act(obs: Observation) -> np.ndarray:
        return rng.uniform(JOINT_LOWER, JOINT_UPPER, size=(chunk_len, 2)).astype(np.float32)

    return act
