"""Helpers for the policy-server tests: observations for the openpi-client driver, running it, /healthz."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

DRIVER = Path(__file__).with_name("openpi_driver.py")


class Obs:
    """An observation for the driver: arrays go into an .npz, the structure into JSON."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}

    def array(self, a: np.ndarray) -> dict[str, str]:
        name = f"a{len(self.arrays)}"
        self.arrays[name] = a
        return {"$array": name}


def run_client(python: Path, port: int, steps: list[dict[str, Any]], arrays: dict[str, np.ndarray], tmp: Path,
               api_key: str | None = None, timeout: float = 60) -> list[dict[str, Any]]:
    spec = _write_spec(port, steps, arrays, tmp, api_key)
    proc = subprocess.run([str(python), str(DRIVER), str(spec)], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines()]


def start_client(python: Path, port: int, steps: list[dict[str, Any]], arrays: dict[str, np.ndarray], tmp: Path,
                 api_key: str | None = None) -> subprocess.Popen[str]:
    spec = _write_spec(port, steps, arrays, tmp, api_key)
    return subprocess.Popen([str(python), str(DRIVER), str(spec)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _write_spec(port: int, steps: list[dict[str, Any]], arrays: dict[str, np.ndarray], tmp: Path,
                api_key: str | None) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="client-", dir=tmp)
    os.close(fd)
    npz = Path(name + ".npz")
    np.savez(npz, **arrays)
    spec = Path(name + ".json")
    spec.write_text(json.dumps({"uri": f"ws://127.0.0.1:{port}", "api_key": api_key, "arrays": str(npz),
                                "steps": steps}))
    return spec


def healthz(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
        assert r.status == 200
        return json.loads(r.read())
