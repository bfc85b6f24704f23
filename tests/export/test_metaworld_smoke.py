"""CI smoke of the MetaWorld chain, through the same commands as the sim: make-data -> train -> export ->
evaluate (expert and the bundle through the runtime) -> `edge-vla run` refuses the end-effector bundle.
Skipped without the `metaworld` extra; `make test` installs it."""

import importlib.util
import json

import pytest

from edge_vla.cli import main

pytestmark = pytest.mark.skipif(importlib.util.find_spec("metaworld") is None,
                                reason="MetaWorld is an optional extra: pip install 'edge-vla[metaworld]'")

ENV = "metaworld:reach-v3?horizon=80"  # the expert needs ~50 steps; a short cap keeps failing students cheap


def test_metaworld_chain_runs_and_the_expert_succeeds(tmp_path, capsys):
    data, ckpt, bundle, report = (tmp_path / n for n in ("data.npz", "tiny", "bundle", "eval.json"))
    assert main(["make-data", "--env", ENV, "--episodes", "2", "-o", str(data)]) == 0
    assert main(["train", "--preset", "tiny", "--data", str(data), "-o", str(ckpt), "--steps", "4",
                 "--batch-size", "8", "--threads", "1", "--checkpoint-every", "4"]) == 0
    assert main(["export", str(ckpt), "-o", str(bundle)]) == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["action_space"]["kind"] == "delta_ee_pose"
    assert manifest["action_space"]["roles"] == ["ee", "ee", "ee", "gripper"]
    assert manifest["model"]["state_dim"] == manifest["model"]["action_dim"] == 4
    assert manifest["cameras"] == [{"name": "corner2", "role": "scene", "image_size": 64}]

    # --env comes from the bundle's provenance (the dataset it was trained on)
    assert main(["evaluate", "expert", f"{bundle}@2", "--episodes", "2", "--json", str(report)]) == 0
    doc = json.loads(report.read_text())
    assert doc["env"] == "metaworld:reach-v3?cameras=corner2&horizon=80"
    expert, student = (c["overall"] for c in doc["contenders"])
    assert expert["successes"] == 2 and expert["episodes"] == 2
    assert student["episodes"] == 2 and len(student["outcomes"]) == 2  # 4 training steps: any outcome
    assert set(doc["contenders"][0]["groups"]) == {"easy"}
    assert "TinyVLA" in capsys.readouterr().out

    assert main(["run", str(bundle), "--emulate", "--duration", "3"]) == 1
    assert "declares delta_ee_pose" in capsys.readouterr().err
