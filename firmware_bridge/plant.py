"""Simulated joints behind the emulated motor controller: PD + inertia + viscous friction, hard stops."""

from __future__ import annotations

import numpy as np

from firmware_bridge.protocol import JointLimits


class JointPlant:
    """Each joint: I * a = clip(kp (q* - q) + kd (v* - v) + tau_ff, +-effort_max) - b v, q held inside its limits."""

    def __init__(self, limits: list[JointLimits], inertia: float = 0.05, friction: float = 0.1) -> None:
        self.q_min = np.array([j.position_min for j in limits])
        self.q_max = np.array([j.position_max for j in limits])
        self.tau_max = np.array([j.effort_max for j in limits])
        self.inertia, self.friction = inertia, friction
        self.q = np.clip(np.zeros(len(limits)), self.q_min, self.q_max)
        self.v = np.zeros(len(limits))
        self.tau = np.zeros(len(limits))
        self.blocked = np.zeros(len(limits), dtype=bool)  # fault injection: an obstacle holds these joints
        self._q_block = self.q.copy()

    def block(self, joint: int, blocked: bool = True) -> None:
        """Joint `joint` stops moving where it is (a collision, a jammed gearbox) until unblocked."""
        self.blocked[joint] = blocked
        self._q_block[joint] = self.q[joint]

    def step(self, dt: float, torque_on: bool, cmd: np.ndarray, max_substep: float = 5e-4) -> None:
        """Advance by dt seconds under commands (n x 5: q*, v*, tau_ff, kp, kd), semi-implicit Euler."""
        steps = max(1, int(np.ceil(dt / max_substep)))
        h = dt / steps
        for _ in range(steps):
            if torque_on:
                tau = cmd[:, 3] * (cmd[:, 0] - self.q) + cmd[:, 4] * (cmd[:, 1] - self.v) + cmd[:, 2]
                self.tau = np.clip(tau, -self.tau_max, self.tau_max)
            else:
                self.tau = np.zeros_like(self.q)
            self.v += h * (self.tau - self.friction * self.v) / self.inertia
            self.q += h * self.v
            hit = (self.q < self.q_min) | (self.q > self.q_max)
            self.q = np.clip(self.q, self.q_min, self.q_max)
            self.v[hit] = 0.0
            if self.blocked.any():  # the drive still pushes (tau stays), the joint does not move
                self.q[self.blocked] = self._q_block[self.blocked]
                self.v[self.blocked] = 0.0
