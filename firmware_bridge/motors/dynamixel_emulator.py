"""A bus of emulated Dynamixel X-series servos (Protocol 2.0) on a real pty, paced like a UART.

Written from the ROBOTIS e-manual (Protocol 2.0 packet format, the XM430-W350 control table, the Bus
Watchdog, Shutdown and Return Delay Time sections), not from dynamixel_sdk, so the SDK and this emulator
check each other. What it does, with the manual's words where the manual says it:

- packets: header FF FF FD 00, id, length, instruction, params, CRC-16 (poly 0x8005, init 0) over the
  stuffed packet; byte stuffing FF FF FD -> FF FF FD FD in instruction + params; Ping, Read, Write,
  Reboot, Sync Read, Sync Write; other instructions get Instruction Error (0x02). Broadcast (0xFE) reads and
  writes return no status; Status Return Level (68) is honoured;
- error field: Result Fail 0x01, Instruction 0x02, CRC 0x03, Data Range 0x04, Data Length 0x05, Data Limit
  0x06, Access 0x07; bit 7 (Alert) is set on every status packet while Hardware Error Status (70) != 0;
- EEPROM items (addresses < 64) are refused with Access Error while Torque Enable (64) is 1 ("ROM lock");
  every EEPROM byte a servo accepts is counted (`eeprom_writes(id)`: EEPROM wears);
- ID (7): takes effect at once, the status packet of the write still carrying the old id (dynamixel_sdk's
  writeTxRx only accepts a reply from the id it wrote to, and LeRobot's setup_motor relies on that); onto an
  id another servo has, the two collide (neither is heard). Baud Rate (8): the status packet of the write
  leaves at the old rate, then the servo hears only the new one; servos on one pty may run at different rates;
  values outside the documented ranges of ID (0..252), Baud Rate (0..7), Return Delay Time (0..254) and the
  position limits (0..4095) get Data Range Error;
- Shutdown (63, default 52 = overload, electrical shock, overheating): a hardware error whose bit is set
  clears Torque Enable; REBOOT is the only way back to torque on (torque on is refused with Result Fail
  until then: the manual says only that reboot is required, the error code is this emulator's choice);
- Bus Watchdog (98, 20 ms units, 1..127): monitored only while Torque Enable is 1; the interval is measured
  between instruction packets (the manual: "all the Instruction Packet"; here: every valid packet addressed
  to this id or broadcast). On expiry the servo stops with torque on (Profile Acceleration/Velocity applied
  as 0: it holds the position it had), 98 reads -1 (0xFF), and Goal PWM/Current/Velocity/Position writes
  are refused with Data Range Error until 0 is written to 98 or the servo reboots;
- Return Delay Time (9, 2 us units): each status packet leaves after it; a sync read answers in list order; a
  broadcast Ping is answered by every servo in id order ("according to their arranged order"), each after
  the one before it plus its own return delay;
- Reboot: answers, then is deaf for `reboot_s` while it restarts with RAM at defaults (torque off,
  98 = 0, errors cleared); in extended position mode the present position comes back within one turn;
- wire time: with `baud` > 0, instruction bytes count as arriving at 10 bits per byte and each status
  packet is released when its last byte would have left the servo; the host port's termios speed must
  match the servo's baud rate or the bytes are dropped as noise (a real UART would see garbage);
- a first-order joint plant per servo, and fault injection: hardware errors (overload...), a servo
  rebooting mid-run, a blocked joint (which trips Overload after `overload_after_s` of effort), reads it
  answers with an error status and no data (`fail_reads`).

    python -m firmware_bridge.motors.dynamixel_emulator --ids 1-6 --return-delay 0 --print-path
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace

from firmware_bridge.motors import emulator_common as common

log = logging.getLogger(__name__)

HEADER = b"\xff\xff\xfd\x00"
BROADCAST_ID = 0xFE
MAX_PACKET_LENGTH = 1024  # longest Length field this emulator accepts; longer is noise (resync)
PARTIAL_TIMEOUT_S = 0.05  # a half-received packet older than this is dropped (servos time out too)

# instructions
PING, READ, WRITE, REG_WRITE, ACTION, FACTORY_RESET, REBOOT, CLEAR = 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x08, 0x10
STATUS, SYNC_READ, SYNC_WRITE = 0x55, 0x82, 0x83

# status error numbers (Protocol 2.0) and the alert bit
ERR_RESULT_FAIL, ERR_INSTRUCTION, ERR_CRC, ERR_DATA_RANGE, ERR_DATA_LENGTH, ERR_DATA_LIMIT, ERR_ACCESS = range(1, 8)
ALERT = 0x80

# Hardware Error Status (70) / Shutdown (63) bits on the X series
HW_INPUT_VOLTAGE, HW_OVERHEATING, HW_ENCODER, HW_ELECTRICAL_SHOCK, HW_OVERLOAD = 0, 2, 3, 4, 5
HW_ERROR_NAMES = {HW_INPUT_VOLTAGE: "input voltage error", HW_OVERHEATING: "overheating error",
                  HW_ENCODER: "motor encoder error", HW_ELECTRICAL_SHOCK: "electrical shock error",
                  HW_OVERLOAD: "overload error"}

# Baud Rate (8) index -> bits per second (X series)
BAUD_RATES = {0: 9600, 1: 57600, 2: 115200, 3: 1_000_000, 4: 2_000_000, 5: 3_000_000, 6: 4_000_000, 7: 4_500_000}

# Control table addresses used by name (X series, e.g. XM430-W350)
MODEL_NUMBER, FIRMWARE_VERSION, ID_ADDR, BAUD_RATE, RETURN_DELAY_TIME = 0, 6, 7, 8, 9
DRIVE_MODE, OPERATING_MODE, HOMING_OFFSET, MAX_POSITION_LIMIT, MIN_POSITION_LIMIT, SHUTDOWN = 10, 11, 20, 48, 52, 63
TORQUE_ENABLE, STATUS_RETURN_LEVEL, HARDWARE_ERROR_STATUS, BUS_WATCHDOG = 64, 68, 70, 98
GOAL_PWM, GOAL_CURRENT, GOAL_VELOCITY, PROFILE_ACCELERATION, PROFILE_VELOCITY, GOAL_POSITION = 100, 102, 104, 108, 112, 116
REALTIME_TICK, MOVING, PRESENT_CURRENT, PRESENT_VELOCITY, PRESENT_POSITION = 120, 122, 126, 128, 132
GOAL_ITEMS = (GOAL_PWM, GOAL_CURRENT, GOAL_VELOCITY, GOAL_POSITION)
EEPROM_END = 64
TABLE_SIZE = 662

# (address, size, writable, signed, default) -- EEPROM below 64, RAM from 64 (XM430-W350 control table)
CONTROL_TABLE: tuple[tuple[int, int, bool, bool, int], ...] = (
    (0, 2, False, False, 1020), (2, 4, False, False, 0), (6, 1, False, False, 45), (7, 1, True, False, 1),
    (8, 1, True, False, 1), (9, 1, True, False, 250), (10, 1, True, False, 0), (11, 1, True, False, 3),
    (12, 1, True, False, 255), (13, 1, True, False, 2), (20, 4, True, True, 0), (24, 4, True, False, 10),
    (31, 1, True, False, 80), (32, 2, True, False, 160), (34, 2, True, False, 95), (36, 2, True, False, 885),
    (38, 2, True, False, 1193), (40, 4, True, False, 32767), (44, 4, True, False, 350),
    (48, 4, True, False, 4095), (52, 4, True, False, 0), (63, 1, True, False, 52),
    (64, 1, True, False, 0), (65, 1, True, False, 0), (68, 1, True, False, 2), (69, 1, False, False, 0),
    (70, 1, False, False, 0), (76, 2, True, False, 1920), (78, 2, True, False, 100), (80, 2, True, False, 0),
    (82, 2, True, False, 0), (84, 2, True, False, 800), (88, 2, True, False, 0), (90, 2, True, False, 0),
    (98, 1, True, True, 0), (100, 2, True, True, 0), (102, 2, True, True, 0), (104, 4, True, True, 0),
    (108, 4, True, False, 0), (112, 4, True, False, 0), (116, 4, True, True, 0), (120, 2, False, False, 0),
    (122, 1, False, False, 0), (123, 1, False, False, 0), (124, 2, False, True, 0), (126, 2, False, True, 0),
    (128, 4, False, True, 0), (132, 4, False, True, 0), (136, 4, False, True, 0), (140, 4, False, True, 0),
    (144, 2, False, False, 120), (146, 1, False, False, 30),
)
ITEMS = {addr: (size, writable, signed, default) for addr, size, writable, signed, default in CONTROL_TABLE}
# documented value ranges of the EEPROM items a configure step writes (X-series control table)
VALUE_RANGES = {ID_ADDR: (0, 252), BAUD_RATE: (0, 7), RETURN_DELAY_TIME: (0, 254),
                MAX_POSITION_LIMIT: (0, 4095), MIN_POSITION_LIMIT: (0, 4095)}

VELOCITY_UNIT_RAD_S = 0.229 * 2 * math.pi / 60  # Present Velocity: 0.229 rpm per unit
TICKS_PER_TURN = 4096
OVERLOAD_AFTER_S = 0.3  # a blocked joint under effort trips Overload after this long (an emulator choice)


# --------------------------------------------------------------------------------------------------------
# Packet codec (independent of dynamixel_sdk; tests cross-check the CRC against it)
# --------------------------------------------------------------------------------------------------------
def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x8005) if crc & 0x8000 else (crc << 1)
        table.append(crc & 0xFFFF)
    return table


_CRC_TABLE = _crc_table()


def crc16(data: bytes | bytearray, crc: int = 0) -> int:
    """CRC-16 of Protocol 2.0: polynomial 0x8005, initial value 0, MSB first, no final xor."""
    for b in data:
        crc = ((crc << 8) ^ _CRC_TABLE[((crc >> 8) ^ b) & 0xFF]) & 0xFFFF
    return crc


def stuff(body: bytes) -> bytes:
    """Instruction + params with an extra 0xFD after every FF FF FD, so no header can appear inside."""
    out = bytearray()
    for b in body:
        out.append(b)
        if b == 0xFD and len(out) >= 3 and out[-3] == 0xFF and out[-2] == 0xFF:
            out.append(0xFD)
    return bytes(out)


def unstuff(body: bytes) -> bytes:
    out = bytearray()
    i = 0
    while i < len(body):
        out.append(body[i])
        if body[i] == 0xFD and len(out) >= 3 and out[-3] == 0xFF and out[-2] == 0xFF \
                and i + 1 < len(body) and body[i + 1] == 0xFD:
            i += 1  # drop the stuffing byte
        i += 1
    return bytes(out)


def build_packet(dxl_id: int, body: bytes) -> bytes:
    """A complete packet: body is the instruction byte and its params (unstuffed)."""
    stuffed = stuff(body)
    length = len(stuffed) + 2
    head = HEADER + bytes((dxl_id, length & 0xFF, length >> 8)) + stuffed
    crc = crc16(head)
    return head + bytes((crc & 0xFF, crc >> 8))


def status_packet(dxl_id: int, error: int, params: bytes = b"") -> bytes:
    return build_packet(dxl_id, bytes((STATUS, error)) + params)


@dataclass(frozen=True)
class Packet:
    dxl_id: int
    instruction: int
    params: bytes
    crc_ok: bool
    raw_length: int


class PacketParser(common.StreamParser):
    """Bytes in, whole packets out; garbage, bad lengths and stale partial packets are skipped."""

    HEADER = HEADER
    partial_timeout_s = PARTIAL_TIMEOUT_S

    def _take(self) -> Packet | object | None:
        if len(self.buf) < 7:
            return None
        length = self.buf[5] | (self.buf[6] << 8)
        if length < 3 or length > MAX_PACKET_LENGTH:
            return self.NOT_A_PACKET
        total = 7 + length
        if len(self.buf) < total:
            return None
        raw = bytes(self.buf[:total])
        del self.buf[:total]
        crc_ok = crc16(raw[:-2]) == (raw[-2] | (raw[-1] << 8))
        body = unstuff(raw[7:-2]) if crc_ok else raw[7:-2]
        return Packet(raw[4], body[0], bytes(body[1:]), crc_ok, total)


# --------------------------------------------------------------------------------------------------------
# One servo: control table + plant
# --------------------------------------------------------------------------------------------------------
@dataclass
class ServoConfig:
    dxl_id: int = 1
    model_number: int = 1020  # XM430-W350
    firmware_version: int = 45
    operating_mode: int = 3  # position control
    return_delay: int = 250  # factory default: 500 us
    min_position: int = 0
    max_position: int = 4095
    homing_offset: int = 0
    initial_position: int = 2048
    baud_index: int | None = None  # Baud Rate (8) value; None: the bus's baud rate
    max_speed_rad_s: float = 4.8  # XM430-W350 no-load speed at 12 V: 46 rpm
    time_constant_s: float = 0.03  # first-order position response


class Servo:
    def __init__(self, cfg: ServoConfig) -> None:
        self.cfg = cfg
        self.table = bytearray(TABLE_SIZE)
        self._load_defaults(eeprom=True)
        self.position = float(cfg.initial_position)  # present position, ticks (homing offset included)
        self.velocity = 0.0  # ticks/s
        self.current = 0.0  # raw units
        self.hold_target: float | None = None  # set while stopped by the bus watchdog
        self.last_instruction = 0.0
        self.offline_until = 0.0
        self.blocked = False
        self.effort_since: float | None = None
        self.booted_at = time.monotonic()
        self.eeprom_written = 0  # EEPROM bytes accepted (EEPROM wears)
        self.silent_after_eeprom: int | None = None  # fault injection: silent after this many more EEPROM writes
        self.failing_reads: dict[int, int] = {}  # fault injection: start address -> error of a data-less status

    # -- registers ------------------------------------------------------------------------------------
    def _load_defaults(self, eeprom: bool) -> None:
        for addr, (_size, _writable, _signed, default) in ITEMS.items():
            if addr < EEPROM_END and not eeprom:
                continue
            self.set(addr, default)
        if eeprom:
            c = self.cfg
            for addr, value in ((MODEL_NUMBER, c.model_number), (FIRMWARE_VERSION, c.firmware_version),
                                (ID_ADDR, c.dxl_id), (BAUD_RATE, 3 if c.baud_index is None else c.baud_index),
                                (RETURN_DELAY_TIME, c.return_delay),
                                (OPERATING_MODE, c.operating_mode), (HOMING_OFFSET, c.homing_offset),
                                (MAX_POSITION_LIMIT, c.max_position), (MIN_POSITION_LIMIT, c.min_position)):
                self.set(addr, value)

    def get(self, addr: int) -> int:
        size, _, signed, _ = ITEMS[addr]
        return int.from_bytes(self.table[addr: addr + size], "little", signed=signed)

    def set(self, addr: int, value: int) -> None:
        size, _, signed, _ = ITEMS[addr]
        if signed and value < 0:
            value += 1 << (8 * size)
        self.table[addr: addr + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    @property
    def dxl_id(self) -> int:
        return self.table[ID_ADDR]

    @property
    def torque(self) -> bool:
        return self.table[TORQUE_ENABLE] == 1

    @property
    def watchdog_error(self) -> bool:
        return self.table[BUS_WATCHDOG] == 0xFF

    def error_byte(self, error: int) -> int:
        return error | (ALERT if self.table[HARDWARE_ERROR_STATUS] else 0)

    def read(self, addr: int, length: int) -> tuple[int, bytes]:
        if addr in self.failing_reads:  # injected: the status packet of a read the servo could not serve
            return self.failing_reads[addr], b""
        if length <= 0 or addr + length > TABLE_SIZE:
            return ERR_ACCESS, b""
        return 0, bytes(self.table[addr: addr + length])

    def _items_in(self, addr: int, length: int) -> list[int] | int:
        """The items a write of `length` bytes at `addr` covers, or an error number."""
        items, cursor, end = [], addr, addr + length
        while cursor < end:
            if cursor not in ITEMS:
                inside = any(a < cursor < a + s for a, (s, *_rest) in ITEMS.items())
                return ERR_DATA_LENGTH if inside else ERR_ACCESS
            size = ITEMS[cursor][0]
            if cursor + size > end:
                return ERR_DATA_LENGTH
            items.append(cursor)
            cursor += size
        return items

    def write(self, addr: int, data: bytes, now: float) -> int:
        """Validate the whole write first, then apply it; returns the status error number (0: done)."""
        items = self._items_in(addr, len(data)) if data else ERR_DATA_LENGTH
        if isinstance(items, int):
            return items
        values = {}
        for a in items:
            size, writable, signed, _ = ITEMS[a]
            value = int.from_bytes(data[a - addr: a - addr + size], "little", signed=signed)
            if not writable or (a < EEPROM_END and self.torque):
                return ERR_ACCESS
            if a in GOAL_ITEMS and self.watchdog_error:
                return ERR_DATA_RANGE
            err = self._check_value(a, value)
            if err:
                return err
            values[a] = value
        for a, value in values.items():
            self._apply(a, value, now)
        return 0

    def _check_value(self, addr: int, value: int) -> int:
        if addr == TORQUE_ENABLE:
            if value not in (0, 1):
                return ERR_DATA_RANGE
            if value == 1 and self.table[HARDWARE_ERROR_STATUS]:
                return ERR_RESULT_FAIL  # only REBOOT restores torque after a shutdown
        if addr == BUS_WATCHDOG and not 0 <= value <= 127:
            return ERR_DATA_RANGE
        if addr == GOAL_POSITION and self.get(OPERATING_MODE) == 3 \
                and not self.get(MIN_POSITION_LIMIT) <= value <= self.get(MAX_POSITION_LIMIT):
            return ERR_DATA_LIMIT
        if addr in VALUE_RANGES and not VALUE_RANGES[addr][0] <= value <= VALUE_RANGES[addr][1]:
            return ERR_DATA_RANGE
        return 0

    def _apply(self, addr: int, value: int, now: float) -> None:
        self.set(addr, value)
        if addr == TORQUE_ENABLE:
            self.hold_target = None
            self.effort_since = None
        if addr == BUS_WATCHDOG:
            self.last_instruction = now  # the interval starts now
            if value == 0:
                self.hold_target = None  # error cleared: goal writes are accepted again

    # -- time -----------------------------------------------------------------------------------------
    def watchdog_expired(self, now: float) -> bool:
        wd = self.table[BUS_WATCHDOG]
        if not self.torque or not 1 <= wd <= 127:
            return False
        if now - self.last_instruction <= wd * 0.020:
            return False
        self.table[BUS_WATCHDOG] = 0xFF
        self.hold_target = self.position  # stop: profile acceleration/velocity applied as 0 -> hold here
        return True

    def target(self) -> float | None:
        if not self.torque:
            return None
        if self.hold_target is not None:
            return self.hold_target
        return float(self.get(GOAL_POSITION))

    def step(self, dt: float, now: float) -> int | None:
        """Advance the plant by dt; returns a hardware error bit that this step raised, if any."""
        target = self.target()
        vmax = self.cfg.max_speed_rad_s * TICKS_PER_TURN / (2 * math.pi)
        if target is None or self.blocked:
            self.velocity = 0.0
        else:
            self.velocity = max(-vmax, min(vmax, (target - self.position) / self.cfg.time_constant_s))
            self.position += self.velocity * dt
        error = 0.0 if target is None else target - self.position
        self.current = max(-1193.0, min(1193.0, 2.0 * error)) if self.torque else 0.0
        raised = None
        if self.blocked and self.torque and abs(error) > 20:
            self.effort_since = self.effort_since or now
            if now - self.effort_since > OVERLOAD_AFTER_S:
                raised = HW_OVERLOAD
        else:
            self.effort_since = None
        self._publish(now)
        return raised

    def _publish(self, now: float) -> None:
        self.set(PRESENT_POSITION, round(self.position))
        self.set(PRESENT_VELOCITY, round(self.velocity * 2 * math.pi / TICKS_PER_TURN / VELOCITY_UNIT_RAD_S))
        self.set(PRESENT_CURRENT, round(self.current))
        self.set(MOVING, int(abs(self.velocity) > 1.0))
        self.set(REALTIME_TICK, int((now - self.booted_at) * 1000) % 32768)

    def hardware_error(self, bit: int) -> None:
        self.table[HARDWARE_ERROR_STATUS] |= 1 << bit
        if self.table[SHUTDOWN] & (1 << bit):
            self.table[TORQUE_ENABLE] = 0  # Shutdown: torque off, output 0 %
            self.hold_target = None

    def reboot(self, now: float, reboot_s: float) -> None:
        self._load_defaults(eeprom=False)
        self.hold_target = None
        self.effort_since = None
        self.velocity = 0.0
        if self.get(OPERATING_MODE) == 4:  # extended position: multi-turn count is lost on reboot
            self.position = float(round(self.position) % TICKS_PER_TURN)
        self.set(GOAL_POSITION, round(self.position))
        self.offline_until = now + reboot_s
        self.booted_at = now + reboot_s
        self._publish(now)


# --------------------------------------------------------------------------------------------------------
# The bus: pty, pacing, dispatch, events
# --------------------------------------------------------------------------------------------------------
class Event(common.Event):
    """A bus event; `dxl_id` is the servo it concerns (0xFE: the bus)."""

    @property
    def dxl_id(self) -> int:
        return self.servo_id


class BusEmulator(common.PtyBus):
    """Servos on one pty. start() runs the bus in a thread; every public method is thread-safe."""

    thread_name = "dxl-emulator"
    event_type = Event
    baud_rates = tuple(BAUD_RATES.values())
    id_address, baud_address, baud_table = ID_ADDR, BAUD_RATE, BAUD_RATES

    def __init__(self, servos: Iterable[ServoConfig], *, baud: int = 1_000_000, reboot_s: float = 0.05,
                 check_baud: bool = True, link: str | None = None, tick_s: float = 0.001) -> None:
        index = {bps: i for i, bps in BAUD_RATES.items()}.get(baud, 3)
        cfgs = [cfg if cfg.baud_index is not None else replace(cfg, baud_index=index) for cfg in servos]
        super().__init__({cfg.dxl_id: Servo(cfg) for cfg in cfgs}, PacketParser(), baud=baud, reboot_s=reboot_s,
                         check_baud=check_baud, link=link, tick_s=tick_s)

    def _step_servo(self, servo: Servo, dt: float, now: float) -> None:
        if servo.watchdog_expired(now):
            self._event(now, servo.dxl_id, "watchdog_expired",
                        since_last_instruction=now - servo.last_instruction, position=servo.position)
        raised = servo.step(dt, now)
        if raised is not None:
            servo.hardware_error(raised)
            self._event(now, servo.dxl_id, "hardware_error", bit=raised, torque=servo.torque)

    # -- dispatch -------------------------------------------------------------------------------------
    def _reply(self, servo: Servo, error: int, params: bytes = b"", after: float | None = None,
               reply_id: int | None = None) -> float:
        """Queue a status packet (from `reply_id`, default the servo's id); returns when its last byte leaves."""
        packet = status_packet(servo.dxl_id if reply_id is None else reply_id, servo.error_byte(error), params)
        return self._queue_status(packet, servo.table[RETURN_DELAY_TIME] * 2e-6, after)

    def _dispatch(self, p: Packet, now: float) -> None:
        if p.dxl_id == BROADCAST_ID:
            targets = [s for s in self._all_servos() if self._hears(s, now)]
        else:
            one = self._online(p.dxl_id, now)
            targets = [one] if one else []
        if not p.crc_ok:
            if p.dxl_id != BROADCAST_ID and targets:
                self._reply(targets[0], ERR_CRC)
            self._event(now, p.dxl_id, "crc_error")
            return
        for servo in targets:
            servo.last_instruction = now  # every valid instruction packet feeds the bus watchdog
        handler = {PING: self._ping, READ: self._read, WRITE: self._write, REBOOT: self._reboot,
                   SYNC_READ: self._sync_read, SYNC_WRITE: self._sync_write}.get(p.instruction)
        if handler is None:
            if p.dxl_id != BROADCAST_ID and targets:
                self._reply(targets[0], ERR_INSTRUCTION)
            return
        handler(p, targets, now)

    def _ping(self, p: Packet, targets: list[Servo], now: float) -> None:
        for servo in sorted(targets, key=lambda s: s.dxl_id):  # broadcast: answers in id order
            self._reply(servo, 0, bytes(servo.table[0:2]) + bytes((servo.table[FIRMWARE_VERSION],)))

    def _read(self, p: Packet, targets: list[Servo], now: float) -> None:
        if p.dxl_id == BROADCAST_ID or not targets:
            return
        servo = targets[0]
        if servo.table[STATUS_RETURN_LEVEL] < 1:
            return
        if len(p.params) != 4:
            self._reply(servo, ERR_DATA_LENGTH)
            return
        addr, length = p.params[0] | (p.params[1] << 8), p.params[2] | (p.params[3] << 8)
        error, data = servo.read(addr, length)
        self._reply(servo, error, data)

    def _write(self, p: Packet, targets: list[Servo], now: float) -> None:
        if len(p.params) < 3:
            if p.dxl_id != BROADCAST_ID and targets:
                self._reply(targets[0], ERR_DATA_LENGTH)
            return
        addr = p.params[0] | (p.params[1] << 8)
        for servo in targets:
            old_id = servo.dxl_id
            error = servo.write(addr, p.params[2:], now)
            self._after_write(servo, old_id, addr, p.params[2:], error, now)
            if p.dxl_id != BROADCAST_ID and servo.table[STATUS_RETURN_LEVEL] >= 2:
                self._reply(servo, error, reply_id=old_id)

    def _after_write(self, servo: Servo, old_id: int, addr: int, data: bytes, error: int, now: float) -> None:
        """Log a write; once accepted, count its EEPROM bytes and re-address the servo after an ID change."""
        self._log_write(servo, addr, data, error, now)
        if error:
            return
        eeprom_bytes = max(0, min(addr + len(data), EEPROM_END) - addr)
        if eeprom_bytes:
            self._eeprom_written(servo, eeprom_bytes, now)
        if servo.dxl_id != old_id:
            self._renumber(servo, old_id, servo.dxl_id, now)

    def _log_write(self, servo: Servo, addr: int, data: bytes, error: int, now: float) -> None:
        if addr <= TORQUE_ENABLE < addr + len(data):
            self._event(now, servo.dxl_id, "torque", value=data[TORQUE_ENABLE - addr], error=error)
        if addr <= BUS_WATCHDOG < addr + len(data):
            self._event(now, servo.dxl_id, "bus_watchdog_write", value=data[BUS_WATCHDOG - addr], error=error)
        if error and addr in GOAL_ITEMS:
            self._event(now, servo.dxl_id, "goal_refused", error=error)
        if error and addr < EEPROM_END:
            self._event(now, servo.dxl_id, "eeprom_refused", address=addr, error=error)

    def _reboot(self, p: Packet, targets: list[Servo], now: float) -> None:
        for servo in targets:
            if p.dxl_id != BROADCAST_ID:
                self._reply(servo, 0)
            servo.table[HARDWARE_ERROR_STATUS] = 0
            servo.reboot(now, self.reboot_s)
            self._event(now, servo.dxl_id, "reboot", by="host")

    def _sync_read(self, p: Packet, targets: list[Servo], now: float) -> None:
        if p.dxl_id != BROADCAST_ID or len(p.params) < 5:
            return
        addr, length = p.params[0] | (p.params[1] << 8), p.params[2] | (p.params[3] << 8)
        after = None
        for dxl_id in p.params[4:]:
            servo = self._online(dxl_id, now)
            if servo is None or servo.table[STATUS_RETURN_LEVEL] < 1:
                continue  # a missing servo stays silent; the host times out
            error, data = servo.read(addr, length)
            after = self._reply(servo, error, data, after)

    def _sync_write(self, p: Packet, targets: list[Servo], now: float) -> None:
        if p.dxl_id != BROADCAST_ID or len(p.params) < 4:
            return
        addr, length = p.params[0] | (p.params[1] << 8), p.params[2] | (p.params[3] << 8)
        block = 1 + length
        data = p.params[4:]
        if length == 0 or len(data) % block:
            self._event(now, BROADCAST_ID, "sync_write_malformed", length=len(data))
            return
        for i in range(0, len(data), block):
            servo = self._online(data[i], now)
            if servo is not None:
                error = servo.write(addr, data[i + 1: i + block], now)
                self._after_write(servo, data[i], addr, data[i + 1: i + block], error, now)

    # -- inspection and fault injection (thread-safe) -------------------------------------------------
    def register(self, dxl_id: int, addr: int) -> int:
        with self._cond:
            return self.servos[dxl_id].get(addr)

    def inject_hardware_error(self, dxl_id: int, bit: int = HW_OVERLOAD) -> None:
        now = time.monotonic()
        with self._cond:
            self.servos[dxl_id].hardware_error(bit)
            self._event(now, dxl_id, "hardware_error", bit=bit, torque=self.servos[dxl_id].torque, injected=True)

    def power_cycle(self, dxl_id: int) -> None:
        """The servo reboots by itself (brown-out, a loose power wire) mid-run."""
        now = time.monotonic()
        with self._cond:
            servo = self.servos[dxl_id]
            servo.table[HARDWARE_ERROR_STATUS] = 0
            servo.reboot(now, self.reboot_s)
            self._event(now, dxl_id, "reboot", by="injected")

    def fail_reads(self, dxl_id: int, address: int, error: int = ERR_RESULT_FAIL) -> None:
        """Fault injection: the servo answers every Read and Sync Read starting at `address` with a status packet
        carrying `error` and no data, as it answers a read it cannot serve (error 0 ends the injection)."""
        with self._cond:
            failing = self.servos[dxl_id].failing_reads
            if error:
                failing[address] = error
            else:
                failing.pop(address, None)
            self._event(time.monotonic(), dxl_id, "fail_reads", address=address, error=error)

    def set_position(self, dxl_id: int, ticks: float) -> None:
        with self._cond:
            servo = self.servos[dxl_id]
            servo.position = float(ticks)
            servo._publish(time.monotonic())

    def set_register(self, dxl_id: int, addr: int, value: int) -> None:
        """Set a register from outside the bus (a step done earlier by another tool), bypassing the access rules."""
        with self._cond:
            self.servos[dxl_id].set(addr, value)


def snapshot(bus: BusEmulator, dxl_id: int) -> dict:
    """Plain values of one servo (for another process, or a log line)."""
    with bus.lock:
        servo = bus.servos[dxl_id]
        return {"torque": servo.torque, "bus_watchdog": servo.table[BUS_WATCHDOG], "position": servo.position,
                "velocity": servo.velocity, "holding": servo.hold_target is not None,
                "hardware_error_status": servo.table[HARDWARE_ERROR_STATUS],
                "last_instruction": servo.last_instruction, "goal": servo.get(GOAL_POSITION),
                "online": time.monotonic() >= servo.offline_until, "eeprom_written": servo.eeprom_written}


_REMOTE_CALLS = ("register", "events_of", "inject_hardware_error", "fail_reads", "power_cycle", "block_joint",
                 "set_position", "set_register", "eeprom_writes", "silence_after_eeprom_writes", "servo_ids")


class EmulatorProcess(common.BusProcess):
    """A BusEmulator in its own process (no GIL shared with the host under test), driven over a pipe.

    Inspection: snapshot(id), register(id, addr), events_of(kind, id), eeprom_writes(id), servo_ids();
    injection: inject_hardware_error, fail_reads, power_cycle, block_joint, set_position, set_register,
    silence_after_eeprom_writes. Timestamps are time.monotonic(), one clock for the machine."""

    bus_type = BusEmulator
    snapshot_of = staticmethod(snapshot)
    process_name = "dxl-emulator"
    vendor = "Dynamixel"

    def inject_hardware_error(self, dxl_id: int, bit: int = HW_OVERLOAD) -> None:
        self._call("inject_hardware_error", dxl_id, bit)

    def fail_reads(self, dxl_id: int, address: int, error: int = ERR_RESULT_FAIL) -> None:
        self._call("fail_reads", dxl_id, address, error)

    def set_position(self, dxl_id: int, ticks: float) -> None:
        self._call("set_position", dxl_id, ticks)


def main(argv: list[str] | None = None) -> int:
    def vendor_args(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--firmware", type=int, default=45)
        parser.add_argument("--mode", type=int, default=3, help="Operating Mode (11)")
        parser.add_argument("--min-position", type=int, default=0)
        parser.add_argument("--max-position", type=int, default=4095)

    parser = common.emulator_arg_parser(__doc__.split("\n")[0], "Return Delay Time (9), 2 us units", vendor_args)
    args = parser.parse_args(argv)
    index = common.baud_index(parser, args.baud, BAUD_RATES, "X-series")
    cfgs = [ServoConfig(dxl_id=i, firmware_version=args.firmware, operating_mode=args.mode,
                        return_delay=args.return_delay, min_position=args.min_position,
                        max_position=args.max_position, baud_index=index) for i in common.parse_ids(args.ids)]
    bus = BusEmulator(cfgs, baud=args.baud, link=args.link)
    return common.serve_until_stopped(bus, args.print_path)


if __name__ == "__main__":
    sys.exit(main())
