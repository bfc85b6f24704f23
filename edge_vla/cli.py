"""The `edge-vla` console command.

Each subcommand lives in its own module exposing `configure(parser)` and `main(args) -> int`.
Modules are imported only when their subcommand runs, so `edge-vla --help` and the robot-side
commands never import torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from edge_vla import __version__
from edge_vla.errors import EdgeVlaError
from firmware_bridge.errors import BridgeError


@dataclass(frozen=True)
class Subcommand:
    name: str
    module: str
    help: str
    group: str


SUBCOMMANDS: tuple[Subcommand, ...] = (
    Subcommand("demo", "edge_vla.demo", "the main job end to end on the embedded default", "start here"),
    Subcommand("make-data", "edge_vla.sim.cli", "write expert demonstrations from the sim", "workstation"),
    Subcommand("train", "edge_vla.export.train_cli", "train a preset by flow-matching behaviour cloning", "workstation"),
    Subcommand("evaluate", "edge_vla.export.evaluate_cli", "closed-loop success of a checkpoint, bundle or baseline", "workstation"),
    Subcommand("distill", "edge_vla.export.distill_cli", "distill a teacher into a small, few-step student", "workstation"),
    Subcommand("compare", "edge_vla.export.compare_cli", "teacher vs student vs INT8 vs few-step table", "workstation"),
    Subcommand("export", "edge_vla.export.export_cli", "checkpoint -> verified ONNX graphs -> bundle", "workstation"),
    Subcommand("lint", "edge_vla.export.trt_lint", "check a bundle's graphs against TensorRT's ONNX parser", "workstation"),
    Subcommand("build-engines", "edge_vla.export.engines", "build TensorRT engines for a bundle (or write trtexec lines)", "target"),
    Subcommand("tune", "edge_vla.runtime.tune", "time each backend x precision here; record the fastest in the numerics gate", "target"),
    Subcommand("profile", "edge_vla.runtime.profile_cli", "latency budget per stage, with trace, plot and roofline", "target"),
    Subcommand("run", "edge_vla.onboard.cli", "run the robot: cameras -> policy -> safety -> motor controller", "target"),
    Subcommand("serve", "edge_vla.serve.cli", "answer openpi-client robots (websocket protocol) from a bundle", "target"),
    Subcommand("arm", "edge_vla.onboard.operator_cli", "operator: clear faults and arm the running loop", "target"),
    Subcommand("stop", "edge_vla.onboard.operator_cli", "operator: category-1 stop of the running loop (stays up, latched)", "target"),
    Subcommand("clear-faults", "edge_vla.onboard.operator_cli", "operator: acknowledge latched faults without arming", "target"),
    Subcommand("status", "edge_vla.onboard.operator_cli", "operator: phase, firmware mode and faults, last trip", "target"),
    Subcommand("emulate", "firmware_bridge.emulator", "a motor controller emulator on a pty or CAN bus", "target"),
    Subcommand("motors", "edge_vla.onboard.motors_cli", "scan servo buses; configure ids, baud, return delay, limits", "target"),
    Subcommand("package", "edge_vla.provision.package", "bundle + service + udev rules -> robot package", "provisioning"),
    Subcommand("install", "edge_vla.provision.install", "install a robot package into a rootfs or onto a robot", "provisioning"),
    Subcommand("doctor", "edge_vla.provision.doctor", "check this machine against a package or bundle", "provisioning"),
)
_BY_NAME = {s.name: s for s in SUBCOMMANDS}


# Loggers of this project (export modules are imported as edge_vla.export.*; `export` for a source checkout).
OWN_LOGGERS = ("edge_vla", "export", "firmware_bridge")


def _verbosity_parser(defaults: bool) -> argparse.ArgumentParser:
    """-v/-vv/-q, shared by the top parser and every subcommand's, so they work on either side of COMMAND.

    The subcommand's copy has SUPPRESS defaults: a flag it did not see leaves the top parser's value alone."""
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("logging")
    group.add_argument("-v", "--verbose", action="count", default=0 if defaults else argparse.SUPPRESS,
                       help="-v: also edge-vla's debug messages; -vv: every library's too (default: info messages "
                       "and progress)")
    group.add_argument("-q", "--quiet", action="store_true", default=False if defaults else argparse.SUPPRESS,
                       help="warnings and errors only, no progress (a command's results are still printed)")
    return parser


def log_levels(verbose: int, quiet: bool) -> tuple[int, int]:
    """(root level for every library, level of this project's loggers)."""
    if quiet:
        return logging.WARNING, logging.WARNING
    if verbose >= 2:
        return logging.DEBUG, logging.DEBUG
    return logging.INFO, logging.DEBUG if verbose == 1 else logging.INFO


def _configure_logging(verbose: int, quiet: bool) -> None:
    root, own = log_levels(verbose, quiet)
    # The one place logging is configured (a second basicConfig elsewhere would be a no-op or a second handler).
    logging.basicConfig(level=root, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(own)


def _top_parser() -> argparse.ArgumentParser:
    lines = []
    for group in dict.fromkeys(s.group for s in SUBCOMMANDS):
        lines.append(f"{group}:")
        lines += [f"  {s.name:<14} {s.help}" for s in SUBCOMMANDS if s.group == group]
    parser = argparse.ArgumentParser(
        prog="edge-vla",
        description="Deploy a Vision-Language-Action policy to a robot's onboard computer and run it safely.",
        epilog="\n".join(lines) + "\n\nRun `edge-vla COMMAND --help` for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="edge-vla [-h] [--version] [-v | -vv | -q] COMMAND ...",
        parents=[_verbosity_parser(defaults=True)],
    )
    parser.add_argument("--version", action="version", version=f"edge-vla {__version__}")
    parser.add_argument("command", nargs="?", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    # Split at the first non-option word: options before it are global, the rest is the command's.
    split = next((i for i, a in enumerate(argv) if not a.startswith("-")), len(argv))
    top_args = top.parse_args(argv[: split + 1] if split < len(argv) else argv)
    if top_args.command is None:
        _configure_logging(top_args.verbose, top_args.quiet)
        top.print_help()
        return 2
    sub = _BY_NAME.get(top_args.command)
    if sub is None:
        top.error(f"unknown command {top_args.command!r}; choose one of: {', '.join(_BY_NAME)}")
    try:
        module = importlib.import_module(sub.module)
        # "resolve": a subcommand that defines its own -v or -q keeps it (its definition comes last).
        parser = argparse.ArgumentParser(prog=f"edge-vla {sub.name}", description=sub.help,
                                         parents=[_verbosity_parser(defaults=False)], conflict_handler="resolve")
        module.configure(parser)
        args = parser.parse_args(argv[split + 1 :])
        verbose = top_args.verbose + getattr(args, "verbose", 0)
        quiet = top_args.quiet or getattr(args, "quiet", False)
        if quiet and verbose:
            parser.error("--quiet and --verbose contradict each other; give one")
        _configure_logging(verbose, quiet)
        return int(module.main(args) or 0)
    except (EdgeVlaError, BridgeError) as exc:
        logging.getLogger("edge_vla").debug("command failed", exc_info=True)
        print(f"edge-vla {sub.name}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"edge-vla {sub.name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
