"""A motor backend in its own process, as the service user, driven one command at a time over stdin/stdout.

Each command is answered with one JSON line: {"ok": true, "did": cmd, "out": ...} or {"ok": false, "did": cmd,
"type": exception class name, "error": its message}. So a test can inject a fault into the emulator between two
commands and see exactly what the backend answered, while the process that holds the port stays alive."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from typing import Any

import service_user

HOST = """
import json, sys
from firmware_bridge.motors import open_device
dev = open_device(sys.argv[1], joint_limits=[(-1.6, 1.6)] * int(sys.argv[2]))
print(json.dumps({"ok": True, "did": "open"}), flush=True)
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "exit":
        break
    try:
        if cmd == "poll":
            out = [float(x) for x in dev.poll_state().positions]
        elif cmd == "arm":
            out = dev.arm()
        elif cmd == "stop":
            out = dev.stop(0)
        elif cmd == "close":
            out = dev.close()
        elif cmd == "faults":
            out = [[f.code, f.reason] for f in dev.faults]
        elif cmd == "clear":
            out = dev.clear_faults()
        elif cmd.startswith("write "):
            out = [float(x) for x in dev.write_setpoints([float(cmd.split()[1])] * len(dev.ids))]
        else:
            raise ValueError("unknown command " + cmd)
        print(json.dumps({"ok": True, "did": cmd, "out": out}), flush=True)
    except Exception as exc:
        print(json.dumps({"ok": False, "did": cmd, "type": type(exc).__name__, "error": str(exc)}), flush=True)
"""


def _start(*argv: str) -> subprocess.Popen[str]:
    """motor_helpers.run_host with a stdin to send the commands on: as the service user where we are root."""
    if service_user.why_no_service_user() is None:
        sp = service_user.service_python()
        cmd, cwd, env = [*service_user.drop(), sp.python, "-c", HOST, *argv], sp.repo, sp.environ()
    else:
        cmd, cwd, env = [sys.executable, "-c", HOST, *argv], os.getcwd(), {**os.environ, "PYTHONPATH": os.getcwd()}
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=cwd, env=env)


class ScriptedHost:
    def __init__(self, url: str, joints: int) -> None:
        self.proc = _start(url, str(joints))
        opened = self._answer(30.0)
        assert opened.get("ok"), opened

    def do(self, cmd: str, timeout: float = 20.0) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._answer(timeout)

    def _answer(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.proc.kill()
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise AssertionError(f"the host did not answer within {timeout} s: {err[-2000:]}")
        return json.loads(line)  # type: ignore[no-any-return]

    def close(self) -> None:
        """Ends the process without close(): what the backend left on the bus stays there for the test to see."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10.0)

    def __enter__(self) -> ScriptedHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
