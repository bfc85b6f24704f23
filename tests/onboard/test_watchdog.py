"""Every trip path of the watchdog state machine, its stop category, latching and explicit re-arm."""

from __future__ import annotations

import logging
import math

import pytest

from edge_vla.errors import ConfigError
from edge_vla.onboard.watchdog import STOP_CATEGORY, FaultKind, Signals, State, Watchdog, WatchdogConfig

HEALTHY = dict(camera_age_s=0.05, chunk_age_s=0.2, link_age_s=0.01, worker_age_s=0.1)

# kind -> the signal values that trip it (everything else healthy), and the expected category
PATHS = {
    FaultKind.CAMERA_STALE: (dict(camera_age_s=0.6), 1),
    FaultKind.CHUNK_STALE: (dict(chunk_age_s=2.0), 1),
    FaultKind.CHUNK_EXHAUSTED: (dict(exhausted_for_s=0.4), 1),
    FaultKind.OVERRUN: (dict(consecutive_overruns=5), 1),
    FaultKind.WORKER_DEAD: (dict(worker_age_s=1.5), 1),
    FaultKind.NONFINITE_ACTION: (dict(consecutive_nonfinite=3), 1),
    FaultKind.LINK_STALE: (dict(link_age_s=0.2), 0),
    FaultKind.LINK_ERRORS: (dict(link_errors_total=3), 0),
    FaultKind.FIRMWARE_FAULT: (dict(firmware_faults=0x0001), 0),
}


def armed(**cfg) -> Watchdog:
    wd = Watchdog(WatchdogConfig(**cfg))
    wd.arm(now=100.0)
    return wd


def test_healthy_signals_do_not_trip() -> None:
    wd = armed()
    for i in range(100):
        assert wd.check(Signals(now=100.0 + i * 0.01, **HEALTHY)) is None
    assert wd.state is State.RUNNING and wd.trips == []


@pytest.mark.parametrize("kind", list(PATHS), ids=lambda k: k.value)
def test_each_trip_path(kind: FaultKind, caplog) -> None:
    bad, category = PATHS[kind]
    wd = armed()
    caplog.set_level(logging.ERROR, logger="edge_vla.onboard.watchdog")
    trip = wd.check(Signals(now=101.25, **{**HEALTHY, **bad}))
    assert trip is not None and trip.kind is kind and trip.category == category == STOP_CATEGORY[kind]
    assert trip.t == 101.25 and trip.reason
    # Logged with reason and timestamp.
    assert any(kind.value in r.getMessage() and "t=101.25" in r.getMessage() for r in caplog.records)
    assert wd.state is (State.STOPPED if category == 0 else State.STOPPING)
    # Latched: healthy signals do not restart anything, not even after the stop completes.
    wd.stop_complete()
    assert wd.state is State.STOPPED
    assert wd.check(Signals(now=102.0, **HEALTHY)) is None
    assert wd.state is State.STOPPED
    with pytest.raises(ConfigError, match="rearm"):
        wd.arm(now=102.0)
    wd.rearm()
    wd.arm(now=103.0, link_errors_total=bad.get("link_errors_total", 0))
    assert wd.state is State.RUNNING and wd.active is None


def test_thresholds_are_configurable_and_inf_disables() -> None:
    wd = armed(camera_max_age_s=math.inf, max_consecutive_overruns=50)
    assert wd.check(Signals(now=101.0, **{**HEALTHY, "camera_age_s": 99.0, "consecutive_overruns": 49})) is None
    with pytest.raises(ConfigError, match="chunk_max_age_s"):
        WatchdogConfig(chunk_max_age_s=0).validate()


def test_link_errors_count_within_a_window_only() -> None:
    wd = armed(max_link_errors=3, link_error_window_s=1.0)
    # Two errors, then a third 1.5 s later: never 3 within one second.
    assert wd.check(Signals(now=100.1, link_errors_total=2, **{k: v for k, v in HEALTHY.items()})) is None
    assert wd.check(Signals(now=101.6, link_errors_total=3, **HEALTHY)) is None
    trip = wd.check(Signals(now=101.8, link_errors_total=5, **HEALTHY))
    assert trip is not None and trip.kind is FaultKind.LINK_ERRORS


def test_errors_before_arming_are_not_counted() -> None:
    wd = Watchdog()
    wd.arm(now=0.0, link_errors_total=10)
    assert wd.check(Signals(now=0.1, link_errors_total=11, **HEALTHY)) is None


def test_only_the_first_trip_acts_and_later_ones_are_recorded() -> None:
    wd = armed()
    first = wd.trip(FaultKind.OPERATOR_STOP, "SIGTERM", now=100.5)
    assert first is not None and first.category == 1 and wd.state is State.STOPPING
    assert wd.trip(FaultKind.LINK_STALE, "link lost while stopping", now=100.6) is None
    assert wd.active is first and len(wd.trips) == 2


def test_category_zero_checks_win_over_category_one() -> None:
    wd = armed()
    trip = wd.check(Signals(now=101.0, **{**HEALTHY, "camera_age_s": 9.0, "link_age_s": 9.0}))
    assert trip is not None and trip.category == 0


def test_unset_signals_are_not_checked() -> None:
    wd = armed()
    assert wd.check(Signals(now=101.0)) is None


def test_cannot_rearm_mid_stop() -> None:
    wd = armed()
    wd.trip(FaultKind.OVERRUN, "x", now=100.1)
    with pytest.raises(ConfigError, match="wait"):
        wd.rearm()
