"""CAN ID scheme and segmentation of frames into classic CAN (8-byte) data frames.

The COBS byte stream of PROTOCOL.md is cut into consecutive 8-byte chunks (the last one shorter,
DLC = its length), all sent on one 11-bit ID per (direction, priority, node):

    ID = base + node_id      node_id 0..63
    0x080  host -> firmware, urgent   (STOP)
    0x0C0  firmware -> host, urgent   (FAULT)
    0x100  host -> firmware, normal   (everything else)
    0x140  firmware -> host, normal

Lower IDs win bus arbitration, so a STOP overtakes a queued setpoint. Each ID is its own byte
stream with its own reassembly buffer; CAN delivers frames of one ID in order, and a lost chunk
makes the reassembled frame fail its CRC, after which the receiver resynchronises on the next 0x00.
"""

from __future__ import annotations

from firmware_bridge.errors import BridgeError

HOST_TO_FW_URGENT = 0x080
FW_TO_HOST_URGENT = 0x0C0
HOST_TO_FW = 0x100
FW_TO_HOST = 0x140
MAX_NODE_ID = 63
CLASSIC_DLC = 8
FD_DLC = 64


def can_id(base: int, node_id: int) -> int:
    if not 0 <= node_id <= MAX_NODE_ID:
        raise BridgeError(f"CAN node id {node_id} outside 0..{MAX_NODE_ID}; pass node_id= in that range")
    return base + node_id


def segment(frame: bytes, size: int = CLASSIC_DLC) -> list[bytes]:
    """A complete frame (delimiter included) -> CAN payloads of at most `size` bytes."""
    return [frame[i : i + size] for i in range(0, len(frame), size)]


def classic_can_bits(payload_len: int) -> int:
    """Worst-case bits on the wire for one classic 11-bit-ID data frame, bit stuffing included."""
    body = 34 + 8 * payload_len  # SOF..CRC, the stuffable part
    return body + (body - 1) // 4 + 13  # stuff bits, CRC delimiter, ACK, EOF, interframe space
