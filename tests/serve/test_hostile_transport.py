"""The policy server against clients that misuse the websocket itself rather than the request inside it.

Raw sockets on loopback, written frame by frame (RFC 6455: client frames are masked), so a test can do what
no well-behaved websocket library would: flood pings and never read the pongs.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from serve_helpers import healthz
from test_hostile_clients import client, good_request, infer
from websockets.sync.client import connect

from edge_vla.serve.server import ServerThread

MIB = 1024 * 1024
PING = 0x9
FLOOD_BYTES = 24 * MIB  # of pings; with the old server about as much memory, for as long as the client stays


def ws_connect(port: int, rcvbuf: int | None = None) -> socket.socket:
    """A raw websocket connection past its handshake (the server's metadata frame is left unread)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:  # before connect: a small receive window, so the server's replies pile up on its side
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    assert sock.recv(12) == b"HTTP/1.1 101", "the handshake was refused"
    return sock


def masked_frame(opcode: int, payload: bytes) -> bytes:
    """One final client frame of up to 125 bytes (a control frame's limit)."""
    assert len(payload) <= 125
    mask = os.urandom(4)
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def flood_pings(sock: socket.socket, total: int) -> int:
    """Send `total` bytes of 125-byte pings (or until the server cuts the connection); returns bytes sent."""
    batch = masked_frame(PING, b"p" * 125) * 1024
    sent = 0
    try:
        while sent < total:
            sock.sendall(batch)
            sent += len(batch)
    except OSError:  # the server closed the connection: what the fixed server does to this client
        pass
    return sent


def unread_bytes(st: ServerThread) -> list[int]:
    """Bytes each server connection has buffered for its client and not yet handed to the kernel."""
    async def sizes() -> list[int]:
        assert st.server._server is not None
        return [c.transport.get_write_buffer_size() for c in st.server._server.connections]

    assert st._loop is not None
    return asyncio.run_coroutine_threadsafe(sizes(), st._loop).result(10)


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def drain(sock: socket.socket, stop: threading.Event) -> None:
    """Read and discard whatever the server sends until told to stop: a client that reads its pongs."""
    sock.settimeout(0.2)
    while not stop.is_set():
        try:
            if not sock.recv(1 << 20):
                return
        except TimeoutError:
            continue
        except OSError:
            return


# --- pings: websockets answers each one outside ws.send()'s flow control ----------------------------------
def test_a_ping_flood_that_never_reads_its_pongs_is_cut_off_and_others_are_served(start_server, bundle2,
                                                                                   caplog) -> None:
    st = start_server(bundle2, "libero", seed=90)
    # Control: the same flood from a client that reads its pongs is kept (nothing piles up for it).
    with ws_connect(st.port) as reader:
        stop = threading.Event()
        draining = threading.Thread(target=drain, args=(reader, stop))
        draining.start()
        try:
            assert flood_pings(reader, FLOOD_BYTES) >= FLOOD_BYTES, "a client that reads its pongs was cut off"
            assert healthz(st.port)["connections"] == 1
        finally:
            stop.set()
            draining.join(10)
    assert wait_until(lambda: healthz(st.port)["connections"] == 0, 10)
    # The hostile client: a tiny receive window, and it never reads.
    with caplog.at_level(logging.WARNING), ws_connect(st.port, rcvbuf=4096) as hostile:
        flood_pings(hostile, FLOOD_BYTES)
        cut = wait_until(lambda: healthz(st.port)["connections"] == 0, 5)
        assert cut, (f"a client that never reads its pongs is still connected, the server holding "
                     f"{max(unread_bytes(st), default=0) / MIB:.1f} MiB of unread pongs for it")
    assert "never reads" in caplog.text, caplog.text
    # The server survives and serves the next client as before.
    good, _ = good_request(np.random.default_rng(7))
    with client(st.port) as (ws, _meta):
        assert infer(ws, good)["actions"].shape[0] > 0


# --- connections that never send their handshake: bounded before the client cap applies --------------------
IDLE_FLOOD = 300  # more than the server process's descriptors below, were each one kept
FD_LIMIT = 256  # the server's RLIMIT_NOFILE here; a robot's systemd service gets 1024 by default


@contextlib.contextmanager
def serve_process(bundle: Path, soft: int = FD_LIMIT, hard: int = FD_LIMIT
                  ) -> Iterator[tuple[subprocess.Popen[str], int, list[str]]]:
    """`edge-vla serve` in its own process with RLIMIT_NOFILE (soft, hard); yields it, its port and its stderr
    lines so far (read by a thread: a full pipe would block the server's logging, and so the server). On exit:
    SIGTERM, and the server must not have run out of descriptors."""
    cli = [sys.executable, "-m", "edge_vla.cli", "serve", str(bundle), "--obs-map", "libero", "--threads", "1",
           "--port", "0"]
    proc = subprocess.Popen(cli, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)))
    watchdog = threading.Timer(90, proc.kill)  # a server that never starts fails the test, not the suite
    watchdog.start()
    assert proc.stderr is not None
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)  # type: ignore[arg-type]
    reader.start()
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("edge-vla serve: listening on"), line
        yield proc, int(line.rsplit(":", 1)[1]), err
    finally:
        proc.send_signal(signal.SIGCONT)  # harmless when running; a test may have paused it
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        reader.join(timeout=10)
        watchdog.cancel()
    text = "".join(err)
    assert "Too many open files" not in text and "Traceback" not in text, text[-2000:]


def idle_flood(port: int) -> tuple[list[socket.socket], int]:
    """IDLE_FLOOD TCP connections that never send a byte; stops after 3 that cannot connect within 0.5 s."""
    idle: list[socket.socket] = []
    refused = 0
    while len(idle) < IDLE_FLOOD and refused < 3:
        try:
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=0.5))
        except OSError:  # the listen backlog full: the old server once accept() ran out of descriptors
            refused += 1
    return idle, refused


def assert_an_honest_client_is_served(port: int) -> None:
    good, _ = good_request(np.random.default_rng(8))
    with connect(f"ws://127.0.0.1:{port}", compression=None, open_timeout=10) as ws:
        ws.recv(timeout=10)  # the metadata
        assert infer(ws, good)["actions"].shape[0] > 0


def test_idle_connections_cannot_exhaust_the_servers_descriptors(bundle2) -> None:
    """TCP connections that never send a byte are not websocket clients yet, so the client cap did not count
    them: a few hundred (or a robot's 1024) took every file descriptor and no one else could connect."""
    with serve_process(bundle2) as (_proc, port, _err):
        idle, _ = idle_flood(port)
        try:
            assert_an_honest_client_is_served(port)  # it still gets in, promptly
            # The oldest idle connections were closed to make room, each told why.
            oldest = idle[0]
            oldest.settimeout(5)
            answer = oldest.recv(4096).decode("latin-1")
            assert answer.startswith("HTTP/1.1 503") and "handshake" in answer, answer
        finally:
            for sock in idle:
                sock.close()


def test_a_connect_flood_while_the_server_is_busy_fits_its_accept_queue(bundle2) -> None:
    """asyncio's default listen backlog is 100: connections the kernel completes while the event loop is busy
    (paused here with SIGSTOP) beyond that were dropped, and an honest client caught in the overflow believed
    it was connected while the server never saw it until a SYN-ACK retransmission seconds later (a CI run
    timed out in the websocket handshake). The server raises its soft descriptor limit to the hard one, as a
    systemd service's 1024 soft / 524288 hard, and sizes the backlog to it: 1024 here."""
    with serve_process(bundle2, soft=FD_LIMIT, hard=4 * 1024) as (proc, port, _err):
        proc.send_signal(signal.SIGSTOP)
        try:
            idle, refused = idle_flood(port)
        finally:
            proc.send_signal(signal.SIGCONT)
        try:
            assert refused == 0 and len(idle) == IDLE_FLOOD, (
                f"only {len(idle)} of {IDLE_FLOOD} connections completed while the server was busy: its accept "
                "queue overflowed")
            assert_an_honest_client_is_served(port)
        finally:
            for sock in idle:
                sock.close()


def test_running_out_of_descriptors_is_one_warning_line_not_a_traceback_per_connection(caplog) -> None:
    """asyncio logs a traceback for every accept() that fails with EMFILE, up to the backlog per loop tick;
    the server's handler makes that one warning line per interval, and passes anything else on."""
    from edge_vla.serve.server import _AcceptErrorLog

    passed_on: list[dict[str, object]] = []
    handler = _AcceptErrorLog(lambda _loop, context: passed_on.append(context))
    loop = asyncio.new_event_loop()
    try:
        emfile = OSError(24, "Too many open files")
        with caplog.at_level(logging.WARNING, logger="edge_vla.serve.server"):
            for _ in range(500):
                handler(loop, {"message": "socket.accept() out of system resource", "exception": emfile})
            other = {"message": "Task exception was never retrieved", "exception": RuntimeError("x")}
            handler(loop, other)
    finally:
        loop.close()
    warnings = [r for r in caplog.records if "cannot accept connections" in r.getMessage()]
    assert len(warnings) == 1 and "Too many open files" in warnings[0].getMessage()
    assert passed_on == [other]
