"""Feetech STS series (STS3215: SO-100/SO-101, LeKiwi) through scservo_sdk: `feetech:///dev/ttyUSB0?ids=1-6`.

Per control cycle: `poll_state()` is one Sync Read of Present Position (56) .. Present Current (69..70), 15
bytes per servo (position, speed, load, voltage, temperature, status, moving, current); `write_setpoints()`
is one Sync Write of Goal Position (42, 2 bytes). Values are sign-magnitude, not two's complement:
position, speed, goal and current carry the sign in bit 15, Present Load in bit 10, Homing Offset in bit
11. Every status packet's error byte is the servo's Status (65): a set bit (overload, overheat, voltage,
angle sensor, overcurrent) latches a fault with its reason and stops the arm (category 0).

**There is no device watchdog.** The STS/SMS control table (Feetech's STS e-manual; LeRobot's
`motors/feetech/tables.py`; Feetech's `SMS_STS.h`) has no communication-timeout register: a servo keeps
its last goal with torque on for as long as it has power. So this backend turns torque off on every host
stop path it can see: `stop(0|1)`, `close()`, a fault, garbage collection of an unclosed device, interpreter
exit (atexit) and SIGTERM/SIGHUP (see `_ExitHooks`), each read back from every id (a broadcast would get no
reply). It cannot act on `kill -9`, an OOM kill, a host crash or an unplugged USB cable: then the arm keeps
holding its last goal under torque. The mitigations are outside the host: a hardware E-stop on servo power,
or an MCU running this project's firmware reference between the host and the servo bus (it owns a real
watchdog and writes Torque_Enable 0 when the host falls silent). `arm()` logs that residual risk every time.

Arming (an operator act) reads, and never writes, EEPROM: the model must be an STS/SMS servo (SCS servos
are refused at open: big-endian table, 1,024 ticks per turn); Operating Mode (33) must be 0 (position);
Min/Max Angle Limit (9/11) must be set and lie inside the robot configuration's joint limits; the Lock flag
(55) must read 1, so an EEPROM write reaching the servo while armed is not saved to flash; Homing Offset
(31) must equal a LeRobot calibration's; Present Position must lie inside the limits; Status (65) must be 0.
Then Goal Position <- Present Position, Torque_Enable (40) <- 1, read back from every id. Torque_Enable is
only ever written 0 or 1 (`_torque_param`): 128 would re-centre the servo (rewrite its homing offset).
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from firmware_bridge.motors.base import (
    ArmRefusedError,
    Capabilities,
    MotorBusError,
    MotorError,
    MotorFault,
    MotorState,
    MotorUrlError,
    StopCategory,
)
from firmware_bridge.motors.calibration import JointCalibration, LeRobotMotor
from firmware_bridge.motors.registry import parse_ids, parse_int
from firmware_bridge.motors.sdk_port import DEFAULT_LATENCY_MS
from firmware_bridge.motors.servo_bus import ServoBusDevice

log = logging.getLogger(__name__)

# STS/SMS control table (SRAM from 40)
FIRMWARE_MAJOR, FIRMWARE_MINOR, MODEL_NUMBER = 0, 1, 3
MIN_ANGLE_LIMIT, MAX_ANGLE_LIMIT, HOMING_OFFSET, OPERATING_MODE = 9, 11, 31, 33
TORQUE_ENABLE, GOAL_POSITION, LOCK, STATUS = 40, 42, 55, 65
STATE_ADDR, STATE_LEN = 56, 15  # Present Position (56) .. Present Current (69, 2 bytes)
POSITION_SIGN_BIT, SPEED_SIGN_BIT, LOAD_SIGN_BIT, HOMING_SIGN_BIT, CURRENT_SIGN_BIT = 15, 15, 10, 11, 15
STS_TICKS_PER_TURN = 4096
POSITION_MODE = 0
CURRENT_UNIT_A = 0.0065  # Present Current: 6.5 mA per unit
LOAD_UNIT = 0.001  # Present Load: 0.1 % of maximum torque per unit
STS_MODELS = {777: "STS3215", 2825: "STS3250", 11272: "SM8512BL"}  # LeRobot's MODEL_NUMBER_TABLE
SCS_MODELS = {1284: "SCS0009"}
BAUD_RATES = (1_000_000, 500_000, 250_000, 128_000, 115_200, 57_600, 38_400)  # STS table ∩ scservo_sdk
# EEPROM items only `edge-vla motors configure` writes (never the backend), and the Baud Rate (6) values
ID_ADDR, BAUD_RATE_ADDR, RETURN_DELAY_TIME = 5, 6, 7
BAUD_RATE_VALUES = {0: 1_000_000, 1: 500_000, 2: 250_000, 3: 128_000, 4: 115_200, 5: 76_800, 6: 57_600,
                    7: 38_400}  # Feetech's SMS_STS.h (76800: not settable through scservo_sdk)
STATUS_BITS = {0: "input voltage error", 1: "angle sensor error", 2: "overheat error", 3: "overcurrent error",
               5: "overload error"}
PERIOD_FLOOR_S = 0.010  # 100 Hz: 6 servos at 1 Mbaud take ~1.7 ms of wire time per cycle (bench_motors.py)
TORQUE_CHECK_EVERY = 25  # cycles between reads of one servo's Torque_Enable (a servo that restarted)
LINE_SETTLE_S = 0.005  # after a signal interrupted a transaction: let its replies arrive, then discard them
RESIDUAL_RISK = ("STS servos have NO communication watchdog: if this process is killed (kill -9, OOM), the "
                 "host crashes or the USB cable is unplugged, the servos keep holding their last goal with "
                 "torque on until servo power is cut. Mitigate with a hardware E-stop on servo power, or an MCU "
                 "running edge-vla's firmware reference between the host and the servo bus")


def encode_sign_magnitude(value: int, sign_bit: int) -> int:
    """|value| below `sign_bit`, the sign in `sign_bit`; refuses what does not fit (never wraps silently)."""
    limit = (1 << sign_bit) - 1
    if abs(value) > limit:
        raise ValueError(f"{value} does not fit a sign-magnitude field of {sign_bit} magnitude bits (max {limit})")
    return (-value | (1 << sign_bit)) if value < 0 else value


def decode_sign_magnitude(raw: int, sign_bit: int) -> int:
    magnitude = raw & ((1 << sign_bit) - 1)
    return -magnitude if raw & (1 << sign_bit) else magnitude


def describe_status(status: int) -> str:
    names = [name for bit, name in STATUS_BITS.items() if status & (1 << bit)]
    return ", ".join(names) or f"status 0x{status:02x}"


def _torque_param(value: int) -> list[int]:
    """The only way a Torque_Enable value is built: 0 or 1. 128 re-centres the servo, 2 is damping."""
    if value not in (0, 1):
        raise ValueError(f"Torque_Enable is only ever written 0 or 1 by this backend, not {value}")
    return [value]


class _ExitHooks:
    """Torque off every armed Feetech device (and one whose last stop was not read back from every servo) at
    interpreter exit and on SIGTERM/SIGINT/SIGHUP (SIGINT: Ctrl-C, and the edge-vla service unit's KillSignal).

    How it composes with the host: installed at the first arm(), from the main thread only. A signal whose
    handler is SIG_IGN (the host chose to ignore it) or was set outside Python is left alone. Otherwise the
    previous handler is kept and chained (and restored once no device is armed): ours turns torque off (read back) first, then calls the host's
    Python handler, or, where the previous one was SIG_DFL, restores SIG_DFL and re-sends the signal so the
    process still dies by it (exit status -15). A host that installs its own handler after arm() replaces
    ours and must call stop()/close() itself. If the signal interrupted a bus transaction, that transaction
    is abandoned (its replies are drained first); if the host's handler returns, the interrupted call fails
    with MotorBusError while the device is already disarmed.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    devices: ClassVar[weakref.WeakSet[FeetechDevice]] = weakref.WeakSet()
    previous: ClassVar[dict[int, Any]] = {}
    _atexit_done = False

    @classmethod
    def track(cls, device: FeetechDevice) -> None:
        cls.devices.add(device)
        if not cls._atexit_done:
            atexit.register(cls.torque_off_all, "interpreter exit")
            cls._atexit_done = True
        if threading.current_thread() is not threading.main_thread():
            log.warning("%s: armed from a non-main thread: SIGTERM handling not installed; the host must stop "
                        "the device on SIGTERM", device.url)
            return
        for sig in cls.SIGNALS:
            current = signal.getsignal(sig)
            # `==`, not `is`: cls.on_signal is a new bound-method object at every attribute access.
            if current == cls.on_signal or current == signal.SIG_IGN or current is None:
                continue
            cls.previous[sig] = current
            signal.signal(sig, cls.on_signal)

    @classmethod
    def untrack(cls, device: FeetechDevice) -> None:
        """No device left that may hold torque: give the host back its own handlers (where ours is still installed)."""
        cls.devices.discard(device)
        if any(d.torque_maybe_on for d in cls.devices) or threading.current_thread() is not threading.main_thread():
            return
        for sig, previous in list(cls.previous.items()):
            if signal.getsignal(sig) == cls.on_signal:
                signal.signal(sig, previous)
            del cls.previous[sig]

    @classmethod
    def torque_off_all(cls, why: str) -> None:
        for device in list(cls.devices):
            if device.torque_maybe_on:  # armed, or a stop whose torque off was not read back from every servo
                log.warning("%s: %s: torque off", device.url, why)
                device._interrupted_reset()
                device.stop(StopCategory.TORQUE_OFF)

    @classmethod
    def on_signal(cls, signum: int, frame: Any) -> None:
        previous = cls.previous.get(signum, signal.SIG_DFL)  # before the stops below restore it
        cls.torque_off_all(f"signal {signal.Signals(signum).name}")
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)


class FeetechDevice(ServoBusDevice):
    SCHEME: ClassVar[str] = "feetech"
    SDK: ClassVar[tuple[str, str, str]] = ("scservo_sdk", "feetech-servo-sdk", "feetech")
    BAUD_RATES: ClassVar[tuple[int, ...]] = BAUD_RATES
    PERIOD_FLOOR_S: ClassVar[float] = PERIOD_FLOOR_S
    GOAL_ADDR, GOAL_SIZE = GOAL_POSITION, 2
    LEROBOT_TICKS_PER_TURN: ClassVar[int | None] = STS_TICKS_PER_TURN
    URL_PARAMS: ClassVar[dict[str, str]] = {
        "ids": "servo ids in joint order: 1-6 or 1,2,5 (required)",
        "baud": "bus baud rate (default 1000000)",
        "period_ms": "control period (default 10, the floor); there is no device watchdog to size",
        "latency_ms": "the USB-serial adapter's latency timer: a reply is awaited 2 x this + wire time + 2 ms "
                      "(default 16, what the SDK assumes; 1 for an adapter set as LeRobot recommends)",
    }
    APPLY_DRIVE_MODE: ClassVar[bool] = True  # LeRobot's FeetechMotorsBus applies drive_mode in its ranges

    def __init__(self, port: str, ids: Sequence[int], *, baud: int = 1_000_000,
                 joint_limits: Sequence[tuple[float, float]] | None = None,
                 calibration: Sequence[JointCalibration] | None = None,
                 lerobot_calibration: dict[str, LeRobotMotor] | None = None,
                 names: Sequence[str] | None = None, period_s: float = PERIOD_FLOOR_S,
                 stop_timeout_s: float = 0.3, latency_ms: int = DEFAULT_LATENCY_MS) -> None:
        super().__init__(port, ids, baud=baud, joint_limits=joint_limits, calibration=calibration,
                         lerobot_calibration=lerobot_calibration, names=names, period_s=period_s,
                         stop_timeout_s=stop_timeout_s, latency_ms=latency_ms)
        n = len(self.ids)
        self.last_load = np.zeros(n)  # signed fraction of maximum torque, from the last poll_state()
        self.last_temperature = np.zeros(n)  # deg C

    @classmethod
    def from_url(cls, port: str, params: dict[str, str], **kw: Any) -> FeetechDevice:
        if "ids" not in params:
            raise MotorUrlError("feetech:// needs ids=...: the servo ids in joint order, e.g. ids=1-6")
        period_ms = parse_int(params, "period_ms", round(kw.pop("period_s", PERIOD_FLOOR_S) * 1000))
        ids = parse_ids(params["ids"], scheme="feetech")  # Feetech's own range (0..253), not Dynamixel's
        return cls(port, ids, baud=parse_int(params, "baud", 1_000_000, BAUD_RATES),
                   period_s=period_ms / 1000.0, latency_ms=parse_int(params, "latency_ms", DEFAULT_LATENCY_MS), **kw)

    # -- lifecycle ------------------------------------------------------------------------------------
    def _packet_handler(self, sdk: Any) -> Any:
        # PacketHandler(0) sets scservo_sdk's module-global byte order to little-endian (STS). This backend
        # packs and unpacks every value itself, so that global never decides a value here.
        return sdk.PacketHandler(0)

    def _describe_servos(self) -> str:
        return ", ".join(sorted({STS_MODELS[m] for m in self._models.values()}))

    def _open(self) -> None:
        super()._open()
        # At every start, not only at arm: a user rehearsing disarmed should learn it before wiring the arm.
        log.warning("%s: %s", self.url, RESIDUAL_RISK)

    def _identify(self, servo_id: int) -> None:
        model = self._read(servo_id, MODEL_NUMBER, 2)
        swapped = ((model & 0xFF) << 8) | (model >> 8)
        scs = SCS_MODELS.get(model) or SCS_MODELS.get(swapped)
        if scs:
            raise MotorBusError(f"{self.url}: servo id {servo_id} is an SCS-series servo ({scs}): its control "
                                "table is big-endian with 1,024 ticks per turn and is not implemented; this "
                                "backend drives STS/SMS servos (STS3215)")
        if model not in STS_MODELS:
            raise MotorBusError(f"{self.url}: servo id {servo_id} reports model number {model}, not a known STS/SMS "
                                f"servo ({', '.join(f'{v} = {k}' for k, v in STS_MODELS.items())})")
        self._models[servo_id] = model

    def _on_disarm(self) -> None:
        _ExitHooks.untrack(self)

    # -- the interface --------------------------------------------------------------------------------
    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            vendor="Feetech STS series (SO-100/SO-101)", joint_names=self.names, has_device_watchdog=False,
            watchdog_period_s=0.0,
            on_watchdog_expiry="no device watchdog exists: if the host dies or the cable is unplugged the servos "
                               "keep holding their last goal with torque on until servo power is cut",
            units="rad", min_period_s=PERIOD_FLOOR_S)

    def arm(self) -> None:
        self._arm_preflight()
        for j, servo_id in enumerate(self.ids):
            status = self._read(servo_id, STATUS, 1)
            if status:
                self._latch(MotorFault(self.names[j], "servo_error", describe_status(status)))
        self._refuse_if_faulted("arm")
        self._tick_range = [self._check_joint(j, servo_id) for j, servo_id in enumerate(self.ids)]
        try:
            for servo_id in self.ids:  # no jump to a stale goal at torque on
                present = decode_sign_magnitude(self._read(servo_id, 56, 2), POSITION_SIGN_BIT)
                self._write(servo_id, GOAL_POSITION, list(encode_sign_magnitude(present, 15).to_bytes(2, "little")))
            self._torque_unconfirmed = True  # until a torque off is read back, whatever happens next
            # Hooked before torque on, not after a successful arm: an arm that fails after it (a servo deaf to the
            # read-back, and so to the torque off below) leaves a powered servo that SIGTERM must still reach.
            _ExitHooks.track(self)
            self._sync_write(TORQUE_ENABLE, 1, [b for i in self.ids for b in (i, *_torque_param(1))])
            for servo_id in self.ids:
                torque = self._read(servo_id, TORQUE_ENABLE, 1)
                if torque != 1:
                    raise ArmRefusedError(f"arm failed: servo id {servo_id} reads back torque {torque} (expected 1)")
        except MotorError:
            if self._torque_off_all():
                self._on_disarm()  # every servo read torque off: nothing left for the hooks
            raise
        self._armed = True
        self._cycles = 0
        log.warning("%s: armed WITHOUT a device watchdog. %s", self.url, RESIDUAL_RISK)

    def poll_state(self) -> MotorState:
        self._require_open("poll_state")
        raw = self._sync_read(STATE_ADDR, STATE_LEN)
        stamp = time.monotonic()
        n = len(self.ids)
        pos, vel, cur = np.empty(n), np.empty(n), np.empty(n)
        for j, servo_id in enumerate(self.ids):
            b, cal = raw[servo_id], self.calibration[j]
            word = [int.from_bytes(b[k: k + 2], "little") for k in (0, 2, 4, 13)]
            pos[j] = cal.to_radians(decode_sign_magnitude(word[0], POSITION_SIGN_BIT))
            vel[j] = decode_sign_magnitude(word[1], SPEED_SIGN_BIT) * cal.rad_per_tick() * cal.direction
            self.last_load[j] = decode_sign_magnitude(word[2], LOAD_SIGN_BIT) * LOAD_UNIT * cal.direction
            cur[j] = decode_sign_magnitude(word[3], CURRENT_SIGN_BIT) * CURRENT_UNIT_A
            self.last_temperature[j] = b[7]
        self._cycles += 1
        if self._armed and self._cycles % TORQUE_CHECK_EVERY == 0:
            self._check_torque_held(self.ids[(self._cycles // TORQUE_CHECK_EVERY) % n])
        if self._faults and self._armed:
            self._fault_stop()
        return MotorState(pos, vel, cur, stamp)

    def _encode_goal(self, ticks: int) -> bytes:
        return encode_sign_magnitude(ticks, POSITION_SIGN_BIT).to_bytes(2, "little")

    def clear_faults(self) -> None:
        """Operator act: with torque off (the STS clears its error bits then), every servo must read Status 0;
        a bit still set means the condition persists (heat, voltage): the operator must fix it or power-cycle."""
        self._clear_faults_preflight()
        self._torque_off_all()
        left = {i: s for i in self.ids if (s := self._read(i, STATUS, 1))}
        if left:
            detail = "; ".join(f"id {i}: {describe_status(s)}" for i, s in left.items())
            raise MotorError(f"{self.url}: faults did not clear ({detail}); let the servo cool, check the supply, "
                             "or power-cycle the servos")
        self._faults_cleared()

    # -- arm checks -----------------------------------------------------------------------------------
    def _check_joint(self, j: int, servo_id: int) -> tuple[int, int]:
        """The goal tick range this joint may be sent; raises ArmRefusedError with one line otherwise."""
        name, cal = self.names[j], self.calibration[j]
        assert self.joint_limits is not None
        lo, hi = self.joint_limits[j]
        where = f"joint {name!r} (servo id {servo_id})"
        mode = self._read(servo_id, OPERATING_MODE, 1)
        if mode != POSITION_MODE:
            raise ArmRefusedError(f"arm refused: {where} is in operating mode {mode}; this backend sends goal "
                                  "positions and needs mode 0 (position), set with `edge-vla motors configure`")
        lock = self._read(servo_id, LOCK, 1)
        if lock != 1:
            raise ArmRefusedError(f"arm refused: {where} has its EEPROM unlocked (Lock 55 = {lock}), so a stray write "
                                  "would be saved to flash; power-cycle the servos or finish `edge-vla motors "
                                  "configure`, which locks it")
        t_lo, t_hi = sorted((cal.to_ticks(lo), cal.to_ticks(hi)))
        d_lo, d_hi = self._read(servo_id, MIN_ANGLE_LIMIT, 2), self._read(servo_id, MAX_ANGLE_LIMIT, 2)
        if d_lo == 0 and d_hi == 0:
            raise ArmRefusedError(f"arm refused: {where} has Min/Max Angle Limit 0/0 (multi-turn: the servo enforces "
                                  f"no limit); set limits inside {lo:.3f}..{hi:.3f} rad with `edge-vla motors "
                                  "configure`")
        self._check_device_limits(where, cal, "Min/Max Angle Limit", (d_lo, d_hi), (t_lo, t_hi), (lo, hi))
        if servo_id in self.expected_homing:
            homing = decode_sign_magnitude(self._read(servo_id, HOMING_OFFSET, 2), HOMING_SIGN_BIT)
            self._check_homing(where, servo_id, homing)
        present = decode_sign_magnitude(self._read(servo_id, 56, 2), POSITION_SIGN_BIT)
        t_lo, t_hi = max(t_lo, d_lo), min(t_hi, d_hi)
        self._check_present(where, cal, present, (t_lo, t_hi), (lo, hi))
        return t_lo, t_hi

    # -- faults ---------------------------------------------------------------------------------------
    def _check_torque_held(self, servo_id: int) -> None:
        """An armed servo reading torque off restarted (a power dip) or was switched off by someone else."""
        if self._read(servo_id, TORQUE_ENABLE, 1) != 1:
            self._latch(MotorFault(self.names[self.ids.index(servo_id)], "torque_lost",
                                   "the servo reads torque off while armed: it restarted (power dip, loose "
                                   "cable) or another program wrote it"))

    def _latch_status(self, servo_id: int, error: int) -> None:
        self._latch(MotorFault(self.names[self.ids.index(servo_id)], "servo_error", describe_status(error)))

    def _write_torque_off(self, servo_id: int) -> None:
        self._write(servo_id, TORQUE_ENABLE, _torque_param(0))

    def _read_torque(self, servo_id: int) -> int:
        return self._read(servo_id, TORQUE_ENABLE, 1)

    def _interrupted_reset(self) -> None:
        """Called from a signal handler: whatever transaction it interrupted is abandoned; let its replies
        arrive, then discard them, so the torque-off acknowledgements are not confused with them."""
        if self._port is None:
            return
        self._port.is_using = False
        time.sleep(LINE_SETTLE_S)
        try:
            self._port.ser.reset_input_buffer()
        except Exception as exc:  # the port may be gone (unplugged): the stop will report it
            log.error("%s: could not drain the port: %s", self.url, exc)

    # -- bus helpers ----------------------------------------------------------------------------------
    def _check(self, result: int, error: int, servo_id: int, what: str) -> None:
        self._check_answered(result, servo_id, what)
        if error:
            self._latch_status(servo_id, error)

    def _read(self, servo_id: int, addr: int, size: int) -> int:
        data, result, error = self._ph.readTxRx(self._port, servo_id, addr, size)
        self._check(result, error, servo_id, f"read of address {addr}")
        if len(data) != size:
            raise MotorBusError(f"{self.url}: servo id {servo_id} answered {len(data)} bytes for {size} at {addr}")
        return int.from_bytes(bytes(data), "little")

    def _write(self, servo_id: int, addr: int, data: list[int]) -> None:
        result, error = self._ph.writeTxRx(self._port, servo_id, addr, len(data), data)
        self._check(result, error, servo_id, f"write of {data} to address {addr}")

    def _sync_read(self, addr: int, size: int) -> dict[int, bytes]:
        """One Sync Read of every id; read each reply's error byte here (GroupSyncRead drops it)."""
        sdk, port, ph = self._sdk, self._port, self._ph
        result = ph.syncReadTx(port, addr, size, list(self.ids), len(self.ids))
        if result != sdk.COMM_SUCCESS:
            raise MotorBusError(f"{self.url}: sync read not sent: {ph.getTxRxResult(result)}")
        raw: dict[int, bytes] = {}
        errors: dict[int, int] = {}
        for servo_id in self.ids:
            data, result, error = ph.readRx(port, servo_id, size)
            if result != sdk.COMM_SUCCESS or len(data) != size:
                port.is_using = False
                raise MotorBusError(f"{self.url}: servo id {servo_id} did not answer the sync read of address {addr} "
                                    f"({ph.getTxRxResult(result)}); check its cable and power")
            raw[servo_id] = bytes(data)
            if error:
                errors[servo_id] = error
        port.is_using = False
        for servo_id, error in errors.items():
            self._latch_status(servo_id, error)
        return raw
