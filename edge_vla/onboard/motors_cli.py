"""`edge-vla motors scan | configure`: find serial-bus servos, and set their ids, baud rate, return delay, position
limits and operating mode (EEPROM) as a separate, explicit step; `edge-vla run` never writes EEPROM.

    edge-vla motors scan dynamixel:///dev/ttyUSB0 --all-bauds
    edge-vla motors configure feetech:///dev/ttyUSB0?ids=1-6 --return-delay 0 --limits 1=1000:3000 --dry-run

The work is done by firmware_bridge.motors.configure (see its docstring for the order of writes and what a
failure leaves); this module parses the command line and prints. Every failure ends with exit status 1 and one
line: on stderr, or under --json as {"ok": false, "error": "..."} on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from edge_vla.atomic import atomic_write
from edge_vla.cli_flags import with_epilog
from edge_vla.files import one_line
from firmware_bridge.motors.base import MotorError
from firmware_bridge.motors.configure import (
    DEFAULT_SCAN_TIMEOUT_MS,
    ConfigureError,
    Request,
    ScanResult,
    apply_plan,
    id_ranges,
    make_plan,
    open_bus,
    parse_target,
    scan,
    validate,
    vendor_of,
)

DEFAULT_BAUD = 1_000_000
EXIT_STATUSES = """exit status:
  0  scan: at least one servo answered; configure: written and read back, already set, or (--dry-run) planned
  1  scan: no servo answered (the line names the baud rates and ids tried); configure: refused or failed; a
     bad value (URL, id, limits, return delay): one line on stderr, or {"ok": false, "error": ...} with --json
  2  usage error"""
URL_HELP = ("SCHEME://PORT[?ids=..&baud=..&latency_ms=..]: dynamixel:///dev/ttyUSB0 or feetech:///dev/ttyUSB0; ids= "
            "the servo ids (1-6 or 1,2,5), baud= the rate they answer at now, latency_ms= the USB adapter's latency "
            "timer (default 16)")


def configure(parser: argparse.ArgumentParser) -> None:
    with_epilog(parser, EXIT_STATUSES)
    sub = parser.add_subparsers(dest="motors_command", metavar="{scan,configure}", required=True)
    scan_p = sub.add_parser(
        "scan", help="ping ids at one or more baud rates and show each servo found",
        description="Ping every id (Dynamixel: one broadcast ping per baud rate; Feetech: one ping per id) and print "
                    "one line per servo: id, baud, model, firmware, return delay, limits, mode, torque (and the "
                    "Feetech EEPROM lock). Reads only.")
    scan_p.add_argument("url", metavar="URL", help=URL_HELP + "; without ids= every id of the family is pinged")
    rates = scan_p.add_mutually_exclusive_group()
    rates.add_argument("--baud", type=_baud_list, metavar="RATE[,RATE...]",
                       help="baud rates to try, in order (default: the URL's baud=, else 1000000)")
    rates.add_argument("--all-bauds", action="store_true",
                       help="every rate of the vendor's documented table that its SDK can set")
    scan_p.add_argument("--timeout-ms", type=float, default=DEFAULT_SCAN_TIMEOUT_MS, metavar="MS",
                        help="Feetech: wait this long for each id's answer (default %(default)s)")
    _common(scan_p)

    cfg_p = sub.add_parser(
        "configure", help="write ids, baud rate, return delay, limits, mode (EEPROM), each read back",
        description="Set EEPROM values on the servos listed in the URL's ids= (as they answer now at its baud=), each "
                    "write read back and verified; nothing is written where a value is already set (EEPROM wears). "
                    "Refuses while a servo has torque on unless --torque-off. Feetech: Lock (55) <- 0 around the "
                    "writes, then 1. The baud rate is written last.")
    cfg_p.add_argument("url", metavar="URL", help=URL_HELP + " (ids= required)")
    cfg_p.add_argument("--set-id", action="append", default=[], type=_id_pair, metavar="OLD:NEW",
                       help="give servo OLD the id NEW (refused when NEW already answers); repeatable")
    cfg_p.add_argument("--baud", type=int, metavar="RATE",
                       help="set every listed servo to this baud rate, written last (then they answer only there)")
    cfg_p.add_argument("--return-delay", type=int, metavar="US",
                       help="Return Delay Time in microseconds, even, 0..508 (0 recommended; the factory 500 us adds "
                            "~3 ms per 6-servo cycle)")
    cfg_p.add_argument("--limits", action="append", default=[], type=_limits, metavar="ID=LO:HI",
                       help="position limits of servo ID in ticks 0..4095 (tick = 2048 + rad x 4096 / 2pi at the "
                            "default calibration); repeatable")
    cfg_p.add_argument("--position-mode", action="store_true",
                       help="set Operating Mode to position control (Dynamixel 3, Feetech 0), which the backends need")
    cfg_p.add_argument("--torque-off", action="store_true",
                       help="turn torque off first where it is on (the arm goes limp: support it); without it a "
                            "servo with torque on refuses the whole configure")
    cfg_p.add_argument("--dry-run", action="store_true", help="print the plan (register, old, new) and write nothing")
    _common(cfg_p)


def _common(parser: argparse.ArgumentParser) -> None:
    with_epilog(parser, EXIT_STATUSES)
    parser.add_argument("--json", action="store_true", help="print the result (or the error) as JSON on stdout")
    parser.add_argument("--json-out", metavar="FILE", help="also write the result as JSON to FILE (atomically)")
    # -v/-q after the subcommand too (edge_vla.cli reads them; SUPPRESS keeps the values given before it)
    parser.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    parser.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


# -- argument types (syntax only: ranges depend on the servo family and are checked with the URL) ---------------
def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}: {text!r} is not an integer") from None


def _baud_list(text: str) -> list[int]:
    return [_int(part.strip(), "--baud") for part in text.split(",") if part.strip()]


def _id_pair(text: str) -> tuple[int, int]:
    old, sep, new = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"--set-id {text!r}: write OLD:NEW, e.g. --set-id 1:4")
    return _int(old, "--set-id"), _int(new, "--set-id")


def _limits(text: str) -> tuple[int, int, int]:
    servo, sep, rest = text.partition("=")
    lo, sep2, hi = rest.partition(":")
    if not (sep and sep2):
        raise argparse.ArgumentTypeError(f"--limits {text!r}: write ID=LO:HI in ticks, e.g. --limits 1=1000:3000")
    return _int(servo, "--limits"), _int(lo, "--limits"), _int(hi, "--limits")


# -- commands -------------------------------------------------------------------------------------------------
def main(args: argparse.Namespace) -> int:
    try:
        if args.motors_command == "scan":
            return _scan(args)
        return _configure(args)
    except MotorError as exc:  # ConfigureError, a malformed URL, a missing SDK
        if not args.json:
            raise  # edge_vla.cli prints it as one line on stderr, exit status 1
        print(json.dumps({"ok": False, "error": one_line(exc)}))
        return 1


def _scan(args: argparse.Namespace) -> int:
    target = parse_target(args.url)
    vendor = vendor_of(target.scheme)
    if args.all_bauds:
        bauds = [b for b in vendor.baud_values.values() if b in vendor.sdk_bauds]
    else:
        bauds = args.baud or [target.baud or DEFAULT_BAUD]
    result = scan(target.scheme, target.port, bauds=bauds, ids=target.ids, timeout_ms=args.timeout_ms,
                  latency_ms=target.latency_ms)
    report = result.to_dict()
    if not args.all_bauds:
        report["tried"]["not_tried_bauds"] = []
    if not result.servos:
        report["error"] = _nothing_found(result, args.all_bauds)
    _emit(args, report, [s.line() for s in result.servos])
    if not result.servos and not args.json:
        print(f"edge-vla motors: error: {report['error']}", file=sys.stderr)
    return 0 if result.servos else 1


def _nothing_found(result: ScanResult, all_bauds: bool) -> str:
    tried = (f"no servo answered on {result.port} at baud {', '.join(map(str, result.tried_bauds))} (ids "
             f"{id_ranges(result.tried_ids)}, {result.method})")
    if not all_bauds:
        return f"{tried}; check power and cable, or try --all-bauds"
    skipped = (f"; documented rates the SDK cannot set, not tried: {', '.join(map(str, result.unsettable_bauds))}"
               if result.unsettable_bauds else "")
    return f"{tried}{skipped}; check power, cable and the adapter (TTL vs RS-485)"


def _configure(args: argparse.Namespace) -> int:
    target = parse_target(args.url)
    vendor = vendor_of(target.scheme)
    if target.ids is None:
        raise ConfigureError(f"{args.url!r} lists no servo ids: give ids=... (the servos to configure, as they answer "
                             "now; `edge-vla motors scan` lists them)")
    req = Request(ids=target.ids, set_ids=_set_ids(args.set_id), baud=args.baud, return_delay_us=args.return_delay,
                  limits=_limit_map(args.limits), position_mode=args.position_mode, torque_off=args.torque_off)
    validate(vendor, req)  # before opening the port: bad input causes no bus traffic
    baud = target.baud or DEFAULT_BAUD
    with open_bus(target.scheme, target.port, baud, target.latency_ms) as bus:
        plan = make_plan(bus, req)
        lines = plan.lines()
        report: dict[str, Any] = {"ok": True, "dry_run": args.dry_run, "already_set": plan.empty, "port": target.port,
                                  "changes": [c.to_dict() for c in plan.changes],
                                  "torque_off": list(plan.torque_off)}
        if plan.empty:
            lines = [f"already set: nothing written on servo ids {id_ranges(req.ids)} (EEPROM wears)"]
        elif args.dry_run:
            lines = ["dry run: would write (nothing written):", *lines]
        else:
            done = apply_plan(bus, plan)
            report["written"] = [c.to_dict() for c in done]
            lines = [*lines, f"written and read back: {len(done)} register(s) on servo ids {id_ranges(req.ids)}"
                             + (f", now at {bus.baud} baud" if bus.baud != baud else "")]
    _emit(args, report, lines)
    return 0


def _set_ids(pairs: list[tuple[int, int]]) -> dict[int, int]:
    out: dict[int, int] = {}
    for old, new in pairs:
        if old in out:
            raise ConfigureError(f"--set-id {old}:{out[old]} and --set-id {old}:{new} give servo {old} two ids; "
                                 "give one")
        out[old] = new
    return out


def _limit_map(items: list[tuple[int, int, int]]) -> dict[int, tuple[int, int]]:
    out: dict[int, tuple[int, int]] = {}
    for servo, lo, hi in items:
        if servo in out:
            raise ConfigureError(f"--limits for servo {servo} given twice; give them once")
        out[servo] = (lo, hi)
    return out


def _emit(args: argparse.Namespace, report: dict[str, Any], lines: list[str]) -> None:
    if args.json_out:
        with atomic_write(args.json_out, "w") as f:
            json.dump(report, f, indent=2)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for line in lines:
            print(line)
