"""A motor controller emulator: the C firmware reference (via ctypes) + simulated joints, on a pty or CAN.

    python -m firmware_bridge.emulator --pty --print-path --joints 7 --events events.jsonl
    edge-vla emulate BUNDLE --link serial://$PWD/runs/motor     # the joint count from the bundle
    edge-vla emulate --link can://socketcan/vcan0              # = --can vcan0 --can-interface socketcan

The protocol and the watchdog are the firmware's own C code (firmware/fw_core.c); this module only
moves bytes, steps the joint dynamics, injects faults and writes events as JSON lines with
time.monotonic() timestamps (one clock for every process on the machine).

Targeted fault injection (drop_next, inject_garbage, corrupt_alternate, replay, block_joint,
step_time_back, set_enable) and the bench's set_position (place a disarmed arm) are thread-safe: each call is queued and applied by the emulator's loop
within one tick, and logged as a `control` event. In another process (EmulatorProcess) the same calls
travel as JSON lines on the emulator's stdin (--control-stdin).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np

from firmware_bridge.emulator_process import EmulatorProcess, read_events
from firmware_bridge.errors import BridgeError, UrlError
from firmware_bridge.faults import FaultConfig, FaultInjector
from firmware_bridge.firmware import EventKind, FirmwareRef
from firmware_bridge.framing import StreamDecoder
from firmware_bridge.injection import (
    HostFrameFaults,
    SafetyObserver,
    frame_payload,
    frame_type,
    safety_report,
    type_name,
)
from firmware_bridge.plant import JointPlant
from firmware_bridge.protocol import Fault, JointLimits, JointSafety, Mode, MsgType
from firmware_bridge.transport import CanTransport, PtyTransport, Transport

log = logging.getLogger(__name__)
_LIVENESS = (MsgType.HEARTBEAT, MsgType.SETPOINT)
TIME_BASE_US = 1_000_000_000  # the firmware's time source starts here, so step_time_back has room
MOTION_SPEED = 0.05  # rad/s: above this with torque on, the robot is moving
CONTROL_COMMANDS = ("drop_next", "inject_garbage", "corrupt_alternate", "replay", "block_joint", "step_time_back",
                    "set_enable", "set_position")

__all__ = ["Emulator", "EmulatorConfig", "EmulatorProcess", "configure", "default_limits", "main", "read_events",
           "safety_report"]


def default_limits(n: int, names: list[str] | None = None) -> list[JointLimits]:
    names = names or [f"joint{i}" for i in range(n)]
    return [JointLimits(names[i], -3.0, 3.0, 3.0, 20.0) for i in range(n)]


@dataclass
class EmulatorConfig:
    joints: list[JointLimits] = field(default_factory=lambda: default_limits(2))
    heartbeat_timeout_ms: int = 100
    stop_ramp_ms: int = 200
    state_rate_hz: int = 100
    tick_hz: int = 1000
    link_error_limit: int = 4
    baud: int = 0  # > 0: pace each direction as a UART at this rate (10 bits per byte)
    faults: FaultConfig = field(default_factory=FaultConfig)
    stall_at: float | None = None  # seconds after start: ignore the host for stall_for seconds
    stall_for: float = 0.0
    unplug_at: float | None = None  # seconds after start: close the pty, reopen after unplug_for
    unplug_for: float = 0.5
    inject_fault_at: float | None = None  # seconds after start: a firmware fault of inject_fault_cat
    inject_fault_cat: int = 0
    seed: int | None = None
    protocol: tuple[int, int] | None = None  # pretend to speak another protocol version (tests)
    firmware_version: tuple[int, int, int] = (1, 2, 0)  # the reference firmware release (protocol 1.2)
    # safety configuration of the emulated robot (protocol 1.1)
    link_loss_category: int = 1  # heartbeat loss / new session while armed: 1 = controlled stop (default)
    link_error_category: int = 0  # corrupted-frame bursts: 0 = torque off now
    enable_required: bool = False  # ARM needs the hardware enable input; dropping it stops
    enable_category: int = 0
    enable_initial: bool = True  # the enable input's level at start
    following_error: float = 1.0  # rad, per joint: |commanded - measured| -> category 0 (0: off)
    gripper_joints: tuple[int, ...] = ()  # these get an effort limit instead of a following-error limit
    gripper_effort_limit: float = 0.0  # N*m (0: off)
    kp_max: float = 200.0  # N*m/rad: host gains are clamped to these
    kd_max: float = 10.0
    seq_window: int = 256
    error_leak_per_s: int = 10

    def joint_safety(self) -> list[JointSafety]:
        return [JointSafety("gripper", 0.0, 0.0, self.gripper_effort_limit, self.kp_max, self.kd_max)
                if j in self.gripper_joints else JointSafety("joint", self.following_error, 0.0, 0.0, self.kp_max,
                                                             self.kd_max)
                for j in range(len(self.joints))]


class _Paced:
    """Frames waiting for their release time: fault delays and, with baud > 0, UART wire time."""

    def __init__(self, baud: int) -> None:
        self.byte_time = 10.0 / baud if baud > 0 else 0.0
        self.free_at = 0.0
        self.queue: list[tuple[float, int, bytes]] = []

    def push(self, now: float, frame: bytes, extra_delay: float, stream: int = 0) -> None:
        done = max(now, self.free_at) + len(frame) * self.byte_time
        self.free_at = done
        self.queue.append((done + extra_delay, stream, frame))

    def due(self, now: float) -> list[tuple[int, bytes]]:
        if not self.queue:
            return []
        ready = [(s, f) for t, s, f in self.queue if t <= now]
        if ready:
            self.queue = [q for q in self.queue if q[0] > now]
        return ready

    def next_time(self) -> float:
        return min((t for t, _, _ in self.queue), default=float("inf"))


class Emulator:
    """One emulated motor controller on a transport. run() blocks; start() runs it in a thread."""

    def __init__(self, config: EmulatorConfig, transport: Transport,
                 on_event: Callable[[dict], None] | None = None) -> None:
        self.config = config
        self.transport = transport
        bad = [j for j in config.gripper_joints if not 0 <= j < len(config.joints)]
        if bad:
            raise ValueError(f"gripper joints {bad} outside 0..{len(config.joints) - 1}")
        self.fw = FirmwareRef(config.joints, config.heartbeat_timeout_ms, config.stop_ramp_ms,
                              config.state_rate_hz, config.link_error_limit, config.firmware_version,
                              protocol=config.protocol, link_loss_category=config.link_loss_category,
                              link_error_category=config.link_error_category,
                              enable_required=config.enable_required, enable_category=config.enable_category,
                              seq_window=config.seq_window, error_leak_per_s=config.error_leak_per_s,
                              joint_safety=config.joint_safety())
        self.plant = JointPlant(config.joints)
        self.injector = FaultInjector(config.faults, config.seed)
        self.host_faults = HostFrameFaults()
        self.observer = SafetyObserver()
        self._controls: queue.SimpleQueue[tuple[str, Callable[[], object], dict]] = queue.SimpleQueue()
        self._time_back_us = 0
        self._last_mode: Mode | None = None
        self._moving = False
        self.events: list[dict] = []
        self._on_event = on_event
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._unplug_request: float | None = None
        self._t0 = time.monotonic()
        self.last_liveness: float | None = None  # when the firmware last got a heartbeat or setpoint
        self._stopped_reported = True

    # ---- control from other threads / signal handlers ----
    def start(self) -> Emulator:
        self.transport.open()
        self._thread = threading.Thread(target=self._run_opened, name="fw-emulator", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def unplug(self, duration: float) -> None:
        """Close the port now and reopen it after `duration` seconds (pty only)."""
        self._unplug_request = duration

    @property
    def port(self) -> str:
        return getattr(self.transport, "port", self.transport.description)

    # ---- targeted fault injection (thread-safe: applied by the loop within one tick) ----
    def drop_next(self, msg_type: MsgType | int | str, n: int = 1) -> None:
        """Drop the next `n` host->firmware frames of this type (a lost STOP, a lost DISARM)."""
        t = _msg_type(msg_type)
        self._control("drop_next", lambda: self.host_faults.drop.__setitem__(t, self.host_faults.drop.get(t, 0) + n),
                      type=t.name, n=n)

    def inject_garbage(self, data: bytes | str) -> None:
        """Feed raw bytes to the firmware's receiver (line noise; a malformed frame is a link error)."""
        raw = bytes.fromhex(data) if isinstance(data, str) else bytes(data)
        self._control("inject_garbage", lambda: self.fw.rx(raw, self._us(time.monotonic())), bytes=len(raw))

    def corrupt_alternate(self, n: int) -> None:
        """The next 2n host frames alternate corrupted, good, corrupted, good, ..."""
        self._control("corrupt_alternate", lambda: setattr(self.host_faults, "alternate_left", 2 * n), n=n)

    def replay(self, msg_type: MsgType | int | str, which: str = "oldest") -> None:
        """Deliver an earlier host frame of this type again, byte for byte ("oldest" or "latest" kept)."""
        t = _msg_type(msg_type)

        def go() -> None:
            block = self.host_faults.recorded(t, which)
            self._deliver(block, time.monotonic(), injected=True)

        self._control("replay", go, type=t.name, which=which)

    def block_joint(self, joint: int, blocked: bool = True) -> None:
        """Joint `joint` stops moving where it is (following error while the host keeps commanding)."""
        if not 0 <= joint < len(self.config.joints):
            raise ValueError(f"joint {joint} outside 0..{len(self.config.joints) - 1}")
        self._control("block_joint", lambda: self.plant.block(joint, blocked), joint=joint, blocked=blocked)

    def step_time_back(self, seconds: float) -> None:
        """The firmware's time source jumps back by `seconds` (a timer reset or a bad clock)."""
        us = int(seconds * 1e6)
        if not 0 < us < TIME_BASE_US:
            raise ValueError(f"step back must be in (0, {TIME_BASE_US / 1e6:g}) s, got {seconds}")
        self._control("step_time_back", lambda: setattr(self, "_time_back_us", self._time_back_us + us),
                      seconds=seconds)

    def set_enable(self, asserted: bool) -> None:
        """The hardware enable input (enable switch, E-stop chain) changes level."""
        self._control("set_enable", lambda: self.fw.set_enable(bool(asserted), self._us(time.monotonic())),
                      asserted=bool(asserted))

    def set_position(self, positions: list[float] | np.ndarray) -> None:
        """Place the joints at `positions`, at rest (a bench operator moving the arm by hand between
        episodes). Refused while torque is on: only a disarmed or tripped arm can be moved this way."""
        q = np.asarray(positions, dtype=np.float64).reshape(-1)
        if q.shape != self.plant.q.shape or not np.all(np.isfinite(q)):
            raise ValueError(f"set_position needs {len(self.plant.q)} finite positions, got {q.tolist()}")

        def go() -> None:
            if self.fw.commands()[0]:
                raise ValueError("set_position refused: torque is on (disarm or stop the arm first)")
            self.plant.q = np.clip(q, self.plant.q_min, self.plant.q_max)
            self.plant.v[:] = 0.0
            self.fw.set_measured(self.plant.q, self.plant.v, self.plant.tau)

        self._control("set_position", go, positions=q.tolist())

    def control(self, cmd: str, **args: object) -> None:
        """One injection by name (the control pipe of EmulatorProcess); see CONTROL_COMMANDS."""
        if cmd not in CONTROL_COMMANDS:
            raise ValueError(f"unknown emulator control {cmd!r}; one of {', '.join(CONTROL_COMMANDS)}")
        getattr(self, cmd)(**args)

    def safety_report(self) -> dict:
        return safety_report(self.events)

    def _control(self, name: str, fn: Callable[[], object], **fields: object) -> None:
        self._controls.put((name, fn, fields))

    def _apply_controls(self) -> None:
        while True:
            try:
                name, fn, fields = self._controls.get_nowait()
            except queue.Empty:
                return
            try:
                fn()
                self._observe(time.monotonic())
                self._event("control", cmd=name, ok=True, **fields)
            except (LookupError, ValueError) as exc:
                self._event("control", cmd=name, ok=False, error=str(exc), **fields)

    def _deliver(self, block: bytes, now: float, injected: bool = False) -> None:
        """One host frame into the firmware (after the per-type faults), observed on the way."""
        t = frame_type(block)
        if not injected:
            out, what = self.host_faults.filter(block)
            if out is None:
                self._event("rx_dropped", type=type_name(t))
                return
            if what == "corrupted":
                self._event("rx_corrupted", type=type_name(t))
            block = out
        if t in _LIVENESS and not injected:  # a replayed heartbeat is not the host being alive
            self.last_liveness = now
        if t == MsgType.STOP:
            payload = frame_payload(block)
            self._event("rx_stop", category=payload[0] if payload else None, injected=injected)
        self.observer.on_host_frame(block, injected)
        self.fw.rx(block + b"\x00", self._us(now))
        self._observe(now)  # after every frame: an ARM and a stop may both land between two ticks

    # ---- the loop ----
    def run(self, duration: float | None = None) -> None:
        self.transport.open()
        self._run_opened(duration)

    def _run_opened(self, duration: float | None = None) -> None:
        cfg = self.config
        period = 1.0 / cfg.tick_hz
        self._t0 = now = time.monotonic()
        end = now + duration if duration else float("inf")
        rx, tx = _Paced(cfg.baud), _Paced(cfg.baud)
        decoders: dict[int, StreamDecoder] = {}
        next_tick, last_plant = now, now
        injected = False
        if cfg.enable_required:
            self.fw.set_enable(cfg.enable_initial, self._us(now))
        self._event("started", port=self.port)
        try:
            while not self._stop.is_set() and now < end:
                wait = min(next_tick, rx.next_time(), tx.next_time()) - time.monotonic()
                chunks = self.transport.read(max(0.0, wait))
                now = time.monotonic()
                stalled = cfg.stall_at is not None and 0 <= now - self._t0 - cfg.stall_at < cfg.stall_for
                for stream, data in chunks:
                    for block in decoders.setdefault(stream, StreamDecoder()).feed(data):
                        if stalled:
                            continue
                        for delay, frame in self.injector.apply(block, "rx"):
                            rx.push(now, frame, delay, stream)
                self._apply_controls()
                for _, block in rx.due(now):
                    self._deliver(block, now)
                if now >= next_tick:
                    self.plant.step(now - last_plant, *self.fw.commands())
                    last_plant = now
                    self.fw.set_measured(self.plant.q, self.plant.v, self.plant.tau)
                    self.fw.tick(self._us(now))
                    self._observe(now)
                    next_tick = max(next_tick + period, now - period)
                    if cfg.inject_fault_at is not None and not injected and now - self._t0 >= cfg.inject_fault_at:
                        injected = True
                        self.fw.inject_fault(cfg.inject_fault_cat, self._us(now))
                out = self.fw.tx_take()
                if out:
                    for block in out.split(b"\x00")[:-1]:
                        self.observer.on_firmware_frame(block)  # learns the live session (SESSION)
                        urgent = frame_type(block) == MsgType.FAULT
                        for delay, frame in self.injector.apply(block + b"\x00", "tx"):
                            tx.push(now, frame, delay, int(urgent))
                for urgent, frame in tx.due(now):
                    self.transport.write(frame, bool(urgent))
                self._drain_events(now)
                now = self._maybe_unplug(now, decoders)
        finally:
            self._drain_events(time.monotonic())  # what the firmware logged in the last iteration
            self._event("exit")
            self.transport.close()

    def _maybe_unplug(self, now: float, decoders: dict[int, StreamDecoder]) -> float:
        cfg = self.config
        duration = self._unplug_request
        if duration is None and cfg.unplug_at is not None and now - self._t0 >= cfg.unplug_at:
            duration, cfg.unplug_at = cfg.unplug_for, None
        if duration is None:
            return now
        self._unplug_request = None
        self.transport.close()
        self._event("unplugged", seconds=duration)
        deadline = now + duration
        while time.monotonic() < deadline and not self._stop.is_set():
            # The firmware keeps running while its cable is out: the watchdog must still trip.
            t = time.monotonic()
            self.plant.step(0.001, *self.fw.commands())
            self.fw.set_measured(self.plant.q, self.plant.v, self.plant.tau)
            self.fw.tick(self._us(t))
            self.fw.tx_take()
            self._drain_events(t)
            time.sleep(0.001)
        self.transport.open()
        for d in decoders.values():
            d.reset()
        self._event("replugged", port=self.port)
        return time.monotonic()

    def _us(self, t: float) -> int:
        """The firmware's time source: microseconds since start, on a base that leaves room to step back."""
        return TIME_BASE_US + int((t - self._t0) * 1e6) - self._time_back_us

    def _observe(self, now: float) -> None:
        """Judge the motors from outside the firmware: mode changes, motion, and torque after a stop.
        Called after every tick, frame and injection, so no mode or torque change goes unseen."""
        mode = self.fw.mode
        if mode != self._last_mode:
            if self._last_mode is not None:
                self._event("mode", **{"from": self._last_mode.name, "to": mode.name})
            if mode in (Mode.STOPPING, Mode.TRIPPED):
                self.observer.on_stop()
            self._last_mode = mode
        on, _ = self.fw.commands()
        if self.observer.on_torque(on):
            self._event("unauthorized_motion", mode=mode.name,
                        reason="torque on without an ARM of the live session (after a stop: CLEAR_FAULTS then "
                               "ARM, both carrying the session nonce the firmware announced after the last HELLO)")
        moving = on and float(np.max(np.abs(self.plant.v))) > MOTION_SPEED
        if moving and not self._moving:
            self._event("motion_started")
        self._moving = moving

    def _drain_events(self, now: float) -> None:
        for ev in self.fw.events():
            extra: dict = {}
            if ev.kind in (EventKind.TORQUE_OFF, EventKind.HEARTBEAT_TIMEOUT, EventKind.STOP_CAT1) and \
                    self.last_liveness is not None:
                extra["since_last_heartbeat_s"] = round(now - self.last_liveness, 6)
            if ev.kind in (EventKind.STOP_CAT0, EventKind.STOP_CAT1):
                self._stopped_reported = False
                self.observer.on_stop()
            if ev.kind in (EventKind.FOLLOWING_ERROR, EventKind.EFFORT_LIMIT, EventKind.STOP_ESCALATED):
                extra["joint"] = ev.arg
            elif ev.kind == EventKind.ENABLE:
                extra["asserted"] = bool(ev.arg)
            elif ev.kind in (EventKind.STALE_FRAME, EventKind.BAD_SESSION):
                extra["type"] = type_name(ev.arg)
            elif ev.kind == EventKind.STOP_RECEIVED:
                extra["category"] = ev.arg
            self._event(ev.kind.name.lower(), firmware_time_us=ev.firmware_time_us,
                        faults=[f.name for f in Fault if f and f in ev.fault_bits], **extra)
        mode = self.fw.mode
        if not self._stopped_reported and mode in (Mode.STOPPING, Mode.TRIPPED) and \
                float(np.max(np.abs(self.plant.v))) < 1e-3:
            self._stopped_reported = True
            extra = {}
            if self.last_liveness is not None:
                extra["since_last_heartbeat_s"] = round(now - self.last_liveness, 6)
            self._event("motion_stopped", **extra)

    def _event(self, name: str, **fields: object) -> None:
        ev = {"t": time.monotonic(), "event": name, **fields}
        self.events.append(ev)
        log.info("emulator event %s", ev)
        if self._on_event is not None:
            self._on_event(ev)


# ---- command line ----------------------------------------------------------------------------

EXIT_STATUSES = """exit status:
  0  stopped: --duration elapsed, SIGTERM, Ctrl-C, or its --parent-pid exited
  1  bad arguments (a --link that is not serial://PATH or can://INTERFACE/CHANNEL, a bundle that disagrees with
     --joints) or the pty / CAN channel could not be opened (one line on stderr)
  2  command-line usage error"""
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of `edge-vla emulate` / `python -m firmware_bridge.emulator`."""
    parser.add_argument("bundle", nargs="?",
                        help="bundle directory or .tar.gz: emulate its joint count (its action space's joints)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--pty", action="store_true", help="serve on a new pseudo-terminal (default)")
    where.add_argument("--can", metavar="CHANNEL", help="serve on a CAN channel instead (e.g. vcan0)")
    parser.add_argument("--link", metavar="URL",
                        help="where to serve, as the URL `edge-vla run --link` then takes: serial://PATH (a pty with "
                             "a stable symlink at PATH, = --pty-link PATH) or can://INTERFACE/CHANNEL (= --can CHANNEL "
                             "--can-interface INTERFACE). Deprecated: --link PATH, now --pty-link PATH")
    parser.add_argument("--pty-link", metavar="PATH",
                        help="stable symlink to the pty (survives --unplug-*); connect with --link serial://PATH")
    parser.add_argument("--can-interface", default="socketcan",
                        help="python-can interface for --can (default socketcan; 'virtual' only works in-process)")
    parser.add_argument("--node-id", type=int, default=1, help="CAN node id 0..63 (default 1)")
    parser.add_argument("--print-path", action="store_true", help="print the port path as the first stdout line")
    parser.add_argument("--joints", type=int, default=None, help="joint count (default: the bundle's, else 7)")
    parser.add_argument("--limits", default="-3,3,3,20", metavar="PMIN,PMAX,VMAX,EMAX",
                        help="limits for every joint in rad, rad/s, N*m (default -3,3,3,20)")
    parser.add_argument("--heartbeat-timeout-ms", type=int, default=100,
                        help="host silence that stops the motors, ms (default %(default)s ms)")
    parser.add_argument("--stop-ramp-ms", type=int, default=200,
                        help="category-1 deceleration time, ms (default %(default)s ms)")
    parser.add_argument("--rate-hz", type=int, default=100,
                        help="unsolicited STATE rate, Hz (default %(default)s Hz; 0: only on setpoints)")
    parser.add_argument("--tick-hz", type=int, default=1000, help="firmware control tick, Hz (default %(default)s Hz)")
    parser.add_argument("--link-error-limit", type=int, default=4, help="consecutive bad frames -> category 0")
    parser.add_argument("--baud", type=int, default=0, help="pace the line like a UART at this baud (0: off)")
    faults = parser.add_argument_group("fault injection")
    faults.add_argument("--drop", type=float, default=0.0, help="probability a frame is dropped")
    faults.add_argument("--corrupt", type=float, default=0.0, help="probability a frame is corrupted")
    faults.add_argument("--duplicate", type=float, default=0.0, help="probability a frame is sent twice")
    faults.add_argument("--delay-prob", type=float, default=0.0, help="probability a frame is delayed")
    faults.add_argument("--delay-ms", type=float, default=0.0, help="the delay of a delayed frame")
    faults.add_argument("--fault-direction", choices=("rx", "tx", "both"), default="both")
    faults.add_argument("--stall-at", type=float, help="seconds after start: ignore the host (a stalled host)")
    faults.add_argument("--stall-for", type=float, default=1.0)
    faults.add_argument("--unplug-at", type=float, help="seconds after start: close the port (SIGUSR1: now)")
    faults.add_argument("--unplug-for", type=float, default=0.5)
    faults.add_argument("--inject-fault-at", type=float, help="seconds after start: a firmware fault")
    faults.add_argument("--inject-fault-cat", type=int, choices=(0, 1), default=0)
    faults.add_argument("--seed", type=int)
    safety = parser.add_argument_group("safety configuration of the emulated robot")
    safety.add_argument("--link-loss-category", type=int, choices=(0, 1), default=1,
                        help="stop category on heartbeat loss (default 1: controlled stop; 0: torque off)")
    safety.add_argument("--link-error-category", type=int, choices=(0, 1), default=0,
                        help="stop category on a burst of corrupted frames (default 0)")
    safety.add_argument("--enable-required", action="store_true", help="ARM needs the hardware enable input")
    safety.add_argument("--enable-category", type=int, choices=(0, 1), default=0,
                        help="stop category when enable drops while armed (default 0)")
    safety.add_argument("--enable-initial", type=int, choices=(0, 1), default=1, help="enable input level at start")
    safety.add_argument("--following-error", type=float, default=1.0,
                        help="rad: |commanded - measured| position that trips category 0 (default 1.0; 0 off)")
    safety.add_argument("--gripper-joints", default="", metavar="J,J",
                        help="joints with the gripper role (effort limit instead of following error)")
    safety.add_argument("--gripper-effort-limit", type=float, default=0.0, help="N*m (0: off)")
    safety.add_argument("--kp-max", type=float, default=200.0, help="host kp is clamped to this (N*m/rad)")
    safety.add_argument("--kd-max", type=float, default=10.0, help="host kd is clamped to this (N*m*s/rad)")
    safety.add_argument("--seq-window", type=int, default=256, help="frames a sequence number may jump ahead")
    parser.add_argument("--control-stdin", action="store_true",
                        help="read fault-injection commands as JSON lines on stdin (EmulatorProcess)")
    parser.add_argument("--protocol", metavar="MAJOR.MINOR", help="speak another protocol version (tests)")
    parser.add_argument("--events", metavar="PATH", help="append JSON-lines events here")
    parser.add_argument("--duration", type=float, help="exit after this many seconds")
    parser.add_argument("--parent-pid", type=int, metavar="PID",
                        help="exit when process PID ends (EmulatorProcess sets it: a killed host takes its emulator "
                             "with it)")
    parser.epilog = EXIT_STATUSES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def resolve_where(args: argparse.Namespace) -> tuple[str, str | None] | tuple[str, tuple[str, str]]:
    """("pty", symlink path or None) or ("can", (interface, channel)), from --link URL, --pty-link, --can."""
    link, pty_link = args.link, args.pty_link
    if link and "://" not in link:  # the old meaning: a path for the pty's symlink
        log.warning("--link PATH is now --pty-link PATH in emulate; the old spelling goes in the next release "
                    "(--link takes the URL `edge-vla run --link` takes: serial://PATH)")
        link, pty_link = None, pty_link or args.link
    if link is None:
        return ("can", (args.can_interface, args.can)) if args.can else ("pty", pty_link)
    if pty_link or args.can:
        raise UrlError(f"--link {link!r} already says where to serve; drop --pty-link/--can")
    scheme, _, rest = link.partition("://")
    if scheme == "serial" and rest.startswith("/") and "?" not in rest:
        return "pty", rest
    if scheme == "can":
        interface, _, channel = rest.partition("?")[0].partition("/")
        if interface and channel:
            return "can", (interface, channel)
    raise UrlError(f"--link {link!r}: the emulator serves serial://PATH (a pty behind a symlink at PATH, an absolute "
                   "path) or can://INTERFACE/CHANNEL, e.g. serial:///tmp/motor or can://socketcan/vcan0")


def bundle_joints(path: str) -> int:
    """The joint count of a bundle's action space (edge-vla's bundle reader, imported only when asked)."""
    from edge_vla.bundle import Bundle

    return len(Bundle.open(path, verify=False).manifest["action_space"]["names"])


def joint_count(args: argparse.Namespace) -> int:
    if args.bundle is None:
        return 7 if args.joints is None else args.joints
    n = bundle_joints(args.bundle)
    if args.joints is not None and args.joints != n:
        raise BridgeError(f"bundle {args.bundle} drives {n} joints but --joints is {args.joints}; leave --joints out")
    return n


def exit_with_parent(parent: int, stop: Callable[[], None]) -> None:
    """End when `parent` does: PR_SET_PDEATHSIG (a signal as soon as the parent dies), and a poll of the parent
    pid as the fallback (the signal is tied to the thread that forked us, and is not portable)."""
    def orphaned() -> bool:
        return os.getppid() != parent

    def on_signal(*_: object) -> None:
        if orphaned():  # else only the forking thread ended: the poll below still watches the process
            stop()

    signal.signal(signal.SIGUSR2, on_signal)
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the poll alone
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGUSR2), 0, 0, 0)

    def poll() -> None:
        while not orphaned():
            time.sleep(0.2)
        stop()

    if orphaned():  # it died before the prctl
        stop()
    threading.Thread(target=poll, name="fw-emulator-parent", daemon=True).start()


def config_from_args(args: argparse.Namespace) -> EmulatorConfig:
    pmin, pmax, vmax, emax = (float(x) for x in args.limits.split(","))
    joints = [JointLimits(f"joint{i}", pmin, pmax, vmax, emax) for i in range(joint_count(args))]
    protocol = tuple(int(x) for x in args.protocol.split(".")) if args.protocol else None
    return EmulatorConfig(
        joints=joints, heartbeat_timeout_ms=args.heartbeat_timeout_ms, stop_ramp_ms=args.stop_ramp_ms,
        state_rate_hz=args.rate_hz, tick_hz=args.tick_hz, link_error_limit=args.link_error_limit, baud=args.baud,
        faults=FaultConfig(args.drop, args.corrupt, args.duplicate, args.delay_prob, args.delay_ms / 1000,
                           args.fault_direction),
        stall_at=args.stall_at, stall_for=args.stall_for, unplug_at=args.unplug_at, unplug_for=args.unplug_for,
        inject_fault_at=args.inject_fault_at, inject_fault_cat=args.inject_fault_cat, seed=args.seed,
        protocol=protocol,  # type: ignore[arg-type]
        link_loss_category=args.link_loss_category, link_error_category=args.link_error_category,
        enable_required=args.enable_required, enable_category=args.enable_category,
        enable_initial=bool(args.enable_initial), following_error=args.following_error,
        gripper_joints=tuple(int(j) for j in args.gripper_joints.split(",") if j.strip()),
        gripper_effort_limit=args.gripper_effort_limit, kp_max=args.kp_max, kd_max=args.kd_max,
        seq_window=args.seq_window,
    )


def _msg_type(value: MsgType | int | str) -> MsgType:
    try:
        return MsgType[value.upper()] if isinstance(value, str) else MsgType(value)
    except (KeyError, ValueError):
        raise ValueError(f"unknown message type {value!r}; one of {', '.join(m.name for m in MsgType)}") from None


def _read_controls(emu: Emulator, stream: IO[str]) -> None:
    """JSON lines {"cmd": "drop_next", "args": {...}} -> emu.control(); each answered by one `control` event."""
    for line in stream:
        try:
            req = json.loads(line)
            emu.control(req["cmd"], **req.get("args", {}))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            emu._event("control", ok=False, error=f"bad control line {line.strip()!r}: {exc}")


def main(args: argparse.Namespace) -> int:
    kind, where = resolve_where(args)
    config = config_from_args(args)
    if kind == "can":
        interface, channel = where  # type: ignore[misc]
        transport: Transport = CanTransport(interface, channel, args.node_id, side="firmware")
    else:
        transport = PtyTransport(where)  # type: ignore[arg-type]
    pty_link = where if kind == "pty" else None
    sink: IO[str] | None = open(args.events, "a", buffering=1) if args.events else None  # noqa: SIM115

    def on_event(ev: dict) -> None:
        if sink is not None:
            sink.write(json.dumps(ev) + "\n")

    emu = Emulator(config, transport, on_event)
    if args.control_stdin:
        threading.Thread(target=_read_controls, args=(emu, sys.stdin), name="fw-emulator-control", daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: emu._stop.set())
    if args.parent_pid:
        exit_with_parent(args.parent_pid, emu._stop.set)
        # A terminal's Ctrl-C reaches the whole process group. The host owns this emulator's lifetime: it must
        # first stop the motors over the link (a controlled stop needs the "firmware" alive), then it ends us with
        # SIGTERM, or we follow it when it dies. Exiting on SIGINT here made `run --emulate` trip on Ctrl-C.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, lambda *_: emu.unplug(config.unplug_for))
    transport.open()
    if args.print_path:
        print(emu.port, flush=True)
    log.info("emulating %d joints on %s", len(config.joints), emu.port)
    try:
        emu._run_opened(args.duration)
    except KeyboardInterrupt:
        pass
    finally:
        if sink is not None:
            sink.close()
        if pty_link:
            Path(pty_link).unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m firmware_bridge.emulator", description=__doc__.splitlines()[0])
    configure(_parser)
    logging.basicConfig(level=logging.WARNING)
    try:
        sys.exit(main(_parser.parse_args()))
    except BridgeError as _exc:  # one line, as `edge-vla emulate` says it
        print(f"{_parser.prog}: error: {_exc}", file=sys.stderr)
        sys.exit(1)
