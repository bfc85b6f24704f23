"""The emulator in its own process, so a test can kill the host side (or the emulator) for real."""

from __future__ import annotations

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
    """

    def __init__(self, joints: int = 2, startup_timeout: float = 20.0, **options: object) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="fw-emu-")
        self.port = str(Path(self._dir.name) / "tty")
        self.events_path = Path(self._dir.name) / "events.jsonl"
        self.args = [sys.executable, "-m", "firmware_bridge.emulator", "--pty", "--link", self.port, "--print-path",
                     "--joints", str(joints), "--events", str(self.events_path)]
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
            self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
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
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> EmulatorProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._dir.cleanup()
