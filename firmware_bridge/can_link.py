"""`Link` over python-can. ID scheme and segmentation: see canbus.py and PROTOCOL.md section "CAN"."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

from firmware_bridge.errors import UrlError
from firmware_bridge.link import Link
from firmware_bridge.transport import CanTransport


class CanLink(Link):
    def __init__(self, channel: str, interface: str = "socketcan", node_id: int = 1, fd: bool = False,
                 bitrate: int | None = None, **kw: float) -> None:
        super().__init__(CanTransport(interface, channel, node_id, side="host", fd=fd, bitrate=bitrate), **kw)
        self.channel, self.interface, self.node_id, self.fd = channel, interface, node_id, fd

    @property
    def url(self) -> str:
        return f"can://{self.interface}/{self.channel}?node={self.node_id}&fd={int(self.fd)}"

    @classmethod
    def from_url(cls, url: str, **kw: Any) -> CanLink:
        """can://virtual/<channel>, or can://<python-can interface>/<channel>?node=1&fd=0&bitrate=1000000."""
        parts = urlsplit(url)
        params = parse_qs(parts.query)
        channel = parts.path.lstrip("/")
        if not parts.netloc or not channel:
            raise UrlError(f"CAN URL {url!r} needs an interface and a channel: write can://socketcan/can0?node=1")
        try:
            node = int(params.get("node", ["1"])[0])
            bitrate = params.get("bitrate")
            rate = int(bitrate[0]) if bitrate else None
        except ValueError as exc:
            raise UrlError(f"CAN URL {url!r}: node and bitrate are integers ({exc})") from None
        return cls(channel, interface=parts.netloc, node_id=node, fd=params.get("fd", ["0"])[0] in ("1", "true"),
                   bitrate=rate, **kw)
