"""Shared codec test vectors: regenerate firmware_bridge/vectors/frames.json with
`python tests/firmware_bridge/fb_vectors_gen.py` after a deliberate protocol change.

Both test_vectors.py (Python, and the C codec through ctypes) and firmware/test_fw.c check the
file byte for byte; the C parser expects one vector object per line, as written here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from firmware_bridge import framing
from firmware_bridge import protocol as p
from firmware_bridge.crc import CHECK_VALUE

VECTORS = Path(framing.__file__).resolve().parent / "vectors" / "frames.json"


def messages() -> list[tuple[str, int, p.Message]]:
    seven = np.array([0.0, -0.5, 1.25, -2.0, 0.001, 3.0e-6, -1.0e-6])
    return [
        ("hello", 0, p.Hello()),
        ("capabilities_2", 1, p.Capabilities(1, 0, (1, 2, 3), 0.1, 100, 0.2, (
            p.JointLimits("shoulder", -1.5, 1.5, 2.0, 12.5), p.JointLimits("elbow", -2.0, 0.25, 3.0, 8.0)))),
        ("arm", 2, p.Arm(0x8BADF00D)),  # 1.2: carries the session nonce
        ("disarm", 3, p.Disarm()),
        ("setpoint_7_position_only", 4, p.Setpoint(seven)),
        ("setpoint_7_full", 5, p.Setpoint(seven, velocities=seven * 2, efforts=-seven * 10, kp=np.full(7, 50.0),
                                          kd=np.full(7, 2.5))),
        ("state_7", 6, p.State(123_456_789, 5, p.Fault.SETPOINT_CLAMPED, p.Mode.ARMED, seven, -seven, seven * 3)),
        ("heartbeat", 7, p.Heartbeat(0xDEADBEEF)),
        ("stop_cat0", 8, p.Stop(0, 3)),
        ("stop_cat1", 9, p.Stop(1)),
        ("fault_heartbeat", 10, p.FaultReport(42, p.Fault.HEARTBEAT_TIMEOUT, p.Fault.HEARTBEAT_TIMEOUT, 1,
                                              p.Mode.STOPPING)),
        ("ack", 11, p.Ack(7, p.MsgType.HEARTBEAT)),
        ("nack_not_armed", 0xFFFF, p.Nack(4, p.MsgType.SETPOINT, p.NackCode.NOT_ARMED)),
        # protocol 1.1
        ("clear_faults", 12, p.ClearFaults(0x8BADF00D)),  # 1.2: carries the session nonce
        ("keepalive", 13, p.Keepalive(0x01020304)),
        ("safety_config_2", 14, p.SafetyConfig(987_654, 1, 0, 1, True, True, 256, 10, 4, (
            p.JointSafety("joint", 0.25, 1.5, 0.0, 200.0, 10.0), p.JointSafety("gripper", 0.0, 0.0, 4.5, 80.0, 2.5)))),
        ("state_7_status", 15, p.State(2**40 + 3, 14, p.Fault.FOLLOWING_ERROR | p.Fault.GAINS_CLAMPED,
                                        p.Mode.TRIPPED, seven, -seven, seven * 3,
                                        p.Status.ENABLE_INPUT | p.Status.STOP_LATCHED)),
        ("nack_faults_latched", 16, p.Nack(3, p.MsgType.ARM, p.NackCode.FAULTS_LATCHED)),
        ("nack_stale_seq", 17, p.Nack(0x8001, p.MsgType.SETPOINT, p.NackCode.STALE_SEQ)),
        # protocol 1.2
        ("session", 18, p.Session(0x8BADF00D, 0xFFFE)),
        ("nack_bad_session", 19, p.Nack(0x1234, p.MsgType.ARM, p.NackCode.BAD_SESSION)),
    ]


def raw_frames() -> list[tuple[str, int, int, bytes]]:
    """Payloads that stress COBS edge cases rather than message layouts."""
    return [
        ("cobs_254_nonzero", 0x7F, 0x0102, bytes(range(1, 255))),
        ("cobs_all_zero", 0x7F, 0, bytes(300)),
        ("cobs_long_mixed", 0x7F, 0x8000, bytes((i * 37) % 256 for i in range(600))),
        ("empty_payload", 0x7F, 1, b""),
    ]


def rejects() -> list[tuple[str, bytes, int]]:
    """Blocks (without delimiter) the decoders must refuse: (name, block, status 1 framing / 2 CRC)."""
    good = framing.encode(p.Heartbeat(1), 1)[:-1]
    flipped = bytearray(good)
    flipped[3] ^= 0x10
    bad_code = bytearray(good)
    bad_code[0] = 0x7F  # code points past the end of the block
    return [
        ("bit_flip", bytes(flipped), 2),
        ("truncated", good[:-1], 1),
        ("crc_byte_lost", good[:5] + good[6:], 2),
        ("code_past_end", bytes(bad_code), 1),
        ("too_short", bytes([0x03, 0x01, 0x07]), 1),
    ]


def build() -> str:
    lines = ['{', f'"crc32c_check": {{"input": "123456789", "crc": "{CHECK_VALUE:08x}"}},', '"frames": [']
    rows = []
    for name, seq, msg in messages():
        frame = framing.encode(msg, seq)
        rows.append(dict(name=name, version=p.PROTOCOL_MAJOR, type=int(msg.TYPE), seq=seq,
                         payload=msg.encode().hex(), frame=frame.hex()))
    for name, typ, seq, payload in raw_frames():
        rows.append(dict(name=name, version=p.PROTOCOL_MAJOR, type=typ, seq=seq, payload=payload.hex(),
                         frame=framing.encode_raw(typ, seq, payload).hex()))
    lines.append(",\n".join(json.dumps(r) for r in rows))
    lines += ['],', '"rejects": [']
    lines.append(",\n".join(json.dumps(dict(name=n, block=b.hex(), status=s)) for n, b, s in rejects()))
    lines += [']', '}']
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    VECTORS.write_text(build())
    print(f"wrote {VECTORS}")
