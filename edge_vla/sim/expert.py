"""A scripted expert: inverse kinematics to the named block, planned as a chunk within the joints' limits.

Its plans respect the velocity limit (cruising at PLAN_SPEED_FRACTION of it) and, since issue 13, the
acceleration limit on the way in: each joint's speed toward its goal is capped by the distance it can
still stop in at PLAN_ACCEL_FRACTION of the acceleration limit, so a plan arrives at rest instead of
stopping dead from full speed (2.25 rad/s to 0 in one 0.1 s action is 22.5 rad/s^2 over the 20 rad/s^2
limit, and the onboard safety layer then brakes for 0.11 s and overshoots by ~0.13 rad). The speed cap
depends on the position only, so plans made from consecutive states agree with each other.

What it cannot do from a position-only observation is accelerate gently from rest: it does not know the
arm's velocity, and a plan that ramps up from rest at every replanning would never reach cruising speed.
The first 0.11 s of a move from rest is therefore left to the safety layer's acceleration limit.
"""

from __future__ import annotations

import numpy as np

from edge_vla.sim.env import ACTION_PERIOD_S
from edge_vla.sim.scene import (
    JOINT_ACCEL_LIMIT,
    JOINT_LOWER,
    JOINT_UPPER,
    JOINT_VEL_LIMIT,
    Scene,
    inverse_kinematics,
)

PLAN_SPEED_FRACTION = 0.9  # of the velocity limit: a little short of it so the plan is always trackable
# Of the acceleration limit, for braking: the cubic interpolation between 10 Hz waypoints adds some
# acceleration of its own, and this leaves it room under the limit the safety layer enforces.
PLAN_ACCEL_FRACTION = 0.5
PLAN_ACCEL = PLAN_ACCEL_FRACTION * JOINT_ACCEL_LIMIT


def braking_step(distance: np.ndarray, speed: np.ndarray, accel: np.ndarray, period: float) -> np.ndarray:
    """Largest step (>= 0) toward a goal `distance` away: at most `speed * period`, and slow enough that,
    with steps shrinking by `accel * period**2` each period, the joint still stops at the goal.

    The speed bound is v with v*T + v^2/(2a) <= d (one more period at v, then braking at a), as in the
    safety layer's braking cap; near the goal it tends to d / T, so the last step lands on the goal."""
    d = np.maximum(np.asarray(distance, np.float64), 0.0)
    at = accel * period
    v_stop = -at + np.sqrt(at * at + 2.0 * accel * d)
    return np.minimum(np.minimum(speed, v_stop) * period, d)


def expert_chunk(scene: Scene, q: np.ndarray, chunk_len: int, max_accel: np.ndarray | float | None = PLAN_ACCEL,
                 ) -> np.ndarray:
    """[chunk_len, 2] joint targets: the expert's plan from joint state q, one per action period.

    `max_accel` (rad/s^2) shapes the arrival (see the module docstring); None gives the constant-speed
    plan of the data before issue 13 (cruise, then stop dead at the goal)."""
    goal = inverse_kinematics(scene.target_xy, q).astype(np.float64)
    speed = PLAN_SPEED_FRACTION * JOINT_VEL_LIMIT.astype(np.float64)
    plan = np.empty((chunk_len, 2), dtype=np.float32)
    cur = np.asarray(q, dtype=np.float64)
    for k in range(chunk_len):
        delta = goal - cur
        if max_accel is None:
            step = speed * ACTION_PERIOD_S
        else:
            step = braking_step(np.abs(delta), speed, np.asarray(max_accel, np.float64), ACTION_PERIOD_S)
        cur = np.clip(cur + np.clip(delta, -step, step), JOINT_LOWER, JOINT_UPPER)
        plan[k] = cur
    return plan
