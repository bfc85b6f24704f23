"""`-v`, `-vv` and `--quiet` work before or after the subcommand, and `--help` says what they do.

Every case runs the real `edge-vla` entry point in a fresh process (logging is process-global, and pytest's
own handlers would turn `logging.basicConfig` into a no-op in-process)."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

# The levels main() leaves behind for the root logger (libraries) and edge-vla's own loggers.
_LEVELS = (
    "import logging, sys\n"
    "from edge_vla import cli\n"
    "rc = cli.main(sys.argv[1:])\n"
    "print('LEVELS', logging.getLogger().getEffectiveLevel(), logging.getLogger('edge_vla').getEffectiveLevel(),"
    " logging.getLogger('firmware_bridge').getEffectiveLevel(), rc)\n"
)


def _levels(*argv: str) -> tuple[int, int, int]:
    got = subprocess.run([sys.executable, "-c", _LEVELS, *argv], capture_output=True, text=True, timeout=60)
    line = next((ln for ln in got.stdout.splitlines() if ln.startswith("LEVELS")), None)
    assert line is not None, (argv, got.returncode, got.stdout, got.stderr)
    root, own, bridge, _rc = (int(v) for v in line.split()[1:])
    return root, own, bridge


def _edge_vla(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_vla.cli", *argv], capture_output=True, text=True, timeout=60)


# (flags, root level, edge-vla's level): the default shows INFO; -v adds edge-vla's DEBUG; -vv every library's.
CASES = [
    ((), logging.INFO, logging.INFO),
    (("-v",), logging.INFO, logging.DEBUG),
    (("--verbose",), logging.INFO, logging.DEBUG),
    (("-vv",), logging.DEBUG, logging.DEBUG),
    (("-q",), logging.WARNING, logging.WARNING),
    (("--quiet",), logging.WARNING, logging.WARNING),
]


@pytest.mark.parametrize("position", ["before", "after"])
@pytest.mark.parametrize("flags,root,own", CASES, ids=[" ".join(c[0]) or "default" for c in CASES])
def test_verbosity_flags_work_on_either_side_of_the_subcommand(position, flags, root, own) -> None:
    # `doctor` with a missing package: a command that fails at once, without torch.
    argv = [*flags, "doctor", "/nonexistent.tar.gz"] if position == "before" else \
        ["doctor", "/nonexistent.tar.gz", *flags]
    assert _levels(*argv) == (root, own, own)


def test_v_shows_the_debug_traceback_after_the_subcommand_too() -> None:
    """Behaviour, not just levels: -v makes a failing command log its traceback at DEBUG, in both places."""
    quiet = _edge_vla("doctor", "/nonexistent.tar.gz")
    assert quiet.returncode == 1 and "Traceback" not in quiet.stderr, quiet.stderr
    for argv in (["-v", "doctor", "/nonexistent.tar.gz"], ["doctor", "/nonexistent.tar.gz", "-v"]):
        got = _edge_vla(*argv)
        assert got.returncode == 1, (argv, got.stderr)
        assert "DEBUG edge_vla: command failed" in got.stderr and "Traceback" in got.stderr, (argv, got.stderr)
        assert got.stderr.strip().splitlines()[-1].startswith("edge-vla doctor: error:"), got.stderr


def test_quiet_and_verbose_together_are_refused() -> None:
    got = _edge_vla("-q", "doctor", "/nonexistent.tar.gz", "-v")
    assert got.returncode == 2 and "--quiet" in got.stderr and "--verbose" in got.stderr, got.stderr


@pytest.mark.parametrize("argv", [["--help"], ["doctor", "--help"]])
def test_help_says_what_the_flags_do(argv) -> None:
    text = " ".join(_edge_vla(*argv).stdout.split())
    assert "-vv for debug" not in text  # -v alone already gave DEBUG: the old help was wrong
    assert "-v, --verbose" in text and "-q, --quiet" in text, text
    assert "edge-vla's debug messages" in text and "every library's" in text, text
    assert "warnings and errors only, no progress" in text, text
