"""A SAFETY_CONFIG for another joint count arriving after hello() is dropped, like a STATE of another count.

hello() refuses a SAFETY_CONFIG whose joint count differs from CAPABILITIES'. After it, a SAFETY_CONFIG never
replaces `capabilities.safety` (only hello() sets it), but it was taken as a frame of this controller: its
sequence number entered the receive window and its firmware time the clock estimate (FirmwareClock), and poll()
handed it on. One from another controller (a second one on the port/node, a foreign or faulty firmware) thereby
- moved the window: with its number ahead of ours, every later frame of our controller was "stale" and dropped, so
  `latest_state` froze (the control loop trips on a stale link);
- pulled the clock estimate down by the two firmwares' uptime difference: our STATEs then looked that old.
Its joint count shows it is not our controller's: it is dropped before the window and the clock, and counted in
`stats.bad_messages`.

The controller is the real C firmware (gcc-built, in the emulator) on a real pty; a shim appends the foreign frame,
CRC-valid, to the firmware's output. Control: the same frame with our joint count is taken (and, carrying nothing
that tells it apart from our controller's, moves the window and clock: the probe can tell "applied" from "dropped").
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator

import pytest

from firmware_bridge import framing
from firmware_bridge.emulator import Emulator, EmulatorConfig, default_limits
from firmware_bridge.firmware import FirmwareRef
from firmware_bridge.protocol import MsgType, SafetyConfig
from firmware_bridge.serial_link import SerialLink
from firmware_bridge.transport import PtyTransport

JOINTS = 6
SEQ_AHEAD = 2000  # the foreign frame's number, ahead of ours by more than the window's REORDER_LIMIT (512)
UPTIME_AHEAD_S = 86_400.0  # the foreign controller has been up a day longer than ours
FRESH_STATES = 10  # our controller's STATEs that must still arrive after the foreign frame (100 Hz: 0.1 s)
WAIT_S = 3.0


class ForeignFrames:
    """The real C firmware, plus frames queued by the test appended to its output (the emulator thread takes them)."""

    def __init__(self, fw: FirmwareRef) -> None:
        self._fw = fw
        self._queued: list[bytes] = []
        self._lock = threading.Lock()
        self.sent = threading.Event()

    def __getattr__(self, name: str) -> object:
        return getattr(self._fw, name)

    def send(self, frame: bytes) -> None:
        with self._lock:
            self._queued.append(frame)

    def tx_take(self, *args: object) -> bytes:
        out = self._fw.tx_take(*args)
        with self._lock:
            if self._queued:
                out += b"".join(self._queued)
                self._queued.clear()
                self.sent.set()
        return out


@pytest.fixture
def controller() -> Iterator[tuple[Emulator, ForeignFrames]]:
    emu = Emulator(EmulatorConfig(joints=default_limits(JOINTS)), PtyTransport())
    shim = ForeignFrames(emu.fw)
    emu.fw = shim  # type: ignore[assignment]
    with emu:
        yield emu, shim


def _poll_until(link: SerialLink, done, what: str) -> list:
    """Poll until `done()`; returns every message poll() handed on meanwhile."""
    seen = []
    deadline = time.monotonic() + WAIT_S
    while not done():
        assert time.monotonic() < deadline, what
        seen += link.poll(0.01)
    return seen


def _inject_safety_config(link: SerialLink, shim: ForeignFrames, rows: int) -> tuple[list, int, float, int]:
    """Send a SAFETY_CONFIG of `rows` joints (numbered SEQ_AHEAD ahead of our controller, a day's uptime ahead);
    returns (what poll() handed on until our controller's next FRESH_STATES frames arrived, bad_messages added,
    how far the clock estimate moved in s, the sequence number of our latest STATE when it was sent)."""
    caps = link.capabilities
    assert caps is not None and caps.safety is not None
    _poll_until(link, lambda: link.latest_state is not None, "no STATE from the controller")
    state = link.latest_state
    offset0, bad0 = link.firmware_clock.offset_s, link.stats.bad_messages
    safety = caps.safety
    foreign = dataclasses.replace(safety, joints=(safety.joints * rows)[:rows],
                                  firmware_time_us=int((state.firmware_time_s + UPTIME_AHEAD_S) * 1e6))
    shim.send(framing.encode_raw(MsgType.SAFETY_CONFIG, state.seq + SEQ_AHEAD, foreign.encode()))
    seen = _poll_until(link, shim.sent.is_set, "the shim never sent the frame")
    first_after = link.stats.frames_received + link.stats.stale  # our frames arrive either way, taken or stale
    seen += _poll_until(link, lambda: link.stats.frames_received + link.stats.stale >= first_after + FRESH_STATES,
                        "the controller stopped sending")
    assert link.capabilities is not None and link.capabilities.safety == safety  # never replaced, either way
    return seen, link.stats.bad_messages - bad0, offset0 - link.firmware_clock.offset_s, state.seq


def test_a_safety_config_for_another_joint_count_after_hello_is_dropped(controller) -> None:
    emu, shim = controller
    with SerialLink(emu.port) as link:
        link.hello()
        stale0 = link.stats.stale
        seen, bad, clock_moved, seq_at_send = _inject_safety_config(link, shim, JOINTS + 1)
        assert not [m for m in seen if isinstance(m, SafetyConfig)], "poll() handed on the foreign SAFETY_CONFIG"
        assert bad == 1, f"{bad} frames counted as bad messages"
        assert link.stats.stale == stale0, (
            f"{link.stats.stale - stale0} of our controller's frames were dropped as stale after it")
        assert 0 < (link.latest_state.seq - seq_at_send) & 0xFFFF < SEQ_AHEAD, "latest_state froze"
        assert abs(clock_moved) < 0.01, f"the firmware clock estimate moved by {clock_moved:.1f} s"
        # our controller's latest STATE is fresh on the host clock (sampled_host_time maps its firmware time)
        assert time.monotonic() - link.latest_state.sampled_host_time < 1.0


def test_control_a_safety_config_for_our_joint_count_is_taken(controller) -> None:
    emu, shim = controller
    with SerialLink(emu.port) as link:
        link.hello()
        seen, bad, clock_moved, _ = _inject_safety_config(link, shim, JOINTS)
        assert [m for m in seen if isinstance(m, SafetyConfig)], "the frame was not taken"
        assert bad == 0
        assert clock_moved > UPTIME_AHEAD_S - 1.0  # applied: nothing tells this frame from our controller's
