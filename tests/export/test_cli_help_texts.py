"""`edge-vla demo --help` and `python -m edge_vla.onboard.drill --help`: every option says what it is.

Several options printed no help at all (demo's --eval-episodes and --onboard-seconds; the drill's --duration,
--rate-hz, --strategy and --no-drills), and others left out their default: a newcomer could not tell seconds from
episodes, or which chunk strategies the drill takes. The help is read from the real commands' output, as a user sees
it, and parsed into option -> help text."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from edge_vla.onboard.scheduler import RUN_STRATEGIES

COMMANDS = {
    "demo": [str(Path(sys.executable).parent / "edge-vla"), "demo", "--help"],
    "drill": [sys.executable, "-m", "edge_vla.onboard.drill", "--help"],
}
# Options whose help must name a unit.
UNITS = {"--onboard-seconds": "seconds", "--duration": "seconds", "--rate-hz": "Hz"}
_OPTION = re.compile(r"^  (-\S.*?)(?: {2,}(\S.*))?$")


def help_entries(command: str) -> dict[str, str]:
    """{option as printed (flags and metavar): its help text, joined over wrapped lines}."""
    out = subprocess.run(COMMANDS[command], capture_output=True, text=True, timeout=60,
                         env=os.environ | {"COLUMNS": "100"})
    assert out.returncode == 0, out.stderr
    entries: dict[str, str] = {}
    current = None
    for line in out.stdout.splitlines():
        if match := _OPTION.match(line):
            current = match.group(1)
            entries[current] = match.group(2) or ""
        elif current is not None and line.startswith("   ") and line.strip():
            entries[current] = (entries[current] + " " + line.strip()).strip()
        else:
            current = None
    assert entries, out.stdout
    return entries


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_has_a_help_text_with_its_default(command: str) -> None:
    entries = help_entries(command)
    for option, text in entries.items():
        assert text, f"{command}: {option} has no help text"
        takes_value = " " in option.split(",")[-1].strip()  # "--duration S": a metavar follows the flag
        if takes_value and not text.startswith("deprecated spelling"):
            assert "default" in text, f"{command}: {option} does not say its default: {text!r}"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_times_and_rates_name_their_unit(command: str) -> None:
    entries = help_entries(command)
    named = {flag: text for option, text in entries.items() for flag in UNITS if option.startswith(flag + " ")}
    assert named, entries
    for flag, text in named.items():
        assert UNITS[flag] in text, f"{command}: {flag} does not name its unit: {text!r}"


def test_the_drill_names_its_chunk_strategies() -> None:
    text = next(t for o, t in help_entries("drill").items() if o.startswith("--strategy"))
    assert all(name in text for name in RUN_STRATEGIES), text
