"""The emulator in its own process, so a test can kill the host side (or the emulator) for real."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from firmware_bridge.errors import BridgeError


def read_events(path: str | Path) -> list[dict]:
    """Events written so far by an emulator's --events file (a partial last line is skipped)."""
    out = []
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


class EmulatorProcess:
    """`python -m firmware_bridge.emulator` on a pty behind a stable symlink; `.port` is that path.

    Extra keyword arguments become command-line options (heartbeat_timeout_ms=50 -> --heartbeat-timeout-ms 50).
    Fault injection (drop_next, inject_garbage, corrupt_alternate, replay, block_joint, step_time_back,
    set_enable) and set_position (place a disarmed arm between episodes) go as JSON lines to the child's stdin; each call returns once the emulator's loop has
    applied it (its `control` event is in the events file) and raises BridgeError if it was refused.
    """

    def __init__(self, joints: int = 2, startup_timeout: float = 20.0, **options: object) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="fw-emu-")
        self.port = str(Path(self._dir.name) / "tty")
        self.events_path = Path(self._dir.name) / "events.jsonl"
        # --parent-pid: a host killed with SIGKILL takes its emulator with it (PR_SET_PDEATHSIG and a poll)
        self.args = [sys.executable, "-m", "firmware_bridge.emulator", "--pty", "--pty-link", self.port, "--print-path",
                     "--joints", str(joints), "--events", str(self.events_path), "--control-stdin",
                     "--parent-pid", str(os.getpid())]
        for key, value in options.items():
            if value is True:
                self.args.append(f"--{key.replace('_', '-')}")
            elif value not in (None, False):
                self.args += [f"--{key.replace('_', '-')}", str(value)]
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> EmulatorProcess:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                             env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        self.log_path = Path(self._dir.name) / "emulator.log"
        with open(self.log_path, "w") as log:  # a file, not a pipe: a full pipe would stall the emulator
            self.proc = subprocess.Popen(self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                         text=True, env=env)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], self.startup_timeout)
        line = self.proc.stdout.readline().strip() if ready else ""
        if line != self.port:
            self.stop()
            err = self.log_path.read_text()
            raise BridgeError(f"emulator did not start (printed {line!r}); command: {' '.join(self.args)}\n{err}")
        return self

    def events(self) -> list[dict]:
        return read_events(self.events_path)

    def wait_event(self, name: str, timeout: float = 5.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ev in self.events():
                if ev["event"] == name:
                    return ev
            time.sleep(0.01)
        raise TimeoutError(f"no {name!r} event from the emulator within {timeout} s; events: {self.events()}")

    # ---- fault injection (see Emulator for what each does) ----
    def control(self, cmd: str, timeout: float = 5.0, **args: object) -> dict:
        """Send one injection command and wait until the emulator applied it; returns its `control` event."""
        assert self.proc is not None and self.proc.stdin is not None, "start() the emulator first"
        seen = sum(1 for e in self.events() if e["event"] == "control")
        self.proc.stdin.write(json.dumps({"cmd": cmd, "args": args}) + "\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = [e for e in self.events() if e["event"] == "control"]
            if len(done) > seen:
                ev = done[seen]
                if not ev.get("ok"):
                    raise BridgeError(f"emulator refused {cmd}({args}): {ev.get('error')}")
                return ev
            time.sleep(0.005)
        raise BridgeError(f"emulator did not apply {cmd}({args}) within {timeout} s; log: {self.log_path}")

    def drop_next(self, msg_type: str | int, n: int = 1) -> dict:
        return self.control("drop_next", msg_type=_type_arg(msg_type), n=n)

    def inject_garbage(self, data: bytes) -> dict:
        return self.control("inject_garbage", data=bytes(data).hex())

    def corrupt_alternate(self, n: int) -> dict:
        return self.control("corrupt_alternate", n=n)

    def replay(self, msg_type: str | int, which: str = "oldest") -> dict:
        return self.control("replay", msg_type=_type_arg(msg_type), which=which)

    def block_joint(self, joint: int, blocked: bool = True) -> dict:
        return self.control("block_joint", joint=joint, blocked=blocked)

    def step_time_back(self, seconds: float) -> dict:
        return self.control("step_time_back", seconds=seconds)

    def set_enable(self, asserted: bool) -> dict:
        return self.control("set_enable", asserted=bool(asserted))

    def set_position(self, positions: object) -> dict:
        """Place the disarmed arm's joints at `positions` (refused while torque is on)."""
        return self.control("set_position", positions=[float(x) for x in positions])  # type: ignore[attr-defined]

    def safety_report(self) -> dict:
        from firmware_bridge.injection import safety_report

        return safety_report(self.events())

    def unplug(self) -> None:
        """Close the pty now and reopen it after --unplug-for seconds (SIGUSR1)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGUSR1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            for stream in (self.proc.stdin, self.proc.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()

    def __enter__(self) -> EmulatorProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._dir.cleanup()


def _type_arg(msg_type: str | int) -> str | int:
    """A message type as JSON: its name (an IntEnum member is sent by name)."""
    return getattr(msg_type, "name", msg_type)
