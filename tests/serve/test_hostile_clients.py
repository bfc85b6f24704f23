"""The policy server against hostile clients, over real websockets on loopback: malformed requests are
answered and the connection keeps serving, a decode bomb or a slow sender does not hold the one worker
that every client shares, a replayed request is just another request, and a doubled API-key header is
refused cleanly.
"""

from __future__ import annotations

import base64
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
from hostile_msgpack import deep_lists, empty_map_bomb
from serve_helpers import healthz
from websockets.sync.client import ClientConnection, connect

from edge_vla.runtime.policy import Policy
from edge_vla.runtime.types import Observation
from edge_vla.serve import codec
from edge_vla.serve.codec import Limits

PROMPT = "reach the red block"
MIB = 1024 * 1024
# How long a well-behaved request may wait for the worker while another client does its worst. An honest
# request on the tiny bundle takes a few ms; the old decode of one 4 MiB bomb held the worker ~0.5 s.
WORKER_WAIT_BOUND_MS = 250.0


def good_request(rng: np.random.Generator) -> tuple[bytes, Observation]:
    """A LIBERO observation at the bundle's own image size (so no resize) and what the policy sees."""
    img, wrist = (rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(2))
    state = rng.uniform(-1, 1, 2).astype(np.float32)
    message = codec.packb({"observation/image": img, "observation/wrist_image": wrist, "observation/state": state,
                           "prompt": PROMPT})
    return message, Observation([img, wrist], PROMPT, state)


def reference(bundle: Path, seed: int, observations: list[Observation]) -> list[np.ndarray]:
    """Policy.infer's chunks for these observations from a fresh noise stream `seed`."""
    with Policy.load(bundle, seed=seed, threads=1) as ref:
        return [ref.infer(obs).actions for obs in observations]


@contextmanager
def client(port: int, **kw: Any) -> Iterator[tuple[ClientConnection, dict[str, Any]]]:
    with connect(f"ws://127.0.0.1:{port}", compression=None, open_timeout=30, **kw) as ws:
        yield ws, codec.decode(ws.recv(timeout=30), Limits())


def infer(ws: ClientConnection, message: bytes) -> dict[str, Any]:
    ws.send(message)
    reply = ws.recv(timeout=60)
    assert isinstance(reply, bytes), reply
    return codec.decode(reply, Limits())


def refused(ws: ClientConnection, message: bytes) -> str:
    ws.send(message)
    reply = ws.recv(timeout=60)
    assert isinstance(reply, str), "a malformed request was answered with actions"
    return reply


def ndarray(dtype: str, shape: list[int], data: bytes) -> dict[bytes, Any]:
    return {b"__ndarray__": True, b"data": data, b"dtype": dtype, b"shape": shape}


# --- malformed input: answered with one line; the same connection serves the next good request ---------
def test_malformed_requests_are_answered_and_the_connection_keeps_serving(start_server, bundle2) -> None:
    st = start_server(bundle2, "libero", seed=40)
    good, obs = good_request(np.random.default_rng(1))
    fields = msgpack.unpackb(good)  # the good request's raw fields, to spoil one at a time
    state = "observation/state"
    bad = [
        (msgpack.packb(fields | {state: [[0.1], [0.2, 0.3]]}), "observation/state: expected a flat list of numbers"),
        (msgpack.packb(fields | {state: [True, 0.5]}), "observation/state: expected a flat list of numbers"),
        (msgpack.packb(fields | {state: [1e300, 0.5]}), "contains 1 NaN or Inf"),
        (msgpack.packb(fields | {state: ndarray("<f4", [2**62, 2**62, 0], b"")}), "invalid shape"),
        (msgpack.packb(fields | {state: ndarray("|O", [2], b"\0" * 16)}), "dtype '|O' is not accepted"),
        (msgpack.packb(fields | {state: ndarray("<f4", [3], b"\0" * 8)}), "carries 8 bytes"),
        (good[: len(good) // 2], "truncated"),
        (good + b"\xc0", "1 byte after the end"),
        (deep_lists(100_000), "nested deeper than"),
        (empty_map_bomb(MIB), "more than 16384 values"),
    ]
    with client(st.port) as (ws, meta):
        for message, needle in bad:
            reply = refused(ws, message)
            assert needle in reply and "\n" not in reply, reply
        actions = infer(ws, good)["actions"]
    np.testing.assert_array_equal(actions, reference(bundle2, meta["seed"], [obs])[0])
    assert healthz(st.port)["refused"] == len(bad)


# --- one worker for everyone: a hostile or slow client must not hold it ------------------------------------
def _served_while(port: int, busy: threading.Event, stop: threading.Event, rng: np.random.Generator,
                  n: int = 5) -> list[float]:
    """Wait until another client is at work (`busy`), then time `n` honest requests: the ms each waited
    for the worker (the server's queue_ms). Sets `stop` when done."""
    try:
        assert busy.wait(60), "the other client never got going"
        with client(port) as (ws, _):
            return [infer(ws, good_request(rng)[0])["server_timing"]["queue_ms"] for _ in range(n)]
    finally:
        stop.set()


def test_a_decode_bomb_does_not_hold_the_worker_for_other_clients(start_server, bundle2) -> None:
    cap = 4 * MIB
    st = start_server(bundle2, "libero", limits=Limits(max_message_bytes=cap))
    bomb = empty_map_bomb(cap - 1024)  # a 4 MiB message of empty maps: ~290 MiB and ~0.5 s to decode in full
    busy, stop, replies = threading.Event(), threading.Event(), []

    def hostile() -> None:
        with client(st.port) as (ws, _):
            ws.send(bomb)  # always one more in flight, so the worker never waits for this client's next send
            while not stop.is_set():
                ws.send(bomb)
                replies.append(ws.recv(timeout=60))
                busy.set()
            replies.append(ws.recv(timeout=60))
            assert isinstance(infer(ws, good_request(np.random.default_rng(2))[0])["actions"], np.ndarray)
            replies.append("still served")

    worker = threading.Thread(target=hostile)
    worker.start()
    waits = _served_while(st.port, busy, stop, np.random.default_rng(3))
    worker.join(120)
    assert not worker.is_alive() and replies[-1] == "still served", replies[-3:]
    assert len(replies) >= 3, "the hostile client was not sending while the honest one was served"
    assert max(waits) < WORKER_WAIT_BOUND_MS, f"honest requests waited {waits} ms for the worker"
    assert all("more than 16384 values" in r for r in replies[:-1]), replies[0]


def test_a_slow_sender_does_not_hold_the_worker(start_server, bundle2) -> None:
    st = start_server(bundle2, "libero")
    busy, stop = threading.Event(), threading.Event()
    with socket.create_connection(("127.0.0.1", st.port), timeout=10) as s:
        key = base64.b64encode(os.urandom(16)).decode()
        s.sendall(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{st.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        assert s.recv(12).startswith(b"HTTP/1.1 101")
        s.sendall(bytes([0x82, 0xFF]) + (MIB).to_bytes(8, "big") + os.urandom(4))  # a 1 MiB frame, header only

        def trickle() -> None:
            while not stop.wait(0.005):  # one byte every 5 ms: the frame would take ~90 min
                s.sendall(b"x")
                busy.set()

        sender = threading.Thread(target=trickle)
        sender.start()
        try:
            waits = _served_while(st.port, busy, stop, np.random.default_rng(4))
            assert healthz(st.port)["connections"] == 1  # the honest client has gone; the slow one is still there
        finally:
            stop.set()
            sender.join(10)
    assert max(waits) < WORKER_WAIT_BOUND_MS, f"honest requests waited {waits} ms for the worker"


# --- replay: a recorded request is answered like any other, from the connection's own noise stream ---------
def test_a_replayed_request_is_just_another_request(start_server, bundle2) -> None:
    st = start_server(bundle2, "libero", seed=60)
    good, obs = good_request(np.random.default_rng(5))
    with client(st.port) as (ws, meta):
        first = [infer(ws, good)["actions"] for _ in range(3)]  # the same bytes, three times
    with client(st.port) as (ws, meta2):
        refused(ws, good[:-1])
        again = infer(ws, good)["actions"]
    want = reference(bundle2, meta["seed"], [obs] * 3)
    for got, w in zip(first, want, strict=True):
        np.testing.assert_array_equal(got, w)
    assert not np.array_equal(first[0], first[1])  # each answer draws fresh noise; nothing is cached or re-used
    np.testing.assert_array_equal(again, reference(bundle2, meta2["seed"], [obs])[0])
    assert meta2["seed"] == meta["seed"] + 1


# --- HTTP: a doubled Authorization header ----------------------------------------------------------------
def _handshake_status(port: int, headers: list[str]) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        key = base64.b64encode(os.urandom(16)).decode()
        extra = "".join(f"{h}\r\n" for h in headers)
        s.sendall(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data and (chunk := s.recv(4096)):
            data += chunk
        deadline = time.monotonic() + 5
        while b"\r\n\r\n" in data and time.monotonic() < deadline and not data.startswith(b"HTTP/1.1 101"):
            chunk = s.recv(4096)  # the body, up to the server's close
            if not chunk:
                break
            data += chunk
    return data.decode("latin-1")


def test_a_doubled_authorization_header_is_refused_cleanly(start_server, bundle2, caplog) -> None:
    key = "k3y-" + base64.urlsafe_b64encode(os.urandom(24)).decode()
    st = start_server(bundle2, "libero", api_key=key)
    with caplog.at_level(logging.INFO):
        assert _handshake_status(st.port, [f"Authorization: Api-Key {key}"]).startswith("HTTP/1.1 101")  # control
        reply = _handshake_status(st.port, [f"Authorization: Api-Key {key}"] * 2)
        assert reply.startswith("HTTP/1.1 401"), reply.splitlines()[0]
        assert "exactly one 'Authorization: Api-Key <key>' header" in reply
        reply = _handshake_status(st.port, [f"Authorization: Api-Key {key}", "Authorization: Api-Key wrong"])
        assert reply.startswith("HTTP/1.1 401"), reply.splitlines()[0]
    tracebacks = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not tracebacks, [(r.name, r.getMessage()) for r in tracebacks]
    assert "2 Authorization headers" in caplog.text


def test_an_input_the_checks_missed_is_still_refused_and_the_connection_kept(start_server, bundle2, caplog,
                                                                              monkeypatch) -> None:
    """The net under the checks: if reading a request ever raises something other than RequestError (a
    check edge-vla lacks), the client is refused, its connection kept, and the log keeps the traceback."""
    st = start_server(bundle2, "libero", seed=80)
    good, obs = good_request(np.random.default_rng(6))
    real = st.server.mapper.to_observation
    fail_once = iter([True])

    def missed_check(request: dict[str, Any]) -> Observation:
        if next(fail_once, False):
            raise ValueError("a case no check covers")
        return real(request)

    monkeypatch.setattr(st.server.mapper, "to_observation", missed_check)
    with caplog.at_level(logging.WARNING), client(st.port) as (ws, meta):
        reply = refused(ws, good)
        actions = infer(ws, good)["actions"]
    assert "refused: the request could not be read (ValueError: a case no check covers)" in reply, reply
    np.testing.assert_array_equal(actions, reference(bundle2, meta["seed"], [obs])[0])
    assert any(r.exc_info and "request checks missed this input" in r.getMessage() for r in caplog.records)
