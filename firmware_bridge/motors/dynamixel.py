"""Dynamixel X series over Protocol 2.0 (dynamixel-sdk): `dynamixel:///dev/ttyUSB0?baud=1000000&ids=1-6`.

Per control cycle: `poll_state()` is one Sync Read of the contiguous block Present Current (126, 2 bytes),
Present Velocity (128, 4) and Present Position (132, 4); `write_setpoints()` is one Sync Write of Goal
Position (116, 4). A status packet whose error byte has the Alert bit (0x80) makes the backend read
Hardware Error Status (70) of that servo and latch the reason.

Arming (an operator act) reads, and never writes, EEPROM: Firmware Version (6) must be 38 or newer
(the e-manual: "Bus Watchdog (98) is available from firmware v38"); Operating Mode (11) must be position
control (3), where Min/Max Position Limit (52/48) are enforced by the servo, and those limits must lie
inside the robot configuration's joint limits (modes 4/5 enforce no limit and need `host_limits=1`);
Homing Offset (20) must match a LeRobot calibration when one is given; Present Position must lie inside
the joint limits. Then: Goal Position <- Present Position, Bus Watchdog (98) <- ceil(2 x period / 20 ms)
(20 ms at the 10 ms period floor), Torque Enable (64) <- 1, and both are read back from every id.

The Bus Watchdog is fed only by the packets this object sends from the caller's thread (the control
cycle); there is no helper thread. If the host stops cycling, each servo stops by itself and holds its
position with torque on (the manual: Profile Acceleration/Velocity applied as 0), reads -1 in register 98
and refuses goal writes. That is a stop with power kept. Every stop the host makes ends in torque off:
stop(0) writes Torque Enable 0 to each id now; stop(1) first commands the present positions (the servo's
position loop brakes to hold) for at most `stop_timeout_s`, then torque off. Both read Torque Enable back.
A Bus Watchdog Error and hardware errors latch until `clear_faults()` (an operator act: Reboot
instruction for hardware errors, 98 <- 0 for the watchdog error).
"""

from __future__ import annotations

import logging
import math
import time
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
)
from firmware_bridge.motors.calibration import JointCalibration, LeRobotMotor
from firmware_bridge.motors.registry import parse_ids, parse_int
from firmware_bridge.motors.servo_bus import ServoBusDevice

log = logging.getLogger(__name__)

# Control table (X series, ROBOTIS e-manual)
MODEL_NUMBER, FIRMWARE_VERSION, OPERATING_MODE, HOMING_OFFSET = 0, 6, 11, 20
MAX_POSITION_LIMIT, MIN_POSITION_LIMIT = 48, 52
TORQUE_ENABLE, HARDWARE_ERROR_STATUS, BUS_WATCHDOG, GOAL_POSITION = 64, 70, 98, 116
STATE_ADDR, STATE_LEN = 126, 10  # Present Current (2) + Present Velocity (4) + Present Position (4)
ALERT = 0x80
WATCHDOG_UNIT_S = 0.020
WATCHDOG_ERROR = 0xFF  # register 98 reads -1 after expiry
MIN_FIRMWARE = 38
POSITION_MODE, EXTENDED_POSITION_MODE, CURRENT_POSITION_MODE = 3, 4, 5
VELOCITY_UNIT_RAD_S = 0.229 * 2 * math.pi / 60
CURRENT_UNIT_A = {1190: 1e-3, 1200: 1e-3}  # XL330: 1 mA per unit; X430/540 series: 2.69 mA
DEFAULT_CURRENT_UNIT_A = 2.69e-3
BAUD_RATES = (9600, 57600, 115200, 1_000_000, 2_000_000, 3_000_000, 4_000_000)  # X series and dynamixel-sdk
# EEPROM items only `edge-vla motors configure` writes (never the backend), and the Baud Rate (8) values
ID_ADDR, BAUD_RATE_ADDR, RETURN_DELAY_TIME = 7, 8, 9
BAUD_RATE_VALUES = {0: 9600, 1: 57600, 2: 115200, 3: 1_000_000, 4: 2_000_000, 5: 3_000_000, 6: 4_000_000,
                    7: 4_500_000}  # the e-manual's X-series table (4.5M: not settable through dynamixel-sdk)
MODEL_NAMES = {1020: "XM430-W350", 1030: "XM430-W210", 1060: "XL430-W250", 1070: "XC430-W150", 1120: "XM540-W270",
               1190: "XL330-M077", 1200: "XL330-M288"}  # LeRobot's MODEL_NUMBER_TABLE and the e-manual's example
HW_ERROR_BITS = {0: "input voltage error", 2: "overheating error", 3: "motor encoder error",
                 4: "electrical shock error", 5: "overload error"}
STATUS_ERRORS = {1: "result fail", 2: "instruction error", 3: "CRC error", 4: "data range error",
                 5: "data length error", 6: "data limit error", 7: "access error"}
PERIOD_FLOOR_S = 0.010  # 100 Hz: 6 servos at 1 Mbaud take ~2 ms of wire time per cycle (bench_motors.py)


def describe_hardware_error(status: int) -> str:
    names = [name for bit, name in HW_ERROR_BITS.items() if status & (1 << bit)]
    return ", ".join(names) or f"hardware error status 0x{status:02x}"


def watchdog_units(period_s: float) -> int:
    """Bus Watchdog value for a control period: two periods, rounded up to the register's 20 ms unit."""
    units = max(1, math.ceil(2 * period_s / WATCHDOG_UNIT_S - 1e-9))
    if units > 127:
        raise MotorUrlError(f"a {period_s * 1000:.0f} ms control period needs a Bus Watchdog over 127 x 20 ms; "
                            "use a period of 1.27 s or less")
    return units


class DynamixelDevice(ServoBusDevice):
    SCHEME: ClassVar[str] = "dynamixel"
    SDK: ClassVar[tuple[str, str, str]] = ("dynamixel_sdk", "dynamixel-sdk", "dynamixel")
    BAUD_RATES: ClassVar[tuple[int, ...]] = BAUD_RATES
    PERIOD_FLOOR_S: ClassVar[float] = PERIOD_FLOOR_S
    GOAL_ADDR, GOAL_SIZE = GOAL_POSITION, 4
    URL_PARAMS: ClassVar[dict[str, str]] = {
        "ids": "servo ids in joint order: 1-6 or 1,2,5 (required)",
        "baud": "bus baud rate (default 1000000)",
        "period_ms": "control period the Bus Watchdog is sized for: 2 periods (default 10, the floor)",
        "host_limits": "1: accept extended/current-based position modes, whose limits only the host enforces",
        "latency_ms": "the USB-serial adapter's latency timer: a reply is awaited 2 x this + wire time + 2 ms "
                      "(default 16, the FTDI default the SDK assumes; 1 for a U2D2 set as LeRobot recommends)",
    }

    def __init__(self, port: str, ids: Sequence[int], *, baud: int = 1_000_000,
                 joint_limits: Sequence[tuple[float, float]] | None = None,
                 calibration: Sequence[JointCalibration] | None = None,
                 lerobot_calibration: dict[str, LeRobotMotor] | None = None,
                 names: Sequence[str] | None = None, period_s: float = PERIOD_FLOOR_S,
                 host_limits: bool = False, stop_timeout_s: float = 0.3, latency_ms: int = 16) -> None:
        super().__init__(port, ids, baud=baud, joint_limits=joint_limits, calibration=calibration,
                         lerobot_calibration=lerobot_calibration, names=names, period_s=period_s,
                         stop_timeout_s=stop_timeout_s, latency_ms=latency_ms)
        self.host_limits = host_limits
        self.watchdog_units = watchdog_units(period_s)
        self._firmware: dict[int, int] = {}
        self._last_state: MotorState | None = None

    @classmethod
    def from_url(cls, port: str, params: dict[str, str], **kw: Any) -> DynamixelDevice:
        if "ids" not in params:
            raise MotorUrlError("dynamixel:// needs ids=...: the servo ids in joint order, e.g. ids=1-6")
        period_ms = parse_int(params, "period_ms", round(kw.pop("period_s", PERIOD_FLOOR_S) * 1000))
        return cls(port, parse_ids(params["ids"]), baud=parse_int(params, "baud", 1_000_000, BAUD_RATES),
                   period_s=period_ms / 1000.0, host_limits=parse_int(params, "host_limits", 0, (0, 1)) == 1,
                   latency_ms=parse_int(params, "latency_ms", 16), **kw)

    # -- lifecycle ------------------------------------------------------------------------------------
    def _packet_handler(self, sdk: Any) -> Any:
        return sdk.PacketHandler(2.0)

    def _identify(self, dxl_id: int) -> None:
        model, result, error = self._ph.ping(self._port, dxl_id)
        self._check(result, error, dxl_id, "ping", alert_ok=True)
        self._models[dxl_id] = model
        self._firmware[dxl_id] = self._read(dxl_id, FIRMWARE_VERSION, 1)

    def _describe_servos(self) -> str:
        return f"models {sorted(set(self._models.values()))}, firmware {sorted(set(self._firmware.values()))}"

    # -- the interface --------------------------------------------------------------------------------
    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            vendor="ROBOTIS Dynamixel X series (Protocol 2.0)", joint_names=self.names, has_device_watchdog=True,
            watchdog_period_s=self.watchdog_units * WATCHDOG_UNIT_S,
            on_watchdog_expiry="each servo stops and holds its position with torque on (Profile Acceleration/"
                               "Velocity applied as 0); Bus Watchdog Error latches and goal writes are refused "
                               "until an operator clears faults",
            units="rad", min_period_s=PERIOD_FLOOR_S)

    def arm(self) -> None:
        self._arm_preflight()
        self._check_device_errors()
        self._refuse_if_faulted("arm")
        tick_ranges = []
        for j, dxl_id in enumerate(self.ids):
            tick_ranges.append(self._check_joint(j, dxl_id))
        self._tick_range = tick_ranges
        try:
            for dxl_id in self.ids:
                present = self._read(dxl_id, 132, 4, signed=True)
                self._write(dxl_id, GOAL_POSITION, 4, present)  # no jump to a stale goal at torque on
                self._write(dxl_id, BUS_WATCHDOG, 1, self.watchdog_units)  # inactive until torque is on
            # One sync write starts every servo's torque (and so its watchdog) together; one sync read of
            # 64..98 reads both back and feeds every watchdog.
            self._torque_unconfirmed = True  # until a torque off is read back, whatever happens next
            self._sync_write(TORQUE_ENABLE, 1, [b for dxl_id in self.ids for b in (dxl_id, 1)])
            for dxl_id, block in self._sync_read(TORQUE_ENABLE, BUS_WATCHDOG - TORQUE_ENABLE + 1).items():
                torque, wd = block[0], block[BUS_WATCHDOG - TORQUE_ENABLE]
                if torque != 1 or wd != self.watchdog_units:
                    raise ArmRefusedError(f"arm failed: servo id {dxl_id} reads back torque {torque}, bus watchdog "
                                          f"{wd} (expected 1, {self.watchdog_units})")
        except MotorError:
            self._torque_off_all()
            raise
        self._armed = True
        self._last_tx = time.monotonic()
        log.info("%s: armed; Bus Watchdog %d ms", self.url, self.watchdog_units * 20)

    def poll_state(self) -> MotorState:
        self._require_open("poll_state")
        self._check_watchdog_gap(periodic=True)
        raw = self._sync_read(STATE_ADDR, STATE_LEN)
        stamp = time.monotonic()
        n = len(self.ids)
        pos, vel, cur = np.empty(n), np.empty(n), np.empty(n)
        for j, dxl_id in enumerate(self.ids):
            b, cal = raw[dxl_id], self.calibration[j]
            cur[j] = int.from_bytes(b[0:2], "little", signed=True) * CURRENT_UNIT_A.get(
                self._models.get(dxl_id, 0), DEFAULT_CURRENT_UNIT_A) * cal.direction
            vel[j] = int.from_bytes(b[2:6], "little", signed=True) * VELOCITY_UNIT_RAD_S * cal.direction
            pos[j] = cal.to_radians(int.from_bytes(b[6:10], "little", signed=True))
        self._cycles += 1
        self._last_state = MotorState(pos, vel, cur, stamp)
        if self._faults and self._armed:
            self._fault_stop()
        return self._last_state

    def _before_setpoints(self) -> None:
        self._check_watchdog_gap()
        self._refuse_if_faulted("setpoints")

    def _encode_goal(self, ticks: int) -> bytes:
        return (ticks & 0xFFFFFFFF).to_bytes(4, "little")

    def clear_faults(self) -> None:
        """Operator act: Reboot servos with hardware errors, write 0 to Bus Watchdog (98) where it reads -1,
        read both back, then drop the host's latches. The servos come back disarmed (torque off)."""
        self._clear_faults_preflight()
        for dxl_id in self.ids:
            if self._read(dxl_id, HARDWARE_ERROR_STATUS, 1, alert_ok=True):
                self._reboot(dxl_id)
            if self._read(dxl_id, BUS_WATCHDOG, 1, alert_ok=True) == WATCHDOG_ERROR:
                self._write(dxl_id, BUS_WATCHDOG, 1, 0)
        left = [i for i in self.ids if self._read(i, HARDWARE_ERROR_STATUS, 1, alert_ok=True)
                or self._read(i, BUS_WATCHDOG, 1, alert_ok=True) == WATCHDOG_ERROR]
        if left:
            raise MotorError(f"{self.url}: faults did not clear on servo ids {left}; "
                             "check power and wiring, then power-cycle the servos")
        self._faults_cleared()

    # -- arm checks -----------------------------------------------------------------------------------
    def _check_device_errors(self) -> None:
        for j, dxl_id in enumerate(self.ids):
            hes = self._read(dxl_id, HARDWARE_ERROR_STATUS, 1, alert_ok=True)
            if hes:
                self._latch(MotorFault(self.names[j], "hardware_error", describe_hardware_error(hes)))
            if self._read(dxl_id, BUS_WATCHDOG, 1, alert_ok=True) == WATCHDOG_ERROR:
                self._latch(MotorFault(self.names[j], "bus_watchdog", "Bus Watchdog Error latched in the servo"))

    def _check_joint(self, j: int, dxl_id: int) -> tuple[int, int]:
        """The goal tick range this joint may be sent; raises ArmRefusedError with one line otherwise."""
        name, cal = self.names[j], self.calibration[j]
        assert self.joint_limits is not None
        lo, hi = self.joint_limits[j]
        where = f"joint {name!r} (servo id {dxl_id})"
        firmware = self._firmware[dxl_id]
        if firmware < MIN_FIRMWARE:
            raise ArmRefusedError(f"arm refused: {where} runs firmware v{firmware}; the Bus Watchdog needs v"
                                  f"{MIN_FIRMWARE} or newer (ROBOTIS e-manual, Bus Watchdog(98)); update it with "
                                  "DYNAMIXEL Wizard 2.0")
        t_lo, t_hi = sorted((cal.to_ticks(lo), cal.to_ticks(hi)))
        mode = self._read(dxl_id, OPERATING_MODE, 1)
        if mode == POSITION_MODE:
            d_lo, d_hi = self._read(dxl_id, MIN_POSITION_LIMIT, 4), self._read(dxl_id, MAX_POSITION_LIMIT, 4)
            self._check_device_limits(where, cal, "Min/Max Position Limit", (d_lo, d_hi), (t_lo, t_hi), (lo, hi))
            t_lo, t_hi = max(t_lo, d_lo), min(t_hi, d_hi)
        elif mode in (EXTENDED_POSITION_MODE, CURRENT_POSITION_MODE):
            if not self.host_limits:
                raise ArmRefusedError(
                    f"arm refused: {where} is in operating mode {mode}, where the servo enforces no position limit; "
                    "set position mode (3) with `edge-vla motors configure`, or pass host_limits=1 to rely on "
                    f"the host's clamp to {lo:.3f}..{hi:.3f} rad")
        else:
            raise ArmRefusedError(f"arm refused: {where} is in operating mode {mode}; this backend sends goal "
                                  "positions and needs mode 3 (position), or 4/5 with host_limits=1")
        if dxl_id in self.expected_homing:
            self._check_homing(where, dxl_id, self._read(dxl_id, HOMING_OFFSET, 4, signed=True))
        self._check_present(where, cal, self._read(dxl_id, 132, 4, signed=True), (t_lo, t_hi), (lo, hi))
        return t_lo, t_hi

    # -- faults ---------------------------------------------------------------------------------------
    def _latch_hardware_error(self, dxl_id: int) -> None:
        j = self.ids.index(dxl_id)
        hes = self._read(dxl_id, HARDWARE_ERROR_STATUS, 1, alert_ok=True)
        self._latch(MotorFault(self.names[j], "hardware_error", describe_hardware_error(hes)))

    def _check_watchdog_gap(self, periodic: bool = False) -> None:
        """After a gap longer than half the watchdog period (the host stalled), or every 25 cycles for one
        servo (a packet lost on the wire, a servo that restarted), read Torque Enable (64) through Bus Watchdog
        (98) in one transaction: 98 = -1 means the servo stopped by itself; torque off while armed means it
        restarted (a power dip: it comes back torque off, watchdog 0) or another program switched it off."""
        if not self._armed:
            return
        gap = time.monotonic() - self._last_tx
        span = BUS_WATCHDOG - TORQUE_ENABLE + 1
        if gap > 0.5 * self.watchdog_units * WATCHDOG_UNIT_S:
            # one Sync Read of every servo's 64..98: one transaction, and it feeds every watchdog
            blocks = self._sync_read(TORQUE_ENABLE, span)
        elif periodic and self._cycles % 25 == 0:
            dxl_id = self.ids[(self._cycles // 25) % len(self.ids)]
            blocks = {dxl_id: self._read_bytes(dxl_id, TORQUE_ENABLE, span)}
        else:
            return
        for dxl_id, block in blocks.items():
            name = self.names[self.ids.index(dxl_id)]
            if block[BUS_WATCHDOG - TORQUE_ENABLE] == WATCHDOG_ERROR:
                self._latch(MotorFault(name, "bus_watchdog",
                                       f"the servo's Bus Watchdog expired (host silent for {gap * 1000:.0f} ms > "
                                       f"{self.watchdog_units * 20} ms); it holds position with torque on"))
            elif block[0] != 1:
                self._latch(MotorFault(name, "torque_lost", "the servo reads torque off while armed: it restarted "
                                       "(power dip, loose cable) or another program wrote it"))
        if self._faults:
            self._fault_stop()

    def _write_torque_off(self, dxl_id: int) -> None:
        self._write(dxl_id, TORQUE_ENABLE, 1, 0, alert_ok=True)

    def _read_torque(self, dxl_id: int) -> int:
        return self._read(dxl_id, TORQUE_ENABLE, 1, alert_ok=True)

    def _reboot(self, dxl_id: int) -> None:
        result, error = self._ph.reboot(self._port, dxl_id)
        self._check(result, error, dxl_id, "reboot", alert_ok=True)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:  # the servo is deaf while it restarts
            _, result, _ = self._ph.ping(self._port, dxl_id)
            if result == self._sdk.COMM_SUCCESS:
                log.warning("%s: servo id %d rebooted by the operator", self.url, dxl_id)
                return
        raise MotorBusError(f"{self.url}: servo id {dxl_id} did not come back within 2 s of its reboot")

    # -- bus helpers ----------------------------------------------------------------------------------
    def _check(self, result: int, error: int, dxl_id: int, what: str, alert_ok: bool = False) -> None:
        self._check_answered(result, dxl_id, what)
        if error & ALERT and not alert_ok:
            self._latch_hardware_error(dxl_id)
        if error & 0x7F:
            raise MotorError(f"{self.url}: servo id {dxl_id} refused {what}: "
                             f"{STATUS_ERRORS.get(error & 0x7F, f'error {error & 0x7F}')}")

    def _read(self, dxl_id: int, addr: int, size: int, *, signed: bool = False, alert_ok: bool = False) -> int:
        data, result, error = self._ph.readTxRx(self._port, dxl_id, addr, size)
        self._last_tx = time.monotonic()
        self._check(result, error, dxl_id, f"read of address {addr}", alert_ok)
        return int.from_bytes(self._whole(data, size, dxl_id, addr), "little", signed=signed)

    def _read_bytes(self, dxl_id: int, addr: int, size: int) -> bytes:
        data, result, error = self._ph.readTxRx(self._port, dxl_id, addr, size)
        self._last_tx = time.monotonic()
        self._check(result, error, dxl_id, f"read of addresses {addr}..{addr + size - 1}", alert_ok=True)
        return self._whole(data, size, dxl_id, addr)

    def _whole(self, data: Sequence[int], size: int, dxl_id: int, addr: int) -> bytes:
        """The `size` bytes a status packet must carry: the SDK hands over whatever parameters the packet had,
        and a short answer decoded anyway reads as zeros (a position of tick 0, an IndexError)."""
        if len(data) != size:
            raise MotorBusError(f"{self.url}: servo id {dxl_id} answered {len(data)} bytes for the {size} at address "
                                f"{addr}; check for two servos with one id, or a servo of another series")
        return bytes(data)

    def _write(self, dxl_id: int, addr: int, size: int, value: int, *, alert_ok: bool = False) -> None:
        data = list((value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
        result, error = self._ph.writeTxRx(self._port, dxl_id, addr, size, data)
        self._last_tx = time.monotonic()
        self._check(result, error, dxl_id, f"write of {value} to address {addr}", alert_ok)

    def _sync_read(self, addr: int, size: int) -> dict[int, bytes]:
        """One Sync Read of every id; the SDK's GroupSyncRead drops the error bytes, so read them here and
        latch the reason of any Alert."""
        sdk, port, ph = self._sdk, self._port, self._ph
        result = ph.syncReadTx(port, addr, size, list(self.ids), len(self.ids), False)
        self._last_tx = time.monotonic()
        if result != sdk.COMM_SUCCESS:
            raise MotorBusError(f"{self.url}: sync read not sent: {ph.getTxRxResult(result)}")
        raw: dict[int, bytes] = {}
        alerts = []
        for dxl_id in self.ids:
            data, result, error = ph.readRx(port, dxl_id, size)
            if result != sdk.COMM_SUCCESS:
                raise MotorBusError(f"{self.url}: servo id {dxl_id} did not answer the sync read of address {addr} "
                                    f"({ph.getTxRxResult(result)}); check its cable and power")
            if error & 0x7F:  # the servo did not serve the read: its status packet carries no data
                raise MotorBusError(f"{self.url}: servo id {dxl_id} refused the sync read of address {addr}: "
                                    f"{STATUS_ERRORS.get(error & 0x7F, f'error {error & 0x7F}')}")
            raw[dxl_id] = self._whole(data, size, dxl_id, addr)
            if error & ALERT:
                alerts.append(dxl_id)
        for dxl_id in alerts:
            self._latch_hardware_error(dxl_id)
        return raw
