"""The reaching task as an environment: joint-position targets in, observations out, at 10 Hz."""

from __future__ import annotations

import numpy as np

from edge_vla.runtime.types import Observation
from edge_vla.sim.scene import HOME, JOINT_LOWER, JOINT_UPPER, JOINT_VEL_LIMIT, Scene, get_split

ACTION_PERIOD_S = 0.1
MAX_STEPS = 30


class ReachEnv:
    """Deterministic given a seed: the scene, and the joints' rate-limited tracking of targets."""

    action_period_s = ACTION_PERIOD_S

    def __init__(self, image_size: int = 64, num_cameras: int = 1, max_steps: int = MAX_STEPS,
                 split: str = "base") -> None:
        get_split(split)  # fail at construction on an unknown split
        self.split = split
        self.image_size = image_size
        self.num_cameras = num_cameras
        self.max_steps = max_steps
        self.scene: Scene | None = None
        self.q = HOME.copy()
        self.t = 0

    def reset(self, seed: int, target: int | None = None) -> Observation:
        """A seeded episode; `target` names another block of the same layout (same start pose) instead."""
        rng = np.random.default_rng(seed)
        self.scene = Scene.sample(rng, self.split)
        if target is not None:
            self.scene = self.scene.with_target(target)
        self.q = (HOME + rng.uniform(-0.3, 0.3, size=2)).astype(np.float32)
        self.t = 0
        return self.observation()

    def observation(self) -> Observation:
        assert self.scene is not None, "call reset() first"
        images = self.scene.cameras(self.q, self.image_size, self.num_cameras)
        return Observation(images=images, instruction=self.scene.instruction, state=self.q.copy())

    def step(self, target: np.ndarray) -> tuple[Observation, bool, bool]:
        """Track one joint-position target for one action period. Returns (obs, success, done)."""
        assert self.scene is not None, "call reset() first"
        target = np.asarray(target, dtype=np.float32)
        if target.shape != (2,) or not np.all(np.isfinite(target)):
            raise ValueError(f"action must be 2 finite joint targets, got {target!r}")
        max_delta = JOINT_VEL_LIMIT * ACTION_PERIOD_S
        self.q = np.clip(self.q + np.clip(target - self.q, -max_delta, max_delta), JOINT_LOWER, JOINT_UPPER)
        self.t += 1
        success = self.scene.reached(self.q)
        return self.observation(), success, success or self.t >= self.max_steps
