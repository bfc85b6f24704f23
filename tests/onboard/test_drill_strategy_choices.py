"""`python -m edge_vla.onboard.drill --strategy NAME`: a misspelt strategy is refused by argparse, before anything starts.

It was taken as given: the drill loaded its source, started the firmware emulator on a pty and spawned the control
process, which then failed to build its scheduler, and the drill ended in a StartupError traceback. Now argparse
refuses it (exit 2) with the choices, in the real command's own process. Control: a valid strategy gets past
parsing (shown with --help after it, which argparse answers only once every option before it has parsed)."""

from __future__ import annotations

import subprocess
import sys

from edge_vla.onboard.scheduler import RUN_STRATEGIES

DRILL = [sys.executable, "-m", "edge_vla.onboard.drill"]


def _drill(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*DRILL, *argv], capture_output=True, text=True, timeout=60)


def test_a_misspelt_strategy_exits_2_naming_the_choices_before_anything_starts() -> None:
    done = _drill("--strategy", "recedng", "--duration", "0.1", "--no-drills")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "argument --strategy: invalid choice: 'recedng'" in done.stderr, done.stderr
    assert all(f"'{name}'" in done.stderr for name in RUN_STRATEGIES), done.stderr
    # Nothing ran: no emulator, no control process, no traceback; only argparse's usage and error lines.
    assert done.stdout == "" and "Traceback" not in done.stderr and "control" not in done.stderr, done.stderr
    assert [line.split(":")[0] for line in done.stderr.splitlines() if line.strip() and not line.startswith(" ")] \
        == ["usage", "python -m edge_vla.onboard.drill"], done.stderr


def test_control_every_run_strategy_is_accepted() -> None:
    for name in RUN_STRATEGIES:
        done = _drill("--strategy", name, "--help")
        assert done.returncode == 0 and "--strategy NAME" in done.stdout, (name, done.stderr)
