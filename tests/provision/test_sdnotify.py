"""sd_notify over a real AF_UNIX datagram socket, as systemd would receive it."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from edge_vla.provision import sdnotify


@pytest.fixture
def listener(tmp_path: Path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    sock.bind(str(path))
    sock.settimeout(2)
    yield sock, str(path)
    sock.close()


def test_ready_watchdog_stopping_arrive_as_datagrams(listener):
    sock, path = listener
    with sdnotify.Notifier({"NOTIFY_SOCKET": path}) as n:
        assert n.enabled
        assert n.ready("warm")
        assert n.watchdog()
        assert n.stopping()
        assert n.status("running at 50 Hz")
    got = [sock.recv(4096).decode() for _ in range(4)]
    assert got == ["READY=1\nSTATUS=warm", "WATCHDOG=1", "STOPPING=1", "STATUS=running at 50 Hz"]


def test_abstract_namespace_socket():
    name = f"edge-vla-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    try:
        assert sdnotify.notify("READY=1", env={"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(64) == b"READY=1"
    finally:
        sock.close()


def test_outside_systemd_is_a_noop():
    assert sdnotify.notify("READY=1", env={}) is False
    n = sdnotify.Notifier({})
    assert not n.enabled and n.watchdog() is False


def test_vanished_socket_does_not_raise(tmp_path: Path):
    assert sdnotify.notify("WATCHDOG=1", env={"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}) is False


def test_watchdog_interval_is_half_of_watchdogsec():
    assert sdnotify.watchdog_interval_s({"WATCHDOG_USEC": "2000000"}) == 1.0
    assert sdnotify.watchdog_interval_s({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}) == 1.0
    assert sdnotify.watchdog_interval_s({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}) is None
    assert sdnotify.watchdog_interval_s({}) is None
    assert sdnotify.watchdog_interval_s({"WATCHDOG_USEC": "junk"}) is None
