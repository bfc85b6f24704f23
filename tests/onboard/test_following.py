"""Host following-error limits: from the robot configuration, narrowed (never widened) by a bundle."""

from __future__ import annotations

import numpy as np
import pytest

from edge_vla.errors import ConfigError
from edge_vla.onboard.following import TrackingCheck, TrackingLimits
from edge_vla.provision.robot_config import RobotConfig

NAMES = ("shoulder", "elbow", "gripper")


def test_robot_config_round_trip_and_gripper_role() -> None:
    cfg = RobotConfig(following_error="0.4,0.3,0.3", gripper_joints="gripper", gripper_effort=5.0,
                      link_loss_category=1)
    back = RobotConfig.from_env(cfg.to_env()).validate()
    assert back == cfg
    lim = back.tracking_limits(NAMES)
    assert lim.max_position_error.tolist() == [0.4, 0.3, np.inf]  # the gripper is blocked by design
    assert lim.max_effort.tolist() == [np.inf, np.inf, 5.0]


@pytest.mark.parametrize("bad", [dict(following_error="0"), dict(following_error="a"),
                                 dict(link_loss_category=2), dict(gripper_effort=-1.0)])
def test_bad_robot_config_is_a_clear_error(bad) -> None:
    with pytest.raises(ConfigError, match="EDGE_VLA_"):
        RobotConfig(**bad).validate()


def test_a_bundle_narrows_but_never_widens() -> None:
    lim = TrackingLimits.from_robot(NAMES, 0.5, ("gripper",), 5.0)
    narrowed = lim.narrowed(position_error=[0.2, 0.9, 0.1], effort=[np.inf, np.inf, 9.0])
    assert narrowed.max_position_error.tolist() == [0.2, 0.5, 0.1]
    assert narrowed.max_effort.tolist() == [np.inf, np.inf, 5.0]
    with pytest.raises(ConfigError, match="not among"):
        TrackingLimits.from_robot(NAMES, 0.5, ("wrist",))


def test_check_trips_after_debounce_on_position_and_gripper_effort() -> None:
    check = TrackingCheck(TrackingLimits.from_robot(NAMES, 0.3, ("gripper",), 5.0, debounce=3))
    cmd, meas = np.array([1.0, 0.0, 0.0]), np.array([0.6, 0.0, 0.0])
    assert check.check(cmd, meas, np.zeros(3), NAMES) == (None, None)
    assert check.check(cmd, meas, np.zeros(3), NAMES) == (None, None)
    pos, eff = check.check(cmd, meas, np.zeros(3), NAMES)
    assert pos is not None and "shoulder" in pos and eff is None
    check.reset()
    for _ in range(2):
        assert check.check(cmd * 0, meas * 0, np.array([0, 0, 6.0]), NAMES) == (None, None)
    assert "gripper" in check.check(cmd * 0, meas * 0, np.array([0, 0, 6.0]), NAMES)[1]
