"""Frames: header + payload + CRC-32C, COBS-encoded, terminated by one 0x00 byte.

    raw   = version:u8 | type:u8 | seq:u16 | payload | crc32c(version..payload):u32   (little-endian)
    frame = cobs(raw) | 0x00

The 0x00 delimiter never appears inside a COBS block, so a receiver resynchronises on the next
0x00 after any garbage, and a frame cut in two by a lost CAN segment fails its CRC.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cobs import cobs

from firmware_bridge.crc import crc32c
from firmware_bridge.errors import FrameError
from firmware_bridge.protocol import MESSAGE_CLASSES, PROTOCOL_MAJOR, Message, MsgType

HEADER = struct.Struct("<BBH")
CRC = struct.Struct("<I")
MAX_PAYLOAD = 640
MAX_RAW = HEADER.size + MAX_PAYLOAD + CRC.size
MAX_ENCODED = MAX_RAW + MAX_RAW // 254 + 2  # COBS overhead plus the delimiter


@dataclass(frozen=True)
class RawFrame:
    version: int
    type: int
    seq: int
    payload: bytes


def encode_raw(msg_type: int, seq: int, payload: bytes, version: int = PROTOCOL_MAJOR) -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds MAX_PAYLOAD={MAX_PAYLOAD}")
    raw = HEADER.pack(version, msg_type, seq & 0xFFFF) + payload
    return cobs.encode(raw + CRC.pack(crc32c(raw))) + b"\x00"


def encode(msg: Message, seq: int, version: int = PROTOCOL_MAJOR) -> bytes:
    """A message -> one complete frame, delimiter included."""
    return encode_raw(msg.TYPE, seq, msg.encode(), version)


def decode_raw(block: bytes) -> RawFrame:
    """One COBS block (without its 0x00) -> checked header and payload; raises FrameError."""
    if len(block) > MAX_ENCODED:
        raise FrameError("framing", f"frame of {len(block)} bytes exceeds {MAX_ENCODED}")
    try:
        raw = cobs.decode(block)
    except cobs.DecodeError as exc:
        raise FrameError("framing", f"COBS decode failed: {exc}") from None
    if len(raw) < HEADER.size + CRC.size:
        raise FrameError("framing", f"frame of {len(raw)} bytes is shorter than header + CRC")
    body, (crc,) = raw[:-4], CRC.unpack(raw[-4:])
    if crc32c(body) != crc:
        raise FrameError("crc", "CRC-32C mismatch")
    version, msg_type, seq = HEADER.unpack_from(body)
    return RawFrame(version, msg_type, seq, bytes(body[HEADER.size:]))


def decode_message(frame: RawFrame) -> Message:
    """A checked raw frame -> message; raises FrameError on version, type or layout mismatch."""
    if frame.version != PROTOCOL_MAJOR:
        raise FrameError("version", f"frame has protocol major {frame.version}, host speaks {PROTOCOL_MAJOR}")
    cls = MESSAGE_CLASSES.get(frame.type)
    if cls is None:
        raise FrameError("unknown_type", f"unknown message type 0x{frame.type:02x}")
    return cls.decode(frame.payload)


def decode(block: bytes) -> tuple[int, Message]:
    """One COBS block -> (seq, message)."""
    raw = decode_raw(block)
    return raw.seq, decode_message(raw)


class StreamDecoder:
    """Splits a byte stream into COBS blocks at 0x00; keeps the tail of an incomplete frame.

    A run of bytes longer than any legal frame is discarded up to the next delimiter, so garbage
    on the line costs one counted framing error and no memory growth.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._overflow = False
        self.overflows = 0

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        *blocks, tail = self._buf.split(b"\x00")
        self._buf = bytearray(tail)
        out: list[bytes] = []
        for block in blocks:
            if self._overflow:
                self._overflow = False  # this block is the end of the oversized run: skip it
                continue
            if block:
                out.append(bytes(block))
        if len(self._buf) > MAX_ENCODED:
            self._buf.clear()
            self._overflow = True
            self.overflows += 1
        return out

    def reset(self) -> None:
        self._buf.clear()
        self._overflow = False


__all__ = ["MAX_PAYLOAD", "MsgType", "RawFrame", "StreamDecoder", "decode", "decode_message", "decode_raw",
           "encode", "encode_raw"]
