"""A bus of emulated Feetech STS3215 servos (the SO-100/SO-101 arm's) on a real pty, paced like a UART.

Written from the STS/SMS memory table (Feetech's STS e-manual as transcribed by LeRobot's
`motors/feetech/tables.py` and Feetech's own SDK headers `SMS_STS.h`/`sms_sts.py`) and the FT-SCS packet
format, not from scservo_sdk, so the SDK and this emulator check each other. What it does:

- packets: FF FF, id, length (= params + 2), instruction or error byte, params, checksum = ~(id + length +
  instruction + params) & 0xFF. Ping (1), Read (2), Write (3), Sync Read (0x82), Sync Write (0x83); other
  instructions are ignored. A packet with a bad checksum gets no answer (the host times out: an emulator
  choice, the protocol defines no checksum error bit). Broadcast (0xFE) writes and pings of 0xFE answer
  nothing here (the real bus would collide). Response level (8) 0: only Ping and Read answer;
- values are little-endian on the STS series (the table's byte 2 "endianness" reads 0); sign-magnitude,
  not two's complement: Goal/Present Position and Present Speed carry their sign in bit 15, Present Load
  in bit 10, Homing Offset (31) in bit 11 (`encode_sign_magnitude`/`decode_sign_magnitude`);
- error byte of every status packet = Status (65): bit 0 voltage, 1 angle/encoder, 2 overheat, 3 over-
  current, 5 overload (scservo_sdk's ERRBIT_*);
- EEPROM (addresses < 40) and the Lock flag (55, default 1 at power-on): a write to EEPROM takes effect at
  once either way, but is saved to flash (survives a power cycle) only while Lock is 0 ("0 = save EEPROM
  changes, 1 = don't save"). Every EEPROM write is recorded as an `eeprom_write` event with `saved=` and its
  bytes counted (`eeprom_writes(id)`). EEPROM writes are accepted with torque on: neither the STS/SMS table
  nor Feetech's SDKs document a torque interlock (Feetech's own ID-change example writes 55 = 0, the ID, 55 = 1
  without touching torque; LeRobot turns torque off first only by habit), so only the Lock governs them;
- ID (5): takes effect at once, the status packet of the write still carrying the old id (scservo_sdk's
  writeTxRx only accepts a reply from the id it wrote to; Feetech's example then locks at the new id); onto an
  id another servo has, the two collide (neither is heard). Baud Rate (6, Feetech's SMS_STS.h: 0 = 1M,
  1 = 500k, 2 = 250k, 3 = 128k, 4 = 115200, 5 = 76800, 6 = 57600, 7 = 38400; LeRobot's table lists 5..7 as
  57600/38400/19200): the status packet of the write leaves at the old rate, then the servo hears only the new
  one; servos on one pty may run at different rates;
- Torque_Enable (40): 0 off, 1 on, 2 damping (treated as off here), 128 = "calibrate the middle": the servo
  rewrites its Homing Offset so the present position reads 2048. The emulator applies it and records a
  `recentre` event, because a host that sends it by mistake silently moves the arm's zero;
- **no communication watchdog**: the STS/SMS table has no timeout register, so a servo keeps its last
  goal with torque on for as long as it has power, whatever the host does (tests measure exactly this);
- Return Delay Time (7, 2 us units; LeRobot says the factory value is 250 = 500 us): each status packet
  leaves after it; a sync read answers in the order of its id list;
- wire time: with `baud` > 0 instruction bytes arrive at 10 bits per byte and each status packet is
  released when its last byte would have left the servo; the host port's termios speed must match;
- a first-order joint plant per servo (present = actual - Homing Offset, modulo one turn), and fault
  injection: overload / overheat error bits (the servo's "unloading": output limited to Protective
  Torque (34) percent while the bit is set in Unloading Condition (19)), a servo power-cycling mid-run
  (RAM back to defaults: torque off, Lock 1, EEPROM from flash), a blocked joint (Overload after
  `OVERLOAD_AFTER_S` of effort). An error bit stays set until torque is written 0 (an emulator choice:
  the manual does not say when the Status bits clear).

    python -m firmware_bridge.motors.feetech_emulator --ids 1-6 --return-delay 0 --print-path
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace

from firmware_bridge.motors import emulator_common as common

Event = common.Event  # what events_of() returns, by its old name

BROADCAST_ID = 0xFE
PARTIAL_TIMEOUT_S = 0.05  # a half-received packet older than this is dropped

PING, READ, WRITE, REG_WRITE, ACTION, SYNC_READ, SYNC_WRITE = 0x01, 0x02, 0x03, 0x04, 0x05, 0x82, 0x83

# Status (65) / error byte bits (scservo_sdk ERRBIT_*)
ERR_VOLTAGE, ERR_ANGLE, ERR_OVERHEAT, ERR_OVERCURRENT, ERR_OVERLOAD = 0, 1, 2, 3, 5
ERROR_NAMES = {ERR_VOLTAGE: "input voltage error", ERR_ANGLE: "angle sensor error", ERR_OVERHEAT: "overheat error",
               ERR_OVERCURRENT: "overcurrent error", ERR_OVERLOAD: "overload error"}

# Baud Rate (6) index -> bits per second (STS series)
BAUD_RATES = {0: 1_000_000, 1: 500_000, 2: 250_000, 3: 128_000, 4: 115_200, 5: 76_800, 6: 57_600, 7: 38_400}

# STS/SMS control table addresses used by name
FIRMWARE_MAJOR, FIRMWARE_MINOR, MODEL_NUMBER, ID_ADDR, BAUD_RATE, RETURN_DELAY_TIME, RESPONSE_LEVEL = 0, 1, 3, 5, 6, 7, 8
MIN_ANGLE_LIMIT, MAX_ANGLE_LIMIT, UNLOADING_CONDITION, HOMING_OFFSET, OPERATING_MODE = 9, 11, 19, 31, 33
PROTECTIVE_TORQUE = 34
TORQUE_ENABLE, ACCELERATION, GOAL_POSITION, GOAL_TIME, GOAL_SPEED, TORQUE_LIMIT, LOCK = 40, 41, 42, 44, 46, 48, 55
PRESENT_POSITION, PRESENT_SPEED, PRESENT_LOAD, PRESENT_VOLTAGE, PRESENT_TEMPERATURE = 56, 58, 60, 62, 63
STATUS, MOVING, PRESENT_CURRENT = 65, 66, 69
EEPROM_END = 40
TABLE_SIZE = 87
STS3215_MODEL = 777
TORQUE_RECENTRE = 128

# Sign-magnitude bit per item (STS series; LeRobot's STS_SMS_SERIES_ENCODINGS_TABLE lists 31/46/58, the
# manual marks 42/56 "BIT15 = direction" and 60 "BIT10 = direction")
SIGN_BITS = {HOMING_OFFSET: 11, GOAL_POSITION: 15, GOAL_SPEED: 15, PRESENT_POSITION: 15, PRESENT_SPEED: 15,
             PRESENT_LOAD: 10, PRESENT_CURRENT: 15}

# (address, size, writable, default) -- EEPROM below 40, SRAM from 40 (STS3215)
CONTROL_TABLE: tuple[tuple[int, int, bool, int], ...] = (
    (0, 1, False, 3), (1, 1, False, 10), (3, 2, False, STS3215_MODEL), (5, 1, True, 1), (6, 1, True, 0),
    (7, 1, True, 250), (8, 1, True, 1), (9, 2, True, 0), (11, 2, True, 4095), (13, 1, True, 70),
    (14, 1, True, 140), (15, 1, True, 40), (16, 2, True, 1000), (18, 1, True, 12), (19, 1, True, 44),
    (20, 1, True, 47), (21, 1, True, 32), (22, 1, True, 32), (23, 1, True, 0), (24, 2, True, 16),
    (26, 1, True, 1), (27, 1, True, 1), (28, 2, True, 500), (30, 1, True, 1), (31, 2, True, 0),
    (33, 1, True, 0), (34, 1, True, 20), (35, 1, True, 200), (36, 1, True, 80), (37, 1, True, 10),
    (38, 1, True, 200), (39, 1, True, 10),
    (40, 1, True, 0), (41, 1, True, 0), (42, 2, True, 0), (44, 2, True, 0), (46, 2, True, 0), (48, 2, True, 1000),
    (55, 1, True, 1), (56, 2, False, 0), (58, 2, False, 0), (60, 2, False, 0), (62, 1, False, 120),
    (63, 1, False, 30), (64, 1, False, 0), (65, 1, False, 0), (66, 1, False, 0), (69, 2, False, 0),
)
ITEMS = {addr: (size, writable, default) for addr, size, writable, default in CONTROL_TABLE}

TICKS_PER_TURN = 4096
CURRENT_UNIT_A = 0.0065  # Present Current: 6.5 mA per unit
OVERLOAD_AFTER_S = 0.3  # a blocked joint under effort trips Overload after this long (an emulator choice)


# --------------------------------------------------------------------------------------------------------
# Codec (independent of scservo_sdk; tests cross-check both)
# --------------------------------------------------------------------------------------------------------
def encode_sign_magnitude(value: int, sign_bit: int) -> int:
    """Sign-magnitude: |value| in the bits below `sign_bit`, the sign in `sign_bit` (negative zero -> 0)."""
    limit = (1 << sign_bit) - 1
    if abs(value) > limit:
        raise ValueError(f"{value} does not fit in {sign_bit} bits of magnitude (max {limit})")
    return (-value | (1 << sign_bit)) if value < 0 else value


def decode_sign_magnitude(raw: int, sign_bit: int) -> int:
    """Inverse of encode_sign_magnitude; bits above `sign_bit` are ignored (a register's unused bits)."""
    magnitude = raw & ((1 << sign_bit) - 1)
    return -magnitude if raw & (1 << sign_bit) else magnitude


def checksum(body: bytes | bytearray) -> int:
    """~(id + length + instruction/error + params) & 0xFF."""
    return ~sum(body) & 0xFF


def build_packet(servo_id: int, instruction: int, params: bytes = b"") -> bytes:
    """An instruction packet (or, with the error byte in `instruction`, a status packet)."""
    body = bytes((servo_id, len(params) + 2, instruction)) + params
    return b"\xff\xff" + body + bytes((checksum(body),))


def status_packet(servo_id: int, error: int, params: bytes = b"") -> bytes:
    return build_packet(servo_id, error, params)


@dataclass(frozen=True)
class Packet:
    servo_id: int
    instruction: int
    params: bytes
    checksum_ok: bool


class PacketParser(common.StreamParser):
    """Bytes in, whole packets out; garbage, impossible lengths and stale partial packets are skipped."""

    HEADER = b"\xff\xff"
    partial_timeout_s = PARTIAL_TIMEOUT_S

    def _take(self) -> Packet | object | None:
        if len(self.buf) < 4:
            return None
        servo_id, length = self.buf[2], self.buf[3]
        if servo_id == 0xFF or length < 2:  # FF FF FF ...: the header starts one byte later; or not a packet
            return self.NOT_A_PACKET
        total = 4 + length
        if len(self.buf) < total:
            return None
        raw = bytes(self.buf[:total])
        del self.buf[:total]
        return Packet(servo_id, raw[4], raw[5:-1], checksum(raw[2:-1]) == raw[-1])


# --------------------------------------------------------------------------------------------------------
# One servo: control table + plant
# --------------------------------------------------------------------------------------------------------
@dataclass
class ServoConfig:
    servo_id: int = 1
    model_number: int = STS3215_MODEL
    return_delay: int = 250  # 500 us, LeRobot's figure for the factory value
    min_angle: int = 0
    max_angle: int = 4095
    homing_offset: int = 0  # signed; stored sign-magnitude (bit 11)
    operating_mode: int = 0  # position servo mode
    initial_position: int = 2048  # present position (after the homing offset)
    lock: int = 1  # Lock flag at power-on
    baud_index: int | None = None  # Baud Rate (6) value; None: the bus's baud rate
    max_speed_ticks_s: float = 3400.0  # STS3215 at 12 V: ~50 rpm
    time_constant_s: float = 0.03


class Servo:
    def __init__(self, cfg: ServoConfig) -> None:
        self.cfg = cfg
        self.table = bytearray(TABLE_SIZE)
        for addr, (_size, _w, default) in ITEMS.items():
            self.set(addr, default)
        c = cfg
        baud_index = 0 if c.baud_index is None else c.baud_index  # None outside a BusEmulator: 1 Mbps
        for addr, value in ((MODEL_NUMBER, c.model_number), (ID_ADDR, c.servo_id), (BAUD_RATE, baud_index),
                            (RETURN_DELAY_TIME, c.return_delay), (MIN_ANGLE_LIMIT, c.min_angle),
                            (MAX_ANGLE_LIMIT, c.max_angle), (OPERATING_MODE, c.operating_mode)):
            self.set(addr, value)
        self.set(HOMING_OFFSET, encode_sign_magnitude(c.homing_offset, 11))
        self.flash = bytes(self.table[:EEPROM_END])  # what survives a power cycle
        self.set(LOCK, c.lock)
        self.actual = float((c.initial_position + c.homing_offset) % TICKS_PER_TURN)  # encoder ticks
        self.velocity = 0.0  # ticks/s
        self.offline_until = 0.0
        self.blocked = False
        self.effort_since: float | None = None
        self.eeprom_written = 0  # EEPROM bytes accepted (saved to flash or not)
        self.silent_after_eeprom: int | None = None  # fault injection: silent after this many more EEPROM writes
        self._publish()
        self.set(GOAL_POSITION, self.get(PRESENT_POSITION))

    # -- registers (raw, unsigned) --------------------------------------------------------------------
    def get(self, addr: int) -> int:
        size = ITEMS[addr][0]
        return int.from_bytes(self.table[addr: addr + size], "little")

    def set(self, addr: int, value: int) -> None:
        size = ITEMS[addr][0]
        self.table[addr: addr + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def value(self, addr: int) -> int:
        """The register decoded (sign-magnitude where the table says so)."""
        raw = self.get(addr)
        return decode_sign_magnitude(raw, SIGN_BITS[addr]) if addr in SIGN_BITS else raw

    @property
    def servo_id(self) -> int:
        return self.table[ID_ADDR]

    @property
    def torque(self) -> bool:
        return self.table[TORQUE_ENABLE] == 1

    @property
    def homing_offset(self) -> int:
        return self.value(HOMING_OFFSET)

    def read(self, addr: int, length: int) -> bytes | None:
        if length <= 0 or addr + length > TABLE_SIZE:
            return None
        return bytes(self.table[addr: addr + length])

    def write(self, addr: int, data: bytes) -> list[tuple[int, int]] | None:
        """Validate the whole write, then apply it; returns the (address, value) items written, or None."""
        items, cursor, end = [], addr, addr + len(data)
        while cursor < end:
            if cursor not in ITEMS or not ITEMS[cursor][1] or cursor + ITEMS[cursor][0] > end:
                return None  # read-only or misaligned: the servo ignores the write
            size = ITEMS[cursor][0]
            items.append((cursor, int.from_bytes(data[cursor - addr: cursor - addr + size], "little")))
            cursor += size
        for a, v in items:
            self.set(a, v)
        return items

    # -- plant ----------------------------------------------------------------------------------------
    def present_from_actual(self, actual: float) -> int:
        return round(actual - self.homing_offset) % TICKS_PER_TURN

    def target_actual(self) -> float | None:
        if not self.torque:
            return None
        goal = self.value(GOAL_POSITION)
        lo, hi = self.get(MIN_ANGLE_LIMIT), self.get(MAX_ANGLE_LIMIT)
        if self.get(OPERATING_MODE) == 0 and not (lo == 0 and hi == 0):
            goal = min(hi, max(lo, goal))  # the servo clamps goals to its angle limits
        # the shortest way from the present reading to the goal, in encoder ticks
        return self.actual + (goal - self.present_from_actual(self.actual))

    def step(self, dt: float, now: float) -> int | None:
        target = self.target_actual()
        vmax = self.cfg.max_speed_ticks_s
        status = self.table[STATUS]
        if status & self.table[UNLOADING_CONDITION]:
            vmax *= self.table[PROTECTIVE_TORQUE] / 100.0  # unloaded: output limited to Protective Torque %
        if target is None or self.blocked:
            self.velocity = 0.0
        else:
            self.velocity = max(-vmax, min(vmax, (target - self.actual) / self.cfg.time_constant_s))
            self.actual = (self.actual + self.velocity * dt) % TICKS_PER_TURN
        error = 0.0 if target is None else target - self.actual
        raised = None
        if self.blocked and self.torque and abs(error) > 20:
            self.effort_since = self.effort_since or now
            if now - self.effort_since > OVERLOAD_AFTER_S:
                raised = ERR_OVERLOAD
        else:
            self.effort_since = None
        self._publish(error)
        return raised

    def _publish(self, error: float = 0.0) -> None:
        load = max(-1000, min(1000, round(5.0 * error))) if self.torque else 0
        self.set(PRESENT_POSITION, encode_sign_magnitude(self.present_from_actual(self.actual), 15))
        self.set(PRESENT_SPEED, encode_sign_magnitude(max(-32767, min(32767, round(self.velocity))), 15))
        self.set(PRESENT_LOAD, encode_sign_magnitude(load, 10))
        self.set(PRESENT_CURRENT, encode_sign_magnitude(abs(load) // 2, 15))
        self.set(MOVING, int(abs(self.velocity) > 5.0))

    def raise_error(self, bit: int) -> None:
        self.table[STATUS] |= 1 << bit

    def power_cycle(self, now: float, reboot_s: float) -> None:
        """Power lost and back: SRAM to defaults (torque off, Lock 1), EEPROM from flash."""
        self.table[:EEPROM_END] = self.flash
        for addr, (_size, _w, default) in ITEMS.items():
            if addr >= EEPROM_END:
                self.set(addr, default)
        self.velocity = 0.0
        self.effort_since = None
        self._publish()
        self.set(GOAL_POSITION, self.get(PRESENT_POSITION))
        self.offline_until = now + reboot_s


# --------------------------------------------------------------------------------------------------------
# The bus: pty, pacing, dispatch, events
# --------------------------------------------------------------------------------------------------------
class BusEmulator(common.PtyBus):
    """STS servos on one pty. start() runs the bus in a thread; every public method is thread-safe."""

    thread_name = "feetech-emulator"
    baud_rates = tuple(BAUD_RATES.values())
    id_address, baud_address, baud_table = ID_ADDR, BAUD_RATE, BAUD_RATES

    def __init__(self, servos: Iterable[ServoConfig], *, baud: int = 1_000_000, reboot_s: float = 0.05,
                 check_baud: bool = True, link: str | None = None, tick_s: float = 0.001) -> None:
        index = {bps: i for i, bps in BAUD_RATES.items()}.get(baud, 0)
        cfgs = [cfg if cfg.baud_index is not None else replace(cfg, baud_index=index) for cfg in servos]
        super().__init__({cfg.servo_id: Servo(cfg) for cfg in cfgs}, PacketParser(), baud=baud, reboot_s=reboot_s,
                         check_baud=check_baud, link=link, tick_s=tick_s)

    def _step_servo(self, servo: Servo, dt: float, now: float) -> None:
        raised = servo.step(dt, now)
        if raised is not None and not servo.table[STATUS] & (1 << raised):
            servo.raise_error(raised)
            self._event(now, servo.servo_id, "error", bit=raised, torque=servo.torque)

    # -- dispatch -------------------------------------------------------------------------------------
    def _reply(self, servo: Servo, params: bytes = b"", after: float | None = None,
               reply_id: int | None = None) -> float:
        """Queue a status packet (from `reply_id`, default the servo's id); returns when its last byte leaves."""
        packet = status_packet(servo.servo_id if reply_id is None else reply_id, servo.table[STATUS], params)
        return self._queue_status(packet, servo.table[RETURN_DELAY_TIME] * 2e-6, after)

    def _dispatch(self, p: Packet, now: float) -> None:
        if not p.checksum_ok:
            self._event(now, p.servo_id, "checksum_error")
            return
        handler = {PING: self._ping, READ: self._read, WRITE: self._write, SYNC_READ: self._sync_read,
                   SYNC_WRITE: self._sync_write}.get(p.instruction)
        if handler is None:
            self._event(now, p.servo_id, "unknown_instruction", instruction=p.instruction)
            return
        handler(p, now)

    def _ping(self, p: Packet, now: float) -> None:
        servo = self._online(p.servo_id, now)
        if servo is not None:
            self._reply(servo)

    def _read(self, p: Packet, now: float) -> None:
        servo = self._online(p.servo_id, now)
        if servo is None or len(p.params) != 2:
            return
        data = servo.read(p.params[0], p.params[1])
        if data is not None:
            self._reply(servo, data)

    def _write(self, p: Packet, now: float) -> None:
        if len(p.params) < 2:
            return
        if p.servo_id == BROADCAST_ID:
            targets = [s for s in self._all_servos() if self._hears(s, now)]
        else:
            targets = [s for s in (self._online(p.servo_id, now),) if s is not None]
        for servo in targets:
            old_id = servo.servo_id
            self._apply_write(servo, p.params[0], p.params[1:], now)
            if p.servo_id != BROADCAST_ID and servo.table[RESPONSE_LEVEL] >= 1:
                self._reply(servo, reply_id=old_id)

    def _apply_write(self, servo: Servo, addr: int, data: bytes, now: float) -> None:
        recentre = addr == TORQUE_ENABLE and data[:1] == bytes((TORQUE_RECENTRE,))
        before, old_id = servo.table[TORQUE_ENABLE], servo.servo_id
        items = servo.write(addr, data)
        if items is None:
            self._event(now, servo.servo_id, "write_ignored", address=addr, length=len(data))
            return
        eeprom_bytes = sum(ITEMS[a][0] for a, _ in items if a < EEPROM_END)
        if eeprom_bytes:
            self._eeprom_written(servo, eeprom_bytes, now)
        if servo.servo_id != old_id:
            self._renumber(servo, old_id, servo.servo_id, now)
        for a, v in items:
            if a == TORQUE_ENABLE:
                self._torque_written(servo, v, before, now, recentre)
            elif a < EEPROM_END:
                saved = servo.table[LOCK] == 0
                if saved:
                    servo.flash = bytes(servo.table[:EEPROM_END])
                self._event(now, servo.servo_id, "eeprom_write", address=a, value=v, saved=saved)
            elif a == LOCK:
                self._event(now, servo.servo_id, "lock", value=v)

    def _torque_written(self, servo: Servo, value: int, before: int, now: float, recentre: bool) -> None:
        if recentre:
            # "128: calibrate the middle": the present position becomes 2048, by rewriting the homing offset
            offset = round(servo.actual) - 2048
            if offset > 2047:
                offset -= TICKS_PER_TURN
            servo.set(HOMING_OFFSET, encode_sign_magnitude(offset, 11))
            if servo.table[LOCK] == 0:
                servo.flash = bytes(servo.table[:EEPROM_END])
            servo.table[TORQUE_ENABLE] = before  # the calibration command does not change the torque state
            servo._publish()
            self._event(now, servo.servo_id, "recentre", homing_offset=offset)
            return
        if value != 1:
            servo.table[STATUS] = 0  # an emulator choice: error bits clear once torque is released
            servo.effort_since = None
        self._event(now, servo.servo_id, "torque", value=value)
        if value == 1:
            self._torque_on_heard(servo, now)

    def _sync_read(self, p: Packet, now: float) -> None:
        if p.servo_id != BROADCAST_ID or len(p.params) < 3:
            return
        addr, length = p.params[0], p.params[1]
        after = None
        for servo_id in p.params[2:]:
            servo = self._online(servo_id, now)
            if servo is None:
                continue  # a missing servo stays silent; the host times out
            data = servo.read(addr, length)
            if data is not None:
                after = self._reply(servo, data, after)

    def _sync_write(self, p: Packet, now: float) -> None:
        if p.servo_id != BROADCAST_ID or len(p.params) < 3:
            return
        addr, length = p.params[0], p.params[1]
        block = 1 + length
        data = p.params[2:]
        if length == 0 or len(data) % block:
            self._event(now, BROADCAST_ID, "sync_write_malformed", length=len(data))
            return
        for i in range(0, len(data), block):
            servo = self._online(data[i], now)
            if servo is not None:
                self._apply_write(servo, addr, data[i + 1: i + block], now)

    # -- inspection and fault injection (thread-safe) -------------------------------------------------
    def register(self, servo_id: int, addr: int) -> int:
        """The decoded value of one register."""
        with self._cond:
            return self.servos[servo_id].value(addr)

    def inject_error(self, servo_id: int, bit: int = ERR_OVERLOAD) -> None:
        with self._cond:
            self.servos[servo_id].raise_error(bit)
            self._event(time.monotonic(), servo_id, "error", bit=bit, injected=True)

    def power_cycle(self, servo_id: int) -> None:
        now = time.monotonic()
        with self._cond:
            self.servos[servo_id].power_cycle(now, self.reboot_s)
            self._event(now, servo_id, "power_cycle")

    def set_register(self, servo_id: int, addr: int, value: int) -> None:
        """Set a register from outside the bus (a configure step done earlier), sign-magnitude applied."""
        with self._cond:
            servo = self.servos[servo_id]
            servo.set(addr, encode_sign_magnitude(value, SIGN_BITS[addr]) if addr in SIGN_BITS else value)
            if addr < EEPROM_END:
                servo.flash = bytes(servo.table[:EEPROM_END])


def snapshot(bus: BusEmulator, servo_id: int) -> dict:
    """Plain values of one servo (for another process, or a log line)."""
    with bus.lock:
        s = bus.servos[servo_id]
        return {"torque": s.torque, "torque_enable": s.table[TORQUE_ENABLE], "position": s.value(PRESENT_POSITION),
                "velocity": s.velocity, "goal": s.value(GOAL_POSITION), "status": s.table[STATUS],
                "lock": s.table[LOCK], "homing_offset": s.homing_offset, "online": time.monotonic() >= s.offline_until,
                "eeprom_written": s.eeprom_written}


class EmulatorProcess(common.BusProcess):
    """A BusEmulator in its own process (no GIL shared with the host under test), driven over a pipe."""

    bus_type = BusEmulator
    snapshot_of = staticmethod(snapshot)
    process_name = "feetech-emulator"
    vendor = "Feetech"

    def inject_error(self, servo_id: int, bit: int = ERR_OVERLOAD) -> None:
        self._call("inject_error", servo_id, bit)

    def set_register(self, servo_id: int, addr: int, value: int) -> None:
        self._call("set_register", servo_id, addr, value)


def main(argv: list[str] | None = None) -> int:
    def vendor_args(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--min-angle", type=int, default=0)
        parser.add_argument("--max-angle", type=int, default=4095)

    parser = common.emulator_arg_parser(__doc__.split("\n")[0], "Return Delay Time (7), 2 us units", vendor_args)
    args = parser.parse_args(argv)
    index = common.baud_index(parser, args.baud, BAUD_RATES, "STS")
    cfgs = [ServoConfig(servo_id=i, return_delay=args.return_delay, min_angle=args.min_angle,
                        max_angle=args.max_angle, baud_index=index) for i in common.parse_ids(args.ids)]
    bus = BusEmulator(cfgs, baud=args.baud, link=args.link)
    return common.serve_until_stopped(bus, args.print_path)


if __name__ == "__main__":
    sys.exit(main())
