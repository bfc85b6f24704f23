"""Flag conventions shared by the `edge-vla` commands, and the deprecated spellings kept for one release.

    --steps          ODE steps, everywhere (training steps are --train-steps)
    --json           a switch: print JSON to stdout (a file is --json-out FILE)
    -o / --output    an output path (--out is a deprecated alias where it existed)
    --link           a motor-controller link URL (run, emulate)
    --control-socket the operator socket (run, arm, stop, clear-faults, status)

A deprecated spelling still works and logs one line saying what it is now called.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

log = logging.getLogger("edge_vla.cli")


def deprecation_line(old: str, new: str, command: str) -> str:
    return f"{old} is now {new} in {command}; the old spelling goes in the next release"


class DeprecatedAlias(argparse.Action):
    """Stores like the new flag (same dest and type) and logs the deprecation line when used.

    parser.add_argument("--steps", dest="train_steps", type=int, action=DeprecatedAlias, new="--train-steps")
    """

    def __init__(self, option_strings: Sequence[str], dest: str, new: str, tty_only: bool = False,
                 **kwargs: Any) -> None:
        kwargs.setdefault("help", f"deprecated spelling of {new}")
        super().__init__(option_strings, dest, **kwargs)
        self.new = new
        self.tty_only = tty_only  # commands whose stderr is a one-line contract tell only a person at a terminal

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        command = parser.prog.split(maxsplit=1)[-1]
        if not self.tty_only or sys.stderr.isatty():
            log.warning(deprecation_line(option_string or self.option_strings[0], self.new, command))
        setattr(namespace, self.dest, values)


def with_epilog(parser: argparse.ArgumentParser, epilog: str) -> None:
    """An epilog printed as written (exit-status tables), whatever formatter the parser was made with."""
    parser.epilog = epilog
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
