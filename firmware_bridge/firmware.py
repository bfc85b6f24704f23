"""Python handle on the C firmware reference (firmware/fw_core.c) loaded through ctypes.

`FirmwareRef` owns one fw_t; the emulator feeds it received bytes, ticks it, and applies its
commands to simulated joints. The codec helpers expose the C encoder/decoder to agreement tests.
"""

from __future__ import annotations

import ctypes
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from firmware_bridge import native
from firmware_bridge.errors import BridgeError
from firmware_bridge.framing import MAX_ENCODED, MAX_PAYLOAD
from firmware_bridge.protocol import (
    EFFORT_SCALE,
    GAIN_SCALE,
    MAX_JOINTS,
    POS_SCALE,
    VEL_SCALE,
    Fault,
    JointLimits,
    JointSafety,
    Mode,
    Status,
)

_RAW_CAP = MAX_PAYLOAD + 8
TX_CAP = 4096


class EventKind(IntEnum):
    ARMED = 1
    DISARMED = 2
    STOP_CAT0 = 3
    STOP_CAT1 = 4
    TORQUE_OFF = 5
    HEARTBEAT_TIMEOUT = 6
    LINK_ERRORS = 7
    HELLO = 8
    FAULTS_CLEARED = 9
    FOLLOWING_ERROR = 10  # arg: joint
    EFFORT_LIMIT = 11  # arg: joint
    ENABLE = 12  # arg: 1 asserted, 0 dropped
    TIME_BACKSTEP = 13
    STALE_FRAME = 14  # arg: message type
    STOP_ESCALATED = 15  # arg: joint
    SESSION_RESET = 16
    STOP_RECEIVED = 17  # arg: category
    BAD_SESSION = 18  # arg: message type (a CLEAR_FAULTS or ARM without the current session's nonce)


STAT_NAMES = ("rx_frames", "rx_crc_errors", "rx_framing_errors", "rx_bad_messages", "rx_duplicates", "rx_gaps",
              "tx_frames", "tx_overflows", "events_lost", "rx_stale", "time_backsteps", "rx_bad_session")


@dataclass(frozen=True)
class FirmwareEvent:
    firmware_time_us: int
    kind: EventKind
    arg: int
    fault_bits: Fault


def _buf(data: bytes) -> ctypes.Array:
    return (ctypes.c_uint8 * max(1, len(data))).from_buffer_copy(data or b"\0")


def c_crc32c(data: bytes) -> int:
    return native.load().fw_crc32c(_buf(data), len(data), 0)


def c_frame_encode(version: int, msg_type: int, seq: int, payload: bytes) -> bytes:
    out = (ctypes.c_uint8 * (MAX_ENCODED + 8))()
    n = native.load().fw_frame_encode(version, msg_type, seq, _buf(payload), len(payload), out, len(out))
    if n == 0:
        raise ValueError(f"C encoder refused a {len(payload)}-byte payload")
    return bytes(out[:n])


def c_frame_decode(block: bytes) -> tuple[int, int, int, int, bytes]:
    """(status, version, type, seq, payload); status 0 ok, 1 framing, 2 CRC."""
    raw = (ctypes.c_uint8 * _RAW_CAP)()
    ver, typ, seq, plen = ctypes.c_uint8(), ctypes.c_uint8(), ctypes.c_uint16(), ctypes.c_size_t()
    st = native.load().fw_frame_decode(_buf(block), len(block), raw, ctypes.byref(ver), ctypes.byref(typ),
                                       ctypes.byref(seq), ctypes.byref(plen))
    payload = bytes(raw[4 : 4 + plen.value]) if st == 0 else b""
    return st, ver.value, typ.value, seq.value, payload


class FirmwareRef:
    """One motor-controller firmware instance (the C state machine) with integer wire units at its edge."""

    def __init__(
        self,
        joints: list[JointLimits],
        heartbeat_timeout_ms: int = 100,
        stop_ramp_ms: int = 200,
        state_rate_hz: int = 100,
        link_error_limit: int = 4,
        firmware_version: tuple[int, int, int] = (1, 0, 0),
        kp_default: float = 50.0,
        kd_default: float = 2.0,
        protocol: tuple[int, int] | None = None,
        *,
        link_loss_category: int = 1,
        link_error_category: int = 0,
        enable_required: bool = False,
        enable_category: int = 0,
        seq_window: int = 256,
        error_leak_per_s: int = 10,
        joint_safety: Sequence[JointSafety] | None = None,
        session_entropy: int | None = None,
    ) -> None:
        if not 1 <= len(joints) <= MAX_JOINTS:
            raise BridgeError(f"the firmware supports 1..{MAX_JOINTS} joints, got {len(joints)}")
        self._lib = native.load()
        self._fw = ctypes.create_string_buffer(self._lib.fw_sizeof())
        self.n = len(joints)
        major, minor, patch = firmware_version
        self._lib.fw_init(self._fw, self.n, heartbeat_timeout_ms, stop_ramp_ms, state_rate_hz, link_error_limit,
                          (major << 16) | (minor << 8) | patch)
        if protocol is not None:
            self._lib.fw_set_protocol(self._fw, *protocol)
        # What a port's hardware RNG gives at boot (PROTOCOL.md, Sessions): a new instance is a new boot, so
        # its session nonces have nothing to do with an earlier instance's. Fixed only by tests that need it.
        self._lib.fw_seed_sessions(self._fw, secrets.randbits(64) if session_entropy is None else session_entropy)
        for j, lim in enumerate(joints):
            rc = self._lib.fw_set_joint(
                self._fw, j, lim.name.encode()[:16], round(lim.position_min * POS_SCALE),
                round(lim.position_max * POS_SCALE), round(lim.velocity_max * VEL_SCALE),
                round(lim.effort_max * EFFORT_SCALE), round(kp_default * GAIN_SCALE), round(kd_default * GAIN_SCALE))
            if rc != 0:
                raise BridgeError(f"joint {j} ({lim}) rejected by the firmware: need min <= max and max >= 0")
        rc = self._lib.fw_set_safety(self._fw, link_loss_category, link_error_category, int(enable_required),
                                     enable_category, seq_window, error_leak_per_s)
        if rc != 0:
            raise BridgeError(
                f"safety configuration rejected by the firmware: categories must be 0 or 1 (got link loss "
                f"{link_loss_category}, link errors {link_error_category}, enable {enable_category}) and the "
                f"sequence window 1..32768 (got {seq_window})")
        if joint_safety is not None:
            if len(joint_safety) != self.n:
                raise BridgeError(f"joint_safety has {len(joint_safety)} entries for {self.n} joints")
            for j, s in enumerate(joint_safety):
                kp_max = 4 * kp_default if s.kp_max is None else s.kp_max
                kd_max = 4 * kd_default if s.kd_max is None else s.kd_max
                rc = self._lib.fw_set_joint_safety(
                    self._fw, j, 1 if s.role == "gripper" else 0, round(s.max_position_error * POS_SCALE),
                    round(s.max_velocity_error * VEL_SCALE), round(s.effort_limit * EFFORT_SCALE),
                    min(round(kp_max * GAIN_SCALE), 2**32 - 1), min(round(kd_max * GAIN_SCALE), 2**32 - 1))
                if rc != 0:
                    raise BridgeError(f"joint {j} safety {s} rejected by the firmware: limits must be >= 0")
        self._meas = np.zeros(self.n * 3, dtype=np.int32)
        self._cmd = np.zeros(self.n * 5, dtype=np.int32)
        self._tx = (ctypes.c_uint8 * TX_CAP)()
        self._i32p = ctypes.POINTER(ctypes.c_int32)

    def rx(self, data: bytes, now_us: int) -> None:
        if data:
            self._lib.fw_rx_bytes(self._fw, _buf(data), len(data), now_us)

    def tick(self, now_us: int) -> None:
        self._lib.fw_tick(self._fw, now_us)

    def inject_fault(self, category: int, now_us: int) -> None:
        self._lib.fw_inject_fault(self._fw, category, now_us)

    def set_enable(self, asserted: bool, now_us: int) -> None:
        """The hardware enable input (an E-stop chain or enable switch) changed."""
        self._lib.fw_set_enable(self._fw, int(bool(asserted)), now_us)

    def set_measured(self, pos: np.ndarray, vel: np.ndarray, eff: np.ndarray) -> None:
        m = self._meas.reshape(self.n, 3)
        lim = np.iinfo(np.int32)
        m[:, 0] = np.clip(np.rint(pos * POS_SCALE), lim.min, lim.max)
        m[:, 1] = np.clip(np.rint(vel * VEL_SCALE), lim.min, lim.max)
        m[:, 2] = np.clip(np.rint(eff * EFFORT_SCALE), lim.min, lim.max)
        self._lib.fw_set_measured(self._fw, self._meas.ctypes.data_as(self._i32p))

    def commands(self) -> tuple[bool, np.ndarray]:
        """(torque_on, float array n x 5: position, velocity, effort, kp, kd in SI units)."""
        on = bool(self._lib.fw_get_commands(self._fw, self._cmd.ctypes.data_as(self._i32p)))
        c = self._cmd.reshape(self.n, 5).astype(np.float64)
        c[:, 3:] = self._cmd.reshape(self.n, 5)[:, 3:].view(np.uint32) / GAIN_SCALE
        c[:, 0] /= POS_SCALE
        c[:, 1] /= VEL_SCALE
        c[:, 2] /= EFFORT_SCALE
        return on, c

    def tx_take(self, cap: int = TX_CAP) -> bytes:
        """Up to `cap` bytes of the firmware's output (a frame may be split across calls)."""
        n = self._lib.fw_tx_take(self._fw, self._tx, min(cap, TX_CAP))
        return bytes(self._tx[:n])

    def events(self) -> list[FirmwareEvent]:
        out = []
        t, kind, arg, bits = ctypes.c_uint64(), ctypes.c_uint8(), ctypes.c_uint8(), ctypes.c_uint16()
        while self._lib.fw_pop_event(self._fw, ctypes.byref(t), ctypes.byref(kind), ctypes.byref(arg),
                                     ctypes.byref(bits)):
            out.append(FirmwareEvent(t.value, EventKind(kind.value), arg.value, Fault(bits.value)))
        return out

    @property
    def mode(self) -> Mode:
        return Mode(self._lib.fw_mode(self._fw))

    @property
    def faults(self) -> Fault:
        return Fault(self._lib.fw_faults(self._fw))

    @property
    def status(self) -> Status:
        return Status(self._lib.fw_status(self._fw))

    @property
    def session(self) -> int:
        """The nonce of the firmware's current session (0: none)."""
        return self._lib.fw_session(self._fw)

    @property
    def time_us(self) -> int:
        """The firmware's own monotonic clock (what STATE.time_us reports)."""
        return self._lib.fw_time_us(self._fw)

    def stats(self) -> dict[str, int]:
        return {name: self._lib.fw_stat(self._fw, i) for i, name in enumerate(STAT_NAMES)}
