"""What the servo emulators (Dynamixel, Feetech) share: a pty paced like a UART, the bus thread, events,
inspection under one lock, and the wrapper that runs a bus in its own process.

Each vendor's packet format, control table, servo plant and documented semantics stay in its own module
(`dynamixel_emulator`, `feetech_emulator`); a vendor bus subclasses `PtyBus` and supplies its parser, its
dispatch and its per-servo step.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import fcntl
import math
import os
import select
import signal
import sys
import termios
import threading
import time
import tty
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

_BOTHER = getattr(termios, "BOTHER", 0o010000)
_TCGETS2 = 0x802C542A  # Linux: read struct termios2, whose c_ospeed holds a custom rate (how pyserial sets 250000)


def custom_speed(fd: int) -> int | None:
    """The output speed of a tty set with BOTHER (a rate without a B constant), or None where it cannot be read."""
    if not sys.platform.startswith("linux"):
        return None
    buf = array.array("i", [0] * 64)
    try:
        fcntl.ioctl(fd, _TCGETS2, buf)
    except OSError:
        return None
    return buf[10] if buf[10] > 0 else None  # c_ospeed (c_ispeed is buf[9])


@dataclass
class Event:
    t: float
    servo_id: int
    kind: str
    detail: dict = field(default_factory=dict)


class _Parser(Protocol):
    def feed(self, data: bytes, now: float) -> list[Any]: ...


class StreamParser(ABC):
    """Bytes in, whole packets out; garbage before a header, bad lengths and stale partial packets are
    skipped (counted in `dropped_bytes`). A vendor parser sets HEADER and implements `_take()`."""

    HEADER: ClassVar[bytes] = b""
    partial_timeout_s: ClassVar[float] = 0.05  # a half-received packet older than this is dropped

    NOT_A_PACKET: ClassVar[object] = object()  # what _take() returns for a header that starts no packet

    def __init__(self) -> None:
        self.buf = bytearray()
        self.last_data = 0.0
        self.dropped_bytes = 0

    @abstractmethod
    def _take(self) -> Any:
        """With a header at buf[0]: remove and return one packet, None if more bytes are needed, or
        NOT_A_PACKET (the caller then drops one byte and resyncs on the next header)."""
        ...

    def feed(self, data: bytes, now: float) -> list[Any]:
        if self.buf and now - self.last_data > self.partial_timeout_s:
            self.dropped_bytes += len(self.buf)
            self.buf.clear()
        self.buf += data
        self.last_data = now
        packets = []
        while True:
            start = self.buf.find(self.HEADER)
            if start < 0:
                # keep a tail that may be the start of a header split across reads
                keep = max(k for k in range(len(self.HEADER)) if self.buf.endswith(self.HEADER[:k]))
                self.dropped_bytes += len(self.buf) - keep
                del self.buf[: len(self.buf) - keep]
                return packets
            if start:
                self.dropped_bytes += start
                del self.buf[:start]
            packet = self._take()
            if packet is None:
                return packets
            if packet is self.NOT_A_PACKET:
                self.dropped_bytes += 1
                del self.buf[:1]  # not a packet: resync on the next header
                continue
            packets.append(packet)


def termios_speeds(baud_rates: Iterable[int]) -> dict[int, int]:
    """termios speed constant -> bits per second, for the rates a servo family supports."""
    return {getattr(termios, f"B{b}"): b for b in baud_rates if hasattr(termios, f"B{b}")}


class PtyBus(ABC):
    """Servos on one pty. start() runs the bus in a thread; every public method is thread-safe.

    Subclasses set `thread_name`, `event_type` and `baud_rates`, and implement `_dispatch(packet, now)` and
    `_step_servo(servo, dt, now)`; `self.servos` maps id -> servo (each with an `offline_until` time, a `table`
    of registers, `eeprom_written` and `silent_after_eeprom`). Where a subclass also sets `id_address`,
    `baud_address` and `baud_table` (register value -> bits per second), each servo has its own id and baud rate
    from its registers: it hears only packets sent at its baud rate, and an ID write re-addresses it at once
    (`_renumber`). Otherwise every servo runs at the bus's `baud`."""

    thread_name: ClassVar[str] = "servo-emulator"
    event_type: ClassVar[type[Event]] = Event
    baud_rates: ClassVar[Iterable[int]] = ()
    id_address: ClassVar[int] = -1
    baud_address: ClassVar[int] = -1
    baud_table: ClassVar[dict[int, int]] = {}

    def __init__(self, servos: dict[int, Any], parser: _Parser, *, baud: int, reboot_s: float, check_baud: bool,
                 link: str | None, tick_s: float) -> None:
        self.servos = servos
        self.displaced: list[Any] = []  # servos given an id another servo already had (see _renumber)
        self.baud = baud
        self.byte_time = 10.0 / baud if baud > 0 else 0.0
        self.reboot_s = reboot_s
        self.check_baud = check_baud
        self.link = link
        self.tick_s = tick_s
        self.events: list[Event] = []
        self.packets_seen = 0
        self._cond = threading.Condition()
        self._parser = parser
        self._termios_speeds = termios_speeds(self.baud_rates)
        self._out: list[tuple[float, bytes]] = []
        self._rx_wire_end = 0.0
        self._tx_free = 0.0
        self._heard_at: int | None = None  # the host's baud rate for the packets being dispatched (None: any)
        self._last_step = time.monotonic()
        self._thread: threading.Thread | None = None
        self._running = False
        self._master = self._slave = -1
        self.path = ""

    # -- lifecycle ------------------------------------------------------------------------------------
    def open(self) -> str:
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)
        attrs = termios.tcgetattr(self._slave)
        speed = getattr(termios, f"B{self.baud}", None)
        if speed is not None:
            attrs[4] = attrs[5] = speed
            termios.tcsetattr(self._slave, termios.TCSANOW, attrs)
        os.set_blocking(self._master, False)
        self.path = os.ttyname(self._slave)
        if self.link:
            tmp = f"{self.link}.tmp{os.getpid()}"
            os.symlink(self.path, tmp)
            os.replace(tmp, self.link)
        return self.port

    @property
    def port(self) -> str:
        return self.link or self.path

    def start(self) -> Any:
        if self._master < 0:
            self.open()
        self._running = True
        self._thread = threading.Thread(target=self.run, name=self.thread_name, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._running = False
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None
        for fd in (self._master, self._slave):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._master = self._slave = -1

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the loop -------------------------------------------------------------------------------------
    def run(self) -> None:
        while self._running:
            now = time.monotonic()
            with self._cond:
                next_out = min((t for t, _ in self._out), default=math.inf)
            timeout = max(0.0, min(next_out - now, self._last_step + self.tick_s - now))
            try:
                ready, _, _ = select.select([self._master], [], [], timeout)
            except (OSError, ValueError):
                return
            if ready:
                try:
                    data = os.read(self._master, 65536)
                except (BlockingIOError, OSError):
                    data = b""
                if data:
                    self._receive(data, time.monotonic())
            self._flush(time.monotonic())
            now = time.monotonic()
            if now - self._last_step >= self.tick_s:
                self._tick(now)

    def _host_baud(self) -> int | None:
        """The baud rate the host's port is set to, or None where it cannot be read (then every servo hears)."""
        if not self.check_baud:
            return None
        try:
            speed = termios.tcgetattr(self._slave)[4]
        except termios.error:
            return None
        if speed == _BOTHER or speed not in self._termios_speeds:
            return custom_speed(self._slave)  # a custom rate (250000, 128000): read termios2; None: accept
        return self._termios_speeds[speed]

    def _receive(self, data: bytes, now: float) -> None:
        host = self._host_baud()
        if host is not None and not any(self._servo_baud(s) == host for s in self._all_servos()):
            # 0xFE: the broadcast id of both families; a real UART would see garbage
            self._event(now, 0xFE, "baud_mismatch", bytes=len(data), host_baud=host)
            return
        self._heard_at = host
        if self.baud > 0 and host is not None:
            self.byte_time = 10.0 / host  # the wire runs at the host's rate (the servos that answer share it)
        self._rx_wire_end = max(now, self._rx_wire_end) + len(data) * self.byte_time
        with self._cond:
            for packet in self._parser.feed(data, now):
                self.packets_seen += 1
                self._dispatch(packet, now)

    def _flush(self, now: float) -> None:
        with self._cond:
            due = [item for item in self._out if item[0] <= now]
            if not due:
                return
            self._out = [item for item in self._out if item[0] > now]
        for _, data in sorted(due, key=lambda x: x[0]):
            with contextlib.suppress(BlockingIOError, OSError):
                os.write(self._master, data)

    def _tick(self, now: float) -> None:
        with self._cond:
            dt = min(now - self._last_step, 0.05)
            self._last_step = now
            for servo in self._all_servos():
                if now < servo.offline_until:
                    continue
                self._step_servo(servo, dt, now)
            self._cond.notify_all()

    # -- vendor hooks ---------------------------------------------------------------------------------
    @abstractmethod
    def _dispatch(self, packet: Any, now: float) -> None:
        ...

    @abstractmethod
    def _step_servo(self, servo: Any, dt: float, now: float) -> None:
        ...

    # -- helpers for the vendor dispatch --------------------------------------------------------------
    def _all_servos(self) -> list[Any]:
        return [*self.servos.values(), *self.displaced]

    def _id_of(self, servo: Any) -> int:
        return int(servo.table[self.id_address])

    def _servo_baud(self, servo: Any) -> int | None:
        """The baud rate a servo listens and answers at (its Baud Rate register; None: a value it cannot run)."""
        if self.baud_address < 0:
            return self.baud
        return self.baud_table.get(servo.table[self.baud_address])

    def _hears(self, servo: Any, now: float) -> bool:
        """Powered, not restarting, its data wire connected, and at the baud rate of the packet being dispatched."""
        return (now >= servo.offline_until and now >= getattr(servo, "deaf_until", 0.0)
                and (self._heard_at is None or self._servo_baud(servo) == self._heard_at))

    def _online(self, servo_id: int, now: float) -> Any | None:
        if self.id_address < 0:
            servo = self.servos.get(servo_id)
            return servo if servo is not None and self._hears(servo, now) else None
        hearing = [s for s in self._all_servos() if self._id_of(s) == servo_id and self._hears(s, now)]
        return hearing[0] if len(hearing) == 1 else None  # two at one id and rate: answers collide (_renumber)

    def _renumber(self, servo: Any, old: int, new: int, now: float) -> None:
        """An ID write took effect: the servo answers at `new` from the next packet (its status packet for the
        write itself carries `old`: the SDKs match a reply to the id they wrote to). Onto an id another servo has,
        both answer every packet to that id they hear: at one baud rate their answers collide (the manual warns
        such servos "may not be detected"), so neither is heard (an `id_collision` event); at different rates
        each answers at its own (`id_shared`). `self.servos[new]` (what `register(new, ...)` inspects) is the
        servo that took the id last; the other waits in `self.displaced`."""
        if old == new:
            return
        if self.servos.get(old) is servo:
            del self.servos[old]
            shadow = next((d for d in self.displaced if self._id_of(d) == old), None)
            if shadow is not None:  # the servo that shared its old id is alone there now
                self.displaced.remove(shadow)
                self.servos[old] = shadow
        else:
            self.displaced = [d for d in self.displaced if d is not servo]
        other = self.servos.get(new)
        if other is not None:
            self.displaced.append(other)
            same_rate = self._servo_baud(other) == self._servo_baud(servo)
            self._event(now, new, "id_collision" if same_rate else "id_shared", previous_id=old)
        self.servos[new] = servo
        self._event(now, new, "id_changed", previous_id=old)

    def _eeprom_written(self, servo: Any, nbytes: int, now: float) -> None:
        """Count an accepted write of `nbytes` EEPROM bytes (EEPROM wears); the injected silence starts after it."""
        servo.eeprom_written += nbytes
        if servo.silent_after_eeprom is not None:
            servo.silent_after_eeprom -= 1
            if servo.silent_after_eeprom <= 0:
                servo.silent_after_eeprom = None
                servo.offline_until = math.inf  # power or cable lost: it never answers again
                self._event(now, self._id_of(servo), "silenced")

    def _queue_status(self, packet: bytes, return_delay_s: float, after: float | None = None) -> float:
        """Queue a status packet; returns the time its last byte leaves the servo."""
        start = max(self._rx_wire_end if after is None else after, self._tx_free) + return_delay_s
        end = start + len(packet) * self.byte_time
        self._tx_free = end
        self._out.append((end, packet))
        return end

    def _event(self, t: float, servo_id: int, kind: str, **detail: object) -> None:
        with self._cond:
            self.events.append(self.event_type(t, servo_id, kind, dict(detail)))
            self._cond.notify_all()

    # -- inspection and fault injection (thread-safe) -------------------------------------------------
    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until predicate() (evaluated under the bus lock) holds; False on timeout."""
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def servo(self, servo_id: int) -> Any:
        """The servo object (read it inside wait_for predicates or under `lock`)."""
        return self.servos[servo_id]

    @property
    def lock(self) -> threading.Condition:
        return self._cond

    def events_of(self, kind: str, servo_id: int | None = None) -> list[Event]:
        with self._cond:
            return [e for e in self.events if e.kind == kind and (servo_id is None or e.servo_id == servo_id)]

    def block_joint(self, servo_id: int, blocked: bool = True) -> None:
        with self._cond:
            self.servos[servo_id].blocked = blocked
            self._event(time.monotonic(), servo_id, "block_joint", blocked=blocked)

    def disconnect(self, servo_id: int, seconds: float) -> float:
        """Fault injection: the servo's data wire is loose for `seconds`. It hears no packet and answers none, but
        keeps its power: torque, goal and motion go on as they were. Returns when the wire is back (monotonic)."""
        with self._cond:
            servo = self.servos[servo_id]
            servo.deaf_until = time.monotonic() + seconds
            self._event(time.monotonic(), servo_id, "disconnected", seconds=seconds)
            return float(servo.deaf_until)

    def disconnect_after_torque_on(self, servo_id: int, seconds: float) -> None:
        """Fault injection: the servo's data wire comes loose for `seconds` right after it applies its next torque on
        (between a host's torque-on write and its read-back), keeping its torque. Once."""
        with self._cond:
            self.servos[servo_id].deaf_after_torque_on = seconds

    def _torque_on_heard(self, servo: Any, now: float) -> None:
        """Called by a vendor's emulator when a servo applies a torque on: starts an injected disconnect."""
        seconds = getattr(servo, "deaf_after_torque_on", None)
        if seconds is not None:
            servo.deaf_after_torque_on = None
            servo.deaf_until = now + seconds
            self._event(now, self._id_of(servo) if self.id_address >= 0 else getattr(servo, "servo_id", -1),
                        "disconnected", seconds=seconds)

    def eeprom_writes(self, servo_id: int) -> int:
        """EEPROM bytes the servo at `servo_id` has accepted since the emulator started (EEPROM wears)."""
        with self._cond:
            return int(self.servos[servo_id].eeprom_written)

    def silence_after_eeprom_writes(self, servo_id: int, writes: int) -> None:
        """Fault injection: the servo applies and acknowledges `writes` more EEPROM writes, then never answers
        again (its cable or power is lost mid-configure)."""
        with self._cond:
            self.servos[servo_id].silent_after_eeprom = writes

    def servo_ids(self) -> list[int]:
        with self._cond:
            return sorted(self.servos)


# --------------------------------------------------------------------------------------------------------
# A bus in its own process
# --------------------------------------------------------------------------------------------------------
def serve_bus(conn, bus_type: type[PtyBus], snapshot: Callable[[Any, int], dict],  # type: ignore[no-untyped-def]
              servos: list, kw: dict) -> None:
    """The child process: run the bus, answer (name, args) calls on `conn` until "stop" or EOF."""
    # Ctrl-C reaches the whole process group: the host must still find its servos to stop them (and the parent
    # closes this process itself), as the firmware emulator's child does.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    bus = bus_type(servos, **kw)  # type: ignore[call-arg]
    conn.send(bus.open())
    bus.start()
    try:
        while True:
            try:
                name, args = conn.recv()
            except EOFError:
                return
            if name == "stop":
                return
            try:
                result = snapshot(bus, *args) if name == "snapshot" else getattr(bus, name)(*args)
                conn.send((True, result))
            except Exception as exc:  # report to the caller, keep serving
                conn.send((False, f"{type(exc).__name__}: {exc}"))
    finally:
        bus.stop()


class BusProcess:
    """A bus emulator in its own process (no GIL shared with the host under test), driven over a pipe.

    Subclasses set `bus_type`, `snapshot_of` (staticmethod of a module-level function, so the spawned child
    can import it),
    `process_name` and `vendor`. Timestamps are time.monotonic(), one clock for the machine."""

    bus_type: ClassVar[type[PtyBus]]
    snapshot_of: ClassVar[Callable[[Any, int], dict]]
    process_name: ClassVar[str] = "servo-emulator"
    vendor: ClassVar[str] = "servo"

    def __init__(self, servos: Iterable[Any], **kw: object) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # no fork of a threaded test process
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=serve_bus, args=(child, self.bus_type, self.snapshot_of, list(servos), kw),
                                 daemon=True, name=self.process_name)
        self._proc.start()
        child.close()
        if not self._conn.poll(20.0):
            self.close()
            raise RuntimeError(f"the {self.vendor} emulator process did not start within 20 s")
        self.port: str = self._conn.recv()
        self._lock = threading.Lock()

    def _call(self, name: str, *args: object) -> object:
        with self._lock:
            self._conn.send((name, args))
            ok, result = self._conn.recv()
        if not ok:
            raise RuntimeError(f"emulator {name}{args}: {result}")
        return result

    def snapshot(self, servo_id: int) -> dict:
        return self._call("snapshot", servo_id)  # type: ignore[return-value]

    def register(self, servo_id: int, addr: int) -> int:
        return self._call("register", servo_id, addr)  # type: ignore[return-value]

    def events_of(self, kind: str, servo_id: int | None = None) -> list[Event]:
        return self._call("events_of", kind, servo_id)  # type: ignore[return-value]

    def power_cycle(self, servo_id: int) -> None:
        self._call("power_cycle", servo_id)

    def block_joint(self, servo_id: int, blocked: bool = True) -> None:
        self._call("block_joint", servo_id, blocked)

    def disconnect(self, servo_id: int, seconds: float) -> float:
        return self._call("disconnect", servo_id, seconds)  # type: ignore[return-value]

    def disconnect_after_torque_on(self, servo_id: int, seconds: float) -> None:
        self._call("disconnect_after_torque_on", servo_id, seconds)

    def eeprom_writes(self, servo_id: int) -> int:
        return self._call("eeprom_writes", servo_id)  # type: ignore[return-value]

    def silence_after_eeprom_writes(self, servo_id: int, writes: int) -> None:
        self._call("silence_after_eeprom_writes", servo_id, writes)

    def servo_ids(self) -> list[int]:
        return self._call("servo_ids")  # type: ignore[return-value]

    def set_register(self, servo_id: int, addr: int, value: int) -> None:
        """Set a register from outside the bus (a step done earlier by another tool)."""
        self._call("set_register", servo_id, addr, value)

    def wait_until(self, predicate: Callable[[], bool], timeout: float, poll_s: float = 0.002) -> bool:
        """Poll predicate() (which may call the methods above) until it holds or the deadline passes."""
        deadline = time.monotonic() + timeout
        while True:
            if predicate():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll_s)

    def close(self) -> None:
        if self._proc.is_alive():
            with contextlib.suppress(OSError, BrokenPipeError):
                self._conn.send(("stop", ()))
            self._proc.join(timeout=3.0)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(timeout=3.0)
        self._conn.close()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------
def emulator_arg_parser(description: str, return_delay_help: str,
                        vendor_args: Callable[[argparse.ArgumentParser], None]) -> argparse.ArgumentParser:
    """The emulators' command line: ids, baud, return delay, the vendor's own options, link, print-path."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--ids", default="1-6")
    parser.add_argument("--baud", type=int, default=1_000_000)
    parser.add_argument("--return-delay", type=int, default=250, help=return_delay_help)
    vendor_args(parser)
    parser.add_argument("--link", default=None, help="also make this symlink to the pty")
    parser.add_argument("--print-path", action="store_true", help="print the pty path on stdout, then serve")
    return parser


def baud_index(parser: argparse.ArgumentParser, baud: int, rates: dict[int, int], family: str) -> int:
    """The Baud Rate register value for `baud` (rates: index -> bits per second); a usage error otherwise."""
    index = {v: k for k, v in rates.items()}.get(baud)
    if index is None:
        parser.error(f"--baud {baud} is not an {family} rate ({', '.join(map(str, rates.values()))})")
    return index


def parse_ids(text: str) -> list[int]:
    """"1-3,5" -> [1, 2, 3, 5]."""
    ids: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        ids.extend(range(int(lo), int(hi or lo) + 1))
    return ids


def serve_until_stopped(bus: Any, print_path: bool, line: Callable[[Any], str] = lambda bus: bus.port) -> int:
    """Open the bus (print `line(bus)`, by default its port, if asked), then serve until SIGTERM or until stdin
    closes. Every emulator's command line ends here (pty servo buses, the CAN ones)."""
    bus.open()
    if print_path:
        print(line(bus), flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    bus.start()
    # Serve until SIGTERM or until stdin closes (the parent died or closed our pipe).
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    done.wait()
    bus.stop()
    return 0
