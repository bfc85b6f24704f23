"""Message types and their little-endian fixed layouts (see PROTOCOL.md).

Every quantity travels as a scaled integer so the firmware never needs floats: positions in
micro-radians, velocities in micro-radians per second, efforts in milli-newton-metres, gains in
1e-4 SI units. Messages here hold SI floats (numpy float64 arrays); encoding rounds and saturates.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import ClassVar

import numpy as np

from firmware_bridge.errors import FrameError

PROTOCOL_MAJOR = 1  # carried in every frame header; a different major is refused
PROTOCOL_MINOR = 2  # carried in HELLO/CAPABILITIES
# 1.0 firmware clears latched faults on ARM and knows no CLEAR_FAULTS; 1.1 firmware applies a CLEAR_FAULTS
# and ARM from any session, so a replayed session start (HELLO, CLEAR_FAULTS, ARM written again byte for
# byte) re-arms it. A host that relies on "arming is an operator act" refuses both.
MIN_FIRMWARE_MINOR = 2
# 1.2: CLEAR_FAULTS and ARM apply only within this many sequence numbers after the session's HELLO, so the
# 16-bit sequence window can never come round onto a captured frame of a session that still arms.
SESSION_ARM_SPAN = 0x8000
MAX_JOINTS = 16
NAME_LEN = 16

POS_SCALE = 1e6  # wire units per radian (or metre for a prismatic joint)
VEL_SCALE = 1e6  # per rad/s
EFFORT_SCALE = 1e3  # per N*m (or N)
GAIN_SCALE = 1e4  # per N*m/rad (kp) and N*m*s/rad (kd)

_I32 = (-(2**31), 2**31 - 1)
_U32 = (0, 2**32 - 1)


class MsgType(IntEnum):
    HELLO = 0x01
    CAPABILITIES = 0x02
    ARM = 0x03
    DISARM = 0x04
    SETPOINT = 0x05
    STATE = 0x06
    HEARTBEAT = 0x07
    STOP = 0x08
    FAULT = 0x09
    ACK = 0x0A
    NACK = 0x0B
    CLEAR_FAULTS = 0x0C  # 1.1
    KEEPALIVE = 0x0D  # 1.1
    SAFETY_CONFIG = 0x0E  # 1.1
    SESSION = 0x0F  # 1.2


class Mode(IntEnum):
    DISARMED = 0  # torque off, no fault
    ARMED = 1  # tracking setpoints
    STOPPING = 2  # category-1 ramp in progress
    TRIPPED = 3  # torque off after a trip; needs an explicit ARM


class Fault(IntFlag):
    NONE = 0
    HEARTBEAT_TIMEOUT = 0x0001
    LINK_ERRORS = 0x0002
    HOST_STOP_CAT0 = 0x0004
    HOST_STOP_CAT1 = 0x0008
    INJECTED = 0x0010
    FOLLOWING_ERROR = 0x0020  # 1.1: |commanded - measured| beyond the joint's limit (category 0)
    EFFORT_LIMIT = 0x0040  # 1.1: a gripper's measured effort beyond its limit (category 0)
    ENABLE_LOST = 0x0080  # 1.1: the hardware enable input dropped while armed
    SETPOINT_CLAMPED = 0x0100  # status bit, not a trip: the last setpoint was outside a limit
    GAINS_CLAMPED = 0x0200  # 1.1 status bit: the last setpoint's kp/kd exceeded the configured maxima
    STOP_ESCALATED = 0x0400  # 1.1: a category-1 ramp did not slow a joint down: category 0
    SESSION_RESET = 0x0800  # 1.1: HELLO while armed (the host that armed is gone)


STATUS_FAULTS = Fault.SETPOINT_CLAMPED | Fault.GAINS_CLAMPED
TRIP_FAULTS = Fault(0xFFFF & ~int(STATUS_FAULTS))  # latched until CLEAR_FAULTS; ARM is refused meanwhile


class Status(IntFlag):
    """STATE's status word (1.1; zero from 1.0 firmware)."""

    NONE = 0
    ENABLE_INPUT = 0x1  # the hardware enable input is asserted (always 1 when none is configured)
    STOP_LATCHED = 0x2  # a STOP was received; only an accepted ARM clears it
    ENABLE_REQUIRED = 0x4


class NackCode(IntEnum):
    OK = 0
    NOT_ARMED = 1
    BAD_LENGTH = 2
    BAD_JOINT_COUNT = 3
    BUSY = 4
    BAD_VERSION = 5
    BAD_ARGUMENT = 6
    UNKNOWN_TYPE = 7
    FAULTS_LATCHED = 8  # 1.1: ARM refused while faults are latched: CLEAR_FAULTS first
    ENABLE_OFF = 9  # 1.1: ARM refused: the enable input is required and not asserted
    STALE_SEQ = 10  # 1.1: the frame's sequence number is not newer than the last one (or no HELLO yet)
    BAD_SESSION = 11  # 1.2: CLEAR_FAULTS/ARM without the current session's nonce (a replay, or a lost session)


SETPOINT_HAS_VELOCITY = 0x01
SETPOINT_HAS_EFFORT = 0x02
SETPOINT_HAS_GAINS = 0x04

_SETPOINT_JOINT = np.dtype([("pos", "<i4"), ("vel", "<i4"), ("eff", "<i4"), ("kp", "<u4"), ("kd", "<u4")])
_STATE_JOINT = np.dtype([("pos", "<i4"), ("vel", "<i4"), ("eff", "<i4")])
_CAP_JOINT = np.dtype(
    [("name", "S16"), ("pos_min", "<i4"), ("pos_max", "<i4"), ("vel_max", "<i4"), ("eff_max", "<i4")]
)


def to_wire(values: np.ndarray | Sequence[float], scale: float, bounds: tuple[int, int] = _I32) -> np.ndarray:
    """SI floats -> rounded, saturated integers (NaN is refused: it must never reach a motor)."""
    arr = np.asarray(values, dtype=np.float64) * scale
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"non-finite value in {np.asarray(values)!r}; refusing to encode it")
    return np.clip(np.rint(arr), *bounds).astype(np.int64)


def _joints(n: int) -> int:
    if not 0 <= n <= MAX_JOINTS:
        raise ValueError(f"joint count {n} outside 0..{MAX_JOINTS}")
    return n


def _require_len(payload: bytes, expected: int, what: str) -> None:
    if len(payload) != expected:
        raise FrameError("bad_length", f"{what} payload is {len(payload)} bytes, expected {expected}")


@dataclass(frozen=True)
class Hello:
    TYPE: ClassVar[MsgType] = MsgType.HELLO
    host_major: int = PROTOCOL_MAJOR
    host_minor: int = PROTOCOL_MINOR

    def encode(self) -> bytes:
        return struct.pack("<BBH", self.host_major, self.host_minor, 0)

    @classmethod
    def decode(cls, p: bytes) -> Hello:
        _require_len(p, 4, "HELLO")
        major, minor, _ = struct.unpack("<BBH", p)
        return cls(major, minor)


@dataclass(frozen=True)
class JointLimits:
    name: str
    position_min: float
    position_max: float
    velocity_max: float
    effort_max: float


@dataclass(frozen=True)
class Capabilities:
    """What the firmware reports about itself in answer to HELLO."""

    TYPE: ClassVar[MsgType] = MsgType.CAPABILITIES
    protocol_major: int
    protocol_minor: int
    firmware_version: tuple[int, int, int]
    heartbeat_timeout_s: float
    state_rate_hz: int
    stop_ramp_s: float
    joints: tuple[JointLimits, ...]
    safety: SafetyConfig | None = None  # 1.1: the SAFETY_CONFIG frame that follows; not part of this layout
    session: int | None = None  # 1.2: the nonce of the SESSION frame that follows; not part of this layout

    _HEAD: ClassVar[struct.Struct] = struct.Struct("<BBBBIHHHH")

    @property
    def joint_count(self) -> int:
        return len(self.joints)

    @property
    def joint_names(self) -> list[str]:
        return [j.name for j in self.joints]

    def limits_array(self, attr: str) -> np.ndarray:
        return np.array([getattr(j, attr) for j in self.joints], dtype=np.float64)

    def encode(self) -> bytes:
        major, minor, patch = self.firmware_version
        head = self._HEAD.pack(
            self.protocol_major, self.protocol_minor, _joints(len(self.joints)), 0,
            (major << 16) | (minor << 8) | patch,
            round(self.heartbeat_timeout_s * 1000), self.state_rate_hz, round(self.stop_ramp_s * 1000), 0,
        )
        rows = np.zeros(len(self.joints), dtype=_CAP_JOINT)
        for i, j in enumerate(self.joints):
            rows[i] = (j.name.encode()[:NAME_LEN], *to_wire([j.position_min, j.position_max], POS_SCALE),
                       to_wire([j.velocity_max], VEL_SCALE)[0], to_wire([j.effort_max], EFFORT_SCALE)[0])
        return head + rows.tobytes()

    @classmethod
    def decode(cls, p: bytes) -> Capabilities:
        if len(p) < cls._HEAD.size:
            raise FrameError("bad_length", f"CAPABILITIES payload is {len(p)} bytes, too short")
        major, minor, n, _, fw, hb_ms, rate, ramp_ms, _ = cls._HEAD.unpack_from(p)
        _require_len(p, cls._HEAD.size + n * _CAP_JOINT.itemsize, "CAPABILITIES")
        if n > MAX_JOINTS:
            raise FrameError("bad_length", f"CAPABILITIES claims {n} joints, max {MAX_JOINTS}")
        rows = np.frombuffer(p, dtype=_CAP_JOINT, offset=cls._HEAD.size, count=n)
        joints = tuple(
            JointLimits(r["name"].decode(errors="replace"), float(r["pos_min"]) / POS_SCALE,
                        float(r["pos_max"]) / POS_SCALE,
                        float(r["vel_max"]) / VEL_SCALE, float(r["eff_max"]) / EFFORT_SCALE)
            for r in rows
        )
        return cls(major, minor, ((fw >> 16) & 0xFF, (fw >> 8) & 0xFF, fw & 0xFF), hb_ms / 1000, rate,
                   ramp_ms / 1000, joints)


@dataclass(frozen=True)
class _Empty:
    def encode(self) -> bytes:
        return b""

    @classmethod
    def decode(cls, p: bytes) -> _Empty:
        _require_len(p, 0, cls.__name__.upper())
        return cls()


@dataclass(frozen=True)
class _SessionBound:
    """1.2: a command the firmware applies only with the nonce of its current session (SESSION.session)."""

    session: int = 0  # 0 never matches: the firmware has no session 0

    def encode(self) -> bytes:
        return struct.pack("<I", self.session & 0xFFFFFFFF)

    @classmethod
    def decode(cls, p: bytes) -> _SessionBound:
        _require_len(p, 4, cls.__name__.upper())
        return cls(struct.unpack("<I", p)[0])


@dataclass(frozen=True)
class Arm(_SessionBound):
    """Torque on, holding the measured position; carries the session nonce (1.2; empty in 1.1)."""

    TYPE: ClassVar[MsgType] = MsgType.ARM


@dataclass(frozen=True)
class Disarm(_Empty):
    TYPE: ClassVar[MsgType] = MsgType.DISARM


@dataclass(frozen=True, eq=False)
class Setpoint:
    """Per-joint targets in SI units. Missing velocity/effort/gains are sent as zero and flagged
    absent, so the firmware uses zero feed-forward and its own default gains."""

    TYPE: ClassVar[MsgType] = MsgType.SETPOINT
    positions: np.ndarray
    velocities: np.ndarray | None = None
    efforts: np.ndarray | None = None
    kp: np.ndarray | None = None
    kd: np.ndarray | None = None

    _HEAD: ClassVar[struct.Struct] = struct.Struct("<BBH")

    def encode(self) -> bytes:
        n = _joints(len(self.positions))
        rows = np.zeros(n, dtype=_SETPOINT_JOINT)
        rows["pos"] = to_wire(self.positions, POS_SCALE)
        flags = 0
        if self.velocities is not None:
            rows["vel"], flags = to_wire(self.velocities, VEL_SCALE), flags | SETPOINT_HAS_VELOCITY
        if self.efforts is not None:
            rows["eff"], flags = to_wire(self.efforts, EFFORT_SCALE), flags | SETPOINT_HAS_EFFORT
        if self.kp is not None or self.kd is not None:
            if self.kp is None or self.kd is None:
                raise ValueError("give both kp and kd, or neither (the firmware then uses its defaults)")
            rows["kp"] = to_wire(self.kp, GAIN_SCALE, _U32)
            rows["kd"] = to_wire(self.kd, GAIN_SCALE, _U32)
            flags |= SETPOINT_HAS_GAINS
        return self._HEAD.pack(n, flags, 0) + rows.tobytes()

    @classmethod
    def decode(cls, p: bytes) -> Setpoint:
        if len(p) < cls._HEAD.size:
            raise FrameError("bad_length", f"SETPOINT payload is {len(p)} bytes, too short")
        n, flags, _ = cls._HEAD.unpack_from(p)
        _require_len(p, cls._HEAD.size + n * _SETPOINT_JOINT.itemsize, "SETPOINT")
        r = np.frombuffer(p, dtype=_SETPOINT_JOINT, offset=cls._HEAD.size, count=n)
        gains = bool(flags & SETPOINT_HAS_GAINS)
        return cls(
            r["pos"] / POS_SCALE,
            r["vel"] / VEL_SCALE if flags & SETPOINT_HAS_VELOCITY else None,
            r["eff"] / EFFORT_SCALE if flags & SETPOINT_HAS_EFFORT else None,
            r["kp"] / GAIN_SCALE if gains else None,
            r["kd"] / GAIN_SCALE if gains else None,
        )


@dataclass(frozen=True, eq=False)
class State:
    """Measured joint state as the firmware reports it (wire layout of STATE)."""

    TYPE: ClassVar[MsgType] = MsgType.STATE
    firmware_time_us: int
    ack_seq: int  # sequence number of the last SETPOINT applied (for round-trip time)
    fault_bits: Fault
    mode: Mode
    positions: np.ndarray
    velocities: np.ndarray
    efforts: np.ndarray
    status: Status = Status.NONE  # 1.1: the former reserved u16

    _HEAD: ClassVar[struct.Struct] = struct.Struct("<QHHBBH")

    def encode(self) -> bytes:
        n = _joints(len(self.positions))
        rows = np.zeros(n, dtype=_STATE_JOINT)
        rows["pos"] = to_wire(self.positions, POS_SCALE)
        rows["vel"] = to_wire(self.velocities, VEL_SCALE)
        rows["eff"] = to_wire(self.efforts, EFFORT_SCALE)
        head = self._HEAD.pack(self.firmware_time_us, self.ack_seq, int(self.fault_bits), int(self.mode), n,
                               int(self.status))
        return head + rows.tobytes()

    @classmethod
    def decode(cls, p: bytes) -> State:
        if len(p) < cls._HEAD.size:
            raise FrameError("bad_length", f"STATE payload is {len(p)} bytes, too short")
        t, ack, faults, mode, n, status = cls._HEAD.unpack_from(p)
        _require_len(p, cls._HEAD.size + n * _STATE_JOINT.itemsize, "STATE")
        r = np.frombuffer(p, dtype=_STATE_JOINT, offset=cls._HEAD.size, count=n)
        return cls(t, ack, Fault(faults), _mode(mode), r["pos"] / POS_SCALE, r["vel"] / VEL_SCALE,
                   r["eff"] / EFFORT_SCALE, Status(status))


def _mode(value: int) -> Mode:
    try:
        return Mode(value)
    except ValueError:
        raise FrameError("bad_field", f"unknown firmware mode {value}") from None


@dataclass(frozen=True)
class Heartbeat:
    TYPE: ClassVar[MsgType] = MsgType.HEARTBEAT
    counter: int = 0

    def encode(self) -> bytes:
        return struct.pack("<I", self.counter & 0xFFFFFFFF)

    @classmethod
    def decode(cls, p: bytes) -> Heartbeat:
        _require_len(p, 4, "HEARTBEAT")
        return cls(struct.unpack("<I", p)[0])


@dataclass(frozen=True)
class Stop:
    TYPE: ClassVar[MsgType] = MsgType.STOP
    category: int
    reason: int = 0

    def encode(self) -> bytes:
        if self.category not in (0, 1):
            raise ValueError(f"stop category must be 0 (torque off now) or 1 (ramp, then torque off), got "
                             f"{self.category}")
        return struct.pack("<BBH", self.category, self.reason & 0xFF, 0)

    @classmethod
    def decode(cls, p: bytes) -> Stop:
        _require_len(p, 4, "STOP")
        cat, reason, _ = struct.unpack("<BBH", p)
        return cls(cat, reason)


@dataclass(frozen=True)
class ClearFaults(_SessionBound):
    """1.1: clear every latched fault (TRIPPED -> DISARMED); the operator's half of re-arming. 1.2: carries the
    session nonce."""

    TYPE: ClassVar[MsgType] = MsgType.CLEAR_FAULTS


@dataclass(frozen=True)
class Session:
    """1.2: the firmware's nonce for the session a HELLO started (sent after CAPABILITIES and SAFETY_CONFIG to
    hosts announcing minor >= 2). CLEAR_FAULTS and ARM must carry it; `hello_seq` is the sequence number of
    the HELLO it answers, so a host can tell the answer to its own HELLO from one to another node's."""

    TYPE: ClassVar[MsgType] = MsgType.SESSION
    session: int  # never 0 from a working firmware (0: no session source, nothing can be armed)
    hello_seq: int

    _S: ClassVar[struct.Struct] = struct.Struct("<IHH")

    def encode(self) -> bytes:
        return self._S.pack(self.session & 0xFFFFFFFF, self.hello_seq & 0xFFFF, 0)

    @classmethod
    def decode(cls, p: bytes) -> Session:
        _require_len(p, cls._S.size, "SESSION")
        session, hello_seq, _ = cls._S.unpack(p)
        return cls(session, hello_seq)


@dataclass(frozen=True)
class Keepalive:
    """1.1: proves the link is alive; ACKed, and never feeds the firmware's motion watchdog."""

    TYPE: ClassVar[MsgType] = MsgType.KEEPALIVE
    counter: int = 0

    def encode(self) -> bytes:
        return struct.pack("<I", self.counter & 0xFFFFFFFF)

    @classmethod
    def decode(cls, p: bytes) -> Keepalive:
        _require_len(p, 4, "KEEPALIVE")
        return cls(struct.unpack("<I", p)[0])


ROLES = ("joint", "gripper")
_SAFETY_JOINT = np.dtype([("role", "u1"), ("r0", "u1"), ("r1", "<u2"), ("pos_err", "<i4"), ("vel_err", "<i4"),
                          ("effort", "<i4"), ("kp_max", "<u4"), ("kd_max", "<u4")])


@dataclass(frozen=True)
class JointSafety:
    """Per-joint firmware safety limits (SI units; 0 = check off). A gripper is blocked by design when it
    grasps, so it gets an effort limit instead of a following-error limit. kp_max/kd_max None: the
    firmware's default (4x its default gains)."""

    role: str = "joint"
    max_position_error: float = 0.0  # rad (m): |commanded - measured| position -> category 0
    max_velocity_error: float = 0.0  # rad/s
    effort_limit: float = 0.0  # N*m: |measured effort| of a gripper -> category 0
    kp_max: float | None = None  # N*m/rad; host kp is clamped to it
    kd_max: float | None = None  # N*m*s/rad

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"joint role must be one of {ROLES}, got {self.role!r}")
        for name in ("max_position_error", "max_velocity_error", "effort_limit", "kp_max", "kd_max"):
            v = getattr(self, name)
            if v is not None and not (np.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite value >= 0, got {v!r}")


@dataclass(frozen=True)
class SafetyConfig:
    """1.1: the firmware's safety configuration, sent after CAPABILITIES to hosts announcing minor >= 1."""

    TYPE: ClassVar[MsgType] = MsgType.SAFETY_CONFIG
    firmware_time_us: int
    link_loss_category: int  # heartbeat timeout / HELLO while armed: 0 torque off, 1 controlled stop
    link_error_category: int  # too many corrupted frames
    enable_category: int  # the enable input dropping while armed
    enable_required: bool
    enable_asserted: bool
    seq_window: int
    error_leak_per_s: int  # bad frames per second the error bucket forgives
    link_error_limit: int  # bad frames in a burst that trip
    joints: tuple[JointSafety, ...]

    _HEAD: ClassVar[struct.Struct] = struct.Struct("<QBBBBHHBBH")

    def encode(self) -> bytes:
        n = _joints(len(self.joints))
        flags = (1 if self.enable_required else 0) | (2 if self.enable_asserted else 0)
        head = self._HEAD.pack(self.firmware_time_us, self.link_loss_category, self.link_error_category,
                               self.enable_category, flags, self.seq_window, self.error_leak_per_s,
                               self.link_error_limit, n, 0)
        rows = np.zeros(n, dtype=_SAFETY_JOINT)
        for i, j in enumerate(self.joints):
            rows[i] = (ROLES.index(j.role), 0, 0, to_wire([j.max_position_error], POS_SCALE)[0],
                       to_wire([j.max_velocity_error], VEL_SCALE)[0], to_wire([j.effort_limit], EFFORT_SCALE)[0],
                       to_wire([j.kp_max or 0.0], GAIN_SCALE, _U32)[0], to_wire([j.kd_max or 0.0], GAIN_SCALE, _U32)[0])
        return head + rows.tobytes()

    @classmethod
    def decode(cls, p: bytes) -> SafetyConfig:
        if len(p) < cls._HEAD.size:
            raise FrameError("bad_length", f"SAFETY_CONFIG payload is {len(p)} bytes, too short")
        t, loss, err, en_cat, flags, window, leak, limit, n, _ = cls._HEAD.unpack_from(p)
        _require_len(p, cls._HEAD.size + n * _SAFETY_JOINT.itemsize, "SAFETY_CONFIG")
        rows = np.frombuffer(p, dtype=_SAFETY_JOINT, offset=cls._HEAD.size, count=n)
        if any(int(r["role"]) >= len(ROLES) for r in rows):
            raise FrameError("bad_field", f"SAFETY_CONFIG has an unknown joint role in {rows['role'].tolist()}")
        joints = tuple(
            JointSafety(ROLES[int(r["role"])], float(r["pos_err"]) / POS_SCALE if r["pos_err"] > 0 else 0.0,
                        float(r["vel_err"]) / VEL_SCALE if r["vel_err"] > 0 else 0.0,
                        float(r["effort"]) / EFFORT_SCALE if r["effort"] > 0 else 0.0,
                        float(r["kp_max"]) / GAIN_SCALE, float(r["kd_max"]) / GAIN_SCALE)
            for r in rows)
        return cls(t, loss, err, en_cat, bool(flags & 1), bool(flags & 2), window, leak, limit, joints)


@dataclass(frozen=True)
class FaultReport:
    """A trip or fault the firmware reports on its own initiative."""

    TYPE: ClassVar[MsgType] = MsgType.FAULT
    firmware_time_us: int
    fault_code: Fault  # the bit that caused this report
    fault_bits: Fault  # all latched bits
    stop_category: int  # 0, 1, or 255 when no stop was taken
    mode: Mode

    _S: ClassVar[struct.Struct] = struct.Struct("<QHHBBH")

    def encode(self) -> bytes:
        return self._S.pack(self.firmware_time_us, int(self.fault_code), int(self.fault_bits),
                            self.stop_category, int(self.mode), 0)

    @classmethod
    def decode(cls, p: bytes) -> FaultReport:
        _require_len(p, cls._S.size, "FAULT")
        t, code, bits, cat, mode, _ = cls._S.unpack(p)
        return cls(t, Fault(code), Fault(bits), cat, _mode(mode))


@dataclass(frozen=True)
class Ack:
    TYPE: ClassVar[MsgType] = MsgType.ACK
    acked_seq: int
    acked_type: int
    code: int = 0

    def encode(self) -> bytes:
        return struct.pack("<HBB", self.acked_seq, self.acked_type, self.code)

    @classmethod
    def decode(cls, p: bytes) -> Ack:
        _require_len(p, 4, cls.TYPE.name)
        return cls(*struct.unpack("<HBB", p))


@dataclass(frozen=True)
class Nack(Ack):
    TYPE: ClassVar[MsgType] = MsgType.NACK

    @property
    def reason(self) -> str:
        try:
            return NackCode(self.code).name
        except ValueError:
            return f"code {self.code}"


Message = (
    Hello | Capabilities | Arm | Disarm | Setpoint | State | Heartbeat | Stop | FaultReport | Ack | Nack
    | ClearFaults | Keepalive | SafetyConfig | Session
)
MESSAGE_CLASSES: dict[int, type] = {
    cls.TYPE: cls for cls in (Hello, Capabilities, Arm, Disarm, Setpoint, State, Heartbeat, Stop, FaultReport,
                              Ack, Nack, ClearFaults, Keepalive, SafetyConfig, Session)
}
