"""`edge-vla arm | stop | clear-faults | status`: the operator's commands to a running `edge-vla run`.

They talk to its control socket (see edge_vla.onboard.operator). `arm` sends CLEAR_FAULTS then ARM and
returns once the firmware reports ARMED; exit status 0 on success, 1 with the reason otherwise.

Every failure to get an answer (no socket, no permission, no answer in time, a reply that is not an
edge-vla reply, a refusal) ends with exit status 1 and one line: on stderr, or under `--json` as
{"ok": false, "error": "..."} on stdout, so that scripts always get JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from edge_vla.cli_flags import DeprecatedAlias, with_epilog
from edge_vla.files import one_line
from edge_vla.onboard.operator import DEFAULT_SOCKET, SOCKET_ENV, OperatorError, SocketOperator

EXIT_STATUSES = """exit status:
  0  done (status: the loop answered; arm: the firmware reports ARMED; stop/clear-faults: acknowledged)
  1  no answer (not running, no permission, timeout, not an edge-vla reply) or refused: one line on stderr,
     or {"ok": false, "error": ...} on stdout with --json
  2  bad arguments (as JSON on stdout with --json)"""

_COMMANDS = {"arm": "arm", "stop": "stop", "clear-faults": "clear_faults", "status": "status"}


def configure(parser: argparse.ArgumentParser) -> None:
    name = parser.prog.split()[-1]
    parser.set_defaults(operator_command=_COMMANDS.get(name, "status"))
    parser.add_argument("--control-socket", default=None, metavar="PATH",
                        help=f"control socket of the running loop (default: ${SOCKET_ENV} if set, else {DEFAULT_SOCKET} "
                             "(the service), else this user's bench socket $XDG_RUNTIME_DIR/edge-vla/control.sock "
                             "or /tmp/edge-vla-UID/control.sock, as `edge-vla run` chose it)")
    # Deprecated: scripts rely on the one-line contract, so the notice goes to a terminal only.
    parser.add_argument("--socket", dest="control_socket", action=DeprecatedAlias, new="--control-socket",
                        tty_only=True, help="deprecated spelling of --control-socket")
    parser.add_argument("--timeout", type=_positive_seconds, default=10.0,
                        help="seconds to wait for the answer in all (default %(default)s s; an arm takes up to 5 s)")
    parser.add_argument("--json", action="store_true", help="print the reply (or the error) as JSON on stdout")
    with_epilog(parser, EXIT_STATUSES)
    _json_usage_errors(parser)


def _json_usage_errors(parser: argparse.ArgumentParser) -> None:
    """Under --json a usage error is JSON too (exit 2), so that scripts always get JSON."""
    seen: list[str] = []
    parse_known = parser.parse_known_args

    def remember(args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None) -> Any:
        seen[:] = list(sys.argv[1:] if args is None else args)
        return parse_known(args, namespace)

    def error(message: str) -> NoReturn:
        if "--json" in seen:
            print(json.dumps({"ok": False, "error": one_line(f"{parser.prog}: {message}")}))
            raise SystemExit(2)
        argparse.ArgumentParser.error(parser, message)

    parser.parse_known_args = remember  # type: ignore[method-assign]
    parser.error = error  # type: ignore[method-assign]


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def format_status(s: dict[str, Any]) -> str:
    fw = s.get("firmware") or {}
    trip = s.get("trip")
    lines = [
        f"phase     {s['phase']}{' (armed)' if s['armed'] else ''}",
        f"firmware  {fw.get('mode', 'unknown')}" + (f", faults {', '.join(fw['faults'])}" if fw.get("faults") else ""),
        "last trip " + ("none" if trip is None else f"category {trip['category']} {trip['kind']}"),
    ]
    if fw.get("enable_required"):
        lines.append(f"enable    {'asserted' if fw.get('enable_input') else 'NOT asserted (arming is refused)'}")
    if s.get("last_arm"):
        lines.append(f"last arm  {s['last_arm']}")
    if s.get("worker_errors"):
        lines.append(f"inference errors {s['worker_errors']}")
    return "\n".join(lines)


def _status_of(reply: dict[str, Any], cmd: str, path: str) -> dict[str, Any]:
    """The status dict in a reply, checked enough to print: OperatorError if the server refused or garbled it."""
    status = reply if cmd == "status" else reply.get("status")
    if cmd == "status" and reply.get("ok") is False:  # a status is answered with the status itself, or refused
        raise OperatorError(f"the control loop refused {cmd!r}: {one_line(reply.get('error'))}")
    if cmd != "status" and not isinstance(reply.get("ok"), bool):
        raise OperatorError(f"the reply to {cmd!r} from {path} has no \"ok\": is that an edge-vla control socket?")
    if not isinstance(status, dict):
        if cmd != "status" and reply["ok"] is False:  # refused before reaching the loop (busy, malformed)
            raise OperatorError(f"{cmd} failed: {one_line(reply.get('error'))}")
        raise OperatorError(f"the reply to {cmd!r} from {path} has no status: is that an edge-vla control socket?")
    try:
        format_status(status)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise OperatorError(f"the status from {path} is malformed ({type(exc).__name__}: {one_line(exc)}): is "
                            "that an edge-vla control socket of this version?") from None
    return status


def main(args: argparse.Namespace) -> int:
    op = SocketOperator(args.control_socket, timeout=args.timeout)
    cmd = args.operator_command
    try:
        reply = op.call(cmd)
        status = _status_of(reply, cmd, op.path)
    except OperatorError as exc:
        if not args.json:
            raise  # edge_vla.cli prints it as one line on stderr, exit status 1
        print(json.dumps({"ok": False, "error": one_line(exc)}))
        return 1
    if args.json:
        print(json.dumps(reply, indent=2))
    elif cmd == "status":
        print(format_status(status))
    else:
        print(("ok" if reply["ok"] else f"failed: {one_line(reply.get('error'))}") + "\n" + format_status(status))
    return 0 if cmd == "status" or reply["ok"] else 1
