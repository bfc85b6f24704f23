"""`Link` over pyserial: a USB CDC/UART device, a pty, or any pyserial URL."""

from __future__ import annotations

from firmware_bridge.link import Link
from firmware_bridge.transport import SerialTransport


class SerialLink(Link):
    def __init__(self, port: str, baudrate: int = 1_000_000, write_timeout: float = 0.05, **kw: float) -> None:
        super().__init__(SerialTransport(port, baudrate, write_timeout), **kw)
        self.port, self.baudrate = port, baudrate

    @property
    def url(self) -> str:
        return f"serial://{self.port}?baud={self.baudrate}"
