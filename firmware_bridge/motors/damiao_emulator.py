"""Emulated Damiao DM-J motors in MIT mode on a python-can bus (for the tests and `edge-vla run --emulate`).

Written from the facts table in `firmware_bridge/motors/damiao.py` (F1-F16, T1, T2), with its own packing of the
frames (one 64-bit word, where the backend packs byte by byte), so a layout bug in one does not hide in the other.
What it does, and where it had to choose:

- commands on each motor's ESC_ID (F1, F9): enable FC, disable FD, clear error FB, set zero FE (flagged as a
  `set_zero` event: the runtime must never send it), and MIT frames (F2, F3) applied with the control law F4; every
  command is answered with one state frame on its MST_ID (F5, F6, F8);
- register frames on 0x7FF (F10, F11): read 0x33 and write 0x55 (RAM) answered on MST_ID; save 0xAA copies RAM to
  the motor's flash copy, answers a short frame and is flagged as a `save` event; 0xCC answers a state frame;
- TIMEOUT (RID 9), as table T1 says: units of 50 us, 0 = off; and T2's choice on expiry: status LOST_COMM (0xD) and
  the motor disables itself (`on_timeout="damping"` models I2RT's README instead: kp 0, kd `damping_kd`);
- faults: status 8..E (F7) from `inject_fault`, or over-temperature when `set_temperature` passes OT_Value (RID 2);
- a first-order joint plant per motor (inertia, viscous friction, torque clamped to +-TMAX);
- fault-campaign injections: `block_joint` (the joint cannot move: a collision; the motor's torque saturates at
  +-TMAX, no overload status is modelled: the sources say nothing of when a DM-J reports 0xE) and `cut_bus` (the
  bus between host and motors is gone: nothing is heard or sent, the TIMEOUTs run on).

Emulator assumptions the sources do not state: TIMEOUT is measured from the last frame on the motor's own ESC_ID
(register and refresh frames on 0x7FF do not feed it) and runs only while the motor is enabled; an error status
turns the output off; enable is refused while an error status stands, until clear error (FB), which clears it only
when its cause is gone; a disabled motor ignores MIT frames but still answers them; a write to a read-only register
changes nothing and is echoed with the unchanged value; writes to ESC_ID/MST_ID take effect at once.

python-can's `virtual` interface connects buses inside one process only: run the emulator in its own process on
`udp_multicast` (its cross-process virtual bus; `unique_udp_channel()` gives a test its own group and port), or in
a thread of the test process on `virtual`.

    python -m firmware_bridge.motors.damiao_emulator --ids 1-7 --print-port    # udp_multicast, a fresh channel
"""

from __future__ import annotations

import argparse
import contextlib
import math
import random
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import can

from firmware_bridge.motors import emulator_common as common

# The documented table (see damiao.py for the sources of each line)
ENABLE, DISABLE, SET_ZERO, CLEAR_ERROR = 0xFC, 0xFD, 0xFE, 0xFB  # after seven 0xFF bytes (F9)
REGISTER_ID = 0x7FF
REG_READ, REG_WRITE, REG_SAVE, REFRESH = 0x33, 0x55, 0xAA, 0xCC
KP_MAX, KD_MAX = 500.0, 5.0
TIMEOUT_UNIT_S = 50e-6  # table T1
STATUS_DISABLED, STATUS_ENABLED, STATUS_MOS_OT, STATUS_ROTOR_OT, STATUS_LOST_COMM = 0x0, 0x1, 0xB, 0xC, 0xD
FAULT_STATUS = frozenset(range(0x8, 0xF))
ON_TIMEOUT = ("disable", "damping")
RID_OT_VALUE, RID_MST_ID, RID_ESC_ID, RID_TIMEOUT, RID_CTRL_MODE = 2, 7, 8, 9, 10
RID_PMAX, RID_VMAX, RID_TMAX = 21, 22, 23
UINT_RIDS = frozenset({7, 8, 9, 10, 13, 14, 15, 16, 35, 36})
READ_ONLY_RIDS = frozenset({*range(11, 21), 36})
AMBIENT_C = 30.0


def decode_mit(data: bytes, pmax: float, vmax: float, tmax: float) -> tuple[float, float, float, float, float]:
    """An MIT frame (F2, F3) -> (p, v, kp, kd, t), unpacked as one big-endian 64-bit word."""
    word = int.from_bytes(data, "big")
    fields = (word >> 48, (word >> 36) & 0xFFF, (word >> 24) & 0xFFF, (word >> 12) & 0xFFF, word & 0xFFF)
    spans = ((-pmax, pmax, 16), (-vmax, vmax, 12), (0.0, KP_MAX, 12), (0.0, KD_MAX, 12), (-tmax, tmax, 12))
    p, v, kp, kd, t = (lo + u * (hi - lo) / ((1 << bits) - 1) for u, (lo, hi, bits) in zip(fields, spans, strict=True))
    return p, v, kp, kd, t


def _to_uint(x: float, lo: float, hi: float, bits: int) -> int:
    top = (1 << bits) - 1
    return max(0, min(top, round((min(hi, max(lo, x)) - lo) / (hi - lo) * top)))


def encode_reply_word(status: int, nibble: int, p: int, v: int, t: int, t_mos: int, t_rotor: int) -> bytes:
    """A state frame (F6) from its raw fields, packed as one 64-bit word."""
    word = (status << 60 | nibble << 56 | p << 40 | v << 28 | t << 16 | (t_mos & 0xFF) << 8 | (t_rotor & 0xFF))
    return word.to_bytes(8, "big")


@dataclass
class MotorConfig:
    esc_id: int
    mst_id: int | None = None  # default esc_id + 0x10
    pmax: float = 12.5  # DM-J4310 (F13)
    vmax: float = 30.0
    tmax: float = 10.0
    timeout: int = 0  # TIMEOUT (RID 9) in flash; I2RT ships 8000, Damiao's factory value was not found: 0, the worst
    ctrl_mode: int = 1  # MIT
    position: float = 0.0  # rad at power-on
    inertia: float = 0.01  # kg m^2 at the output shaft (an emulator choice)
    friction: float = 0.05  # N m s/rad viscous (an emulator choice)
    ot_value: float = 120.0  # OT_Value (RID 2), degC


@dataclass
class Motor:
    cfg: MotorConfig
    flash: dict[int, float] = field(default_factory=dict)
    ram: dict[int, float] = field(default_factory=dict)
    enabled: bool = False
    damping: bool = False  # T2's alternative: expired into damping
    status: int = STATUS_DISABLED
    position: float = 0.0
    velocity: float = 0.0
    torque: float = 0.0
    t_mos: float = AMBIENT_C
    t_rotor: float = AMBIENT_C
    command: tuple[float, float, float, float, float] = (0.0, 0.0, 0.0, 0.0, 0.0)  # p, v, kp, kd, t
    last_command: float = 0.0  # when the last frame on ESC_ID arrived
    offline: bool = False
    mit_frames: int = 0
    damping_kd: float = 1.0  # T2's damping alternative
    blocked: bool = False  # the joint cannot move (fault injection: a collision)
    recent: deque = field(default_factory=lambda: deque(maxlen=64))

    def __post_init__(self) -> None:
        c = self.cfg
        self.flash = {0: 10.0, 1: 0.945, RID_OT_VALUE: c.ot_value, 3: 0.98, 4: 10.0, 5: -10.0, 6: 30.0,
                      RID_MST_ID: c.mst_id if c.mst_id is not None else c.esc_id + 0x10, RID_ESC_ID: c.esc_id,
                      RID_TIMEOUT: c.timeout, RID_CTRL_MODE: c.ctrl_mode, 13: 1, 14: 5015, 20: 10.0,
                      RID_PMAX: c.pmax, RID_VMAX: c.vmax, RID_TMAX: c.tmax, 35: 4}
        self.ram = dict(self.flash)
        self.position = c.position

    @property
    def esc_id(self) -> int:
        return int(self.ram[RID_ESC_ID])

    @property
    def mst_id(self) -> int:
        return int(self.ram[RID_MST_ID])

    def reply(self) -> bytes:
        pmax, vmax, tmax = self.ram[RID_PMAX], self.ram[RID_VMAX], self.ram[RID_TMAX]
        return encode_reply_word(self.status, self.esc_id & 0xF, _to_uint(self.position, -pmax, pmax, 16),
                                 _to_uint(self.velocity, -vmax, vmax, 12), _to_uint(self.torque, -tmax, tmax, 12),
                                 round(self.t_mos), round(self.t_rotor))

    def fault(self, status: int) -> None:
        """An error status turns the output off (emulator assumption)."""
        self.status, self.enabled, self.damping = status, False, False

    def overheated(self) -> int | None:
        ot = self.ram[RID_OT_VALUE]
        return STATUS_MOS_OT if self.t_mos > ot else STATUS_ROTOR_OT if self.t_rotor > ot else None

    def step(self, dt: float) -> None:
        """Semi-implicit Euler (the velocity terms implicit: stable up to kd = 5 at 1 ms)."""
        j, b = self.cfg.inertia, self.cfg.friction
        tmax = self.ram[RID_TMAX]
        if self.enabled and self.status == STATUS_ENABLED:
            p_des, v_des, kp, kd, t_ff = self.command
        elif self.damping:
            p_des, v_des, kp, kd, t_ff = 0.0, 0.0, 0.0, self.damping_kd, 0.0
        else:
            p_des = v_des = kp = kd = t_ff = 0.0
        drive = kp * (p_des - self.position) + kd * v_des + t_ff
        if self.blocked:  # held where it is: the motor pushes against the block with its command, up to TMAX
            self.velocity, self.torque = 0.0, max(-tmax, min(tmax, drive))
            return
        v = (j * self.velocity + dt * drive) / (j + dt * (kd + b))
        torque = drive - kd * v
        if abs(torque) > tmax:
            torque = math.copysign(tmax, torque)
            v = (j * self.velocity + dt * torque) / (j + dt * b)
        self.velocity, self.torque = v, torque
        self.position += v * dt


class DamiaoBusEmulator:
    """Motors on one python-can bus, served by a thread. Every public method is thread-safe."""

    thread_name: ClassVar[str] = "damiao-emulator"

    def __init__(self, motors: Iterable[MotorConfig], *, interface: str = "udp_multicast", channel: str = "",
                 on_timeout: str = "disable", damping_kd: float = 1.0, timeout_unit_s: float = TIMEOUT_UNIT_S,
                 tick_s: float = 0.001) -> None:
        if on_timeout not in ON_TIMEOUT:
            raise ValueError(f"on_timeout={on_timeout!r}: use one of {ON_TIMEOUT}")
        self.motors: dict[int, Motor] = {}
        for cfg in motors:
            motor = Motor(cfg)
            motor.damping_kd = damping_kd
            self.motors[motor.esc_id] = motor
        self.interface, self.channel = interface, channel or unique_udp_channel()
        self.on_timeout, self.timeout_unit_s, self.tick_s = on_timeout, timeout_unit_s, tick_s
        self.events: list[common.Event] = []
        self.frame_counts = {"frames": 0, "mit": 0, "malformed": 0, "ignored": 0, "rx_errors": 0, "cut": 0}
        self.cut = False  # the bus is cut between host and motors (cut_bus): frames are lost both ways
        self._cond = threading.Condition()
        self._bus: can.BusABC | None = None
        self._thread: threading.Thread | None = None
        self._running = False
        self._last_step = time.monotonic()

    # -- lifecycle ------------------------------------------------------------------------------------------
    @property
    def port(self) -> str:
        """What goes between damiao:// and ?ids= to reach these motors."""
        return f"{self.interface}/{self.channel}"

    def open(self) -> str:
        kwargs: dict[str, Any] = {}
        channel = self.channel
        if self.interface == "udp_multicast" and ":" in channel:
            channel, _, udp_port = channel.rpartition(":")
            kwargs["port"] = int(udp_port)
        self._bus = can.Bus(interface=self.interface, channel=channel, **kwargs)
        return self.port

    def start(self) -> DamiaoBusEmulator:
        if self._bus is None:
            self.open()
        self._running = True
        self._last_step = time.monotonic()
        self._thread = threading.Thread(target=self.run, name=self.thread_name, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._running = False
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None
        if self._bus is not None:
            self._bus.shutdown()
            self._bus = None

    def __enter__(self) -> DamiaoBusEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the loop -------------------------------------------------------------------------------------------
    def run(self) -> None:
        next_tick = time.monotonic() + self.tick_s
        while self._running:
            msg = self._recv(max(0.0, next_tick - time.monotonic()))
            if msg is not None:
                self._handle(msg)
            now = time.monotonic()
            if now >= next_tick:
                for _ in range(256):  # frames that arrived before this instant count before any expiry
                    pending = self._recv(0.0)
                    if pending is None:
                        break
                    self._handle(pending)
                self._tick(time.monotonic())
                next_tick = now + self.tick_s

    def _recv(self, timeout: float) -> can.Message | None:
        bus = self._bus
        if bus is None:
            return None
        try:
            return bus.recv(timeout)
        except can.CanOperationError:
            self.frame_counts["rx_errors"] += 1
            return None
        except (OSError, ValueError):  # the bus was shut down under us
            return None

    def _send(self, arbitration_id: int, data: bytes) -> None:
        if self.cut:
            return
        if self._bus is not None:
            with contextlib.suppress(can.CanError, OSError):
                self._bus.send(can.Message(arbitration_id=arbitration_id, data=data, is_extended_id=False))

    def _handle(self, msg: can.Message) -> None:
        with self._cond:
            if self.cut:  # reached this end of a cut bus: no motor hears it (the TIMEOUTs are not fed)
                self.frame_counts["cut"] += 1
                return
            self.frame_counts["frames"] += 1
            self._dispatch(msg, time.monotonic())
            self._cond.notify_all()

    def _tick(self, now: float) -> None:
        with self._cond:
            dt_total = min(now - self._last_step, 0.05)
            self._last_step = now
            for motor in self.motors.values():
                self._check(motor, now)
                steps = max(1, math.ceil(dt_total / 0.001))
                for _ in range(steps):
                    motor.step(dt_total / steps)
            self._cond.notify_all()

    def _check(self, motor: Motor, now: float) -> None:
        hot = motor.overheated()
        if hot is not None and motor.status not in FAULT_STATUS:
            motor.fault(hot)
            self._event(now, motor, "fault", status=hot, t_mos=motor.t_mos, t_rotor=motor.t_rotor)
        timeout = int(motor.ram[RID_TIMEOUT])
        if not (motor.enabled and motor.status == STATUS_ENABLED and timeout > 0 and not motor.offline):
            return
        since = now - motor.last_command
        if since > timeout * self.timeout_unit_s:
            motor.status = STATUS_LOST_COMM
            if self.on_timeout == "damping":
                motor.enabled, motor.damping = False, True
            else:
                motor.enabled = False
            self._event(now, motor, "timeout_expired", since_last_command=since,
                        timeout_s=timeout * self.timeout_unit_s, action=self.on_timeout)

    # -- frames ---------------------------------------------------------------------------------------------
    def _dispatch(self, msg: can.Message, now: float) -> None:
        if msg.is_error_frame or msg.is_remote_frame or msg.is_extended_id:
            self.frame_counts["ignored"] += 1
            return
        data = bytes(msg.data)
        if msg.arbitration_id == REGISTER_ID:
            self._register(data, now)
            return
        motor = self.motors.get(msg.arbitration_id)
        if motor is None or motor.offline:
            self.frame_counts["ignored"] += 1  # another device's frame, or a reply (ours, looped back)
            return
        if len(data) != 8:
            self.frame_counts["malformed"] += 1
            return
        motor.last_command = now
        if data[:7] == b"\xff" * 7 and data[7] in (ENABLE, DISABLE, SET_ZERO, CLEAR_ERROR):
            self._special(motor, data[7], now)
        else:
            self._mit(motor, data, now)
        self._send(motor.mst_id, motor.reply())

    def _special(self, motor: Motor, cmd: int, now: float) -> None:
        if cmd == ENABLE:
            if motor.status in FAULT_STATUS:
                self._event(now, motor, "enable_refused", status=motor.status)
                return
            # Free until the first MIT frame: kp = kd = 0, no torque.
            motor.enabled, motor.damping, motor.status = True, False, STATUS_ENABLED
            motor.command = (motor.position, 0.0, 0.0, 0.0, 0.0)
            self._event(now, motor, "enable")
        elif cmd == DISABLE:
            motor.enabled, motor.damping = False, False
            if motor.status not in FAULT_STATUS:
                motor.status = STATUS_DISABLED
            self._event(now, motor, "disable")
        elif cmd == CLEAR_ERROR:
            cleared = motor.status in FAULT_STATUS and motor.overheated() is None
            if cleared:
                motor.status, motor.enabled, motor.damping = STATUS_DISABLED, False, False
            self._event(now, motor, "clear_error", cleared=cleared, status=motor.status)
        else:
            motor.position = 0.0  # the output shaft's present position becomes zero
            self._event(now, motor, "set_zero")

    def _mit(self, motor: Motor, data: bytes, now: float) -> None:
        self.frame_counts["mit"] += 1
        motor.mit_frames += 1
        p, v, kp, kd, t = decode_mit(data, motor.ram[RID_PMAX], motor.ram[RID_VMAX], motor.ram[RID_TMAX])
        motor.recent.append({"t": now, "p": p, "v": v, "kp": kp, "kd": kd, "tau": t, "applied": motor.enabled})
        if motor.enabled and motor.status == STATUS_ENABLED:
            motor.command = (p, v, kp, kd, t)

    def _register(self, data: bytes, now: float) -> None:
        if len(data) < 4:
            self.frame_counts["malformed"] += 1
            return
        motor = self.motors.get(data[0] | data[1] << 8)
        if motor is None or motor.offline:
            return
        op, rid = data[2], data[3]
        head = bytes([data[0], data[1]])
        if op == REFRESH:
            self._send(motor.mst_id, motor.reply())
        elif op == REG_SAVE:
            motor.flash = dict(motor.ram)
            self._event(now, motor, "save", rid=rid)
            self._send(motor.mst_id, head + bytes([REG_SAVE, 0x01]))
        elif op in (REG_READ, REG_WRITE) and rid in motor.ram:
            if op == REG_WRITE:
                if len(data) != 8:
                    self.frame_counts["malformed"] += 1
                    return
                value = struct.unpack("<I" if rid in UINT_RIDS else "<f", data[4:8])[0]
                if rid not in READ_ONLY_RIDS:
                    self._write(motor, rid, value, now)
                self._event(now, motor, "register_write", rid=rid, value=value, applied=rid not in READ_ONLY_RIDS)
            else:
                self._event(now, motor, "register_read", rid=rid)
            value = motor.ram[rid]
            raw = struct.pack("<I", int(value)) if rid in UINT_RIDS else struct.pack("<f", value)
            self._send(motor.mst_id, head + bytes([op, rid]) + raw)
        else:
            self.frame_counts["malformed"] += 1

    def _write(self, motor: Motor, rid: int, value: float, now: float) -> None:
        old_esc = motor.esc_id
        motor.ram[rid] = value
        if rid == RID_ESC_ID and int(value) != old_esc:  # answers at the new id at once
            self.motors.pop(old_esc, None)
            self.motors[int(value)] = motor

    def _event(self, t: float, motor: Motor, kind: str, **detail: object) -> None:
        self.events.append(common.Event(t, motor.esc_id, kind, dict(detail)))

    # -- inspection and fault injection (thread-safe) -------------------------------------------------------
    def events_of(self, kind: str, esc_id: int | None = None) -> list[common.Event]:
        with self._cond:
            return [e for e in self.events if e.kind == kind and (esc_id is None or e.servo_id == esc_id)]

    def snapshot(self, esc_id: int) -> dict:
        with self._cond:
            m = self.motors[esc_id]
            return {"esc_id": m.esc_id, "mst_id": m.mst_id, "enabled": m.enabled, "damping": m.damping,
                    "status": m.status, "position": m.position, "velocity": m.velocity, "torque": m.torque,
                    "t_mos": m.t_mos, "t_rotor": m.t_rotor, "mit_frames": m.mit_frames, "recent": list(m.recent),
                    "offline": m.offline}

    def register(self, esc_id: int, rid: int) -> float:
        with self._cond:
            return self.motors[esc_id].ram[rid]

    def flash(self, esc_id: int, rid: int) -> float:
        with self._cond:
            return self.motors[esc_id].flash[rid]

    def counters(self) -> dict[str, int]:
        with self._cond:
            return dict(self.frame_counts)

    def set_temperature(self, esc_id: int, mos: float, rotor: float) -> None:
        with self._cond:
            m = self.motors[esc_id]
            m.t_mos, m.t_rotor = mos, rotor
            self._event(time.monotonic(), m, "temperature", t_mos=mos, t_rotor=rotor)

    def inject_fault(self, esc_id: int, status: int) -> None:
        if status not in FAULT_STATUS:
            raise ValueError(f"status 0x{status:X} is not an error status (0x8..0xE)")
        with self._cond:
            m = self.motors[esc_id]
            m.fault(status)
            self._event(time.monotonic(), m, "fault", status=status, injected=True)

    def block_joint(self, esc_id: int, blocked: bool = True) -> None:
        """The joint cannot move (a collision): it stays where it is, its torque saturates at +-TMAX."""
        with self._cond:
            m = self.motors[esc_id]
            m.blocked = blocked
            if blocked:
                m.velocity = 0.0
            self._event(time.monotonic(), m, "block_joint", blocked=blocked)

    def cut_bus(self, cut: bool = True) -> None:
        """The bus between host and motors is cut (a severed cable, the host's CAN interface down): no motor hears
        a frame and nothing a motor sends arrives, while every motor's own timers (TIMEOUT) run on."""
        with self._cond:
            self.cut = cut
            self.events.append(common.Event(time.monotonic(), 0, "bus_cut", {"cut": cut}))

    def silence(self, esc_id: int, silent: bool = True) -> None:
        """The motor neither hears nor answers (its CAN cable or transceiver lost)."""
        with self._cond:
            self.motors[esc_id].offline = silent

    def set_position(self, esc_id: int, position: float) -> None:
        with self._cond:
            m = self.motors[esc_id]
            m.position, m.velocity = position, 0.0

    def wait_until(self, predicate: Callable[[], bool], timeout: float, poll_s: float = 0.002) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll_s)
        return True


def snapshot(bus: DamiaoBusEmulator, esc_id: int) -> dict:
    return bus.snapshot(esc_id)


def unique_udp_channel() -> str:
    """A multicast group and UDP port of its own ("239.a.b.c:port"): python-can's udp_multicast sockets bind the
    port on every address, so two buses on one machine are apart only when both group and port differ."""
    rng = random.SystemRandom()
    return f"239.{rng.randint(1, 254)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}:{rng.randint(20000, 60999)}"


class EmulatorProcess(common.BusProcess):
    """The motors in their own process (no GIL shared with the host under test), driven over a pipe; `port` is
    what goes between damiao:// and ?ids=."""

    bus_type = DamiaoBusEmulator  # type: ignore[assignment]
    snapshot_of = staticmethod(snapshot)  # type: ignore[assignment]
    process_name = "damiao-emulator"
    vendor = "Damiao"

    def flash(self, esc_id: int, rid: int) -> float:
        return self._call("flash", esc_id, rid)  # type: ignore[return-value]

    def counters(self) -> dict[str, int]:
        return self._call("counters")  # type: ignore[return-value]

    def set_temperature(self, esc_id: int, mos: float, rotor: float) -> None:
        self._call("set_temperature", esc_id, mos, rotor)

    def inject_fault(self, esc_id: int, status: int) -> None:
        self._call("inject_fault", esc_id, status)

    def silence(self, esc_id: int, silent: bool = True) -> None:
        self._call("silence", esc_id, silent)

    def cut_bus(self, cut: bool = True) -> None:
        self._call("cut_bus", cut)

    def set_position(self, esc_id: int, position: float) -> None:
        self._call("set_position", esc_id, position)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Emulated Damiao motors (MIT mode) on a python-can bus")
    parser.add_argument("--ids", default="1-7", help="ESC_IDs, e.g. 1-7 (MST_ID = ESC_ID + 0x10)")
    parser.add_argument("--interface", default="udp_multicast")
    parser.add_argument("--channel", default=None, help="default: a fresh udp_multicast GROUP:PORT")
    parser.add_argument("--on-timeout", choices=ON_TIMEOUT, default="disable", help="TIMEOUT expiry action (T2)")
    parser.add_argument("--timeout", type=int, default=0, help="TIMEOUT (RID 9) in flash at power-on, 50 us units")
    parser.add_argument("--print-port", action="store_true", help="print INTERFACE/CHANNEL on stdout, then serve")
    args = parser.parse_args(argv)
    bus = DamiaoBusEmulator([MotorConfig(esc_id=i, timeout=args.timeout) for i in common.parse_ids(args.ids)],
                            interface=args.interface, channel=args.channel or "", on_timeout=args.on_timeout)
    return common.serve_until_stopped(bus, args.print_port)


if __name__ == "__main__":
    sys.exit(main())
