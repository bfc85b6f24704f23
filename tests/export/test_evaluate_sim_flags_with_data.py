"""`edge-vla evaluate --data lerobot:PATH` with a flag of the closed-loop sim evaluation.

--data runs the open-loop check on a recorded dataset, which reads none of the sim's flags: `--sensitivity`,
`--onboard`, `--episodes N`, `--env E`, `--execute N`, `--seed-base N` and the latency grid's `--strategies` and
`--latency-sigma` were dropped without a word (the check ran, printed its table and exited 0, and the user believed,
say, 500 episodes with instruction sensitivity had been measured). Each is now refused in one line naming what it
needs, before anything loads. The dataset path given here does not exist: a refusal that names the flag (and not
the missing dataset or target) shows the check comes first.

Control: without --data the same flags still act (a sim run whose JSON reports them), and their defaults still
apply when they are not given."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edge_vla.cli import main
from edge_vla.sim.evaluate import EVAL_SEED_BASE, EXECUTE

EDGE_VLA = str(Path(sys.executable).parent / "edge-vla")

# Each closed-loop flag with a value, including the value its default has: given is given.
SIM_FLAGS = [
    ["--sensitivity"],
    ["--onboard"],
    ["--episodes", "100"],
    ["--env", "sim"],
    ["--execute", str(EXECUTE)],
    ["--seed-base", str(EVAL_SEED_BASE)],
    ["--seed-base", "0"],  # a value that is falsy is given all the same
    ["--latency-ms", "100"],
    ["--strategies", "sync"],
    ["--latency-sigma", "0.25"],
    ["--latency-sigma", "0"],
]


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.mark.parametrize("flag", SIM_FLAGS, ids="_".join)
def test_a_sim_flag_with_data_is_refused_in_one_line(flag: list[str], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    data = f"lerobot:{tmp_path / 'no-such-dataset'}"
    assert main(["-q", "evaluate", "random", "--data", data, *flag]) == 1
    captured = capsys.readouterr()
    line = _one_error_line(captured.err)
    assert line.startswith("edge-vla evaluate: error: "), line
    assert f"{flag[0]} " in line and "--data" in line, line  # names the flag and what it conflicts with
    assert "no-such-dataset" not in line and "checkpoint" not in line, line  # refused before anything loads
    assert captured.out == ""


def test_the_real_command_refuses_sensitivity_with_data(tmp_path: Path) -> None:
    """The same through the installed console command, in its own process."""
    done = subprocess.run([EDGE_VLA, "-q", "evaluate", "random", "--data", f"lerobot:{tmp_path / 'none'}",
                           "--sensitivity"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == "", done.stdout + done.stderr
    line = _one_error_line(done.stderr)
    assert "--sensitivity " in line and "drop --data" in line, line


def test_control_without_data_the_sim_flags_still_act(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "given.json"
    assert main(["-q", "evaluate", "random", "--env", "sim", "--episodes", "1", "--seed-base", "7", "--execute", "2",
                 "--sensitivity", "--json-out", str(out)]) == 0, capsys.readouterr().err
    doc = json.loads(out.read_text())
    assert (doc["env"], doc["episodes"], doc["seed_base"], doc["execute"]) == ("sim", 1, 7, 2)
    assert "instruction_sensitivity" in doc["contenders"][0]
    assert "replanning every 2 action(s)" in capsys.readouterr().out


def test_control_without_data_the_defaults_still_apply(tmp_path: Path) -> None:
    out = tmp_path / "defaults.json"
    assert main(["-q", "evaluate", "random", "--json-out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert (doc["env"], doc["episodes"], doc["seed_base"], doc["execute"]) == ("sim", 100, EVAL_SEED_BASE, EXECUTE)
    assert "instruction_sensitivity" not in doc["contenders"][0]


@pytest.mark.parametrize("argv, reason", [
    (["random", "random", "--onboard"], "one bundle directory"),
    (["random", "--env", "sim:nope"], "nope"),
    (["random", "--execute", "0"], "--execute"),
    (["random", "--latency-ms", "100", "--latency-sigma", "9"], "--latency-sigma 9"),
], ids=["onboard", "env", "execute", "latency-sigma"])
def test_control_without_data_each_flag_reaches_its_own_checks(argv: list[str], reason: str,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Past the --data check, each flag is read: its own validation answers, not the --data refusal."""
    assert main(["-q", "evaluate", *argv]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert reason in line and "--data" not in line, line


def test_latency_sigma_without_latency_ms_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """--latency-sigma shapes the latency grid's draws; without --latency-ms there is no grid, and it was dropped."""
    assert main(["-q", "evaluate", "random", "--episodes", "1", "--latency-sigma", "0.5"]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "--latency-sigma" in line and "--latency-ms" in line, line
