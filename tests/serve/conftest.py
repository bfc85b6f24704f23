"""Fixtures for the policy-server tests: the real openpi-client in its own cached venv, small bundles for the
ALOHA (4 cameras) and LIBERO/DROID (2 cameras) layouts, in-process servers, and a client runner.

The openpi-client venv is made once from PyPI into $EDGE_VLA_CACHE_DIR (default ~/.cache/edge-vla),
keyed by the pinned requirements and the Python version, and reused by later runs (about 15 s the first
time on a 2-core box). $EDGE_VLA_OPENPI_PYTHON points the tests at an existing interpreter instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("websockets")
pytest.importorskip("msgpack")

from edge_vla.runtime.policy import Policy
from edge_vla.serve.codec import Limits
from edge_vla.serve.obs_map import ObservationMapper, parse_obs_map
from edge_vla.serve.server import PolicyServer, ServeOptions, ServerThread

# openpi-client 0.1.2 and what it resolved to on 2026-12; typing_extensions is imported by openpi-client but
# not declared in its metadata, so it is installed explicitly.
CLIENT_REQUIREMENTS = (
    "openpi-client==0.1.2",
    "typing_extensions==4.16.0",
    "numpy==1.26.4",
    "websockets==17.4",
    "msgpack==1.2.4",
    "dm-tree==0.1.10",
    "pillow==13.0.0",
)
TEST_LIMITS = Limits(max_message_bytes=2 * 1024 * 1024)  # small, so the oversize case stays cheap


def _cache_dir() -> Path:
    from firmware_bridge.native import cache_dir

    return cache_dir()


def _make_client_venv() -> Path:
    key = hashlib.sha256("\n".join((sys.version, *CLIENT_REQUIREMENTS)).encode()).hexdigest()[:12]
    venv = _cache_dir() / f"openpi-client-venv-{key}"
    python = venv / "bin" / "python"
    if python.is_file():
        return python
    # Build beside the final place, then rename: an interrupted build never leaves a half venv behind.
    staging = Path(tempfile.mkdtemp(prefix=".openpi-client-venv-", dir=venv.parent))
    try:
        subprocess.run([sys.executable, "-m", "venv", str(staging)], check=True, capture_output=True, timeout=120)
        pip = subprocess.run([str(staging / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                              *CLIENT_REQUIREMENTS], capture_output=True, text=True, timeout=600)
        if pip.returncode != 0:
            pytest.skip(f"could not install openpi-client from PyPI (offline?): {pip.stderr.strip()[-500:]}")
        with contextlib.suppress(OSError):  # OSError: another run finished first; use its venv
            os.rename(staging, venv)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return python


@pytest.fixture(scope="session")
def openpi_python() -> Path:
    env = os.environ.get("EDGE_VLA_OPENPI_PYTHON")
    return Path(env) if env else _make_client_venv()


# --- bundles -----------------------------------------------------------------------------------------
def _export(out: Path, num_cameras: int) -> Path:
    from edge_vla.config import preset
    from edge_vla.export.exporter import ExportOptions, export_model
    from edge_vla.export.model import untrained_with_live_outputs

    model = untrained_with_live_outputs(preset("tiny", num_cameras=num_cameras), seed=num_cameras)
    return export_model(model, out, ExportOptions(calib_count=8, numerics_count=2)).bundle


@pytest.fixture(scope="session")
def bundle4(tmp_path_factory) -> Path:
    """4 cameras: the ALOHA layout."""
    return _export(tmp_path_factory.mktemp("serve") / "bundle4", 4)


@pytest.fixture(scope="session")
def bundle2(tmp_path_factory) -> Path:
    """2 cameras: the LIBERO and DROID layouts."""
    return _export(tmp_path_factory.mktemp("serve") / "bundle2", 2)


# --- servers and clients -----------------------------------------------------------------------------
@pytest.fixture(scope="session")
def start_server() -> Iterator[Callable[..., ServerThread]]:
    """(bundle, obs_map, seed=, api_key=, prompt=) -> a started in-process server on a free port."""
    running: list[ServerThread] = []

    def start(bundle: Path, obs_map: str, seed: int = 0, **kw: Any) -> ServerThread:
        policy = Policy.load(bundle, seed=seed, threads=1)
        mapper = ObservationMapper(parse_obs_map(obs_map, policy.config.num_cameras), policy.config,
                                   kw.pop("prompt", None))
        st = ServerThread(PolicyServer(policy, mapper, ServeOptions(**({"port": 0, "seed": seed, "limits": TEST_LIMITS} | kw))))
        running.append(st.__enter__())
        return st

    yield start
    for st in running:
        st.__exit__(None, None, None)
