"""firmware_bridge: the link between the robot computer and its motor controller.

Protocol (COBS + CRC-32C framed, little-endian fixed layouts, see PROTOCOL.md), host transports
over serial (pyserial) and CAN (python-can), a firmware-side reference in C, and an emulator built
on that C code. Imports neither edge_vla nor torch.
"""

from firmware_bridge.errors import (
    BridgeError,
    DisarmFailedError,
    FirmwareBuildError,
    IncompatibleProtocolError,
    LinkDownError,
    LinkTimeoutError,
    NackError,
)

__all__ = [
    "BridgeError",
    "DisarmFailedError",
    "FirmwareBuildError",
    "IncompatibleProtocolError",
    "LinkDownError",
    "LinkTimeoutError",
    "NackError",
]
