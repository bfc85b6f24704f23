"""The vendor SDKs' PortHandler (dynamixel-sdk 4.x and feetech-servo-sdk 1.0 share this class's code), fixed.

1. feetech-servo-sdk's `clearPort()`, called before every transmission, calls `serial.flush()`, which waits for
   *output* to drain and leaves stale *input* in place (dynamixel-sdk 4.x resets the input buffer there). A reply that arrives after its timeout (a loaded host, a slow servo) then sits in the
   buffer and is parsed as the answer to the next request: seen here as a Feetech Lock register read returning a
   byte of the previous sync read's late status packet, so a good arm was refused. Stale input is discarded.
2. Both SDKs compute every reply timeout from a hard-coded LATENCY_TIMER = 16 ms (the FTDI default). The adapter's real
   latency timer is a per-bus setting (`latency_ms` in the link URL): 1 ms for a U2D2 or a Waveshare board set
   as LeRobot recommends, more for a slow adapter or an emulator on a loaded machine.
3. Neither SDK expects the port itself to fail: when the USB adapter is unplugged the kernel hangs up its tty and
   pyserial raises (termios.error from a flush, SerialException from a read, OSError from a write) through the
   SDK, past the backend's checks, and it left the SDK's `is_using` flag set, so every later call answered "Port
   is in use!" (seen in the fault campaign: the control loop died of termios.error, exit 1). Here a port I/O error
   is logged once and becomes what the SDK already handles: nothing written (COMM_TX_FAIL), nothing read (a reply
   timeout), so the backend raises MotorBusError and the control loop trips on a lost link.
4. Both SDKs' receive loops check the reply timeout only when a read comes up short: a packet for another id (or
   a byte that starts no packet) is skipped and the loop reads on. While a peer keeps the input full (a servo or
   a second master flooding status packets; a pty or a USB adapter delivers faster than the SDK parses) one read
   went on past its deadline for as long as the flood lasted (2.1 s seen on a pty for a 34 ms timeout). Past the
   deadline readPort() takes at most LATE_READ_BYTES more (a reply that came in time to a thread descheduled past
   the deadline is still read: the SDKs read a packet in two or more pieces) and then nothing, so the loop ends at
   the SDK's own timeout check (COMM_RX_TIMEOUT or COMM_RX_CORRUPT): ~2.5 ms of input at 1 Mbaud.
5. Both SDKs time every reply with `time.time()`, the wall clock, which NTP steps when a robot computer without an
   RTC (a Jetson) first syncs, often by hours, while the control loop runs. A forward step during a read ended it
   at once although the servo was answering (a spurious lost link: MotorBusError, the control loop trips); a
   backward step met the SDKs' "negative elapsed time" guard, which restarted the timeout from the step, holding
   the read up to one more full timeout past its deadline. Replies are timed with the monotonic clock.
"""

from __future__ import annotations

import logging
import termios
import time
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_LATENCY_MS = 16  # what both SDKs assume
# Past a reply's deadline a read may still take this much input, once per transaction: a sync read's replies from
# a few servos (a status packet is 11-20 bytes), not a flood.
LATE_READ_BYTES = 256
PORT_ERRORS = (OSError, termios.error)  # serial.SerialException is an OSError


def port_handler(sdk: Any, port: str, latency_ms: int = DEFAULT_LATENCY_MS) -> Any:
    """An instance of `sdk.PortHandler` for `port` with the fixes above."""

    class PortHandler(sdk.PortHandler):  # type: ignore[misc, name-defined]
        port_error: str | None = None  # the first I/O error of this port (the adapter is gone)

        def _failed(self, exc: BaseException) -> None:
            if self.port_error is None:
                self.port_error = f"{type(exc).__name__}: {exc}"
                log.error("%s: port I/O failed (%s): the USB-serial adapter was unplugged or failed", port,
                          self.port_error)

        def clearPort(self) -> None:
            try:
                self.ser.reset_input_buffer()  # stale replies out
                self.ser.flush()
            except PORT_ERRORS as exc:
                self._failed(exc)

        late_bytes_left = LATE_READ_BYTES  # what this transaction may still read past its deadline (fix 4)

        def readPort(self, length: int) -> Any:
            late = self.getTimeSinceStart() > self.packet_timeout
            if late:
                # Past this reply's deadline: a little more of what is already buffered (a reply that came in time
                # to a thread descheduled past the deadline is still read), then nothing more (fix 4).
                length = min(length, self.late_bytes_left)
                if length <= 0:
                    return b""
            try:
                data = super().readPort(length)
                if late:
                    self.late_bytes_left -= len(data)
                return data
            except PORT_ERRORS as exc:
                self._failed(exc)
                return b""  # nothing arrived: the SDK's reply timeout follows

        def writePort(self, packet: Any) -> int:
            try:
                return super().writePort(packet)
            except PORT_ERRORS as exc:
                self._failed(exc)
                return 0  # nothing written: the SDK answers COMM_TX_FAIL and clears is_using

        def getCurrentTime(self) -> float:
            """Milliseconds of the monotonic clock (fix 5): every SDK timeout is measured from this."""
            return time.monotonic_ns() / 1_000_000.0

        def setPacketTimeoutMillis(self, msec: float) -> None:
            super().setPacketTimeoutMillis(msec)
            self.late_bytes_left = LATE_READ_BYTES

        def setPacketTimeout(self, packet_length: int) -> None:
            self.late_bytes_left = LATE_READ_BYTES
            self.packet_start_time = self.getCurrentTime()
            self.packet_timeout = (self.tx_time_per_byte * packet_length) + (latency_ms * 2.0) + 2.0

    return PortHandler(port)
