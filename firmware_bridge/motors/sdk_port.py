"""The vendor SDKs' PortHandler (dynamixel-sdk 4.x and feetech-servo-sdk 1.0 share this class's code), fixed.

1. feetech-servo-sdk's `clearPort()`, called before every transmission, calls `serial.flush()`, which waits for
   *output* to drain and leaves stale *input* in place (dynamixel-sdk 4.x resets the input buffer there). A reply that arrives after its timeout (a loaded host, a slow servo) then sits in the
   buffer and is parsed as the answer to the next request: seen here as a Feetech Lock register read returning a
   byte of the previous sync read's late status packet, so a good arm was refused. Stale input is discarded.
2. Both SDKs compute every reply timeout from a hard-coded LATENCY_TIMER = 16 ms (the FTDI default). The adapter's real
   latency timer is a per-bus setting (`latency_ms` in the link URL): 1 ms for a U2D2 or a Waveshare board set
   as LeRobot recommends, more for a slow adapter or an emulator on a loaded machine.
"""

from __future__ import annotations

from typing import Any

DEFAULT_LATENCY_MS = 16  # what both SDKs assume


def port_handler(sdk: Any, port: str, latency_ms: int = DEFAULT_LATENCY_MS) -> Any:
    """An instance of `sdk.PortHandler` for `port` with the fixes above."""

    class PortHandler(sdk.PortHandler):  # type: ignore[misc, name-defined]
        def clearPort(self) -> None:
            self.ser.reset_input_buffer()  # stale replies out
            self.ser.flush()

        def setPacketTimeout(self, packet_length: int) -> None:
            self.packet_start_time = self.getCurrentTime()
            self.packet_timeout = (self.tx_time_per_byte * packet_length) + (latency_ms * 2.0) + 2.0

    return PortHandler(port)
