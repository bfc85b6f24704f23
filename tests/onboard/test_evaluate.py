"""`edge-vla evaluate --onboard`: episodes through the real control process and the emulator on a pty."""

from __future__ import annotations

import json

from onboard_helpers import expert_clamps_allowed

from edge_vla.cli import main as cli_main
from edge_vla.onboard.evaluate import OnboardEvalConfig, compare


def test_onboard_episodes_reuse_one_loop_and_pair_with_offline(tmp_path, capsys) -> None:
    out = tmp_path / "onboard.json"
    doc = compare("expert", 2, config=OnboardEvalConfig(heartbeat_timeout_ms=300), json_out=str(out))
    assert json.loads(out.read_text())["onboard"]["outcomes"] == doc["onboard"]["outcomes"]
    assert doc["onboard"]["outcomes"] == [1, 1] and doc["offline"]["outcomes"] == [1, 1]
    assert doc["paired"]["diff"] == 0.0
    episodes = doc["per_episode"]
    assert [e["seed"] for e in episodes] == [1_000_000, 1_000_001]
    assert all(e["trip"] is None and e["time_s"] < 3.0 and e["setup_s"] < 2.0 for e in episodes)
    control = doc["control"]
    # One control process for both episodes: two operator stops (the bench's), nothing else tripped.
    assert [t["kind"] for t in control["trips"]] == ["operator_stop", "operator_stop"]
    assert not control["armed_at_exit"]
    clamps = control["clamps"]["acceleration"] + control["clamps"]["velocity"]
    assert clamps <= expert_clamps_allowed(control), (control["clamps"], control["missed_deadlines"])
    printed = capsys.readouterr().out
    assert "paired:" in printed and "onboard loop:" in printed


def test_onboard_needs_one_bundle(tmp_path, capsys) -> None:
    assert cli_main(["evaluate", str(tmp_path), "--onboard", "--episodes", "1"]) == 1
    assert "manifest.json" in capsys.readouterr().err
    assert cli_main(["evaluate", "expert", "random", "--onboard"]) == 1
    assert "one bundle" in capsys.readouterr().err
