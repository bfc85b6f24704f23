"""Configure serial-bus servos as a separate, explicit step: `edge-vla motors scan | configure`.

IDs, baud rate, return delay time, position limits and operating mode live in EEPROM. Dynamixel X servos
accept EEPROM writes only with torque off (Access Error otherwise); Feetech STS servos save an EEPROM write to
flash only while their Lock flag (55) is 0. EEPROM wears, so nothing is written when a value is already set,
and the backends (dynamixel.py, feetech.py) never write EEPROM at arm: they read these registers and refuse
to arm when they are wrong, naming this step.

`scan()` pings ids at one or more baud rates (Dynamixel: one broadcast Ping per rate, every servo answering
in id order; Feetech: a Ping per id with a short timeout) and reads what each servo found is: model,
firmware, return delay, limits, torque, mode (and the Feetech Lock).

`make_plan()` reads, checks and lists the changes (register, old value, new value); `apply_plan()` writes
them, each read back and verified, in this order:
  1. torque off, only where the request says so (`torque_off`): otherwise a servo with torque on refuses
     the plan (one line naming it), because an arm may be holding a load;
  2. per servo: (Feetech: Lock <- 0), return delay, limits, operating mode, then the ID: it takes effect at
     once, so the servo is read back at its new id; (Feetech: Lock <- 1 unless its baud rate changes);
  3. last, the baud rate of every listed servo: each acknowledges at the old rate, then the port switches
     to the new rate and every servo is read back there (Feetech: and locked there).
A failure stops at once with one line: what failed, what was written and read back before it, what was
not written, and the state left (an unlocked Feetech servo, servos at two baud rates).

Limits are in ticks, the registers' own unit (0..4095; what LeRobot calibration files hold as
range_min/range_max): with the default calibration, tick = 2048 + rad * 4096 / (2 pi).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from firmware_bridge.motors import dynamixel as dxl_table
from firmware_bridge.motors import feetech as sts_table
from firmware_bridge.motors.base import MotorError
from firmware_bridge.motors.registry import ID_SPACES, IdSpace, parse_ids, parse_int, parse_url
from firmware_bridge.motors.sdk_port import DEFAULT_LATENCY_MS, port_handler
from firmware_bridge.motors.servo_bus import load_sdk

log = logging.getLogger(__name__)

try:  # what a vanished port raises inside the SDKs: pyserial's SerialException (an OSError), termios.error
    from termios import error as _termios_error

    PORT_ERRORS: tuple[type[BaseException], ...] = (OSError, _termios_error)
except ImportError:  # not a POSIX host
    PORT_ERRORS = (OSError,)

LIMIT_RANGE = (0, 4095)  # position-mode limits on both families: one turn of a 12-bit encoder
RETURN_DELAY_UNIT_US = 2
RETURN_DELAY_MAX_US = 254 * RETURN_DELAY_UNIT_US
DEFAULT_SCAN_TIMEOUT_MS = 6.0  # per-id ping: a servo answers a Ping within ~0.6 ms at 1 Mbaud (500 us delay)
MAX_SCAN_TIMEOUT_MS = 1000.0  # per id: 253 ids at this wait is already four minutes a baud rate
URL_KEYS = ("ids", "baud", "latency_ms")


class ConfigureError(MotorError):
    """A scan or configure step cannot go on; the one-line message says what was wrong and what to do."""


@dataclass(frozen=True)
class Register:
    name: str
    address: int
    size: int
    eeprom: bool

    @property
    def label(self) -> str:
        return f"{self.name} ({self.address})"


@dataclass(frozen=True)
class Vendor:
    """What configure needs to know of one servo family; every address comes from the backend's table."""

    scheme: str
    title: str
    sdk: tuple[str, str, str]  # (module, pip distribution, edge-vla extra)
    protocol: float
    baud_values: dict[int, int]  # Baud Rate register value -> bits per second, as documented
    sdk_bauds: tuple[int, ...]  # the rates the vendor SDK can set a port to
    broadcast_ping: bool
    model: Register
    firmware: tuple[Register, ...]
    id: Register
    baud: Register
    return_delay: Register
    min_limit: Register
    max_limit: Register
    mode: Register
    torque: Register
    lock: Register | None  # Feetech: EEPROM saved to flash only while 0
    position_mode: int
    models: dict[int, str]
    unsupported_models: dict[int, str]
    refusal_bits: int  # status-packet error bits that mean "write refused" (Feetech's error byte is its Status)
    refusals: dict[int, str] = field(default_factory=dict)

    @property
    def id_space(self) -> IdSpace:
        """The family's servo ids: the registry's, so the motor URL and this tool take the same ones."""
        return ID_SPACES[self.scheme]

    @property
    def max_id(self) -> int:
        return self.id_space.hi

    def id_problem(self, servo_id: int) -> str | None:
        """Why `servo_id` cannot be one servo's id (the registry's one line), or None."""
        return self.id_space.problem(servo_id)

    def baud_value(self, baud: int) -> int:
        return {bps: value for value, bps in self.baud_values.items()}[baud]

    def unit_note(self, register: Register, old: int, new: int) -> str:
        """The values in the units a person thinks in, where the register's differ: '500 us -> 0 us, '."""
        if register == self.return_delay:
            return f"{old * RETURN_DELAY_UNIT_US} us -> {new * RETURN_DELAY_UNIT_US} us, "
        if register == self.baud:
            return f"{self.baud_values.get(old, '?')} -> {self.baud_values.get(new, '?')} baud, "
        return ""


DYNAMIXEL = Vendor(
    scheme="dynamixel", title="Dynamixel X (Protocol 2.0)", sdk=("dynamixel_sdk", "dynamixel-sdk", "dynamixel"),
    protocol=2.0, baud_values=dxl_table.BAUD_RATE_VALUES, sdk_bauds=dxl_table.BAUD_RATES,
    broadcast_ping=True,
    model=Register("Model Number", dxl_table.MODEL_NUMBER, 2, True),
    firmware=(Register("Firmware Version", dxl_table.FIRMWARE_VERSION, 1, True),),
    id=Register("ID", dxl_table.ID_ADDR, 1, True),
    baud=Register("Baud Rate", dxl_table.BAUD_RATE_ADDR, 1, True),
    return_delay=Register("Return Delay Time", dxl_table.RETURN_DELAY_TIME, 1, True),
    min_limit=Register("Min Position Limit", dxl_table.MIN_POSITION_LIMIT, 4, True),
    max_limit=Register("Max Position Limit", dxl_table.MAX_POSITION_LIMIT, 4, True),
    mode=Register("Operating Mode", dxl_table.OPERATING_MODE, 1, True),
    torque=Register("Torque Enable", dxl_table.TORQUE_ENABLE, 1, False),
    lock=None, position_mode=dxl_table.POSITION_MODE, models=dxl_table.MODEL_NAMES, unsupported_models={},
    refusal_bits=0x7F, refusals=dxl_table.STATUS_ERRORS,
)
FEETECH = Vendor(
    scheme="feetech", title="Feetech STS/SMS", sdk=("scservo_sdk", "feetech-servo-sdk", "feetech"),
    protocol=0, baud_values=sts_table.BAUD_RATE_VALUES, sdk_bauds=sts_table.BAUD_RATES,
    broadcast_ping=False,
    model=Register("Model Number", sts_table.MODEL_NUMBER, 2, True),
    firmware=(Register("Firmware Major", sts_table.FIRMWARE_MAJOR, 1, True),
              Register("Firmware Minor", sts_table.FIRMWARE_MINOR, 1, True)),
    id=Register("ID", sts_table.ID_ADDR, 1, True),
    baud=Register("Baud Rate", sts_table.BAUD_RATE_ADDR, 1, True),
    return_delay=Register("Return Delay Time", sts_table.RETURN_DELAY_TIME, 1, True),
    min_limit=Register("Min Angle Limit", sts_table.MIN_ANGLE_LIMIT, 2, True),
    max_limit=Register("Max Angle Limit", sts_table.MAX_ANGLE_LIMIT, 2, True),
    mode=Register("Operating Mode", sts_table.OPERATING_MODE, 1, True),
    torque=Register("Torque Enable", sts_table.TORQUE_ENABLE, 1, False),
    lock=Register("Lock", sts_table.LOCK, 1, False), position_mode=sts_table.POSITION_MODE,
    models=sts_table.STS_MODELS, unsupported_models=sts_table.SCS_MODELS, refusal_bits=0,
)
VENDORS = {v.scheme: v for v in (DYNAMIXEL, FEETECH)}


def vendor_of(scheme: str) -> Vendor:
    try:
        return VENDORS[scheme]
    except KeyError:
        raise ConfigureError(f"no servo configuration for {scheme}://; accepted: "
                             f"{', '.join(f'{s}://' for s in VENDORS)}") from None


# --------------------------------------------------------------------------------------------------------
# The bus: the vendor SDK's PortHandler/PacketHandler, with one-line errors instead of result codes
# --------------------------------------------------------------------------------------------------------
class Bus:
    """One port opened through the vendor SDK. Not thread-safe; use it as a context manager."""

    def __init__(self, vendor: Vendor, port: str, baud: int, latency_ms: int = DEFAULT_LATENCY_MS) -> None:
        self.vendor, self.port_name, self.baud, self.latency_ms = vendor, port, baud, latency_ms
        self.sdk = load_sdk(vendor.sdk[0], vendor.scheme, *vendor.sdk[1:])
        self._ph = self.sdk.PacketHandler(vendor.protocol)
        self._port: Any = None

    def __enter__(self) -> Bus:
        self._open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open(self) -> None:
        if self.baud not in self.vendor.sdk_bauds:
            raise ConfigureError(f"baud {self.baud} is not a {self.vendor.title} rate the SDK can set; use one of "
                                 f"{', '.join(map(str, self.vendor.sdk_bauds))}")
        port = port_handler(self.sdk, self.port_name, self.latency_ms)
        try:
            ok = port.setBaudRate(self.baud)  # opens the port
        except Exception as exc:  # pyserial raises SerialException / OSError / ValueError
            raise ConfigureError(f"cannot open {self.port_name}: {exc}. Check the cable, that the device exists "
                                 f"(ls -l {self.port_name}) and that this user may open it (dialout group)") from exc
        if not ok:
            raise ConfigureError(f"cannot set {self.port_name} to {self.baud} baud")
        self._port = port

    def close(self) -> None:
        if self._port is not None:
            with contextlib.suppress(*PORT_ERRORS):  # a port that vanished is closed all the same
                self._port.closePort()
            self._port = None

    def set_baud(self, baud: int) -> None:
        if baud != self.baud:
            self.close()
            self.baud = baud
            self._open()

    @contextmanager
    def reply_timeout(self, timeout_ms: float) -> Iterator[None]:
        """Wait about `timeout_ms` for each reply (a short per-id scan), then restore the adapter's latency."""
        saved = self.latency_ms
        self.close()
        self.latency_ms = max(1, round((timeout_ms - 2.0) / 2.0))  # sdk_port: 2 x latency + 2 ms + wire time
        self._open()
        try:
            yield
        finally:
            self.close()
            self.latency_ms = saved
            self._open()

    # -- transactions ---------------------------------------------------------------------------------
    @contextmanager
    def _wire(self, servo_id: int | str, what: str) -> Iterator[None]:
        """pyserial and termios errors inside the SDK (an unplugged adapter) as one line, not a traceback."""
        try:
            yield
        except PORT_ERRORS as exc:
            self._port.is_using = False  # the SDK's transaction flag, left set by the interrupted transaction
            raise ConfigureError(f"servo id {servo_id}: the port {self.port_name} failed during {what} ({exc}); "
                                 "was the USB adapter unplugged or its power lost? Reconnect it and re-run") from exc

    def ping(self, servo_id: int) -> bool:
        with self._wire(servo_id, "a ping"):
            _, result, _ = self._ph.ping(self._port, servo_id)
        return bool(result == self.sdk.COMM_SUCCESS)

    def broadcast_ping(self) -> dict[int, int] | None:
        """id -> model number from one broadcast Ping (Dynamixel), or None when the answers came back garbled."""
        with self._wire("(broadcast)", "a broadcast ping"):
            found, result = self._ph.broadcastPing(self._port)
        if result not in (self.sdk.COMM_SUCCESS, self.sdk.COMM_RX_TIMEOUT):
            log.warning("%s: broadcast ping answer garbled (%s): pinging each id", self.port_name,
                        self._ph.getTxRxResult(result))
            return None
        return {int(i): int(v[0]) for i, v in found.items()}

    def read(self, servo_id: int, register: Register) -> int:
        with self._wire(servo_id, f"the read of {register.label}"):
            data, result, error = self._ph.readTxRx(self._port, servo_id, register.address, register.size)
        self._check(result, error, servo_id, f"the read of {register.label}")
        if len(data) != register.size:
            raise ConfigureError(f"servo id {servo_id} answered {len(data)} bytes for {register.label} "
                                 f"({register.size} expected); check for two servos with one id")
        return int.from_bytes(bytes(data), "little")

    def write(self, servo_id: int, register: Register, value: int) -> None:
        data = list(value.to_bytes(register.size, "little"))
        with self._wire(servo_id, f"the write of {value} to {register.label}"):
            result, error = self._ph.writeTxRx(self._port, servo_id, register.address, register.size, data)
        self._check(result, error, servo_id, f"the write of {value} to {register.label}")

    def _check(self, result: int, error: int, servo_id: int, what: str) -> None:
        if result != self.sdk.COMM_SUCCESS:
            raise ConfigureError(f"servo id {servo_id} did not answer {what} at {self.baud} baud on "
                                 f"{self.port_name} ({self._ph.getTxRxResult(result)}); check its cable and power")
        refused = error & self.vendor.refusal_bits
        if refused:
            reason = self.vendor.refusals.get(refused, f"error {refused}")
            raise ConfigureError(f"servo id {servo_id} refused {what}: {reason}")


@contextmanager
def open_bus(scheme: str, port: str, baud: int, latency_ms: int = DEFAULT_LATENCY_MS) -> Iterator[Bus]:
    with Bus(vendor_of(scheme), port, baud, latency_ms) as bus:
        yield bus


# --------------------------------------------------------------------------------------------------------
# URL
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    scheme: str
    port: str
    ids: tuple[int, ...] | None
    baud: int | None
    latency_ms: int


def parse_target(url: str) -> Target:
    """SCHEME://PORT?ids=1-6&baud=1000000&latency_ms=16 (every key optional here) with one-line errors."""
    parsed = parse_url(url)
    unknown = sorted(set(parsed.params) - set(URL_KEYS))
    if unknown:
        raise ConfigureError(f"unknown query parameter(s) {', '.join(unknown)} in {url!r}; scan and configure "
                             f"accept {', '.join(URL_KEYS)}")
    vendor = vendor_of(parsed.scheme)
    ids = parse_ids(parsed.params["ids"], scheme=parsed.scheme) if "ids" in parsed.params else None
    baud = parse_int(parsed.params, "baud", 0, vendor.sdk_bauds) if "baud" in parsed.params else None
    latency = parse_int(parsed.params, "latency_ms", DEFAULT_LATENCY_MS)
    if not 1 <= latency <= 1000:
        raise ConfigureError(f"latency_ms={latency} is outside 1..1000 ms (the adapter's latency timer)")
    return Target(parsed.scheme, parsed.port, ids, baud, latency)


# --------------------------------------------------------------------------------------------------------
# Scan
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServoInfo:
    id: int
    baud: int
    model: int
    model_name: str
    firmware: str
    return_delay_us: int
    limits: tuple[int, int]
    torque: bool
    mode: int
    lock: int | None  # Feetech only

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "baud": self.baud, "model": self.model, "model_name": self.model_name,
                "firmware": self.firmware, "return_delay_us": self.return_delay_us, "limits": list(self.limits),
                "torque": self.torque, "mode": self.mode, "lock": self.lock}

    def line(self) -> str:
        lock = "" if self.lock is None else f"  lock {self.lock}"
        return (f"id {self.id:<3} baud {self.baud:<7}  model {self.model} ({self.model_name})  firmware "
                f"{self.firmware}  return delay {self.return_delay_us} us  limits {self.limits[0]}..{self.limits[1]}"
                f"  mode {self.mode}  torque {'ON' if self.torque else 'off'}{lock}")


@dataclass(frozen=True)
class ScanResult:
    scheme: str
    port: str
    servos: list[ServoInfo]
    tried_bauds: tuple[int, ...]
    tried_ids: tuple[int, ...]
    method: str
    unsettable_bauds: tuple[int, ...]  # documented rates the SDK cannot set: not tried

    def to_dict(self) -> dict[str, Any]:
        return {"ok": bool(self.servos), "scheme": self.scheme, "port": self.port,
                "servos": [s.to_dict() for s in self.servos],
                "tried": {"bauds": list(self.tried_bauds), "ids": id_ranges(self.tried_ids), "method": self.method,
                          "not_tried_bauds": list(self.unsettable_bauds)}}


def id_ranges(ids: Sequence[int]) -> str:
    """(0, 1, 2, 5) -> '0-2,5'."""
    parts: list[str] = []
    for i in sorted(ids):
        if parts and parts[-1].split("-")[-1] == str(i - 1):
            parts[-1] = f"{parts[-1].split('-')[0]}-{i}"
        else:
            parts.append(str(i))
    return ",".join(parts)


def read_servo(bus: Bus, servo_id: int) -> ServoInfo:
    v = bus.vendor
    model = bus.read(servo_id, v.model)
    unsupported = _unsupported(v, model)
    if unsupported:
        return ServoInfo(servo_id, bus.baud, model, f"{unsupported}, not supported", "?", -1, (-1, -1), False, -1,
                         None)
    return ServoInfo(
        id=servo_id, baud=bus.baud, model=model, model_name=v.models.get(model, "unknown model"),
        firmware=".".join(str(bus.read(servo_id, r)) for r in v.firmware),
        return_delay_us=bus.read(servo_id, v.return_delay) * RETURN_DELAY_UNIT_US,
        limits=(bus.read(servo_id, v.min_limit), bus.read(servo_id, v.max_limit)),
        torque=bus.read(servo_id, v.torque) != 0, mode=bus.read(servo_id, v.mode),
        lock=bus.read(servo_id, v.lock) if v.lock else None)


def _answering(bus: Bus, ids: Sequence[int], timeout_ms: float) -> list[int]:
    if bus.vendor.broadcast_ping:
        found = bus.broadcast_ping()
        if found is not None:
            wanted = set(ids)
            return sorted(i for i in found if i in wanted)
    with bus.reply_timeout(timeout_ms):
        return [i for i in ids if bus.ping(i)]


def scan(scheme: str, port: str, *, bauds: Sequence[int], ids: Iterable[int] | None = None,
         timeout_ms: float = DEFAULT_SCAN_TIMEOUT_MS, latency_ms: int = DEFAULT_LATENCY_MS) -> ScanResult:
    """Every servo answering on `port` at each of `bauds` among `ids` (default: every id of the family)."""
    vendor = vendor_of(scheme)
    tried = tuple(range(vendor.max_id + 1)) if ids is None else tuple(ids)
    problem = next((p for i in tried if (p := vendor.id_problem(i))), None)
    if problem:
        raise ConfigureError(problem)
    if not bauds:
        raise ConfigureError("no baud rate to scan; give --baud RATE[,RATE...] or --all-bauds")
    wrong = [b for b in bauds if b not in vendor.sdk_bauds]
    if wrong:
        raise ConfigureError(f"baud {wrong[0]} is not a {vendor.title} rate the SDK can set; use one of "
                             f"{', '.join(map(str, vendor.sdk_bauds))}")
    if not 3 <= timeout_ms <= MAX_SCAN_TIMEOUT_MS:  # NaN fails both; inf overflowed the adapter's latency setting
        raise ConfigureError(f"--timeout-ms {timeout_ms:g} is outside 3..{MAX_SCAN_TIMEOUT_MS:g} ms: no servo answers "
                             "faster, and one that has not answered in a second is not there")
    found: list[ServoInfo] = []
    with Bus(vendor, port, bauds[0], latency_ms) as bus:
        for baud in bauds:
            bus.set_baud(baud)
            found.extend(read_servo(bus, servo_id) for servo_id in _answering(bus, tried, timeout_ms))
    method = "broadcast ping" if vendor.broadcast_ping else f"ping per id, {timeout_ms:g} ms timeout"
    unsettable = tuple(b for b in vendor.baud_values.values() if b not in vendor.sdk_bauds)
    return ScanResult(scheme, port, found, tuple(bauds), tried, method, unsettable)


# --------------------------------------------------------------------------------------------------------
# Configure: request -> plan -> apply
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    """What to set on the servos listed in `ids` (their ids now). Limits are ticks per id: (lo, hi)."""

    ids: tuple[int, ...]
    set_ids: dict[int, int] = field(default_factory=dict)
    baud: int | None = None
    return_delay_us: int | None = None
    limits: dict[int, tuple[int, int]] = field(default_factory=dict)
    position_mode: bool = False
    torque_off: bool = False


@dataclass(frozen=True)
class Change:
    servo_id: int  # the id the servo answered at when the plan was made
    register: Register
    old: int
    new: int

    def describe(self, vendor: Vendor) -> str:
        area = "EEPROM" if self.register.eeprom else "RAM"
        return (f"servo id {self.servo_id}: {self.register.label}: {self.old} -> {self.new} "
                f"({vendor.unit_note(self.register, self.old, self.new)}{area})")

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.servo_id, "register": self.register.name, "address": self.register.address,
                "old": self.old, "new": self.new, "eeprom": self.register.eeprom}


@dataclass(frozen=True)
class Plan:
    vendor: Vendor
    port: str
    baud: int  # the rate the servos answer at now
    ids: tuple[int, ...]
    torque_off: tuple[int, ...]  # servos whose torque is turned off first (requested)
    changes: tuple[Change, ...]  # in the order apply_plan writes them
    locks: dict[int, int]  # Feetech: Lock as found, per servo

    @property
    def empty(self) -> bool:
        return not self.changes and not self.torque_off

    def new_id(self, servo_id: int) -> int:
        return next((c.new for c in self.changes if c.servo_id == servo_id and c.register == self.vendor.id),
                    servo_id)

    def eeprom_servos(self) -> list[int]:
        return [i for i in self.ids if any(c.servo_id == i and c.register.eeprom for c in self.changes)]

    def lines(self) -> list[str]:
        out = [f"servo id {i}: {self.vendor.torque.label}: 1 -> 0 (requested: the arm goes limp)"
               for i in self.torque_off]
        out += [c.describe(self.vendor) for c in self.changes]
        if self.vendor.lock is not None:
            out += [f"servo id {i}: {self.vendor.lock.label}: {self.locks[i]} -> 0 for its EEPROM writes, then 1"
                    for i in self.eeprom_servos()]
        return out


def validate(vendor: Vendor, req: Request) -> None:
    """Refuse a malformed request before any bus traffic (one line naming the value and what to give)."""
    if not req.ids:
        raise ConfigureError("no servo ids: give ids=... in the URL (the servos to configure, as they answer now)")
    listed = f"ids={id_ranges(req.ids)}"
    for i in req.ids:
        if problem := vendor.id_problem(i):
            raise ConfigureError(problem)
    targets: dict[int, int] = {}
    for old, new in req.set_ids.items():
        what = f"--set-id {old}:{new}"
        for i in (old, new):
            if problem := vendor.id_problem(i):
                raise ConfigureError(f"{what}: {problem}")
        if old not in req.ids:
            raise ConfigureError(f"{what}: servo id {old} is not in {listed}; list it in the URL")
        if new in targets:
            raise ConfigureError(f"--set-id {targets[new]}:{new} and {what} would move two servos both to id "
                                 f"{new}; give each servo its own id")
        targets[new] = old
    if req.baud is not None and req.baud not in vendor.sdk_bauds:
        raise ConfigureError(f"--baud {req.baud} is not a {vendor.title} rate this tool can reach afterwards; use "
                             f"one of {', '.join(map(str, vendor.sdk_bauds))}")
    rd = req.return_delay_us
    if rd is not None and (not 0 <= rd <= RETURN_DELAY_MAX_US or rd % RETURN_DELAY_UNIT_US):
        raise ConfigureError(f"return delay {rd} us: the register counts {RETURN_DELAY_UNIT_US} us steps from 0 to "
                             f"{RETURN_DELAY_MAX_US} us; give an even number (0 is recommended, as LeRobot does)")
    for servo_id, (lo, hi) in req.limits.items():
        what = f"--limits {servo_id}={lo}:{hi}"
        if servo_id not in req.ids:
            raise ConfigureError(f"{what}: servo id {servo_id} is not in {listed}; list it in the URL")
        if not LIMIT_RANGE[0] <= lo < hi <= LIMIT_RANGE[1]:
            raise ConfigureError(f"{what}: give the low end first (lo < hi), both in {LIMIT_RANGE[0]}.."
                                 f"{LIMIT_RANGE[1]} ticks (tick = 2048 + rad x 4096 / 2pi at the default calibration)")


def make_plan(bus: Bus, req: Request) -> Plan:
    """Read every listed servo and list what differs; refuses (one line) before writing anything."""
    v = bus.vendor
    validate(v, req)
    for servo_id in req.ids:
        if not bus.ping(servo_id):
            raise ConfigureError(f"servo id {servo_id} did not answer at {bus.baud} baud on {bus.port_name}; find "
                                 f"the servos with `edge-vla motors scan {v.scheme}://{bus.port_name}`")
    for servo_id in req.ids:
        unsupported = _unsupported(v, bus.read(servo_id, v.model))
        if unsupported:
            raise ConfigureError(f"servo id {servo_id} is a {unsupported}: its control table is not implemented")
    torque_on = [i for i in req.ids if bus.read(i, v.torque) != 0]
    if torque_on and not req.torque_off:
        raise ConfigureError(f"servo id {torque_on[0]} has torque on: its EEPROM is written only with torque off; "
                             "stop what drives the arm (edge-vla stop), or pass --torque-off to turn it off first "
                             "(the arm goes limp: support it)")
    for old, new in req.set_ids.items():
        if new != old and (new in req.ids or bus.ping(new)):
            raise ConfigureError(f"--set-id {old}:{new}: id {new} already answers on {bus.port_name} at {bus.baud} "
                                 "baud; pick a free id (`edge-vla motors scan` lists the used ones)")
    if req.baud is not None and req.baud != bus.baud:
        _refuse_clash_at(bus, req.baud, [req.set_ids.get(i, i) for i in req.ids])
    locks = {i: bus.read(i, v.lock) for i in req.ids} if v.lock else {}
    baud_value = None if req.baud is None else v.baud_value(req.baud)
    per_servo: list[Change] = []
    rebaud: list[Change] = []  # last, after every other change
    for servo_id in req.ids:
        own = [Change(servo_id, reg, old, new) for reg, new in _wanted(v, req, servo_id)
               if (old := bus.read(servo_id, reg)) != new]
        new_id = req.set_ids.get(servo_id, servo_id)
        if new_id != servo_id:
            own.append(Change(servo_id, v.id, servo_id, new_id))
        if baud_value is not None and (old_baud := bus.read(servo_id, v.baud)) != baud_value:
            rebaud.append(Change(servo_id, v.baud, old_baud, baud_value))
        has_eeprom = bool(own) or any(c.servo_id == servo_id for c in rebaud)
        if v.lock and not has_eeprom and locks[servo_id] != 1:
            own.append(Change(servo_id, v.lock, locks[servo_id], 1))  # SRAM, no wear: the backend arms only locked
        per_servo.extend(own)
    return Plan(v, bus.port_name, bus.baud, req.ids, tuple(torque_on if req.torque_off else ()),
                (*per_servo, *rebaud), locks)


def _refuse_clash_at(bus: Bus, baud: int, final_ids: list[int]) -> None:
    """Servos already at the new baud rate must not have an id the moved servos will have: they would collide."""
    here = bus.baud
    bus.set_baud(baud)
    try:
        taken = [i for i in final_ids if bus.ping(i)]
    finally:
        bus.set_baud(here)
    if taken:
        raise ConfigureError(f"id {taken[0]} already answers at {baud} baud on {bus.port_name}: after --baud {baud} two "
                             "servos would share it; give the moved servo another id (--set-id) or move the other one")


def _unsupported(v: Vendor, model: int) -> str | None:
    swapped = ((model & 0xFF) << 8) | (model >> 8)  # a big-endian table (Feetech SCS) reads byte-swapped
    return v.unsupported_models.get(model) or v.unsupported_models.get(swapped)


def _wanted(v: Vendor, req: Request, servo_id: int) -> list[tuple[Register, int]]:
    wanted: list[tuple[Register, int]] = []
    if req.return_delay_us is not None:
        wanted.append((v.return_delay, req.return_delay_us // RETURN_DELAY_UNIT_US))
    if servo_id in req.limits:
        lo, hi = req.limits[servo_id]
        wanted += [(v.min_limit, lo), (v.max_limit, hi)]
    if req.position_mode:
        wanted.append((v.mode, v.position_mode))
    return wanted


class _Progress:
    """What apply_plan has done so far, for the one line that reports a failure."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.done: list[Change] = []
        self.unlocked: dict[int, int] = {}  # Feetech servo (planned id) -> the id it answers at now; maybe unlocked
        self.rebauded: list[int] = []  # servos (planned ids) sent the new baud rate (acknowledged or not)

    def verified(self, change: Change) -> None:
        self.done.append(change)

    def failure(self, bus: Bus, exc: ConfigureError) -> ConfigureError:
        v, plan = bus.vendor, self.plan
        relocked = self._relock(bus)
        done = "; ".join(f"id {c.servo_id} {c.register.name} {c.old} -> {c.new}" for c in self.done) or "nothing"
        left = [c for c in plan.changes if c not in self.done]
        not_done = "; ".join(f"id {c.servo_id} {c.register.name} {c.old} -> {c.new}" for c in left) or "nothing"
        parts = [str(exc), f"written and read back before it: {done}", f"not written (or not verified): {not_done}"]
        if relocked:
            parts.append(f"{v.lock.label if v.lock else 'Lock'} restored to 1 on servo ids {relocked}")
        if self.unlocked:
            parts.append(f"servo ids {sorted(self.unlocked.values())} may be left with Lock 0 (EEPROM unlocked: the "
                         "backend refuses to arm them); re-run configure, or power-cycle the servos (Lock is 1 at "
                         "power-on)")
        if self.rebauded:
            others = [plan.new_id(i) for i in plan.ids if i not in self.rebauded]
            new_baud = v.baud_values.get(next(c.new for c in plan.changes if c.register == v.baud))
            parts.append(f"servo ids {[plan.new_id(i) for i in self.rebauded]} were sent {new_baud} baud and answer "
                         f"only there if they took it" + (f", ids {others} are still at {plan.baud}" if others else "")
                         + f": find them with `edge-vla motors scan` --baud {plan.baud},{new_baud}")
        return ConfigureError("; ".join(" ".join(p.split()) for p in parts))

    def _relock(self, bus: Bus) -> list[int]:
        """Best effort after a failure: lock every servo this run unlocked and that still answers."""
        relocked: list[int] = []
        lock = bus.vendor.lock
        if lock is None:
            return relocked
        for planned, now_id in list(self.unlocked.items()):
            try:
                bus.write(now_id, lock, 1)
                if bus.read(now_id, lock) == 1:
                    relocked.append(now_id)
                    del self.unlocked[planned]
            except ConfigureError:
                continue
        return relocked


def _write_verified(bus: Bus, servo_id: int, register: Register, value: int, read_at: int | None = None) -> None:
    bus.write(servo_id, register, value)
    at = servo_id if read_at is None else read_at
    got = bus.read(at, register)
    if got != value:
        raise ConfigureError(f"servo id {at} reads {register.label} back as {got} after {value} was written: it did "
                             "not keep the value (check the register's range for this model)")


def apply_plan(bus: Bus, plan: Plan) -> list[Change]:
    """Write the plan, each write read back; returns the changes verified (empty when nothing differed)."""
    progress = _Progress(plan)
    try:
        _apply(bus, plan, progress)
    except ConfigureError as exc:
        raise progress.failure(bus, exc) from exc
    return progress.done


def _apply(bus: Bus, plan: Plan, progress: _Progress) -> None:
    v = plan.vendor
    for servo_id in plan.torque_off:
        _write_verified(bus, servo_id, v.torque, 0)
    eeprom_servos = set(plan.eeprom_servos())
    baud_changes = [c for c in plan.changes if c.register == v.baud]
    for servo_id in plan.ids:
        if v.lock and servo_id in eeprom_servos:
            progress.unlocked[servo_id] = servo_id  # first: an unlock whose answer is lost may still have landed
            if plan.locks[servo_id] != 0:
                _write_verified(bus, servo_id, v.lock, 0)
        own = [c for c in plan.changes if c.servo_id == servo_id and c.register not in (v.id, v.baud)]
        for change in own:
            _write_verified(bus, servo_id, change.register, change.new)
            progress.verified(change)
        renumber = next((c for c in plan.changes if c.servo_id == servo_id and c.register == v.id), None)
        if renumber is not None:  # effective at once: read back at the new id
            _write_verified(bus, servo_id, v.id, renumber.new, read_at=renumber.new)
            progress.verified(renumber)
            if servo_id in progress.unlocked:
                progress.unlocked[servo_id] = renumber.new
        if v.lock and servo_id in eeprom_servos and not any(c.servo_id == servo_id for c in baud_changes):
            _write_verified(bus, plan.new_id(servo_id), v.lock, 1)
            del progress.unlocked[servo_id]
    if baud_changes:
        _apply_baud(bus, plan, progress, baud_changes)


def _apply_baud(bus: Bus, plan: Plan, progress: _Progress, changes: list[Change]) -> None:
    """Last: each servo acknowledges the new rate at the old one, then everything is verified at the new one."""
    v = plan.vendor
    for change in changes:
        progress.rebauded.append(change.servo_id)  # first: a lost acknowledgement may hide a change that landed
        bus.write(plan.new_id(change.servo_id), v.baud, change.new)
    bus.set_baud(v.baud_values[changes[0].new])
    for change in changes:
        servo_id = plan.new_id(change.servo_id)
        got = bus.read(servo_id, v.baud)
        if got != change.new:
            raise ConfigureError(f"servo id {servo_id} reads {v.baud.label} back as {got} at {bus.baud} baud "
                                 f"after {change.new} was written")
        progress.verified(change)
        if v.lock and change.servo_id in progress.unlocked:
            _write_verified(bus, servo_id, v.lock, 1)
            del progress.unlocked[change.servo_id]
