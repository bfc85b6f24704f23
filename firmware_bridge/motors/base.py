"""The motor-device interface: one small abstract class every backend implements (python-can's BusABC shape).

A control loop talks only to `MotorDevice`: open, capabilities, arm, one cycle of `poll_state()` +
`write_setpoints()`, `stop(category)`, latched `faults`, the operator's `clear_faults()`, and an idempotent
`close()` that warns when it was skipped. Positions cross this interface in radians (`Capabilities.units`);
the ticks and registers of each device stay inside its backend.

Arming is an operator act: `arm()` is refused while a fault is latched, and nothing here re-arms by itself.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

from firmware_bridge.errors import BridgeError

log = logging.getLogger(__name__)
ArrayLike = np.ndarray | Sequence[float]


class MotorError(BridgeError):
    """Base of every error raised by a motor device or the motor registry."""


class MotorUrlError(MotorError, ValueError):
    """A motor link URL is malformed, names an unknown scheme, or carries a bad query parameter."""


class MotorBusError(MotorError):
    """The bus did not answer (cable, power, baud rate or id), or answered with a corrupt packet."""


class ArmRefusedError(MotorError):
    """The device may not be armed as configured; the message names the joint and what to change."""


class FaultLatchedError(MotorError):
    """A fault is latched: setpoints and arming are refused until an operator clears it."""


class MissingDependencyError(MotorError, ImportError):
    """A backend's optional package is not installed; the message names the extra to install."""


class StopCategory(IntEnum):
    """IEC 60204-1 stop categories."""

    TORQUE_OFF = 0  # remove power to the motors now
    CONTROLLED = 1  # decelerate to hold under power, then remove power


@dataclass(frozen=True)
class Capabilities:
    """What the host may rely on; a control loop reads this instead of knowing the device."""

    vendor: str
    joint_names: tuple[str, ...]
    has_device_watchdog: bool
    watchdog_period_s: float  # 0 when there is no device watchdog (or it is not armed)
    on_watchdog_expiry: str  # what the device itself does when the host falls silent, in words
    units: str = "rad"  # position units of write_setpoints / poll_state
    min_period_s: float = 0.01  # the shortest control period this backend is specified for

    @property
    def joint_count(self) -> int:
        return len(self.joint_names)


@dataclass(frozen=True)
class MotorState:
    positions: np.ndarray  # rad
    velocities: np.ndarray  # rad/s
    currents: np.ndarray  # A
    stamp: float  # time.monotonic() when the answer arrived


@dataclass(frozen=True)
class MotorFault:
    """A latched fault: which joint, a short code, and a reason a person can act on."""

    joint: str
    code: str
    reason: str
    stamp: float = field(default_factory=time.monotonic)

    def __str__(self) -> str:
        return f"{self.joint}: {self.code} ({self.reason})"


class MotorDevice(ABC):
    """One bus of motors. Not thread-safe: call it from the control loop only (the device watchdog is fed
    by the frames this loop sends; a helper thread that kept it fed would defeat it)."""

    url: str = ""

    def __init__(self) -> None:
        self._closed = True  # until open() succeeds: nothing to release yet
        self._faults: list[MotorFault] = []

    # -- lifecycle ------------------------------------------------------------------------------------
    def open(self) -> MotorDevice:
        """Connect and identify the devices. Leaves them disarmed (torque as found: see arm()). Idempotent:
        `with open_device(url) as dev` (already opened) must not open a second port on the same bus."""
        if not self._closed:
            return self
        self._open()
        self._closed = False
        return self

    def close(self) -> None:
        """Torque off (if armed) and release the port. Idempotent; never raises for a vanished bus."""
        if self._closed:
            return
        self._closed = True
        try:
            self._close()
        except MotorError as exc:  # the port may be gone: report, do not mask the caller's exception
            log.error("%s: close did not complete: %s", self.url, exc)

    def __enter__(self) -> MotorDevice:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # python-can's habit: a device dropped without close() may still hold torque; say so loudly.
        if not getattr(self, "_closed", True):
            log.warning("%s was not closed: closing it now (call close() or use it as a context manager)", self.url)
            self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    # -- faults ---------------------------------------------------------------------------------------
    @property
    def faults(self) -> list[MotorFault]:
        """Latched faults, oldest first; they stay until clear_faults()."""
        return list(self._faults)

    def _latch(self, fault: MotorFault) -> None:
        if not any(f.joint == fault.joint and f.code == fault.code for f in self._faults):
            log.error("%s: fault latched: %s", self.url, fault)
            self._faults.append(fault)

    def _setpoint_target(self, positions: ArrayLike, names: Sequence[str]) -> np.ndarray:
        """What every backend's write_setpoints checks first: open, no latched fault, armed by the operator, one
        finite position per joint (float64 [len(names)])."""
        self._require_open("write_setpoints")  # type: ignore[attr-defined]
        self._refuse_if_faulted("setpoints")
        if not self.armed:
            raise MotorError(f"{self.url}: setpoints refused: not armed (arming is an operator act: arm())")
        target = np.asarray(positions, dtype=float)
        if target.shape != (len(names),):
            raise ValueError(f"{len(names)} joint positions expected, got shape {target.shape}")
        if not np.all(np.isfinite(target)):
            bad = names[int(np.argmin(np.isfinite(target)))]
            raise MotorError(f"{self.url}: setpoints refused: non-finite position for joint {bad!r}")
        return target

    def _refuse_if_faulted(self, what: str) -> None:
        if self._faults:
            raise FaultLatchedError(
                f"{what} refused: fault latched ({'; '.join(map(str, self._faults))}); "
                "an operator must clear faults (clear_faults) and arm again"
            )

    # -- the interface --------------------------------------------------------------------------------
    @property
    @abstractmethod
    def capabilities(self) -> Capabilities: ...

    @property
    @abstractmethod
    def armed(self) -> bool: ...

    @abstractmethod
    def arm(self) -> None:
        """Check the devices against the configuration, arm their watchdog, enable torque (operator act)."""

    @abstractmethod
    def stop(self, category: int = StopCategory.TORQUE_OFF) -> bool:
        """Stop; every path ends in torque off. True when torque off was read back from every device."""

    @abstractmethod
    def write_setpoints(self, positions: ArrayLike) -> np.ndarray:
        """Send goal positions (rad); returns what was actually sent after clamping to the joint limits."""

    @abstractmethod
    def poll_state(self) -> MotorState:
        """Read positions, velocities and currents of every joint (one bus transaction where possible)."""

    @abstractmethod
    def clear_faults(self) -> None:
        """Operator act: reset the devices' latched errors; the device stays disarmed afterwards."""

    @abstractmethod
    def _open(self) -> None: ...

    @abstractmethod
    def _close(self) -> None: ...
