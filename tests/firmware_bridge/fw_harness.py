"""A host-side harness around one C firmware instance (FirmwareRef): send frames at chosen firmware
times, read back what it transmitted. Deterministic: no ptys, no threads, no wall clock."""

from __future__ import annotations

import struct

import numpy as np

from firmware_bridge import framing
from firmware_bridge import protocol as p
from firmware_bridge.errors import FrameError
from firmware_bridge.firmware import FirmwareRef

MS = 1000  # firmware time is in microseconds


class Harness:
    def __init__(self, fw: FirmwareRef, seq0: int = 100) -> None:
        self.fw = fw
        self.seq = seq0
        self.now = 1000
        self.sent: dict[int, bytes] = {}  # seq -> frame, for replays
        self.rx: list[tuple[int, p.Message]] = []
        self.session = 0  # the nonce of the last SESSION the firmware announced (protocol 1.2)

    def at(self, t_us: int) -> Harness:
        self.now = t_us
        return self

    def raw(self, msg_type: int, payload: bytes = b"", seq: int | None = None) -> int:
        """Send one frame (type by number, so frames new in 1.1 can be sent to any build)."""
        if seq is None:
            seq, self.seq = self.seq, (self.seq + 1) & 0xFFFF
        frame = framing.encode_raw(msg_type, seq, payload)
        self.sent[seq] = frame
        self.fw.rx(frame, self.now)
        return seq

    def send(self, msg: p.Message) -> int:
        return self.raw(int(msg.TYPE), msg.encode())

    def hello(self, minor: int = p.PROTOCOL_MINOR) -> list[p.Message]:
        self.raw(p.MsgType.HELLO, struct.pack("<BBH", p.PROTOCOL_MAJOR, minor, 0))
        out = self.take()
        self.session = next((m.session for m in out if isinstance(m, p.Session)), self.session)
        return out

    def replay(self, seq: int) -> None:
        self.fw.rx(self.sent[seq], self.now)

    def tick(self, t_us: int | None = None) -> None:
        if t_us is not None:
            self.now = t_us
        self.fw.tick(self.now)

    def run(self, until_us: int, step_us: int = 1000, heartbeat: bool = False) -> None:
        while self.now < until_us:
            self.now += step_us
            if heartbeat:
                self.send(p.Heartbeat(1))
            self.fw.tick(self.now)

    def take(self) -> list[p.Message]:
        out = []
        for block in framing.StreamDecoder().feed(self.fw.tx_take()):
            raw = framing.decode_raw(block)
            try:
                msg = framing.decode_message(raw)
            except FrameError:  # a type this host build does not know yet
                continue
            out.append(msg)
            self.rx.append((raw.seq, msg))
        return out

    def answer(self, seq: int) -> p.Ack | None:
        """The ACK/NACK for `seq` among everything received so far."""
        self.take()
        for _, m in self.rx:
            if isinstance(m, p.Ack) and m.acked_seq == seq:
                return m
        return None

    def arm(self) -> p.Ack | None:
        """ARM in the live session (the nonce the last HELLO was answered with)."""
        return self.answer(self.send(p.Arm(self.session)))

    def clear(self) -> p.Ack | None:
        """CLEAR_FAULTS in the live session."""
        return self.answer(self.send(p.ClearFaults(self.session)))

    def set_measured(self, pos, vel=None, eff=None) -> None:
        n = self.fw.n
        pos = np.broadcast_to(np.asarray(pos, float), (n,))
        vel = np.zeros(n) if vel is None else np.broadcast_to(np.asarray(vel, float), (n,))
        eff = np.zeros(n) if eff is None else np.broadcast_to(np.asarray(eff, float), (n,))
        self.fw.set_measured(pos, vel, eff)


def limits(n: int = 2, pmax: float = 3.0) -> list[p.JointLimits]:
    return [p.JointLimits(f"j{i}", -pmax, pmax, 3.0, 20.0) for i in range(n)]
