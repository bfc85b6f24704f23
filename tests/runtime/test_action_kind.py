"""The bundle manifest declares what an action is (its kind) and each dimension's role (docs/MANIFEST.md)."""

import json
import shutil

import numpy as np
import pytest

from edge_vla.action_space import ACTION_KINDS, ActionSpace, sim_action_space
from edge_vla.bundle import Bundle
from edge_vla.errors import ConfigError
from edge_vla.runtime.policy import Policy
from edge_vla.runtime.types import Observation
from edge_vla.sim.metaworld import action_space as metaworld_action_space


def _space(**kw) -> ActionSpace:
    base = dict(names=("x", "y", "g"), units="u", lower=-np.ones(3, np.float32), upper=np.ones(3, np.float32),
                max_velocity=np.ones(3, np.float32), max_acceleration=np.ones(3, np.float32), action_period_s=0.1)
    return ActionSpace(**(base | kw))


def test_sim_bundles_declare_absolute_joint_positions(tiny_bundle):
    space = Bundle.open(tiny_bundle).action_space
    assert space.kind == "absolute_joint_position"
    assert space.dim_roles == ("joint", "joint")
    assert Bundle.open(tiny_bundle).manifest["action_space"]["kind"] == "absolute_joint_position"


def test_metaworld_space_round_trips_through_the_manifest_dict():
    d = metaworld_action_space().to_dict()
    assert d["kind"] == "delta_ee_pose" and d["roles"] == ["ee", "ee", "ee", "gripper"]
    back = ActionSpace.from_dict(json.loads(json.dumps(d)))
    assert (back.kind, back.dim_roles, back.names) == ("delta_ee_pose", ("ee", "ee", "ee", "gripper"),
                                                      ("dx", "dy", "dz", "gripper"))


def test_a_manifest_from_before_action_kinds_reads_as_absolute_joint_positions(tiny_bundle, tmp_path):
    """Older bundles have no kind or roles: they load, as what they were, and the Policy runs them."""
    old = tmp_path / "old"
    shutil.copytree(tiny_bundle, old)
    manifest = json.loads((old / "manifest.json").read_text())
    for key in ("kind", "roles"):
        del manifest["action_space"][key]
    (old / "manifest.json").write_text(json.dumps(manifest))  # the manifest itself is not hashed
    bundle = Bundle.open(old)
    assert bundle.action_space.kind == "absolute_joint_position"
    assert bundle.action_space.dim_roles == ("joint", "joint")
    policy = Policy.load(old)
    obs = Observation([np.zeros((64, 64, 3), np.uint8)], "reach the red block", np.zeros(2, np.float32))
    assert policy.infer(obs).actions.shape == (8, 2)


@pytest.mark.parametrize(("kw", "message"), [
    ({"kind": "teleport"}, "action_space.kind 'teleport' is not one of"),
    ({"kind": "delta_ee_pose", "roles": ("joint", "ee", "gripper")}, "a delta_ee_pose action's dimensions are ee or gripper"),
    ({"roles": ("joint", "ee", "gripper")}, "a absolute_joint_position action's dimensions are gripper or joint"),
    ({"roles": ("joint", "gripper")}, "one role per dimension (3)"),
])
def test_malformed_kinds_and_roles_are_refused(kw, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _space(**kw).validate()


def test_every_kind_parses_and_defaults_its_roles():
    for kind in ACTION_KINDS:
        space = ActionSpace.from_dict(_space(kind=kind).to_dict())
        assert space.kind == kind
        assert space.dim_roles == (("ee",) * 3 if kind.endswith("ee_pose") else ("joint",) * 3)
    assert sim_action_space().describe() == "absolute_joint_position (absolute joint positions, joint: shoulder, elbow)"


@pytest.mark.parametrize("period", [float("nan"), float("inf"), 0.0, -0.01])
def test_an_action_period_that_is_not_a_positive_finite_number_is_refused(period: float) -> None:
    """NaN compared False with `<= 0` and passed (a NaN period reached the scheduler's time arithmetic)."""
    space = sim_action_space()
    with pytest.raises(ConfigError, match="action_period_s"):
        ActionSpace.from_dict(space.to_dict() | {"action_period_s": period})


def test_control_a_positive_action_period_is_taken() -> None:
    space = sim_action_space()
    assert ActionSpace.from_dict(space.to_dict() | {"action_period_s": 0.02}).action_period_s == 0.02
