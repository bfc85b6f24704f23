"""What the control socket server does with whatever already lies at its path, run as the service user.

Only a stale socket (one nobody answers on) may be replaced. A mistyped `--control-socket` naming a file,
a directory or a symlink must be refused with one line saying what is there, and nothing may be removed.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest
from service_user import SERVICE_GID, SERVICE_UID, needs_service_user, open_dir, python_as_service_user

START = """
import sys
from edge_vla.onboard.operator import BusOperator, ControlSocketServer, OperatorError
from edge_vla.onboard.shared import SharedBus

try:
    server = ControlSocketServer(sys.argv[1], BusOperator(SharedBus(2))).start()
except OperatorError as exc:
    print(f"refused: {exc}")
    raise SystemExit(3) from None
print("served")
server.close()
"""

NOTES = "calibration notes the operator keeps next to the robot\n"


def _own(*paths: Path) -> None:
    for p in paths:
        os.lchown(p, SERVICE_UID, SERVICE_GID)


def _stale_socket(path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(path))  # closed without unlinking: what a crashed edge-vla leaves behind


@pytest.fixture
def run_dir():
    d = open_dir("edge-vla-op-path-")
    _own(d)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@needs_service_user
def test_only_a_stale_socket_is_replaced(run_dir: Path) -> None:
    # Control: a stale socket is replaced and served (so the cases below are refused for what lies there).
    stale = run_dir / "control.sock"
    _stale_socket(stale)
    _own(stale)
    out = python_as_service_user(START, str(stale))
    assert out.returncode == 0 and out.stdout.strip() == "served", out.stdout + out.stderr

    notes = run_dir / "notes.txt"
    notes.write_text(NOTES)
    folder = run_dir / "folder"
    folder.mkdir()
    (folder / "keep").write_text(NOTES)
    link = run_dir / "link.sock"
    link.symlink_to(notes)
    _own(notes, folder, folder / "keep", link)
    cases = {"a regular file": (notes, "a regular file"), "a directory": (folder, "a directory"),
             "a symlink": (link, "a symlink")}
    wrong = []
    for case, (path, kind) in cases.items():
        out = python_as_service_user(START, str(path))
        line = out.stdout.strip()
        if out.returncode != 3 or "Traceback" in out.stderr or "\n" in line or kind not in line:
            wrong.append(f"{case}: exit {out.returncode}, {line!r}, {out.stderr.strip()[-300:]!r}")
    assert not wrong, "; ".join(wrong)
    assert notes.read_text() == NOTES and (folder / "keep").read_text() == NOTES
    assert link.is_symlink() and os.readlink(link) == str(notes)


def test_run_refuses_a_path_that_is_no_socket_before_anything_loads(tmp_path: Path) -> None:
    """`edge-vla run` checks --control-socket before it loads the bundle or opens the link: a file there is
    refused up front (not after the loop has started), and a stale socket is accepted (the control)."""
    from edge_vla.errors import ConfigError
    from edge_vla.onboard.cli import control_socket_path

    stale = tmp_path / "control.sock"
    _stale_socket(stale)
    assert control_socket_path(str(stale)) == str(stale)
    notes = tmp_path / "notes.txt"
    notes.write_text(NOTES)
    with pytest.raises(ConfigError, match="is a regular file, not a control socket"):
        control_socket_path(str(notes))
    assert notes.read_text() == NOTES
