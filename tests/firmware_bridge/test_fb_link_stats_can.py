"""`link.stats` (what the run summary and telemetry read) reports the CAN transport's dropped frames and its reads
cut at the per-read frame budget, so a bus full of another node's frames shows in the summary, not only in one log
line. On python-can's virtual bus the test plays the controller and a babbling node; controls: a clean bus, and a
serial link, report zeros."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator

import can
import numpy as np
import pytest

from firmware_bridge import canbus, framing
from firmware_bridge import protocol as p
from firmware_bridge.can_link import CanLink
from firmware_bridge.emulator import Emulator, EmulatorConfig
from firmware_bridge.protocol import Fault, Mode
from firmware_bridge.serial_link import SerialLink
from firmware_bridge.transport import PtyTransport

NODE = 9
RX_NORMAL = canbus.can_id(canbus.FW_TO_HOST, NODE)
RX_URGENT = canbus.can_id(canbus.FW_TO_HOST_URGENT, NODE)
NO_DROPS = {"extended": 0, "error": 0, "remote": 0}


@pytest.fixture
def bus_and_link() -> Iterator[tuple[can.BusABC, CanLink]]:
    channel = f"fbstats-{uuid.uuid4().hex[:8]}"
    with can.Bus(interface="virtual", channel=channel) as bus, CanLink(channel, "virtual", node_id=NODE) as link:
        yield bus, link


def poll_until(link: CanLink, pred: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        link.poll(0.005)
        if pred():
            return
    raise AssertionError(f"condition not met within {timeout} s; stats {link.stats.as_dict()}")


def send_state(bus: can.BusABC, pos: float, fw_seq: int) -> None:
    state = p.State(1000 * fw_seq, 0, Fault.NONE, Mode.DISARMED, np.full(2, pos), np.zeros(2), np.zeros(2))
    for chunk in canbus.segment(framing.encode(state, fw_seq)):
        bus.send(can.Message(arbitration_id=RX_NORMAL, data=chunk, is_extended_id=False))


def test_stats_count_frames_not_ours_and_reads_at_the_budget(bus_and_link) -> None:
    """A node floods our receive IDs with error and remote frames (they pass every CAN filter) before one poll:
    the link drops them, and its stats say how many and how often a read stopped at its budget."""
    bus, link = bus_and_link
    errors, remotes = 700, 300
    for i in range(errors):
        bus.send(can.Message(arbitration_id=RX_URGENT if i % 2 else RX_NORMAL, data=b"\x01\x02", is_extended_id=False,
                             is_error_frame=True))
    for _ in range(remotes):
        bus.send(can.Message(arbitration_id=RX_NORMAL, dlc=8, is_extended_id=False, is_remote_frame=True))
    send_state(bus, 0.5, fw_seq=1)  # the controller's STATE behind the flood is still read
    poll_until(link, lambda: link.latest_state is not None)

    stats = link.stats.as_dict()
    assert stats["ignored_frames"] == {"extended": 0, "error": errors, "remote": remotes}, stats
    budget = link.transport.max_frames_per_read
    assert stats["reads_at_budget"] >= (errors + remotes) // budget, stats
    assert link.latest_state.positions.tolist() == [0.5, 0.5]
    # the counters are the transport's own, not a copy that stops following it
    assert link.stats.reads_at_budget == link.transport.reads_at_budget
    assert link.stats.ignored_frames == {**NO_DROPS, **link.transport.ignored_frames}


def test_control_a_clean_bus_reports_zero(bus_and_link) -> None:
    bus, link = bus_and_link
    for seq in range(1, 51):  # only the controller, at its pace: 50 STATEs, read as they come
        send_state(bus, seq / 100, fw_seq=seq)
        poll_until(link, lambda seq=seq: link.latest_state is not None and link.latest_state.seq == seq)
    stats = link.stats.as_dict()
    assert stats["frames_received"] == 50, stats
    assert stats["ignored_frames"] == NO_DROPS and stats["reads_at_budget"] == 0, stats


def test_control_a_serial_link_reports_zero() -> None:
    """A serial port has no frames to drop: the same keys, zero (the summary's shape does not depend on the
    transport)."""
    with Emulator(EmulatorConfig(), PtyTransport()) as emu, SerialLink(emu.port) as link:
        link.hello()
        stats = link.stats.as_dict()
        assert stats["frames_received"] >= 3
        assert stats["ignored_frames"] == NO_DROPS and stats["reads_at_budget"] == 0, stats
