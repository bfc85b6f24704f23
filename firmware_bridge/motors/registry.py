"""URL scheme -> motor device class, with lazy imports (python-can's interface registry shape).

The registry holds only "module:Class" strings, so listing schemes or parsing a URL imports no backend and
no vendor SDK; `open_device()` imports the one backend a URL names. A backend class provides
`URL_PARAMS` (query key -> one-line help) and `from_url(port, params, **kw)`.

    dynamixel:///dev/ttyUSB0?baud=1000000&ids=1-6     (the port is everything between :// and ?)
    dynamixel://COM3?ids=1,2,5
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from firmware_bridge.motors.base import MissingDependencyError, MotorDevice, MotorUrlError

# scheme -> (import path, one-line description with an example). Register only backends that exist.
BACKENDS: dict[str, tuple[str, str]] = {
    "dynamixel": (
        "firmware_bridge.motors.dynamixel:DynamixelDevice",
        "Dynamixel X series, Protocol 2.0, Bus Watchdog armed (extra: dynamixel): "
        "dynamixel:///dev/ttyUSB0?baud=1000000&ids=1-6",
    ),
    "feetech": (
        "firmware_bridge.motors.feetech:FeetechDevice",
        "Feetech STS3215 (SO-100/SO-101), NO device watchdog: a killed host or unplugged cable leaves the "
        "servos holding their last goal under torque (extra: feetech): feetech:///dev/ttyUSB0?ids=1-6",
    ),
    "damiao": (
        "firmware_bridge.motors.damiao:DamiaoDevice",
        "Damiao DM-J (OpenArm, I2RT YAM) in MIT mode over python-can, each motor's TIMEOUT armed at 2 control "
        "periods: on expiry it disables itself (the joint is not held) (no extra): "
        "damiao://socketcan/can0?ids=1-7&bitrate=1000000",
    ),
    "cia402": (
        "firmware_bridge.motors.cia402:Cia402Device",
        "CiA 402 drives over CANopen, heartbeat consumer (0x1016) and abort-connection quick stop (0x6007 = 3, "
        "then disabled: 0x605A = 2) armed (extra: cia402): cia402://socketcan/can0?node=1-6&bitrate=1000000",
    ),
}

# The servo ids of each family, the one place every entry point (motor URLs, `motors scan/configure`, LeRobot
# calibration files, robot configurations) takes them from:
DYNAMIXEL_MAX_ID = 252  # Protocol 2.0: ID 0..252 (ROBOTIS e-manual, control table address 7); 254 is broadcast
FEETECH_MAX_ID = 253  # STS/SMS memory table: ID (address 5) 0..253; scservo_sdk refuses only ids >= 0xFE
SERVO_BROADCAST_ID = 0xFE  # 254 on both servo buses
BROADCAST = "the broadcast id (0xFE: every servo acts on it and none answers)"


@dataclass(frozen=True)
class IdSpace:
    """The ids a scheme's devices can have: the query key that lists them and the inclusive range, with why;
    `reserved` names what an id just outside the range is (the servo buses' broadcast id)."""

    key: str
    lo: int
    hi: int
    why: str
    reserved: tuple[tuple[int, str], ...] = ()

    def problem(self, value: int) -> str | None:
        """Why `value` cannot be one device's id, in one line; None when it can."""
        if self.lo <= value <= self.hi:
            return None
        named = dict(self.reserved).get(value)
        if named:
            return f"id {value} is {named}; give one servo's own id, {self.lo}..{self.hi} ({self.why})"
        return f"id {value} is outside {self.lo}..{self.hi} ({self.why})"


ID_SPACES: dict[str, IdSpace] = {
    "dynamixel": IdSpace("ids", 0, DYNAMIXEL_MAX_ID, "Dynamixel Protocol 2.0 ids",
                         ((SERVO_BROADCAST_ID, BROADCAST),)),
    "feetech": IdSpace("ids", 0, FEETECH_MAX_ID, "Feetech STS/SMS ids", ((SERVO_BROADCAST_ID, BROADCAST),)),
    "damiao": IdSpace("ids", 0, 0x7FE, "11-bit standard CAN ids; 0x7FF carries the register frames"),
    "cia402": IdSpace("node", 1, 127, "CANopen node ids; 0 addresses every node in NMT"),
}


@dataclass(frozen=True)
class MotorUrl:
    scheme: str
    port: str
    params: dict[str, str]


def schemes() -> dict[str, str]:
    """Accepted URL schemes, each with a one-line description (for `edge-vla run --link` help)."""
    return {name: desc for name, (_, desc) in BACKENDS.items()}


def _accepted() -> str:
    return ", ".join(f"{s}://" for s in BACKENDS)


def parse_url(url: str) -> MotorUrl:
    """Split a motor URL into scheme, port and query parameters; one-line errors for malformed ones."""
    if not isinstance(url, str) or "://" not in url:
        raise MotorUrlError(f"motor link {url!r} is not a URL: expected SCHEME://PORT?key=value, one of {_accepted()}")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in BACKENDS:
        raise MotorUrlError(f"unknown motor link scheme {parts.scheme!r} in {url!r}: accepted schemes are {_accepted()}")
    port = parts.netloc + parts.path
    if not port:
        raise MotorUrlError(f"motor link {url!r} names no port: write {scheme}:///dev/ttyUSB0?... (or COM3 on Windows)")
    if parts.fragment:
        raise MotorUrlError(f"motor link {url!r} has a '#' fragment; remove it")
    try:
        pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError as exc:
        raise MotorUrlError(f"malformed query in motor link {url!r}: {exc}; write key=value pairs joined by &") from exc
    params: dict[str, str] = {}
    for key, value in pairs:
        if key in params:
            raise MotorUrlError(f"query parameter {key!r} given twice in motor link {url!r}; give it once")
        params[key] = value
    return MotorUrl(scheme, port, params)


def parse_ids(text: str, what: str = "ids", scheme: str | None = None) -> tuple[int, ...]:
    """'1-6' or '1,2,5' or '1-3,7' -> (1, 2, ...): distinct, in the order given, each inside the scheme's id range
    (`ID_SPACES`; without a scheme Dynamixel's 0..252)."""
    space = ID_SPACES[scheme or "dynamixel"]
    ids: list[int] = []
    for part in text.split(","):
        part = part.strip()
        lo_s, sep, hi_s = part.partition("-")
        try:
            lo = int(lo_s)
            hi = int(hi_s) if sep else lo
        except ValueError:
            raise MotorUrlError(f"{what}={text!r}: {part!r} is not an id or a range like 1-6 (ids {space.lo}.."
                                f"{space.hi}); write e.g. {what}=1-6 or {what}=1,2,5") from None
        reserved = next((v for v in (lo, hi) if v in dict(space.reserved)), None)
        if reserved is not None:  # the broadcast id: say so, not just "outside"
            raise MotorUrlError(f"{what}={text!r}: {space.problem(reserved)}")
        if not (space.lo <= lo <= hi <= space.hi):
            raise MotorUrlError(f"{what}={text!r}: {part!r} is outside {space.lo}..{space.hi} ({space.why}) or runs "
                                "backwards")
        ids.extend(range(lo, hi + 1))
    if len(set(ids)) != len(ids):
        raise MotorUrlError(f"{what}={text!r} lists an id twice; each servo appears once")
    return tuple(ids)


def parse_int(params: dict[str, str], key: str, default: int, allowed: tuple[int, ...] | None = None) -> int:
    if key not in params:
        return default
    try:
        value = int(params[key])
    except ValueError:
        raise MotorUrlError(f"{key}={params[key]!r} is not an integer") from None
    if allowed is not None and value not in allowed:
        raise MotorUrlError(f"{key}={value} is not supported; use one of {', '.join(map(str, allowed))}")
    return value


def load_backend(scheme: str) -> type[MotorDevice]:
    target, _ = BACKENDS[scheme]
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except MissingDependencyError:
        raise
    except ImportError as exc:  # the backend module itself imports only stdlib/numpy at module level
        raise MissingDependencyError(f"motor backend {scheme}:// cannot be imported: {exc}") from exc
    return getattr(module, class_name)


def open_device(url: str, *, open_now: bool = True, **kw: Any) -> MotorDevice:
    """Build the device a URL names (keyword arguments: joint limits, calibration, period) and open it."""
    parsed = parse_url(url)
    cls = load_backend(parsed.scheme)
    known: dict[str, str] = getattr(cls, "URL_PARAMS", {})
    unknown = sorted(set(parsed.params) - set(known))
    if unknown:
        raise MotorUrlError(f"unknown query parameter(s) {', '.join(unknown)} in {url!r}; "
                            f"{parsed.scheme}:// accepts {', '.join(known) or 'none'}")
    device: MotorDevice = cls.from_url(parsed.port, parsed.params, **kw)  # type: ignore[attr-defined]
    device.url = url
    return device.open() if open_now else device
