"""Byte transports under the protocol: each moves whole frames and returns received bytes per stream.

A stream key separates independent byte streams (one per CAN ID; a serial port has one, key 0),
so reassembly never mixes an urgent CAN frame into a half-received normal one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Mapping
from types import MappingProxyType

import can
import serial

from firmware_bridge import canbus
from firmware_bridge.errors import BridgeError, LinkDownError

log = logging.getLogger(__name__)
Chunks = list[tuple[int, bytes]]

# Frames CanTransport.read() drops: (what it is, why it is not ours / what to do).
_IGNORED_WHY = {
    "extended": ("29-bit (extended) frame", "this link uses 11-bit IDs only, so another device on the bus sent it"),
    "error": ("error frame", "the bus reports errors (the ID bits are the error class, see linux/can/error.h); "
              "check termination, bitrate and wiring (ip -details -statistics link show)"),
    "remote": ("remote (RTR) frame", "this protocol never requests frames; another node on the bus sends them"),
}


class Transport(ABC):
    description: str = "transport"
    # Frames read() dropped as not the peer's data (by kind), and read() calls cut at a frame budget: CAN only;
    # a byte stream has neither. Link copies both into its LinkStats after every read.
    ignored_frames: Mapping[str, int] = MappingProxyType({})
    reads_at_budget: int = 0

    @abstractmethod
    def open(self) -> None: ...

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def read(self, timeout: float) -> Chunks:
        """Bytes that arrived within `timeout` seconds (at least one chunk if any arrived); [] if none."""

    @abstractmethod
    def write(self, frame: bytes, urgent: bool = False) -> None: ...


class SerialTransport(Transport):
    """pyserial: a device path, a pty path, or any URL pyserial accepts (socket://, rfc2217://, loop://)."""

    def __init__(self, port: str, baudrate: int = 1_000_000, write_timeout: float = 0.05) -> None:
        # 50 ms: a frame takes < 1 ms on the wire, so a write blocked this long is a stalled device; it
        # becomes a link-loss trip instead of holding the control loop for half a second.
        self.port, self.baudrate, self.write_timeout = port, baudrate, write_timeout
        self.description = f"serial port {port}"
        self._ser: serial.SerialBase | None = None

    def open(self) -> None:
        try:
            self._ser = serial.serial_for_url(self.port, baudrate=self.baudrate, timeout=0,
                                              write_timeout=self.write_timeout)
        except (serial.SerialException, OSError, ValueError) as exc:
            raise LinkDownError(
                f"cannot open {self.description}: {exc}. Check the cable and power of the motor controller, "
                f"that the device exists (ls -l {self.port}), and that this user may open it (dialout group / udev)."
            ) from exc

    def close(self) -> None:
        if self._ser is not None:
            with contextlib.suppress(serial.SerialException, OSError):  # a vanished port may refuse
                self._ser.close()
            self._ser = None

    def read(self, timeout: float) -> Chunks:
        ser = self._ser
        assert ser is not None, "read() on a closed transport"
        fileno = getattr(ser, "fileno", None)
        if fileno is not None and hasattr(ser, "fd"):
            ready, _, _ = select.select([fileno()], [], [], max(0.0, timeout))
            if not ready:
                return []
            data = ser.read(max(1, ser.in_waiting))
        else:  # URL handlers without a file descriptor: poll
            deadline = time.monotonic() + timeout
            while not (data := ser.read(max(1, ser.in_waiting))) and time.monotonic() < deadline:
                time.sleep(0.0005)
        return [(0, data)] if data else []

    def write(self, frame: bytes, urgent: bool = False) -> None:
        assert self._ser is not None, "write() on a closed transport"
        self._ser.write(frame)


class CanTransport(Transport):
    """python-can: frames segmented into 8-byte CAN frames (64 with CAN-FD) under the canbus ID scheme.

    Only 11-bit data frames on our receive IDs are ours. A 29-bit frame whose ID has the same value (another
    device on the bus), an error frame (socketcan puts the error class in its ID bits, and 0x141 is a bus-off
    recovery) and a remote frame carry bytes that are not the controller's: read() drops them, counts them in
    `ignored_frames` by kind and logs the first of each kind.
    """

    # The most CAN frames one read() takes. The control loop's poll(0.0) must return within its period even while
    # a node floods our receive IDs; what is left stays queued (socket or driver buffer) for the next call. 256 is
    # more than a saturated 1 Mbit/s bus carries (~9,000 frames/s) between two polls of a loop at 36 Hz or faster,
    # and more than the largest message (CAPABILITIES for 16 joints, ~70 classic frames).
    MAX_FRAMES_PER_READ = 256

    def __init__(self, interface: str, channel: str, node_id: int = 1, side: str = "host", fd: bool = False,
                 bitrate: int | None = None, max_frames_per_read: int = MAX_FRAMES_PER_READ) -> None:
        if side not in ("host", "firmware"):
            raise BridgeError(f"CAN side must be 'host' or 'firmware', got {side!r}")
        host = side == "host"
        self.interface, self.channel, self.fd, self.bitrate = interface, channel, fd, bitrate
        self.tx_id = canbus.can_id(canbus.HOST_TO_FW if host else canbus.FW_TO_HOST, node_id)
        self.tx_urgent_id = canbus.can_id(canbus.HOST_TO_FW_URGENT if host else canbus.FW_TO_HOST_URGENT, node_id)
        rx = (canbus.FW_TO_HOST, canbus.FW_TO_HOST_URGENT) if host else (canbus.HOST_TO_FW, canbus.HOST_TO_FW_URGENT)
        self.rx_ids = {canbus.can_id(b, node_id) for b in rx}
        self.description = f"CAN {interface}/{channel} node {node_id}"
        self._bus: can.BusABC | None = None
        self.frames_sent = 0
        if max_frames_per_read < 1:
            raise BridgeError(f"max_frames_per_read must be at least 1, got {max_frames_per_read}")
        self.max_frames_per_read = max_frames_per_read
        self.ignored_frames: Counter[str] = Counter()  # "extended", "error", "remote": frames read() dropped
        self.reads_at_budget = 0  # read() calls that stopped at max_frames_per_read (more may have been waiting)
        self._logged: set[str] = set()  # what was already logged once

    def open(self) -> None:
        kw: dict[str, object] = {"fd": self.fd}
        if self.bitrate:
            kw["bitrate"] = self.bitrate
        try:
            self._bus = can.Bus(interface=self.interface, channel=self.channel,
                                can_filters=[{"can_id": i, "can_mask": 0x7FF, "extended": False}
                                             for i in self.rx_ids], **kw)
        except (can.CanError, OSError, ValueError, ImportError) as exc:
            raise LinkDownError(
                f"cannot open {self.description}: {exc}. Check that the interface exists and is up "
                f"(`ip link show {self.channel}`; `sudo ip link set {self.channel} up type can bitrate 1000000`) "
                "and that python-can supports it."
            ) from exc

    def close(self) -> None:
        if self._bus is not None:
            self._bus.shutdown()
            self._bus = None

    def read(self, timeout: float) -> Chunks:
        """Our data frames among the next `max_frames_per_read` frames received (waiting up to `timeout` for the
        first); frames beyond the budget stay queued for the next call."""
        bus = self._bus
        assert bus is not None, "read() on a closed transport"
        out: Chunks = []
        msg = bus.recv(max(0.0, timeout))
        taken = 0
        while msg is not None:
            taken += 1
            if self._is_ours(msg):
                out.append((msg.arbitration_id, bytes(msg.data)))
            if taken >= self.max_frames_per_read:
                self._budget_reached()
                break
            msg = bus.recv(0.0)
        return out

    def _is_ours(self, msg: can.Message) -> bool:
        # Error frame first: its ID bits are an error class, not an ID, and may equal ours.
        kind = ("error" if msg.is_error_frame else "remote" if msg.is_remote_frame
                else "extended" if msg.is_extended_id else None)
        if kind is None:
            # an interface that cannot filter also passes other nodes' 11-bit frames: normal traffic, not counted
            return msg.arbitration_id in self.rx_ids
        self.ignored_frames[kind] += 1
        self._log_once(kind, "dropped a CAN %s on %s (ID bits 0x%x, %d data bytes): %s. Further ones are counted in "
                       "ignored_frames, not logged", _IGNORED_WHY[kind][0], self.description, msg.arbitration_id,
                       len(msg.data), _IGNORED_WHY[kind][1])
        return False

    def _budget_reached(self) -> None:
        self.reads_at_budget += 1
        self._log_once("budget", "%s: a read stopped at its budget of %d CAN frames; the rest is read on the next "
                       "call, so the control loop keeps its period. If this repeats, a node may be flooding IDs %s "
                       "(candump %s shows it)",
                       self.description, self.max_frames_per_read,
                       "/".join(f"0x{i:x}" for i in sorted(self.rx_ids)), self.channel)

    def _log_once(self, key: str, fmt: str, *args: object) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.warning(fmt, *args)

    def write(self, frame: bytes, urgent: bool = False) -> None:
        bus = self._bus
        assert bus is not None, "write() on a closed transport"
        arb = self.tx_urgent_id if urgent else self.tx_id
        for chunk in canbus.segment(frame, canbus.FD_DLC if self.fd else canbus.CLASSIC_DLC):
            bus.send(can.Message(arbitration_id=arb, data=chunk, is_extended_id=False, is_fd=self.fd))
            self.frames_sent += 1


class PtyTransport(Transport):
    """Emulator side of a pseudo-terminal; a stable symlink (like socat's link=) survives re-plugging."""

    def __init__(self, link: str | None = None) -> None:
        self.link = link
        self.path = ""
        self._master = self._slave = -1
        self.description = "pty"
        self.dropped_bytes = 0

    def open(self) -> None:
        import tty

        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)  # no echo, no CR/LF translation before the host configures the port
        os.set_blocking(self._master, False)
        self.path = os.ttyname(self._slave)
        if self.link:
            tmp = f"{self.link}.tmp{os.getpid()}"
            os.symlink(self.path, tmp)
            os.replace(tmp, self.link)  # atomic: the host sees the old pty or the new one, never nothing
        self.description = f"pty {self.port}"

    @property
    def port(self) -> str:
        return self.link or self.path

    def close(self) -> None:
        for fd in (self._master, self._slave):
            if fd >= 0:
                os.close(fd)
        self._master = self._slave = -1

    def read(self, timeout: float) -> Chunks:
        ready, _, _ = select.select([self._master], [], [], max(0.0, timeout))
        if not ready:
            return []
        try:
            data = os.read(self._master, 65536)
        except BlockingIOError:
            return []
        return [(0, data)] if data else []

    def write(self, frame: bytes, urgent: bool = False) -> None:
        try:
            n = os.write(self._master, frame)
        except BlockingIOError:
            n = 0
        if n < len(frame):  # nobody reading: the pty buffer is full; a real UART drops too
            self.dropped_bytes += len(frame) - n
