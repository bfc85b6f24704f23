"""Non-blocking controller commands for the control loop: send now, learn the answer in a later cycle.

The blocking forms (`Controller.arm()/disarm()`) wait for their acknowledgement, which the control loop must
never do inside a cycle. `Commands` sends through the non-blocking primitives every
`firmware_bridge.controller.Controller` has (`send_arm`, `send_disarm`, `send_clear_faults`, `send_stop`,
`keepalive`) and reads answers with `ack_result`, which the controller fills from the loop's one `poll()` per
cycle (firmware protocol) or at once (motor devices).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from firmware_bridge.controller import Controller

log = logging.getLogger(__name__)

PENDING = None  # result(seq) before the answer arrived
OK = True


class Commands:
    """Commands the loop sends, and their answers as the loop's state machine reads them."""

    # Every controller has CLEAR_FAULTS (firmware protocol >= 1.1; the host side older firmware is refused at
    # HELLO): the loop sends it before each operator arm.
    has_clear_faults = True

    def __init__(self, link: Controller) -> None:
        self.link = link

    def arm(self) -> int:
        return int(self.link.send_arm())

    def disarm(self) -> int:
        return int(self.link.send_disarm())

    def clear_faults(self) -> int:
        return int(self.link.send_clear_faults())

    def stop(self, category: int) -> int:
        return int(self.link.send_stop(category))

    def keepalive(self) -> bool:
        """A keep-alive that does not feed the controller's motion watchdog."""
        self.link.keepalive()
        return True

    def result(self, seq: int | None) -> bool | str | None:
        """OK (True), a NACK reason (the NackCode's name), or PENDING (None) for a command sent earlier ("unsent"
        if it never left: the caller treats that as unanswered and resends)."""
        if seq is None:
            return "unsent"
        r = self.link.ack_result(seq)
        if r is None or r is True:
            return r
        code = getattr(r, "code", None)
        try:
            from firmware_bridge.protocol import NackCode

            return NackCode(code).name
        except ValueError:
            return f"NACK {code}"
