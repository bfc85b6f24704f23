"""One meaning per flag across commands, through the real CLI (subprocesses; nothing here trains or exports).

--steps is ODE steps everywhere (train/distill count training steps with --train-steps, the old spelling warns);
--json prints JSON to stdout (--json-out FILE writes it; --json FILE warns); --link is a URL in run and emulate;
--control-socket in run and in the operator commands; thresholds say their units and defaults; --rate-hz is checked
against 50-500 Hz; robot-side commands document their exit statuses.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EDGE_VLA = [sys.executable, "-m", "edge_vla.cli"]


def run(*args: str, timeout: float = 120, cwd: Path | str = "/") -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for name in ("EDGE_VLA_CONTROL_SOCKET", "RUNTIME_DIRECTORY", "INVOCATION_ID", "NOTIFY_SOCKET"):
        env.pop(name, None)
    return subprocess.run([*EDGE_VLA, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


def parse(command: str, module: str, *argv: str) -> argparse.Namespace:
    import importlib

    parser = argparse.ArgumentParser(prog=f"edge-vla {command}")
    importlib.import_module(module).configure(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize(("command", "module", "extra"), [
    ("train", "edge_vla.export.train_cli", ()),
    ("distill", "edge_vla.export.distill_cli", ("--teacher", "t", "-o", "s")),
])
def test_training_steps_are_train_steps_and_the_old_spelling_still_works(command, module, extra) -> None:
    assert parse(command, module, *extra, "--train-steps", "7").train_steps == 7
    assert parse(command, module, *extra, "--steps", "7").train_steps == 7  # deprecated alias, same value


@pytest.mark.parametrize("command", ["train", "distill"])
def test_the_old_steps_spelling_logs_a_deprecation_line(command: str, tmp_path: Path) -> None:
    common = (["--data", "lerobot:/nonexistent-dataset"] if command == "train"
              else ["--teacher", str(tmp_path / "no-teacher"), "-o", str(tmp_path / "s")])
    old = run(command, *common, "--steps", "3")
    assert f"--steps is now --train-steps in {command}; the old spelling goes in the next release" in old.stderr
    new = run(command, *common, "--train-steps", "3")
    assert "--steps is now" not in new.stderr
    assert old.returncode == new.returncode == 1  # both go on to refuse the missing data/teacher in one line


def test_evaluate_json_is_a_switch_json_out_a_file_and_json_file_a_deprecated_alias(tmp_path: Path) -> None:
    switch = run("evaluate", "expert", "--episodes", "1", "--json")
    assert switch.returncode == 0, switch.stderr
    doc = json.loads(switch.stdout)
    assert doc["contenders"][0]["result"]["episodes"] == 1
    out = tmp_path / "r.json"
    written = run("evaluate", "expert", "--episodes", "1", "--json-out", str(out))
    assert written.returncode == 0 and json.loads(out.read_text())["episodes"] == 1
    assert "deprecated" not in written.stderr
    old = tmp_path / "old.json"
    alias = run("evaluate", "expert", "--episodes", "1", "--json", str(old))
    assert alias.returncode == 0 and json.loads(old.read_text())["episodes"] == 1
    assert "--json FILE is now --json-out FILE" in alias.stderr


@pytest.mark.parametrize("rate", ["1000", "20", "nan"])
def test_rate_hz_outside_the_documented_range_is_refused_in_one_line(rate: str) -> None:
    proc = run("run", "--expert", "--emulate", "--rate-hz", rate, "--duration", "1")
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert "50-500 Hz" in lines[0]


def _help(*command: str) -> str:
    proc = run(*command, "--help")
    assert proc.returncode == 0, proc.stderr
    return re.sub(r"\s+", " ", proc.stdout)


def test_watchdog_thresholds_say_their_units_and_defaults() -> None:
    text = _help("run")
    for flag, unit in (("--camera-max-age", "s"), ("--chunk-max-age", "s"), ("--link-max-age", "s"),
                       ("--worker-max-age", "s"), ("--exhausted-max", "s"), ("--max-overruns", "cycles"),
                       ("--max-link-errors", "frames"), ("--blend-s", "s"), ("--rate-hz", "Hz")):
        m = re.search(r"(?<!\[)" + re.escape(flag) + r" \S+ (.*?)(?= --|$)", text)  # the option, not the usage
        assert m, f"{flag} missing from run --help"
        assert "default" in m.group(1) and re.search(rf"\b{unit}\b", m.group(1)), f"{flag}: {m.group(1)!r}"
    assert "50-500" in text


@pytest.mark.parametrize("command", [("run",), ("arm",), ("stop",), ("status",), ("clear-faults",), ("emulate",),
                                     ("serve",), ("build-engines",)])
def test_robot_side_commands_document_their_exit_statuses(command: tuple[str, ...]) -> None:
    text = _help(*command)
    assert "exit status" in text.lower(), text[-400:]
    if command == ("run",):
        assert re.search(r"\b3\b[^.]*(trip|safety)", text), text[-600:]


def test_operator_commands_take_control_socket_and_socket_is_a_deprecated_alias() -> None:
    """--socket still works; its notice goes to a terminal only (scripts hold the operator commands to one line)."""
    text = _help("arm")
    assert "--control-socket PATH" in text and "--socket CONTROL_SOCKET deprecated spelling of --control-socket" in text
    proc = run("status", "--socket", "/nonexistent/control.sock")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert "/nonexistent/control.sock" in proc.stderr and "pass --control-socket PATH" in proc.stderr


def test_emulate_link_is_a_url_and_the_pty_symlink_is_pty_link(tmp_path: Path) -> None:
    text = _help("emulate")
    assert "--pty-link" in text and "serial://" in text
    a = parse("emulate", "firmware_bridge.emulator", "--link", f"serial://{tmp_path}/motor")
    b = parse("emulate", "firmware_bridge.emulator", "--pty-link", f"{tmp_path}/motor")
    from firmware_bridge.emulator import resolve_where

    assert resolve_where(a) == resolve_where(b) == ("pty", f"{tmp_path}/motor")
    old = run("emulate", "--link", str(tmp_path / "old"), "--print-path", "--duration", "0.2", "--joints", "2")
    assert old.returncode == 0, old.stderr
    assert old.stdout.splitlines()[0] == str(tmp_path / "old")
    assert "--link PATH is now --pty-link PATH" in old.stderr
    bad = run("emulate", "--link", "foo://x", "--duration", "0.2")
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1 and "foo" in bad.stderr
