"""The test recording: 3 episodes, 2 cameras at 48x64, state 3, action 4, 30 fps, two tasks."""

from __future__ import annotations

import numpy as np

from edge_vla.sim.dataset import Dataset

FPS = 30
LENGTHS = (25, 18, 31)
TASKS = ("pick up the cube", "open the drawer", "pick up the cube")


def make_recording() -> Dataset:
    rng = np.random.default_rng(0)
    images, states, actions, instr, episodes = [], [], [], [], []
    for e, n in enumerate(LENGTHS):
        t = np.arange(n) / FPS
        act = np.stack([np.sin(2 * np.pi * (0.5 + 0.2 * d) * t + e) * (d + 1) for d in range(4)], 1)
        actions.append(act.astype(np.float32))
        states.append((act[:, :3] + rng.normal(0, 0.01, (n, 3))).astype(np.float32))
        images.append(rng.integers(0, 256, (n, 2, 48, 64, 3), dtype=np.uint8))  # every frame unique
        instr += [TASKS[e]] * n
        episodes.append(np.full(n, 100 + e, dtype=np.int32))  # renumbered 0..2 by the writer
    return Dataset(images=np.concatenate(images), instructions=np.array(instr), states=np.concatenate(states),
                   actions=np.concatenate(actions), episodes=np.concatenate(episodes),
                   meta={"action_period_s": 1 / FPS})
