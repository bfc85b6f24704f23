"""The safety layer never sends anything outside the limits, whatever the policy outputs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_vla.action_space import sim_action_space
from edge_vla.errors import ConfigError
from edge_vla.onboard.safety import SafetyLayer, SafetyLimits, within_limits

SPACE = sim_action_space()

wild = st.floats(allow_nan=True, allow_infinity=True, width=32, min_value=None, max_value=None)
requests = st.lists(st.lists(wild, min_size=2, max_size=2), min_size=1, max_size=60)


def _layer(rate_hz: float = 100.0, max_step: float | None = None, start=None) -> SafetyLayer:
    layer = SafetyLayer(SafetyLimits.from_action_space(SPACE, rate_hz, max_step=max_step))
    layer.reset(np.asarray(start if start is not None else [1.5, 0.0]))
    return layer


@settings(max_examples=150, deadline=None)
@given(
    reqs=requests,
    rate=st.sampled_from([50.0, 100.0, 500.0]),
    max_step=st.one_of(st.none(), st.floats(0.0005, 0.2)),
    start=st.tuples(st.floats(0.0, np.pi), st.floats(-2.6, 2.6)),
)
def test_outputs_never_exceed_limits(reqs, rate, max_step, start) -> None:
    layer = _layer(rate, max_step, start)
    lim = layer.limits
    prev_q, prev_v = layer.last_sent, layer.velocity
    for req in reqs:
        res = layer.command(np.asarray(req, dtype=np.float64))
        assert np.all(np.isfinite(res.sent))
        assert within_limits(lim, prev_q, prev_v, res.sent) == [], (req, res)
        if not np.all(np.isfinite(req)):
            assert res.rejected and "nonfinite" in res.clamped
        prev_q, prev_v = res.sent, layer.velocity


@settings(max_examples=25, deadline=None)
@given(target=st.tuples(st.floats(-10, 10), st.floats(-10, 10)).filter(
    lambda t: not (0 < t[0] < np.pi and -2.6 < t[1] < 2.6)))
def test_slamming_into_a_limit_stops_at_it_without_violating_acceleration(target) -> None:
    layer = _layer(100.0)
    prev_q, prev_v = layer.last_sent, layer.velocity
    for _ in range(400):
        res = layer.command(np.asarray(target))
        assert within_limits(layer.limits, prev_q, prev_v, res.sent) == []
        prev_q, prev_v = res.sent, layer.velocity
    # Whichever joints were sent beyond a limit rest on it (braked, not crashed).
    expect = np.clip(target, SPACE.lower, SPACE.upper)
    beyond = (np.asarray(target) <= SPACE.lower) | (np.asarray(target) >= SPACE.upper)
    assert np.allclose(prev_q[beyond], expect[beyond], atol=1e-3)


def test_nan_holds_last_safe_command_and_is_counted() -> None:
    layer = _layer(100.0)
    for _ in range(50):
        layer.command(np.array([2.0, 0.5]))
    moving = layer.velocity
    assert np.any(np.abs(moving) > 0.1)
    res = layer.command(np.array([np.nan, 0.5]))
    assert res.rejected and layer.counts["nonfinite"] == 1 and layer.consecutive_rejects == 1
    # Holding decelerates smoothly rather than stopping in one cycle.
    assert np.any(np.abs(layer.velocity) > 0)
    for _ in range(200):
        layer.command(np.array([np.inf, -np.inf]))
    assert np.allclose(layer.velocity, 0.0, atol=1e-9)
    assert layer.counts["nonfinite"] == 201
    layer.command(np.array([2.0, 0.5]))
    assert layer.consecutive_rejects == 0


def test_wrong_shape_is_rejected_like_nan() -> None:
    layer = _layer()
    res = layer.command(np.array([1.0, 2.0, 3.0]))
    assert res.rejected and np.array_equal(res.sent, np.array([1.5, 0.0]))


def test_every_clamp_kind_is_counted() -> None:
    layer = _layer(100.0, max_step=0.001)
    layer.command(np.array([10.0, 0.0]))  # beyond the limit and far: position + velocity
    assert layer.counts["position"] == 1 and layer.counts["velocity"] == 1
    layer.command(np.array([layer.last_sent[0] + 0.01, 0.0]))  # within velocity, beyond max step
    assert layer.counts["step"] == 1
    layer2 = _layer(100.0)
    layer2.command(np.array([2.5, 0.0]))  # far away: velocity, and acceleration from rest
    assert layer2.counts["velocity"] == 1 and layer2.counts["acceleration"] == 1


def test_must_reset_before_commanding() -> None:
    layer = SafetyLayer(SafetyLimits.from_action_space(SPACE, 100.0))
    with pytest.raises(ConfigError, match="reset"):
        layer.command(np.zeros(2))
    with pytest.raises(ConfigError, match="non-finite"):
        layer.reset(np.array([np.nan, 0.0]))
