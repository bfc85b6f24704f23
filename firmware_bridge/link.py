"""The host side of the motor-controller link: one `Link` interface over serial and CAN.

Nothing here runs in the background: `poll()` reads and decodes what arrived; commands write
immediately. Bad frames are counted and dropped, never applied. When the port disappears the
link reports `connected == False`, and the next call re-opens it after an exponential backoff.
"""

from __future__ import annotations

import logging
import time
import warnings
from abc import ABC, abstractmethod
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

import can
import numpy as np
import serial

from firmware_bridge import framing
from firmware_bridge.errors import (
    FrameError,
    IncompatibleProtocolError,
    LinkDownError,
    LinkTimeoutError,
    NackError,
    UrlError,
)
from firmware_bridge.protocol import (
    MIN_FIRMWARE_MINOR,
    PROTOCOL_MAJOR,
    PROTOCOL_MINOR,
    Ack,
    Arm,
    Capabilities,
    Disarm,
    Fault,
    FaultReport,
    Heartbeat,
    Hello,
    Message,
    Mode,
    MsgType,
    Nack,
    Setpoint,
    State,
    Stop,
)
from firmware_bridge.transport import Transport

log = logging.getLogger(__name__)
_TRANSPORT_ERRORS = (serial.SerialException, OSError, can.CanError)
ArrayLike = np.ndarray | Sequence[float]


@dataclass(frozen=True)
class JointState:
    positions: np.ndarray  # rad (or m)
    velocities: np.ndarray  # rad/s
    efforts: np.ndarray  # N*m
    fault_bits: Fault
    mode: Mode
    firmware_time_s: float
    host_time: float  # time.monotonic() when the frame was decoded
    ack_seq: int


@dataclass
class LinkStats:
    frames_sent: int = 0
    frames_received: int = 0
    bytes_received: int = 0
    crc_errors: int = 0
    framing_errors: int = 0
    bad_messages: int = 0  # right CRC, wrong length/type/version/field
    duplicates: int = 0
    drops: int = 0  # gaps in the firmware's sequence numbers
    reconnects: int = 0
    rtts: deque = field(default_factory=lambda: deque(maxlen=4096))

    def rtt_percentiles(self, qs: Sequence[float] = (50, 90, 99)) -> dict[str, float]:
        """Round-trip times in seconds (command sent -> its ACK or STATE decoded), over the last 4096."""
        if not self.rtts:
            return {}
        values = np.percentile(np.fromiter(self.rtts, float), qs)
        return {f"p{q:g}": float(v) for q, v in zip(qs, values, strict=True)}

    def as_dict(self) -> dict[str, object]:
        d: dict[str, object] = {k: v for k, v in vars(self).items() if k != "rtts"}
        d["rtt"] = self.rtt_percentiles()
        return d


class Link(ABC):
    """A connection to one motor controller. Subclasses only choose the transport."""

    def __init__(self, transport: Transport, *, backoff: float = 0.05, max_backoff: float = 2.0,
                 inbox_size: int = 1024) -> None:
        self.transport = transport
        self.capabilities: Capabilities | None = None
        self.faults: list[FaultReport] = []
        self.stats = LinkStats()
        self._latest: JointState | None = None
        self._connected = False
        self._opened = False
        self._seq = 0
        self._last_rx_seq: int | None = None
        self._decoders: dict[int, framing.StreamDecoder] = {}
        self._sent_at: OrderedDict[int, float] = OrderedDict()
        self._inbox: deque[Message] = deque(maxlen=inbox_size)
        self._backoff0, self._max_backoff = backoff, max_backoff
        self._backoff, self._retry_at = backoff, 0.0
        self._last_error = ""
        self._heartbeats = 0

    # ---- lifecycle ----
    def open(self) -> Link:
        if not self._opened:
            self.transport.open()
            self._opened = self._connected = True
            log.info("link open on %s", self.transport.description)
        return self

    def close(self) -> None:
        """Idempotent. Does not disarm: call disarm() or stop() first if the motors are powered."""
        if self._opened:
            self._opened = self._connected = False
            self.transport.close()
            log.info("link closed on %s", self.transport.description)

    def __enter__(self) -> Link:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_opened", False):
            warnings.warn(f"{type(self).__name__} on {self.transport.description} was not closed; call close()",
                          ResourceWarning, stacklevel=2)
            self.close()

    @property
    @abstractmethod
    def url(self) -> str:
        """The open_link() URL that reaches this controller."""

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def latest_state(self) -> JointState | None:
        return self._latest

    # ---- commands ----
    def hello(self, timeout: float = 1.0) -> Capabilities:
        """Ask the firmware what it is; refuses a protocol this host cannot speak."""
        seq = self._send(Hello(), expect_reply=False)
        deadline = time.monotonic() + timeout
        while True:
            for msg in self._poll_once(deadline - time.monotonic(), keep=False):
                if isinstance(msg, Capabilities):
                    return self._accept_capabilities(msg)
                if isinstance(msg, Nack) and msg.acked_seq == seq:
                    raise IncompatibleProtocolError(
                        f"firmware on {self.transport.description} refused HELLO ({msg.reason}); it does not speak "
                        f"protocol {PROTOCOL_MAJOR}.x: update the firmware or use a matching host version")
            if time.monotonic() >= deadline:
                raise LinkTimeoutError(self._no_answer("HELLO", timeout))

    def arm(self, timeout: float = 0.5) -> None:
        """Explicitly (re-)arm: clears latched trips in the firmware, which then holds its current position."""
        self._await_ack(self._send(Arm()), MsgType.ARM, timeout)

    def disarm(self, timeout: float = 0.5) -> None:
        self._await_ack(self._send(Disarm()), MsgType.DISARM, timeout)

    def send_setpoints(self, positions: ArrayLike, velocities: ArrayLike | None = None,
                       efforts: ArrayLike | None = None, kp: ArrayLike | None = None,
                       kd: ArrayLike | None = None) -> Setpoint:
        """Write one setpoint (SI units); returns the message sent. The firmware clamps to its limits."""
        sp = Setpoint(*(None if a is None else np.asarray(a, dtype=np.float64)
                        for a in (positions, velocities, efforts, kp, kd)))  # type: ignore[arg-type]
        n = len(sp.positions)
        if self.capabilities is not None and n != self.capabilities.joint_count:
            raise ValueError(f"{n} positions for a controller with {self.capabilities.joint_count} joints")
        for name, arr in (("velocities", sp.velocities), ("efforts", sp.efforts), ("kp", sp.kp), ("kd", sp.kd)):
            if arr is not None and len(arr) != n:
                raise ValueError(f"{name} has {len(arr)} entries, positions has {n}")
        self._send(sp)
        return sp

    def heartbeat(self) -> int:
        """Tell the firmware the host is alive (setpoints count too); returns the frame's sequence number."""
        self._heartbeats += 1
        return self._send(Heartbeat(self._heartbeats))

    def stop(self, category: int, reason: int = 0) -> int:
        """Safety stop: 0 = torque off now, 1 = controlled ramp then torque off. Sent as urgent, not awaited."""
        if category not in (0, 1):
            raise ValueError(f"stop category must be 0 or 1, got {category}")
        return self._send(Stop(category, reason), urgent=True)

    def poll(self, timeout: float = 0.0) -> list[Message]:
        """Messages decoded since the last call, waiting up to `timeout` s for the first one.

        Never raises for a lost port: returns [] and leaves `connected` False until a reconnect works."""
        if self._inbox:
            out = list(self._inbox)
            self._inbox.clear()
            return out + self._poll_once(0.0, keep=False)
        return self._poll_once(timeout, keep=False)

    # ---- internals ----
    def _accept_capabilities(self, caps: Capabilities) -> Capabilities:
        if caps.protocol_major != PROTOCOL_MAJOR or caps.protocol_minor < MIN_FIRMWARE_MINOR:
            raise IncompatibleProtocolError(
                f"firmware on {self.transport.description} speaks protocol {caps.protocol_major}."
                f"{caps.protocol_minor}, this host needs {PROTOCOL_MAJOR}.{MIN_FIRMWARE_MINOR} or a newer "
                f"{PROTOCOL_MAJOR}.x: flash a matching firmware or install a matching edge-vla")
        self.capabilities = caps
        log.info("firmware %s, protocol %d.%d, %d joints (%s)", ".".join(map(str, caps.firmware_version)),
                 caps.protocol_major, caps.protocol_minor, caps.joint_count, ", ".join(caps.joint_names))
        return caps

    def _no_answer(self, what: str, timeout: float) -> str:
        return (f"no answer to {what} from the firmware on {self.transport.description} within {timeout:g} s: check "
                "that the controller is powered and running this protocol, and that the baud rate / CAN bitrate "
                "and node id match")

    def _send(self, msg: Message, urgent: bool = False, expect_reply: bool = True) -> int:
        self._ensure_connected()
        seq = self._seq
        self._seq = (self._seq + 1) & 0xFFFF
        frame = framing.encode(msg, seq)
        try:
            self.transport.write(frame, urgent)
        except _TRANSPORT_ERRORS as exc:
            self._lost(exc)
            raise LinkDownError(self._down_message()) from exc
        self.stats.frames_sent += 1
        if expect_reply:
            self._sent_at[seq] = time.monotonic()
            if len(self._sent_at) > 1024:
                self._sent_at.popitem(last=False)
        return seq

    def _await_ack(self, seq: int, msg_type: MsgType, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for msg in self._poll_once(max(0.0, deadline - time.monotonic()), keep=True):
                if isinstance(msg, Ack) and msg.acked_seq == seq:
                    if isinstance(msg, Nack):
                        raise NackError(f"firmware on {self.transport.description} refused {msg_type.name}: "
                                        f"{msg.reason}", msg.code)
                    return
            if time.monotonic() >= deadline:
                raise LinkTimeoutError(self._no_answer(msg_type.name, timeout))
            if not self._connected:
                raise LinkDownError(self._down_message())

    def _poll_once(self, timeout: float, keep: bool) -> list[Message]:
        if not self._connected:
            try:
                self._ensure_connected()
            except LinkDownError:
                return []
        try:
            chunks = self.transport.read(max(0.0, timeout))
        except _TRANSPORT_ERRORS as exc:
            self._lost(exc)
            return []
        now = time.monotonic()
        out: list[Message] = []
        for stream, data in chunks:
            self.stats.bytes_received += len(data)
            decoder = self._decoders.setdefault(stream, framing.StreamDecoder())
            for block in decoder.feed(data):
                msg = self._decode(block, now)
                if msg is not None:
                    out.append(msg)
        if keep:
            self._inbox.extend(out)
        return out

    def _decode(self, block: bytes, now: float) -> Message | None:
        try:
            raw = framing.decode_raw(block)
            if raw.version != PROTOCOL_MAJOR and raw.type == MsgType.CAPABILITIES and len(raw.payload) >= 2:
                raise IncompatibleProtocolError(
                    f"firmware on {self.transport.description} speaks protocol {raw.payload[0]}.{raw.payload[1]}, "
                    f"this host speaks {PROTOCOL_MAJOR}.{PROTOCOL_MINOR}: flash a matching firmware or install a "
                    "matching edge-vla")
            msg = framing.decode_message(raw)
        except FrameError as exc:
            kind = {"crc": "crc_errors", "framing": "framing_errors"}.get(exc.kind, "bad_messages")
            setattr(self.stats, kind, getattr(self.stats, kind) + 1)
            log.debug("dropped frame from %s: %s", self.transport.description, exc)
            return None
        if self._last_rx_seq is not None:
            gap = (raw.seq - self._last_rx_seq) & 0xFFFF
            if gap == 0:
                self.stats.duplicates += 1
                return None
            if gap < 0x8000:
                self.stats.drops += gap - 1
        self._last_rx_seq = raw.seq
        self.stats.frames_received += 1
        self._on_message(msg, now)
        return msg

    def _on_message(self, msg: Message, now: float) -> None:
        if isinstance(msg, State):
            self._latest = JointState(msg.positions, msg.velocities, msg.efforts, msg.fault_bits, msg.mode,
                                      msg.firmware_time_us / 1e6, now, msg.ack_seq)
            self._rtt(msg.ack_seq, now)
        elif isinstance(msg, Ack):  # Nack included
            self._rtt(msg.acked_seq, now)
        elif isinstance(msg, FaultReport):
            self.faults.append(msg)
            log.warning("firmware fault on %s: %s (stop category %s, mode %s)", self.transport.description,
                        msg.fault_code.name, msg.stop_category, msg.mode.name)

    def _rtt(self, seq: int, now: float) -> None:
        sent = self._sent_at.pop(seq, None)
        if sent is not None:
            self.stats.rtts.append(now - sent)

    def _lost(self, exc: BaseException) -> None:
        if self._connected:
            log.warning("lost %s: %s", self.transport.description, exc)
        self._connected = False
        self._last_error = str(exc)
        self.transport.close()
        self._retry_at = time.monotonic() + self._backoff

    def _down_message(self) -> str:
        wait = max(0.0, self._retry_at - time.monotonic())
        return (f"{self.transport.description} is down ({self._last_error or 'not open'}); next reconnect attempt in "
                f"{wait:.2f} s. Check the cable, the controller's power, and that the device node still exists; "
                "after reconnecting, call hello() and arm() again (the firmware will have tripped)")

    def _ensure_connected(self) -> None:
        if self._connected:
            return
        if not self._opened:
            raise LinkDownError(f"link on {self.transport.description} is not open: call open() or use `with`")
        if time.monotonic() < self._retry_at:
            raise LinkDownError(self._down_message())
        try:
            self.transport.open()
        except LinkDownError as exc:
            self._last_error = str(exc).split(". Check")[0]
            self._backoff = min(self._backoff * 2, self._max_backoff)
            self._retry_at = time.monotonic() + self._backoff
            raise LinkDownError(self._down_message()) from exc
        self._connected = True
        self._backoff = self._backoff0
        self._last_rx_seq = None
        for d in self._decoders.values():
            d.reset()
        self.stats.reconnects += 1
        log.warning("reconnected %s; the firmware needs hello() and arm() again", self.transport.description)


def open_link(url: str, **kw: object) -> Link:
    """A link from a URL (not yet opened; use `with open_link(...) as link:`).

    serial:///dev/ttyACM0?baud=1000000   a device or pty path (baud defaults to 1000000)
    serial://socket://host:port          any pyserial URL after serial://
    can://virtual/<channel>              python-can's in-process virtual bus
    can://socketcan/can0?node=1&fd=1     any python-can interface/channel; node id, CAN-FD, bitrate
    """
    from firmware_bridge.can_link import CanLink
    from firmware_bridge.serial_link import SerialLink

    accepted = ("serial:///dev/ttyACM0?baud=1000000, serial://<any pyserial URL>, can://virtual/<channel>, "
                "can://<python-can interface>/<channel>?node=1&fd=0&bitrate=1000000")
    if url.startswith("serial://"):
        rest = url[len("serial://"):]
        port, _, query = rest.partition("?")
        params = parse_qs(query)
        baud = int(params.pop("baud", params.pop("baudrate", ["1000000"]))[0])
        if params:  # unknown keys belong to the pyserial URL itself (socket://...?logging=debug)
            port = rest.replace(f"baud={baud}", "").rstrip("?&")
        if not port:
            raise UrlError(f"no port in {url!r}; accepted forms: {accepted}")
        return SerialLink(port, baudrate=baud, **kw)  # type: ignore[arg-type]
    if url.startswith("can://"):
        parts = urlsplit(url)
        params = parse_qs(parts.query)
        channel = parts.path.lstrip("/")
        if not parts.netloc or not channel:
            raise UrlError(f"CAN URL {url!r} needs an interface and a channel; accepted forms: {accepted}")
        bitrate = params.get("bitrate")
        return CanLink(channel, interface=parts.netloc, node_id=int(params.get("node", ["1"])[0]),
                       fd=params.get("fd", ["0"])[0] in ("1", "true"), bitrate=int(bitrate[0]) if bitrate else None,
                       **kw)  # type: ignore[arg-type]
    raise UrlError(f"unsupported link URL {url!r}; accepted forms: {accepted}")
