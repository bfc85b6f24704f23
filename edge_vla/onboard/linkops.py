"""Non-blocking link commands for the control loop: send now, learn the ACK/NACK in a later cycle.

`firmware_bridge.link.Link.arm()/disarm()` wait for their acknowledgement, which the control loop must
never do inside a cycle. `Commands` sends the frame, remembers its sequence number, and reads ACK/NACK
from the messages the loop's one `poll()` per cycle returned. Where the Link offers a primitive
(`send_arm`, `send_disarm`, `send_clear_faults`, `send_stop`, `keepalive`) it is used; otherwise the
frame is built from `firmware_bridge.protocol` and sent through the Link's own framing (`_send`).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

log = logging.getLogger(__name__)

PENDING = None  # result(seq) before the answer arrived
OK = True


class Commands:
    """Commands the loop sent and their answers (bounded: the oldest unanswered are forgotten)."""

    MAX_TRACKED = 64

    def __init__(self, link: Any) -> None:
        self.link = link
        self._results: OrderedDict[int, bool | str | None] = OrderedDict()
        self._keepalives = 0

    # -- sending -----------------------------------------------------------------------------------
    def _send_msg(self, name: str, msg: Any) -> int:
        primitive = getattr(self.link, f"send_{name}", None)
        if callable(primitive):
            return int(primitive())
        return int(self.link._send(msg))

    def _track(self, seq: int) -> int:
        self._results[seq] = PENDING
        while len(self._results) > self.MAX_TRACKED:
            self._results.popitem(last=False)
        return seq

    def arm(self) -> int:
        from firmware_bridge.protocol import Arm

        return self._track(self._send_msg("arm", Arm()))

    def disarm(self) -> int:
        from firmware_bridge.protocol import Disarm

        return self._track(self._send_msg("disarm", Disarm()))

    @property
    def has_clear_faults(self) -> bool:
        from firmware_bridge import protocol

        return callable(getattr(self.link, "send_clear_faults", None)) or hasattr(protocol, "ClearFaults")

    def clear_faults(self) -> int | None:
        """CLEAR_FAULTS (protocol >= 1.1); None with a protocol whose ARM itself clears them."""
        from firmware_bridge import protocol

        if not self.has_clear_faults:
            return None
        return self._track(self._send_msg("clear_faults", getattr(protocol, "ClearFaults", lambda: None)()))

    def stop(self, category: int) -> int:
        primitive = getattr(self.link, "send_stop", None)
        seq = primitive(category) if callable(primitive) else self.link.stop(category)  # Link.stop: no wait
        return self._track(int(seq))

    def keepalive(self) -> bool:
        """A keep-alive that does not feed the firmware's motion watchdog, where the Link has one."""
        from firmware_bridge import protocol

        primitive = getattr(self.link, "keepalive", None)
        if callable(primitive):
            primitive()
            return True
        if hasattr(protocol, "Keepalive"):
            self._keepalives += 1
            self.link._send(protocol.Keepalive(self._keepalives & 0xFFFFFFFF))
            return True
        return False

    # -- answers -----------------------------------------------------------------------------------
    def feed(self, messages: list[Any]) -> None:
        from firmware_bridge.protocol import Ack, Nack

        for msg in messages:
            if isinstance(msg, Ack) and msg.acked_seq in self._results:
                self._results[msg.acked_seq] = (
                    f"{getattr(msg, 'reason', 'refused')}" if isinstance(msg, Nack) else OK)

    def result(self, seq: int | None) -> bool | str | None:
        """OK (True), a NACK reason (str), or PENDING (None) for a command sent earlier ("unsent" if it never
        left: the caller treats that as unanswered and resends)."""
        if seq is None:
            return "unsent"
        ack_result = getattr(self.link, "ack_result", None)
        if callable(ack_result):
            r = ack_result(seq)
            if r is None or r is True:
                return r
            code = getattr(r, "code", None)
            try:
                from firmware_bridge.protocol import NackCode

                return NackCode(code).name
            except ValueError:
                return f"NACK {code}"
        return self._results.get(seq, "forgotten")
