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


def make_small_recording(tasks: tuple[str, ...], lengths: tuple[int, ...] = (8, 6, 8), size: int = 16,
                         seed: int = 1) -> Dataset:
    """A quick recording for end-to-end CLI checks: one camera at size x size, state 3, action 4, one task per
    episode (`tasks[e]`)."""
    rng = np.random.default_rng(seed)
    images, states, actions, instr, episodes = [], [], [], [], []
    for e, n in enumerate(lengths):
        t = np.arange(n) / FPS
        act = np.stack([np.sin(2 * np.pi * (0.5 + 0.2 * d) * t + e) * (d + 1) for d in range(4)], 1)
        actions.append(act.astype(np.float32))
        states.append((act[:, :3] + rng.normal(0, 0.01, (n, 3))).astype(np.float32))
        images.append(rng.integers(0, 256, (n, 1, size, size, 3), dtype=np.uint8))
        instr += [tasks[e]] * n
        episodes.append(np.full(n, e, dtype=np.int32))
    return Dataset(images=np.concatenate(images), instructions=np.array(instr), states=np.concatenate(states),
                   actions=np.concatenate(actions), episodes=np.concatenate(episodes),
                   meta={"action_period_s": 1 / FPS})


def error_line(err: str) -> str:
    """The CLI's error from captured stderr: exactly one line, the last (progress bars go to stderr before it)."""
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if ": error: " in line]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    return errors[0]
