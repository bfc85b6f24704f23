"""`edge-vla run` refuses a bundle whose action kind this robot configuration cannot execute."""

import json
import shutil
import time

import pytest

from edge_vla.action_space import sim_action_space
from edge_vla.cli import main
from edge_vla.errors import ConfigError
from edge_vla.onboard.control import ControlConfig
from edge_vla.sim.metaworld import action_space as metaworld_action_space


@pytest.fixture
def ee_bundle(tiny_bundle, tmp_path):
    """The tiny bundle relabelled as a MetaWorld-style end-effector-delta policy (the manifest is not hashed)."""
    out = tmp_path / "ee"
    shutil.copytree(tiny_bundle, out)
    manifest = json.loads((out / "manifest.json").read_text())
    space = metaworld_action_space().to_dict()
    manifest["action_space"] = {k: (v[:2] if isinstance(v, list) else v) for k, v in space.items()}
    manifest["action_space"]["roles"] = ["ee", "gripper"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_run_refuses_an_end_effector_bundle_in_one_line(ee_bundle, capsys):
    t0 = time.monotonic()
    rc = main(["run", str(ee_bundle), "--emulate", "--duration", "60"])
    err = capsys.readouterr().err.strip()
    assert rc == 1
    assert time.monotonic() - t0 < 30  # refused before the loop ran (it would run 60 s): slack for a slow box
    assert "\n" not in err
    assert err.startswith(f"edge-vla run: error: bundle {ee_bundle} declares delta_ee_pose (end-effector deltas")
    assert "this robot configuration executes absolute_joint_position only" in err


def test_the_control_loop_refuses_other_kinds_too():
    """Programmatic users (drills, the demo) construct ControlConfig directly: the same refusal."""
    with pytest.raises(ConfigError, match="the control loop executes absolute_joint_position only"):
        ControlConfig(link_url="serial:///dev/null", action_space=metaworld_action_space())
    ControlConfig(link_url="serial:///dev/null", action_space=sim_action_space())  # joint positions run
