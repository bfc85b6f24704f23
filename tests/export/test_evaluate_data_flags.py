"""`edge-vla evaluate` flags that only mean something with --data (the open-loop check on recorded data).

`--teacher X` without --data was silently dropped: the closed-loop sim evaluation ran, printed its table and exited 0,
and the user believed X had been compared. --samples and --seed (open-loop only too) went the same way. Each is
now refused in one line saying what it needs; through the real `edge-vla` console command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EDGE_VLA = str(Path(sys.executable).parent / "edge-vla")


def _evaluate(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EDGE_VLA, "-q", "evaluate", *argv], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("flag", [["--teacher", "expert"], ["--samples", "4"], ["--seed", "3"]])
def test_an_open_loop_flag_without_data_is_refused_in_one_line(flag: list[str], tmp_path: Path) -> None:
    done = _evaluate("random", "--episodes", "1", *flag, cwd=tmp_path)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1 and len(lines) == 1, done.stdout + done.stderr
    assert f"{flag[0]} " in lines[0] and "--data lerobot:PATH" in lines[0], lines[0]
    assert done.stdout == ""  # refused before any episode ran


def test_control_without_those_flags_the_closed_loop_evaluation_runs(tmp_path: Path) -> None:
    done = _evaluate("random", "--episodes", "1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("random: success"), done.stdout
