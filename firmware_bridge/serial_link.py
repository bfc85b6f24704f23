"""`Link` over pyserial: a USB CDC/UART device, a pty, or any pyserial URL."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

from firmware_bridge.errors import UrlError
from firmware_bridge.link import Link
from firmware_bridge.transport import SerialTransport


class SerialLink(Link):
    def __init__(self, port: str, baudrate: int = 1_000_000, write_timeout: float = 0.05, **kw: float) -> None:
        super().__init__(SerialTransport(port, baudrate, write_timeout), **kw)
        self.port, self.baudrate = port, baudrate

    @property
    def url(self) -> str:
        return f"serial://{self.port}?baud={self.baudrate}"

    @classmethod
    def from_url(cls, url: str, **kw: Any) -> SerialLink:
        """serial:///dev/ttyACM0?baud=1000000, or serial://<any pyserial URL> (its own query keys kept)."""
        rest = url[len("serial://"):] if url.lower().startswith("serial://") else url
        port, _, query = rest.partition("?")
        params = parse_qs(query)
        baud_values = params.pop("baud", params.pop("baudrate", ["1000000"]))
        try:
            baud = int(baud_values[0])
        except ValueError:
            raise UrlError(f"baud={baud_values[0]!r} in {url!r} is not an integer") from None
        if params:  # unknown keys belong to the pyserial URL itself (socket://...?logging=debug)
            port = rest.replace(f"baud={baud}", "").rstrip("?&")
        if not port:
            raise UrlError(f"no port in {url!r}: write serial:///dev/ttyACM0?baud=1000000")
        return cls(port, baudrate=baud, **kw)
