"""What the serial-bus servo backends (Dynamixel, Feetech) share: URL/constructor checks, opening the port
through the vendor SDK, the stop paths (controlled stop, torque off to each id with read-back), fault
latching to a category 0 stop, the arm-time limit checks and the clamped Sync Write of goal positions.

Each vendor's protocol, control table, watchdog (or lack of one) and documented semantics stay in its own
module; a backend subclasses `ServoBusDevice` and fills in the hooks named in its docstring.
"""

from __future__ import annotations

import importlib
import logging
import time
from abc import abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from firmware_bridge.motors.base import (
    ArmRefusedError,
    ArrayLike,
    MissingDependencyError,
    MotorBusError,
    MotorDevice,
    MotorError,
    MotorFault,
    MotorUrlError,
    StopCategory,
)
from firmware_bridge.motors.calibration import JointCalibration, LeRobotMotor
from firmware_bridge.motors.sdk_port import port_handler

HOLD_SPEED_RAD_S = 0.05  # below this every joint counts as holding (category 1 stop)


def load_sdk(module: str, scheme: str, dist: str, extra: str) -> Any:
    """Import a vendor SDK, or say in one line which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{scheme}:// needs {dist} ({exc}); install it with: pip install 'edge-vla[{extra}]'"
        ) from exc


class ServoBusDevice(MotorDevice):
    """A chain of serial-bus servos driven through a vendor SDK's PortHandler/PacketHandler.

    Subclasses set SCHEME, SDK, BAUD_RATES, PERIOD_FLOOR_S, GOAL_ADDR, GOAL_SIZE (and LEROBOT_TICKS_PER_TURN
    where the servo's turn is not LeRobot's default) and implement `_packet_handler(sdk)`, `_identify(id)`,
    `_describe_servos()`, `_encode_goal(ticks)`, `_write_torque_off(id)` and `_read_torque(id)`;
    `_before_setpoints()` and `_on_disarm()` are optional hooks. Messages go to the vendor module's logger, so
    log records keep the names they had."""

    SCHEME: ClassVar[str]
    SDK: ClassVar[tuple[str, str, str]]  # (module, pip distribution, edge-vla extra)
    BAUD_RATES: ClassVar[tuple[int, ...]]
    PERIOD_FLOOR_S: ClassVar[float]
    GOAL_ADDR: ClassVar[int]
    GOAL_SIZE: ClassVar[int]
    LEROBOT_TICKS_PER_TURN: ClassVar[int | None] = None  # None: LeRobotMotor.joint_calibration's default

    def __init__(self, port: str, ids: Sequence[int], *, baud: int,
                 joint_limits: Sequence[tuple[float, float]] | None,
                 calibration: Sequence[JointCalibration] | None,
                 lerobot_calibration: dict[str, LeRobotMotor] | None,
                 names: Sequence[str] | None, period_s: float, stop_timeout_s: float, latency_ms: int) -> None:
        super().__init__()
        self._log = logging.getLogger(type(self).__module__)
        if not 1 <= latency_ms <= 1000:
            raise MotorUrlError(f"latency_ms={latency_ms} is outside 1..1000 ms (the adapter's latency timer)")
        self.latency_ms = latency_ms
        self.port, self.ids, self.baud = port, tuple(ids), baud
        if not self.ids:
            raise MotorUrlError("no servo ids given; write ids=1-6 (the servos in joint order)")
        if baud not in self.BAUD_RATES:
            raise MotorUrlError(f"baud={baud} is not supported; use one of {', '.join(map(str, self.BAUD_RATES))}")
        if period_s < self.PERIOD_FLOOR_S:
            raise MotorUrlError(f"period {period_s * 1000:.1f} ms is below this backend's floor of "
                                f"{self.PERIOD_FLOOR_S * 1000:.0f} ms (6 servos at 1 Mbaud)")
        n = len(self.ids)
        self.expected_homing: dict[int, int] = {}
        if lerobot_calibration is not None:
            by_id = {m.id: m for m in lerobot_calibration.values()}
            missing = [i for i in self.ids if i not in by_id]
            if missing:
                raise MotorUrlError(f"the LeRobot calibration has no motor with id {missing[0]}; it lists ids "
                                    f"{sorted(by_id)}")
            names = names or [by_id[i].name for i in self.ids]
            # The servo applies its homing offset itself (it is in Present Position): never again here.
            calibration = calibration or [self._lerobot_joint_calibration(by_id[i]) for i in self.ids]
            self.expected_homing = {i: by_id[i].homing_offset for i in self.ids}
        self.names = tuple(names) if names else tuple(f"joint{i}" for i in self.ids)
        self.calibration = tuple(calibration) if calibration else tuple(JointCalibration() for _ in self.ids)
        self.joint_limits = None if joint_limits is None else tuple((float(lo), float(hi)) for lo, hi in joint_limits)
        for what, seq in (("names", self.names), ("calibration", self.calibration),
                          ("joint_limits", self.joint_limits or self.ids)):
            if len(seq) != n:
                raise MotorUrlError(f"{what} has {len(seq)} entries for {n} servo ids {list(self.ids)}")
        self.period_s, self.stop_timeout_s = period_s, stop_timeout_s
        self.url = f"{self.SCHEME}://{port}?baud={baud}&ids={','.join(map(str, self.ids))}"
        self._armed = False
        # True from an arm's torque on until a torque off is read back from every servo: a stop that a servo did
        # not acknowledge (a loose data wire, noise) must not be forgotten, or close() would leave it powered.
        self._torque_unconfirmed = False
        self._port: Any = None
        self._ph: Any = None
        self._models: dict[int, int] = {}
        self._tick_range: list[tuple[int, int]] = []  # goal ticks allowed per joint (config ∩ device)
        self._last_tx = 0.0
        self._cycles = 0

    def _lerobot_joint_calibration(self, motor: LeRobotMotor) -> JointCalibration:
        if self.LEROBOT_TICKS_PER_TURN is None:
            return motor.joint_calibration()
        return motor.joint_calibration(self.LEROBOT_TICKS_PER_TURN)

    # -- vendor hooks ---------------------------------------------------------------------------------
    @abstractmethod
    def _packet_handler(self, sdk: Any) -> Any:
        ...

    @abstractmethod
    def _identify(self, servo_id: int) -> None:
        """Ping or read the servo at open: what it is (model, firmware); raises MotorError to refuse it."""
        ...

    @abstractmethod
    def _describe_servos(self) -> str:
        ...

    @abstractmethod
    def _encode_goal(self, ticks: int) -> bytes:
        ...

    @abstractmethod
    def _write_torque_off(self, servo_id: int) -> None:
        ...

    @abstractmethod
    def _read_torque(self, servo_id: int) -> int:
        ...

    def _before_setpoints(self) -> None:
        """Checks a vendor makes after the setpoints are validated and before they are sent."""

    def _on_disarm(self) -> None:
        """Called once the device is disarmed (stop) or closed."""

    # -- lifecycle ------------------------------------------------------------------------------------
    def _open(self) -> None:
        self._open_port()
        try:
            for servo_id in self.ids:
                self._identify(servo_id)
        except MotorError:
            self._port.closePort()
            self._port = None
            raise
        self._log.info("%s: servos %s (%s)", self.url, list(self.ids), self._describe_servos())
        self._check_found_torque_on()

    def _check_found_torque_on(self) -> None:
        """A servo with torque on at open was left armed by a host that died (kill -9, a crash, an unplugged
        cable): a Dynamixel holding after its Bus Watchdog, a Feetech still driving to the dead host's last goal.
        Latched, so the run starts tripped, not "disarmed" with the arm powered; the operator's clear_faults
        turns torque off (read back) before anything else."""
        on = [(j, servo_id) for j, servo_id in enumerate(self.ids) if self._read_torque(servo_id) == 1]
        for j, servo_id in on:
            self._latch(MotorFault(self.names[j], "found_torque_on",
                                   f"servo id {servo_id} had torque on when this host opened the bus: a previous "
                                   "host left it armed; clear faults (torque off) before arming"))
        if on:
            self._log.warning("%s: %d servo(s) found with torque on at open (%s): left armed by a host that died; "
                              "latched until the operator clears faults, which turns their torque off", self.url,
                              len(on), ", ".join(self.names[j] for j, _ in on))

    def _open_port(self) -> None:
        """Open the port at the configured baud rate; sets self._sdk, self._port and self._ph."""
        sdk = load_sdk(self.SDK[0], self.SCHEME, *self.SDK[1:])
        self._sdk = sdk
        port = port_handler(sdk, self.port, self.latency_ms)
        try:
            ok = port.setBaudRate(self.baud)  # opens the port
        except Exception as exc:  # pyserial raises SerialException / OSError / ValueError
            raise MotorBusError(f"cannot open {self.port}: {exc}. Check the cable, that the device exists "
                                f"(ls -l {self.port}) and that this user may open it (dialout group)") from exc
        if not ok:
            raise MotorBusError(f"cannot set {self.port} to {self.baud} baud")
        self._port, self._ph = port, self._packet_handler(sdk)

    def _close(self) -> None:
        try:
            if self.torque_maybe_on:  # armed, or a stop that a servo did not acknowledge: try again
                self.stop(StopCategory.TORQUE_OFF)
        finally:
            self._on_disarm()
            if self._port is not None:
                self._port.closePort()
                self._port = None

    # -- the interface --------------------------------------------------------------------------------
    @property
    def armed(self) -> bool:
        return self._armed

    @property
    def torque_maybe_on(self) -> bool:
        """Torque may still be on somewhere: armed, or the last torque off was not read back from every servo."""
        return self._armed or self._torque_unconfirmed

    def _arm_preflight(self) -> None:
        self._require_open("arm")
        self._refuse_if_faulted("arm")
        if self.joint_limits is None:
            raise ArmRefusedError("arm refused: no joint limits configured; give the robot configuration's joint "
                                  "limits (joint_limits=[(lo, hi), ...] in rad)")

    def write_setpoints(self, positions: ArrayLike) -> np.ndarray:
        target = self._setpoint_target(positions, self.names)
        self._before_setpoints()
        sent = np.empty_like(target)
        param: list[int] = []
        for j, servo_id in enumerate(self.ids):
            cal, (lo_t, hi_t) = self.calibration[j], self._tick_range[j]
            ticks = min(hi_t, max(lo_t, cal.to_ticks(float(target[j]))))
            sent[j] = cal.to_radians(ticks)
            param.append(servo_id)
            param.extend(self._encode_goal(ticks))
        self._sync_write(self.GOAL_ADDR, self.GOAL_SIZE, param)
        return sent

    def stop(self, category: int = StopCategory.TORQUE_OFF) -> bool:
        if self._port is None:
            return False
        category = StopCategory(category)
        if category is StopCategory.CONTROLLED and self._armed and not self._faults:
            try:
                self._decelerate_to_hold()
            except MotorError as exc:  # the bus may be failing: torque off regardless
                self._log.error("%s: controlled stop aborted (%s); torque off now", self.url, exc)
        confirmed = self._torque_off_all()
        self._armed = False
        if confirmed:  # else the exit hooks (Feetech) stay on it, and close() tries again
            self._on_disarm()
        self._log.warning("%s: stop category %d: torque off %s", self.url, int(category),
                          "read back from every servo" if confirmed else "NOT confirmed by every servo")
        return confirmed

    def _clear_faults_preflight(self) -> None:
        self._require_open("clear_faults")
        if self._armed:
            raise MotorError(f"{self.url}: clear_faults refused while armed; stop first")
        if any(f.code == "found_torque_on" for f in self._faults) and not self._torque_off_all():
            raise MotorError(f"{self.url}: torque off was not read back from every servo; check the bus")

    def _faults_cleared(self) -> None:
        self._log.warning("%s: faults cleared by the operator: %s", self.url,
                          "; ".join(map(str, self._faults)) or "none")
        self._faults.clear()

    # -- arm checks -----------------------------------------------------------------------------------
    def _check_device_limits(self, where: str, cal: JointCalibration, register: str, device: tuple[int, int],
                             config_ticks: tuple[int, int], config_rad: tuple[float, float]) -> None:
        """Refuse a servo whose own limits are wider than the robot configuration's."""
        (d_lo, d_hi), (t_lo, t_hi), (lo, hi) = device, config_ticks, config_rad
        if d_lo < t_lo - 1 or d_hi > t_hi + 1:  # 1 tick: rounding of the configured radians
            r_lo, r_hi = sorted((cal.to_radians(d_lo), cal.to_radians(d_hi)))
            raise ArmRefusedError(
                f"arm refused: {where} allows {r_lo:.3f}..{r_hi:.3f} rad ({register} {d_lo}..{d_hi} ticks) "
                f"but the robot configuration allows {lo:.3f}..{hi:.3f} rad ({t_lo}..{t_hi} ticks); narrow the "
                "servo's limits with `edge-vla motors configure` or correct the configuration")

    def _check_homing(self, where: str, servo_id: int, homing: int) -> None:
        if homing != self.expected_homing[servo_id]:
            raise ArmRefusedError(f"arm refused: {where} has Homing Offset {homing} but the LeRobot calibration "
                                  f"says {self.expected_homing[servo_id]}; re-run the calibration for this arm")

    @staticmethod
    def _check_present(where: str, cal: JointCalibration, present: int, ticks: tuple[int, int],
                       config_rad: tuple[float, float]) -> None:
        (t_lo, t_hi), (lo, hi) = ticks, config_rad
        if not t_lo - 1 <= present <= t_hi + 1:
            raise ArmRefusedError(f"arm refused: {where} is at {cal.to_radians(present):.3f} rad, outside its "
                                  f"limits {lo:.3f}..{hi:.3f} rad; move it inside by hand with torque off")

    # -- faults and stops -----------------------------------------------------------------------------
    def _fault_stop(self) -> None:
        """A latched fault while armed: the link or a servo failed -> category 0 (torque off now)."""
        self._log.error("%s: %s -> stop category 0", self.url, "; ".join(map(str, self._faults)))
        self.stop(StopCategory.TORQUE_OFF)

    def _decelerate_to_hold(self) -> None:
        state = self.poll_state()
        if self._faults:
            return
        hold = self.write_setpoints(state.positions)
        deadline = time.monotonic() + self.stop_timeout_s
        while time.monotonic() < deadline:
            state = self.poll_state()
            if self._faults or float(np.max(np.abs(state.velocities))) < HOLD_SPEED_RAD_S:
                return
            self.write_setpoints(hold)
            time.sleep(min(self.period_s, max(0.0, deadline - time.monotonic())))

    def _torque_off_all(self) -> bool:
        """Torque Enable 0 to each id (acknowledged, 3 tries), then read back from each id; a broadcast
        would get no reply."""
        for servo_id in self.ids:
            for _ in range(3):
                try:
                    self._write_torque_off(servo_id)
                    break
                except MotorError as exc:
                    self._log.error("%s: torque off of servo id %d failed: %s", self.url, servo_id, exc)
        confirmed = True
        for servo_id in self.ids:
            try:
                confirmed &= self._read_torque(servo_id) == 0
            except MotorError:
                confirmed = False
        self._torque_unconfirmed = not confirmed
        return confirmed

    # -- bus helpers ----------------------------------------------------------------------------------
    def _require_open(self, what: str) -> None:
        if self._port is None:
            raise MotorError(f"{what} on {self.url}: the device is not open (open() first)")

    def _check_answered(self, result: int, servo_id: int, what: str) -> None:
        if result != self._sdk.COMM_SUCCESS:
            raise MotorBusError(f"{self.url}: servo id {servo_id} did not answer {what} "
                                f"({self._ph.getTxRxResult(result)}); check power, id and baud rate "
                                f"(the bus is set to {self.baud})")

    def _sync_write(self, addr: int, size: int, param: list[int]) -> None:
        result = self._ph.syncWriteTxOnly(self._port, addr, size, param, len(param))
        self._last_tx = time.monotonic()
        if result != self._sdk.COMM_SUCCESS:
            raise MotorBusError(f"{self.url}: sync write not sent: {self._ph.getTxRxResult(result)}")
