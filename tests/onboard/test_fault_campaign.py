"""The fault campaign over the real host process, the C firmware core and a real pty (edge_vla.onboard.campaign).

One campaign run (~40 s) is shared by every assertion. Bounds are the issue's, at 100 Hz, with margins
for this shared 2-core box: the emulator is a Python loop ticking the C core, so its ticks (and with
them the firmware clock's view of a ramp's end) can run a few ms late under load.
"""

from __future__ import annotations

import logging

import pytest

from edge_vla.onboard.campaign import Campaign, FaultRow

pytest.importorskip("firmware_bridge.emulator_process")

WIRE_MARGIN_MS = 10.0  # detection -> STOP written: a cycle can be preempted on this box
OFF_MARGIN_MS = 30.0  # STOP -> torque off on the emulator: tick jitter of the Python emulator loop

EXPECTED_CATEGORY = {
    "stalled inference": 1, "stale camera": 1, "NaN/Inf action": 1, "lost STOP frame (operator stop)": 1,
    "lost DISARM": 1, "garbage bytes on the line": 0, "alternating corrupt/good frames": 0,
    "following error (blocked joint)": (0, 1), "firmware time steps back 1 s, then a stop": 1, "host SIGTERM": 1,
    "host kill -9": 1,
}


@pytest.fixture(scope="module")
def rows() -> dict[str, FaultRow]:
    with Campaign(rate_hz=100.0, log_level=logging.WARNING) as campaign:
        return {r.fault: r for r in campaign.run_all()}


def test_every_fault_of_the_issue_was_injected(rows) -> None:
    assert set(EXPECTED_CATEGORY) | {"replayed old ARM + SETPOINT after a stop", "link unplug (0.3 s)",
                                     "host restart after a crash", "kp/kd out of range",
                                     "replayed session (HELLO, CLEAR_FAULTS, ARM) after a stop"} == set(rows)


@pytest.mark.parametrize("fault", sorted(EXPECTED_CATEGORY))
def test_stop_category_and_timing(rows, fault: str) -> None:
    r = rows[fault]
    expected = EXPECTED_CATEGORY[fault]
    # A blocked joint: the host's tracking check (category 1) or the firmware's (category 0), whichever first.
    assert r.category in (expected if isinstance(expected, tuple) else (expected,)), r.as_dict()
    assert r.stop_to_off_ms is not None, f"no torque off measured: {r.as_dict()}"
    assert r.stop_to_off_ms <= r.bound_off_ms + OFF_MARGIN_MS, r.as_dict()
    if r.detected_by == "host":
        assert r.fault_to_stop_ms is not None and r.fault_to_stop_ms <= r.bound_stop_ms + WIRE_MARGIN_MS, r.as_dict()


def test_nothing_ever_moved_without_an_operator_arm(rows) -> None:
    moved = [r.fault for r in rows.values() if r.moved_without_arm]
    assert moved == []


def test_link_faults_and_replays(rows) -> None:
    assert int(rows["replayed old ARM + SETPOINT after a stop"].notes.rsplit(" ", 1)[-1]) >= 1
    assert rows["link unplug (0.3 s)"].stop_to_off_ms is not None
    assert "phase disarmed" in rows["host restart after a crash"].notes
    assert rows["kp/kd out of range"].notes.endswith("True")
    assert "DISARM retried, confirmed" in rows["lost DISARM"].notes


def test_replayed_session_start_is_refused_and_a_live_session_arms(rows) -> None:
    """Issue 23: a captured HELLO + CLEAR_FAULTS + ARM written again after a category-0 stop arms nothing (both
    session-bound frames refused for their old nonce); the control, a live session's own arm, is applied."""
    row = rows["replayed session (HELLO, CLEAR_FAULTS, ARM) after a stop"]
    assert "operator arm in the live session applied, armed: True" in row.notes, row.notes
    assert row.notes.endswith("refused (BAD_SESSION): 2"), row.notes
    assert not row.moved_without_arm
