"""One exception base for firmware_bridge; every message says what was wrong and what to do."""

from __future__ import annotations


class BridgeError(Exception):
    """Base of every error raised by firmware_bridge."""


class FrameError(BridgeError):
    """A received frame is malformed (COBS, CRC, length, type or version); it is dropped, never applied."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # the stats counter this error increments


class IncompatibleProtocolError(BridgeError):
    """The firmware speaks a protocol version this host cannot use."""


class LinkDownError(BridgeError):
    """The transport (serial port or CAN interface) is gone; the link retries after a backoff."""


class LinkTimeoutError(BridgeError, TimeoutError):
    """The firmware did not answer in time."""


class DisarmFailedError(LinkTimeoutError):
    """DISARM was not acknowledged after its retries: the firmware may still be armed."""


class NackError(BridgeError):
    """The firmware refused a command (NACK); the message carries its reason."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class FirmwareBuildError(BridgeError):
    """The C firmware reference could not be compiled or loaded."""


class UrlError(BridgeError, ValueError):
    """A link URL is not one of the accepted forms."""
