"""`edge-vla arm | stop | clear-faults | status`: the operator's commands to a running `edge-vla run`.

They talk to its control socket (see edge_vla.onboard.operator). `arm` sends CLEAR_FAULTS then ARM and
returns once the firmware reports ARMED; exit status 0 on success, 1 with the reason otherwise.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from edge_vla.onboard.operator import SocketOperator, default_socket_path

_COMMANDS = {"arm": "arm", "stop": "stop", "clear-faults": "clear_faults", "status": "status"}


def configure(parser: argparse.ArgumentParser) -> None:
    name = parser.prog.split()[-1]
    parser.set_defaults(operator_command=_COMMANDS.get(name, "status"))
    parser.add_argument("--socket", default=None,
                        help=f"control socket of the running loop (default {default_socket_path()}; "
                             "env EDGE_VLA_CONTROL_SOCKET)")
    parser.add_argument("--json", action="store_true", help="print the reply as JSON")


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


def main(args: argparse.Namespace) -> int:
    op = SocketOperator(args.socket)
    reply = op.call(args.operator_command)
    if args.json:
        print(json.dumps(reply, indent=2))
    elif args.operator_command == "status":
        print(format_status(reply))
    else:
        print(("ok" if reply.get("ok") else f"failed: {reply.get('error')}") + "\n" + format_status(reply["status"]))
    return 0 if args.operator_command == "status" or reply.get("ok") else 1
