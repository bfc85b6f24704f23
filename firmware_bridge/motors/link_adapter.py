"""A `MotorDevice` (Dynamixel, Feetech) presented as the `Controller` the control loop drives.

`open_link("dynamixel://...")` returns a `MotorDeviceLink`; the control loop (edge_vla.onboard.control) keeps
talking to its one narrow interface and learns no device details. What the loop uses, and what each becomes:

- `open()` / `close()`: open the device (it stays disarmed: torque as found) / the device's idempotent close,
  which turns torque off if it is armed.
- units: with `units=UnitSpec` (a LeRobot calibration: `edge-vla run --calibration`), setpoints, states and
  limits cross this interface in the bundle's action units (LeRobot's -100..100 / 0..100, degrees, or rad);
  `firmware_bridge.motors.units.UnitMap` converts them per joint to the device's radians (through LeRobot's exact
  `_unnormalize`/`_normalize` ticks) and back, velocities by each joint's slope. The device's joint limits are
  the bundle's converted the same way, refused at construction where they reach outside the calibration's
  range_min..range_max. Without `units` everything is the device's radians (the default calibration).
- `hello()`: a `protocol.Capabilities` built from the device: joint names and count, per-joint position
  limits (the robot configuration's, as given to the device; in the bundle's units), the device watchdog's period as
  `heartbeat_timeout_s` (0 without one). A hello while armed stops the device (category 0), as a firmware
  treats a HELLO from a new host.
- `send_clear_faults()` / `send_arm()` / `send_disarm()`: the device's `clear_faults()` / `arm()` / a
  confirmed torque off. They run when the loop sends them, which is only on an operator's arm request (or at
  a stop); nothing here arms by itself. They block for the bus transactions they need (a few ms per servo:
  the one cycle they run in overruns), and their answer is ready at once for `ack_result()`: True, or a
  `NackError` (FAULTS_LATCHED for a latched fault, BAD_ARGUMENT for any other refusal, whose one-line reason is
  logged here as an error).
- `send_setpoints(q, velocities, efforts, kp, kd)`: one `write_setpoints(q)`. Position-mode servos run their
  own position loop: velocities, efforts, kp and kd are not sent (logged once).
- `poll()` / `latest_state`: one `poll_state()` per call (the loop polls once per cycle) cached as a
  `JointState`; a bus error leaves the cached state as it was, so its age grows and the loop trips on a
  stale link. `poll()` returns no messages: answers are read with `ack_result()`.
- `faults`, `fault_count`, `faults_since()`: each new latched device fault becomes one `FaultReport` whose
  bits the loop treats as a firmware trip (category 0): a Dynamixel Bus Watchdog expiry is
  `Fault.HEARTBEAT_TIMEOUT`, any other device fault (hardware error, servo status) `DEVICE_FAULT` (0x4000,
  a bit this adapter uses that the firmware protocol leaves unassigned).
- `send_stop(category)`: the device's `stop(category)`; every path ends in torque off, read back. The STOP
  is answered only once torque off was read back from every servo; until then the loop resends it and, if
  the bus stays silent for its `link_dead_s`, declares the link dead.
- `heartbeat()` and `keepalive()` send nothing. A Dynamixel's Bus Watchdog is reset by every instruction
  packet addressed to it; the only packets this adapter sends while armed are the control cycle's own sync
  read and sync write (and the stop), all from the control loop's thread. So a stalled or killed loop lets
  the watchdog expire (the servo then holds its position with torque on). Feetech STS servos have no
  watchdog at all.
- `stats`: frames_sent counts bus transactions started, frames_received the state reads answered, drops
  the state reads not answered; crc/framing/bad_messages stay 0 (the vendor SDKs fold those into "no
  answer"), and reconnects stays 0: a lost bus is not re-opened (restart the run).

Where the firmware protocol has no device equivalent:
- the session nonce: servos have none. `hello()` draws a host-side nonce so `session`/`needs_hello` behave;
  it guards nothing on the wire (only this process holds the port, which the OS enforces per open file).
- the firmware clock: servos have none. A state's `firmware_time_s` and `sampled_host_time` are the host's
  time.monotonic() when the sync-read answer arrived, so the loop's freshness test measures bus answers.
- modes, as the firmware reports them (PROTOCOL.md: DISARMED is torque off with nothing latched): ARMED while the
  device is armed; TRIPPED after a stop or while a device fault is latched, including one latched at open (a
  restart over devices a dead host left faulted or powered), until the operator's clear-faults; DISARMED before
  the first arm, after clear-faults, or after a disarm with nothing latched; STOPPING while a stop could not yet
  read torque off back.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import OrderedDict
from typing import Any

import numpy as np

from firmware_bridge.controller import ArrayLike, Controller, JointState
from firmware_bridge.errors import LinkDownError, NackError
from firmware_bridge.motors.base import FaultLatchedError, MotorDevice, MotorError, MotorFault, StopCategory
from firmware_bridge.motors.calibration import CalibrationError
from firmware_bridge.motors.registry import load_backend, open_device, parse_url
from firmware_bridge.motors.units import UnitMap, UnitSpec
from firmware_bridge.protocol import (
    PROTOCOL_MAJOR,
    PROTOCOL_MINOR,
    Capabilities,
    Fault,
    FaultReport,
    JointLimits,
    Message,
    Mode,
    NackCode,
    Setpoint,
    Status,
)

log = logging.getLogger(__name__)

DEVICE_FAULT = 0x4000  # a device's own fault (hardware error, servo status): unassigned in protocol.Fault
# MotorFault.code -> Fault bit; others DEVICE_FAULT. A bus_error (the host's CAN receive failed: frames may be lost)
# is the firmware's LINK_ERRORS trip.
FAULT_BITS = {"bus_watchdog": int(Fault.HEARTBEAT_TIMEOUT), "heartbeat_lost": int(Fault.HEARTBEAT_TIMEOUT),
              "bus_error": int(Fault.LINK_ERRORS)}
HOST_STOP_BITS = {0: Fault.HOST_STOP_CAT0, 1: Fault.HOST_STOP_CAT1}
ACK_MEMORY = 1024


class MotorDeviceLink(Controller):
    """The control loop's `Controller` over one `MotorDevice` (see the module docstring for each mapping)."""

    def __init__(self, url: str, device: MotorDevice | None = None, *, units: UnitSpec | None = None,
                 **device_kw: Any) -> None:
        """`device_kw` (joint_limits, names, period_s, calibration...) go to the backend's constructor; the
        device is built (URL and parameters checked) but not opened. With `units`, `joint_limits` are in the
        bundle's units and the device gets their radians, the calibration's joints and its homing offsets."""
        super().__init__()
        self._url = url
        self._seq = secrets.randbelow(0x10000)
        self._sent_since_hello = 0
        self._heartbeats = self._keepalives = 0
        self.units: UnitMap | None = None
        self._unit_limits: list[tuple[float, float]] | None = None  # the bundle's limits, in its units
        if units is not None:
            self.units = UnitMap.for_backend(units, type(device) if device is not None
                                             else load_backend(parse_url(url).scheme))
            device_kw = self._device_kwargs_in_radians(units, device_kw)
        self.device = device if device is not None else open_device(url, open_now=False, **device_kw)
        if units is not None:
            self._check_device_matches(units)
        self._mode = Mode.DISARMED
        self._host_stop: int | None = None  # category of the last stop this host made (latched like a firmware)
        self._answers: OrderedDict[int, bool | NackError] = OrderedDict()
        self._seen_faults: set[tuple[str, str, float]] = set()
        self._said_ignored = False

    @classmethod
    def from_url(cls, url: str, **device_kw: Any) -> MotorDeviceLink:
        return cls(url, **device_kw)

    def _device_kwargs_in_radians(self, spec: UnitSpec, device_kw: dict[str, Any]) -> dict[str, Any]:
        """The backend's keyword arguments for a calibrated run: limits converted (and checked against the
        calibrated range), the calibration's joints (zero at mid-range) and its homing offsets to check at arm."""
        assert self.units is not None
        kw = dict(device_kw)
        if kw.get("joint_limits") is not None:
            self._unit_limits = [(float(lo), float(hi)) for lo, hi in kw["joint_limits"]]
            kw["joint_limits"] = self.units.limits_to_radians(self._unit_limits)
        kw["calibration"] = list(self.units.calibrations)
        kw["lerobot_calibration"] = spec.by_name
        kw.setdefault("names", list(spec.joints))
        return kw

    def _check_device_matches(self, spec: UnitSpec) -> None:
        """The device drives the calibration's servos in the bundle's joint order, with the layer's calibration."""
        ids = tuple(getattr(self.device, "ids", ()))
        if ids != spec.ids:
            raise CalibrationError(f"{self._url}: the link names servo ids {', '.join(map(str, ids))} but the "
                                   f"calibration gives ids {', '.join(map(str, spec.ids))} for the bundle's joints "
                                   f"({', '.join(spec.joints)}); drop ids= from the URL or correct it")
        assert self.units is not None
        if tuple(getattr(self.device, "calibration", ())) != self.units.calibrations:
            raise CalibrationError(f"{self._url}: the device's calibration is not the unit layer's; pass the "
                                   "calibration through units= only")

    # ---- lifecycle ----
    def open(self) -> MotorDeviceLink:
        if not self._opened:
            try:
                self.device.open()
            except MotorError as exc:
                raise LinkDownError(str(exc)) from exc
            self._opened = self._connected = True
            log.info("motor link open: %s", self.device.url)
        return self

    def close(self) -> None:
        if self._opened:
            self._opened = self._connected = False
            self.device.close()  # torque off if armed; idempotent; never raises for a vanished bus
            log.info("motor link closed: %s", self.device.url)

    @property
    def url(self) -> str:
        return self._url

    # ---- session (host-side only: see the module docstring) ----
    def hello(self, timeout: float = 1.0) -> Capabilities:
        self._require_open()
        if self.device.armed:  # a new session while armed: the host that armed is gone (firmware semantics)
            log.warning("%s: hello while armed: stopping (category 0)", self.device.url)
            self._device_stop(0)
        caps = self.device.capabilities
        limits = (self._unit_limits or self._device_limits_in_units()
                  or [(-np.inf, np.inf)] * caps.joint_count)
        joints = tuple(JointLimits(name, float(lo), float(hi), float("inf"), float("inf"))
                       for name, (lo, hi) in zip(caps.joint_names, limits, strict=True))
        period = float(getattr(self.device, "period_s", caps.min_period_s))
        self._session = secrets.randbits(32) or 1
        self._sent_since_hello = 0
        self.capabilities = Capabilities(PROTOCOL_MAJOR, PROTOCOL_MINOR, (0, 0, 0), caps.watchdog_period_s,
                                         round(1.0 / period), float(getattr(self.device, "stop_timeout_s", 0.0)),
                                         joints, session=self._session)
        log.info("%s: %s, %d joints (%s); device watchdog: %s", self.device.url, caps.vendor, caps.joint_count,
                 ", ".join(caps.joint_names),
                 f"{caps.watchdog_period_s * 1e3:.0f} ms; on expiry {caps.on_watchdog_expiry}"
                 if caps.has_device_watchdog else f"NONE ({caps.on_watchdog_expiry})")
        return self.capabilities

    def _device_limits_in_units(self) -> list[tuple[float, float]] | None:
        limits = getattr(self.device, "joint_limits", None)
        if limits is None or self.units is None:
            return limits
        lo, hi = self.units.from_radians([lo for lo, _ in limits]), self.units.from_radians([hi for _, hi in limits])
        return [(min(a, b), max(a, b)) for a, b in zip(lo, hi, strict=True)]

    @property
    def needs_hello(self) -> bool:
        return self._session is None

    # ---- commands: executed now, answered at once (ack_result) ----
    def send_clear_faults(self) -> int:
        def clear() -> None:
            self.device.clear_faults()
            self._host_stop = None
            self._seen_faults.clear()
            self._mode = Mode.DISARMED
        return self._command("CLEAR_FAULTS", clear)

    def send_arm(self) -> int:
        def arm() -> None:
            if self._host_stop is not None:  # PROTOCOL.md: a host STOP latches; ARM is refused until CLEAR_FAULTS
                raise FaultLatchedError(f"{self.device.url}: a host stop (category {self._host_stop}) is latched; "
                                        "re-arming is the operator's act: clear faults, then arm")
            self.device.arm()
            self._mode = Mode.ARMED
        return self._command("ARM", arm)

    def send_disarm(self) -> int:
        def disarm() -> None:
            if (self.device.armed or self._mode is Mode.STOPPING) and not self._device_stop(0):
                raise MotorError(f"{self.device.url}: torque off not read back from every servo")
            latched = self.device.faults or self._host_stop is not None
            self._mode = Mode.TRIPPED if latched else Mode.DISARMED  # DISARM keeps a latched trip (and a host stop)
        return self._command("DISARM", disarm)

    def send_stop(self, category: int, reason: int = 0) -> int:
        if category not in (0, 1):
            raise ValueError(f"stop category must be 0 or 1, got {category}")
        seq = self._next_seq()
        self._host_stop = category
        if self._device_stop(category):
            self._answer(seq, True)
        # else: no answer (PENDING): the loop resends the stop and declares the link dead if the bus stays silent
        return seq

    def stop(self, category: int, reason: int = 0, timeout: float = 0.05, retries: int = 5) -> bool:
        """Blocking form (bench tools): stop, resent until torque off is read back or `retries` ran out."""
        for _ in range(max(1, retries)):
            if self.ack_result(self.send_stop(category, reason)) is True:
                return True
            time.sleep(timeout)
        self.stats.stops_unacknowledged += 1
        log.error("%s: stop (category %d) not confirmed: torque off was not read back", self.device.url, category)
        return False

    def arm(self, timeout: float = 0.5) -> None:
        self._raise_if_refused(self.send_arm())

    def clear_faults(self, timeout: float = 0.5) -> None:
        self._raise_if_refused(self.send_clear_faults())

    def disarm(self, timeout: float = 0.2, retries: int = 3) -> None:
        self._raise_if_refused(self.send_disarm())

    def ack_result(self, seq: int) -> bool | NackError | None:
        return self._answers.get(seq)

    def heartbeat(self) -> int:
        """Sends nothing: the device watchdog is fed only by the control cycle's own bus transactions."""
        self._heartbeats += 1
        return self._next_seq()

    def keepalive(self) -> int:
        """Sends nothing (each cycle's state read already proves the bus alive); answered at once."""
        self._keepalives += 1
        seq = self._next_seq()
        self._answer(seq, True)
        return seq

    def send_setpoints(self, positions: ArrayLike, velocities: ArrayLike | None = None,
                       efforts: ArrayLike | None = None, kp: ArrayLike | None = None,
                       kd: ArrayLike | None = None) -> Setpoint:
        """One write of goal positions (rad, or the bundle's units with a calibration), clamped by the device to
        its limits; raises if the device refuses (not armed, fault latched, bus down, a non-finite value): the loop
        then trips. Returns what was sent, in the same units."""
        if not self._said_ignored and any(a is not None for a in (velocities, efforts, kp, kd)):
            self._said_ignored = True
            log.info("%s: position-mode servos run their own position loop: velocity feedforward, efforts and "
                     "kp/kd are not sent (only goal positions)", self.device.url)
        self._require_open()
        self.stats.frames_sent += 1
        goal = np.asarray(positions, dtype=np.float64)
        if self.units is not None:
            goal = self.units.to_radians(goal)
        sent = np.asarray(self.device.write_setpoints(goal), dtype=np.float64)
        return Setpoint(sent if self.units is None else self.units.from_radians(sent))

    # ---- state ----
    def poll(self, timeout: float = 0.0) -> list[Message]:
        """One state read from the device (never raises); answers are in ack_result(), so this returns []."""
        if not self._opened or self.device.closed:
            return []
        self.stats.frames_sent += 1
        try:
            st = self.device.poll_state()
        except MotorError as exc:
            self.stats.drops += 1
            if self.stats.drops == 1 or self.stats.drops % 100 == 0:
                log.error("%s: state read failed (%d so far): %s", self.device.url, self.stats.drops, exc)
            self._collect_faults()
            return []
        self.stats.frames_received += 1
        self._collect_faults()
        if self._mode is Mode.ARMED and not self.device.armed:
            self._mode = Mode.TRIPPED  # the device stopped itself (a fault): latched until the operator arms
        elif self._mode is Mode.DISARMED and self.device.faults:
            self._mode = Mode.TRIPPED  # a fault latched while disarmed (at open: a restart over a faulted device)
        bits = self._fault_bits()
        status = Status.ENABLE_INPUT | (Status.STOP_LATCHED if self._host_stop is not None else Status.NONE)
        positions, velocities = st.positions, st.velocities
        if self.units is not None:
            positions, velocities = self.units.from_radians(positions), self.units.velocities_from_radians(velocities)
        self._latest = JointState(positions, velocities, st.currents, Fault(bits), self._mode, st.stamp,
                                  time.monotonic(), -1, st.stamp, status, self.stats.frames_received)
        return []

    # ---- internals ----
    def _fault_bits(self) -> int:
        bits = 0
        for f in self.device.faults:
            bits |= FAULT_BITS.get(f.code, DEVICE_FAULT)
        if self._host_stop is not None:
            bits |= int(HOST_STOP_BITS[self._host_stop])
        return bits

    def _collect_faults(self) -> None:
        for f in self.device.faults:
            key = (f.joint, f.code, f.stamp)
            if key in self._seen_faults:
                continue
            self._seen_faults.add(key)
            self._report(f)

    def _report(self, f: MotorFault) -> None:
        code = Fault(FAULT_BITS.get(f.code, DEVICE_FAULT))
        self.faults.append(FaultReport(int(f.stamp * 1e6), code, Fault(self._fault_bits()), 0,
                                       Mode.TRIPPED if not self.device.armed else self._mode))
        self.fault_count += 1
        log.warning("%s: device fault: %s (reported to the loop as fault bits 0x%04x)", self.device.url, f, int(code))

    def _device_stop(self, category: int) -> bool:
        """The device's stop; True once torque off was read back from every servo."""
        self.stats.frames_sent += 1
        try:
            confirmed = bool(self.device.stop(StopCategory(category)))
        except MotorError as exc:
            log.error("%s: stop category %d failed: %s", self.device.url, category, exc)
            confirmed = False
        self._mode = Mode.TRIPPED if confirmed else Mode.STOPPING
        return confirmed

    def _command(self, what: str, action: Any) -> int:
        seq = self._next_seq()
        try:
            self._require_open()
            action()
        except MotorError as exc:
            code = NackCode.FAULTS_LATCHED if isinstance(exc, FaultLatchedError) else NackCode.BAD_ARGUMENT
            log.error("%s refused by %s: %s", what, self.device.url, exc)
            self._answer(seq, NackError(f"{what} refused: {exc}", code))
            self._collect_faults()
            return seq
        self._answer(seq, True)
        return seq

    def _raise_if_refused(self, seq: int) -> None:
        answer = self.ack_result(seq)
        if isinstance(answer, NackError):
            raise answer

    def _answer(self, seq: int, answer: bool | NackError) -> None:
        self._answers[seq] = answer
        while len(self._answers) > ACK_MEMORY:
            self._answers.popitem(last=False)

    def _next_seq(self) -> int:
        seq = self._seq
        self._seq = (self._seq + 1) & 0xFFFF
        self._sent_since_hello += 1
        return seq

    def _require_open(self) -> None:
        if not self._opened:
            raise LinkDownError(f"motor link {self._url} is not open: call open() or use `with`")


__all__ = ["DEVICE_FAULT", "MotorDeviceLink"]
