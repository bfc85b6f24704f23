"""Helpers the CiA 402 tests share: build a `Cia402Device` from a URL (the lead registers the scheme in the motor
registry; until then the tests call the backend's own `from_url`), the emulated drives' limits, and a control loop
driven at a fixed target."""

from __future__ import annotations

import math
import time
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import numpy as np

from firmware_bridge.motors.cia402 import Cia402Device

COUNTS_PER_TURN = 65536  # the emulated drives' feed constant (0x6092): position units per output revolution
LIMIT_COUNTS = 16000  # the emulated drives' software position limits (0x607D): +-1.53 rad
JOINT_LIMITS = (-1.6, 1.6)  # the robot configuration's limits (rad): wider than the drives' own, so arm is allowed


def device_from_url(url: str, **kw: Any) -> Cia402Device:
    """What `open_device(url, open_now=False, **kw)` does once `cia402` is registered."""
    parts = urlsplit(url)
    dev = Cia402Device.from_url(parts.netloc + parts.path, dict(parse_qsl(parts.query)), **kw)
    dev.url = url
    return dev


def drive(dev: Cia402Device, target: float | list[float], n: int, sleep_s: float) -> np.ndarray:
    """n control cycles (poll, then the target); returns the last positions read."""
    joints = len(dev.nodes)
    state = dev.poll_state()
    for _ in range(n):
        state = dev.poll_state()
        dev.write_setpoints(np.broadcast_to(np.asarray(target, dtype=float), (joints,)))
        time.sleep(sleep_s)
    return state.positions


def counts(rad: float) -> int:
    return round(rad * COUNTS_PER_TURN / (2 * math.pi))


def wait_for(predicate: Any, timeout: float, poll_s: float = 0.005) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)
