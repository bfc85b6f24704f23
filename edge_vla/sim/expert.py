"""A scripted expert: inverse kinematics to the named block, rate-limited, planned as a chunk."""

from __future__ import annotations

import numpy as np

from edge_vla.sim.env import ACTION_PERIOD_S
from edge_vla.sim.scene import JOINT_LOWER, JOINT_UPPER, JOINT_VEL_LIMIT, Scene, inverse_kinematics


def expert_chunk(scene: Scene, q: np.ndarray, chunk_len: int) -> np.ndarray:
    """[chunk_len, 2] joint targets: the expert's plan from joint state q, one per action period."""
    goal = inverse_kinematics(scene.target_xy, q)
    # Aim a little short of the joint-speed limit so the plan is always trackable.
    max_delta = 0.9 * JOINT_VEL_LIMIT * ACTION_PERIOD_S
    plan = np.empty((chunk_len, 2), dtype=np.float32)
    cur = np.asarray(q, dtype=np.float32)
    for k in range(chunk_len):
        cur = np.clip(cur + np.clip(goal - cur, -max_delta, max_delta), JOINT_LOWER, JOINT_UPPER)
        plan[k] = cur
    return plan
