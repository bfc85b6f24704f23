"""The control socket's path appears only once the socket accepts connections.

bind() creates the path; listen() comes after. A client that saw the path in between was refused
(ECONNREFUSED) and told "edge-vla is not running here", and a second start probing it then took it for a
stale socket and removed it (a CI run of the suite hit the first while waiting for a run to come up). The
server binds a temporary name, listens, and then links the real path into place.
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from edge_vla.onboard.operator import BusOperator, ControlSocketServer, OperatorError, SocketOperator
from edge_vla.onboard.shared import SharedBus


@pytest.fixture
def sock_dir(tmp_path: Path) -> Path:
    d = tmp_path / "run"
    d.mkdir()
    return d


def test_the_path_appears_only_once_the_socket_listens(sock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = sock_dir / "control.sock"
    at_listen: list[bool] = []
    real = socket.socket

    class Watching(real):  # type: ignore[misc, valid-type]
        def listen(self, *args: int) -> None:
            if self.family == socket.AF_UNIX:
                at_listen.append(os.path.lexists(path))
            super().listen(*args)

    monkeypatch.setattr(socket, "socket", Watching)
    server = ControlSocketServer(path, BusOperator(SharedBus(2))).start()
    monkeypatch.undo()
    try:
        assert at_listen == [False], "the control socket's path existed before it listened"
        # Control: the path is there now, a socket of mode 0660, and it answers; no temporary name is left.
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
        assert SocketOperator(path, timeout=5).status()["armed"] is False
        assert sorted(p.name for p in sock_dir.iterdir()) == ["control.sock"]
    finally:
        server.close()
    assert not path.exists()


def test_a_second_server_on_a_live_path_is_refused_and_leaves_the_first_serving(sock_dir: Path) -> None:
    path = sock_dir / "control.sock"
    first = ControlSocketServer(path, BusOperator(SharedBus(2))).start()
    try:
        with pytest.raises(OperatorError, match="another edge-vla is serving"):
            ControlSocketServer(path, BusOperator(SharedBus(2))).start()
        assert SocketOperator(path, timeout=5).status()["armed"] is False
        assert sorted(p.name for p in sock_dir.iterdir()) == ["control.sock"]
    finally:
        first.close()


def test_a_path_too_long_for_a_temporary_name_is_still_served(tmp_path: Path) -> None:
    """AF_UNIX paths are at most 107 bytes: a path that fits where its temporary name would not is bound
    directly, as before."""
    room = 107 - len(os.fsencode(tmp_path)) - len("/") - len("/s")
    if room < 1:
        pytest.skip("tmp_path is too long for this test")
    d = tmp_path / ("d" * min(room, 255))
    d.mkdir()
    path = d / "s"
    assert len(os.fsencode(path)) == 107  # the longest that binds; "." + the pid in its place would not
    server = ControlSocketServer(path, BusOperator(SharedBus(2))).start()
    try:
        assert SocketOperator(path, timeout=5).status()["armed"] is False
    finally:
        server.close()
