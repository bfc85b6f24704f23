"""`Link` over python-can. ID scheme and segmentation: see canbus.py and PROTOCOL.md section "CAN"."""

from __future__ import annotations

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
