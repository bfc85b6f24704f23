"""The websocket policy server: openpi's protocol (openpi-client 0.1.2) in front of one edge-vla Policy.

Protocol, per connection:
    1. the client connects to ws://host:port (optionally with the header `Authorization: Api-Key <key>`);
    2. the server sends a msgpack dict of metadata (action space, chunk length, action period, model
       family and precision, the observation keys it expects, this connection's seed);
    3. each binary frame from the client is a msgpack-numpy packed observation dict; the reply is a packed
       dict {"actions": float32 [H, D] in the robot's units, "policy_timing": {...}, "server_timing": {...}};
       a text frame instead is an error naming what was wrong (openpi-client raises it as RuntimeError),
       and the connection stays open for the next request.
`GET /healthz` answers 200 with a small JSON status (no API key needed; it reveals no observations).

Connections: at most `max_clients` past their handshake (the next one gets a 503 saying so) and at most
`max_handshakes` still sending their HTTP request (when full, the oldest of those is closed with a 503: idle
TCP connections cannot take every file descriptor). A client that leaves more than 1 MiB of the server's
frames unread (a ping flood that never reads its pongs) is disconnected.

Concurrency model: one Policy instance, one worker thread. The asyncio event loop does all socket I/O for
every client; each complete request (decode, key mapping, inference, reply encoding) runs on the single
worker thread, so requests from all clients are served one at a time, in the order they arrived, and the
Policy's buffers are never shared between two requests. onnxruntime releases the GIL while it runs, so the
event loop keeps answering handshakes, pings and /healthz meanwhile. A client that disconnects mid-request
leaves nothing behind: its request finishes, the reply is dropped, and its connection entry (seed stream,
counters) is removed.

Seeds: the protocol carries none. The k-th connection accepted since the server started (k = 0, 1, ...)
draws its flow-matching noise from its own generator seeded with `--seed + k`, so its replies equal
`Policy.load(bundle, seed=seed + k).infer(obs)` on the same observations, whatever other clients do in
between. The metadata tells each client its `connection` number and `seed`.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import http
import ipaddress
import itertools
import json
import logging
import resource
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_vla import __version__
from edge_vla.bundle import MANIFEST, sha256_file
from edge_vla.errors import ObservationError, PolicyOutputError
from edge_vla.onboard.telemetry import Telemetry
from edge_vla.optional import require
from edge_vla.runtime.policy import Policy
from edge_vla.runtime.types import Observation
from edge_vla.serve import codec
from edge_vla.serve.codec import Limits
from edge_vla.serve.errors import RequestError, ServeError, clip
from edge_vla.serve.obs_map import ObservationMapper

require("websockets")
from websockets.asyncio.server import Server, ServerConnection, serve  # noqa: E402
from websockets.datastructures import Headers  # noqa: E402
from websockets.exceptions import ConnectionClosed  # noqa: E402
from websockets.http11 import Request, Response  # noqa: E402

log = logging.getLogger(__name__)

PROTOCOL = "openpi-websocket (openpi-client 0.1.2: msgpack-numpy over websockets)"
CLIENT_ERRORS = (RequestError, ObservationError, PolicyOutputError)
# Frames the server may hold for a client that does not read them. ws.send() waits while more than websockets'
# write limit (32 KiB) is buffered, so replies never come near this; only the pongs websockets writes by itself can.
MAX_UNREAD_OUTPUT_BYTES = 1024 * 1024


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (tests)
    api_key: str | None = None
    allow_remote_without_key: bool = False
    seed: int = 0
    limits: Limits = field(default_factory=Limits)
    max_clients: int = 8
    max_handshakes: int = 64  # connections still sending their HTTP request; when full the oldest is closed
    telemetry: str | None = None  # a .mcap or .jsonl file: one /serve/request record per request


@dataclass
class _Connection:
    id: int
    seed: int
    peer: Any
    rng: np.random.Generator
    requests: int = 0
    prev_total_ms: float | None = None


class _GuardedConnection(ServerConnection):
    """A websocket connection with two guards websockets lacks, each against a client that holds server
    resources without using them:

    - until its HTTP request has arrived, it is one of the server's `handshaking` connections, of which the
      server keeps at most `max_handshakes` (the oldest is closed to make room). The client cap counts only
      connections past their handshake, so a few hundred TCP connections that never sent a byte took every
      file descriptor (a systemd service has 1024) and no one else could connect;
    - it is dropped once its client leaves more than MAX_UNREAD_OUTPUT_BYTES unread. websockets answers every
      ping with a pong written straight to the transport, outside the flow control of ws.send(): a client
      that floods pings and never reads made the server buffer all the pongs (24 MiB of pings in about a
      second: 20 MiB held, for as long as the client stayed). It reads nothing, so it is told nothing: the
      connection is aborted and the server log says why.
    """

    def __init__(self, handshaking: _Handshaking, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._handshaking = handshaking

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._handshaking.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._handshaking.discard(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        unread = self.transport.get_write_buffer_size()
        if unread > MAX_UNREAD_OUTPUT_BYTES and not self.transport.is_closing():
            log.warning("dropped the connection from %s: it sends (pings?) but never reads what the server sends "
                        "back (%d bytes left unread, at most %d)", self.remote_address, unread,
                        MAX_UNREAD_OUTPUT_BYTES)
            self.transport.abort()


MAX_LISTEN_BACKLOG = 1024
ACCEPT_WARNING_INTERVAL_S = 5.0


def listen_backlog() -> int:
    """The listen backlog: how many connections the kernel completes before the event loop accepts them.

    asyncio's default, 100, overflowed under a few hundred connects arriving while the loop was busy: a client
    whose final ACK the kernel drops believes it is connected and waits seconds for a SYN-ACK retransmission.
    But asyncio also accepts up to `backlog` connections in one go before any of them can be closed as idle,
    so the backlog must leave room in the descriptor limit: a quarter of it, 16 to 1024 (the kernel caps it
    at net.core.somaxconn as well)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_LISTEN_BACKLOG
    return max(16, min(MAX_LISTEN_BACKLOG, soft // 4))


class _AcceptErrorLog:
    """The event loop's exception handler for one error it logs with a traceback for every failed accept():
    out of file descriptors (or kernel memory), asyncio pauses accepting for a second, but a flood made it log
    a 20-line traceback per queued connection, hundreds a second (a test's stderr pipe filled and blocked the
    server). One warning line every ACCEPT_WARNING_INTERVAL_S instead, with the count; anything else goes to
    the handler that was there before."""

    def __init__(self, previous: Any) -> None:
        self._previous = previous
        self._suppressed = 0
        self._last = -float("inf")

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if not (context.get("message", "").startswith("socket.accept() out of system resource")
                and isinstance(exc, OSError)):
            if self._previous is not None:
                self._previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        now = time.monotonic()
        if now - self._last < ACCEPT_WARNING_INTERVAL_S:
            self._suppressed += 1
            return
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        log.warning("cannot accept connections for a second: %s (descriptor limit %d; %d more such errors since "
                    "the last warning); idle connections are being closed", exc.strerror, soft, self._suppressed)
        self._last, self._suppressed = now, 0


class _Handshaking:
    """The connections still sending their HTTP request, oldest first, at most `limit` (event loop only).
    When full, the oldest is closed with a 503 saying why: an honest client sends its request as soon as it
    connects, so it is never the oldest for long, while idle connections cannot pile up."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._since: dict[ServerConnection, float] = {}  # insertion order: the first is the oldest

    def add(self, conn: ServerConnection) -> None:
        self._since[conn] = time.monotonic()
        if len(self._since) > self.limit:
            oldest, since = next(iter(self._since.items()))
            self.discard(oldest)
            log.warning("closed a connection from %s that sent no handshake in %.1f s: %d connections were "
                        "waiting for theirs", oldest.remote_address, time.monotonic() - since, self.limit + 1)
            oldest.transport.write(_HANDSHAKE_REFUSAL)
            oldest.transport.close()

    def discard(self, conn: ServerConnection) -> None:
        self._since.pop(conn, None)


def _handshake_refusal() -> bytes:
    body = (b"too many connections are still in their websocket handshake; this one, the oldest, was closed to "
            b"let a newer one in: send the handshake as soon as you connect\n")
    return (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)) + body


_HANDSHAKE_REFUSAL = _handshake_refusal()


class _Fatal(str):
    """An error text after which the connection is closed (a server fault, not the client's)."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(opts: ServeOptions) -> ServeOptions:
    """Loopback by default; any other address needs an API key or an explicit opt-out."""
    if not is_loopback(opts.host) and not opts.api_key and not opts.allow_remote_without_key:
        raise ServeError(
            f"refusing to serve on {opts.host!r} without an API key: anyone who reaches this port could drive "
            "the robot's policy. Pass --api-key-file FILE (clients send 'Authorization: Api-Key <key>'), or "
            "--allow-remote-without-key on an isolated network, or bind 127.0.0.1 and tunnel (ssh -L)"
        )
    return opts


class PolicyServer:
    def __init__(self, policy: Policy, mapper: ObservationMapper, options: ServeOptions | None = None) -> None:
        self.policy = policy
        self.mapper = mapper
        self.options = opts = check_bind(options or ServeOptions())
        self._auth = f"Api-Key {opts.api_key}".encode() if opts.api_key else None
        # One worker thread: requests from every client run one at a time, in arrival order.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-vla-serve-policy")
        self._packer = codec.packer()  # used on the worker thread only
        self._ids = itertools.count()
        self._connections: dict[int, _Connection] = {}
        self._served = 0
        self._refused = 0
        self._peak_connections = 0
        self._recent_ms: deque[float] = deque(maxlen=1000)
        self._stats_lock = threading.Lock()  # the worker thread writes stats, /healthz reads them
        self._server: Server | None = None
        self._handshaking = _Handshaking(opts.max_handshakes)
        self._telemetry = Telemetry(opts.telemetry)  # written on the worker thread only
        self.metadata = self._metadata()

    # --- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        lim = self.options.limits
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(_AcceptErrorLog(loop.get_exception_handler()))
        try:
            self._server = await serve(
                self._handle, self.options.host, self.options.port,
                process_request=self._process_request,
                # idle connections cannot take every descriptor; a client that never reads cannot pile up pongs
                create_connection=functools.partial(_GuardedConnection, self._handshaking),  # type: ignore[arg-type]
                max_size=lim.max_message_bytes,  # a larger frame closes the connection with 1009
                compression=None,  # no permessage-deflate: no decompression bombs, and openpi-client asks for none
                max_queue=1,  # one frame buffered per connection, then TCP back-pressure: openpi-client never pipelines,
                #   and 4 would let each connection pin ~5 x the message cap
                backlog=listen_backlog(),
            )
        except OSError as exc:
            raise ServeError(f"cannot listen on {self.options.host}:{self.options.port} ({exc}); is another server "
                             "running there? Stop it or pick another --port") from exc
        log.info("serving %s (%s, %s, %d ODE steps) on ws://%s:%d; obs map %s; seed %d; API key %s",
                 self.policy.bundle.root, self.metadata["model_family"], self.policy.precision, self.policy.steps,
                 self.options.host, self.port, self.mapper.map.name, self.options.seed,
                 "required" if self._auth else "off")

    @property
    def port(self) -> int:
        if self._server is None:
            raise ServeError("the server is not started")
        return int(next(iter(self._server.sockets)).getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self._worker.shutdown(wait=True)
        self._telemetry.close()

    def stats(self) -> dict[str, Any]:
        with self._stats_lock:
            recent = np.asarray(self._recent_ms) if self._recent_ms else None
        return {
            "status": "ok", "connections": len(self._connections), "peak_connections": self._peak_connections,
            "requests": self._served, "refused": self._refused,
            "latency_ms": None if recent is None else {
                "p50": round(float(np.percentile(recent, 50)), 3), "p99": round(float(np.percentile(recent, 99)), 3),
                "max": round(float(recent.max()), 3), "n": len(recent)},
        }

    # --- HTTP: health check, API key, client cap ---------------------------------------------------
    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        self._handshaking.discard(connection)  # its request is here: no longer an idle connection
        if request.path.split("?", 1)[0] == "/healthz":
            return _respond(http.HTTPStatus.OK, json.dumps(self.stats()) + "\n", "application/json")
        if self._auth is not None and (why := self._key_refusal(request.headers)):
            log.warning("refused %s: %s", connection.remote_address, why)
            return _respond(http.HTTPStatus.UNAUTHORIZED,
                            f"{why}: send exactly one 'Authorization: Api-Key <key>' header\n")
        if len(self._connections) >= self.options.max_clients:
            return _respond(http.HTTPStatus.SERVICE_UNAVAILABLE,
                            f"this policy server already serves {self.options.max_clients} clients\n")
        return None

    def _key_refusal(self, headers: Headers) -> str | None:
        """Why the handshake's API key is refused, or None. Exactly one Authorization header: with two, which
        one counts would be a guess (a proxy may have added one), so neither does."""
        given = headers.get_all("Authorization")  # headers.get() raises on a repeated header
        if len(given) > 1:
            return f"{len(given)} Authorization headers"
        key = (given[0] if given else "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(key, self._auth or b""):  # constant time in the key's content
            return "missing or wrong API key"
        return None

    # --- websocket ---------------------------------------------------------------------------------
    async def _handle(self, ws: ServerConnection) -> None:
        cid = next(self._ids)
        conn = _Connection(cid, self.options.seed + cid, ws.remote_address,
                           np.random.default_rng(self.options.seed + cid))
        self._connections[cid] = conn
        self._peak_connections = max(self._peak_connections, len(self._connections))
        log.info("connection %d from %s opened (seed %d)", cid, conn.peer, conn.seed)
        loop = asyncio.get_running_loop()
        try:
            await ws.send(codec.packb(self.metadata | {"connection": cid, "seed": conn.seed}))
            async for message in ws:
                arrived = time.perf_counter()
                reply = await loop.run_in_executor(self._worker, self._answer, conn, message, arrived)
                await ws.send(reply)
                conn.prev_total_ms = 1e3 * (time.perf_counter() - arrived)
                if isinstance(reply, _Fatal):
                    await ws.close(1011, "internal server error; see the previous text frame and the server log")
                    break
        except ConnectionClosed as exc:
            log.info("connection %d closed (%s)", cid, exc)
        finally:
            self._connections.pop(cid, None)
            log.info("connection %d gone after %d request(s)", cid, conn.requests)

    def _answer(self, conn: _Connection, message: bytes | str, arrived: float) -> bytes | str:
        """Decode, map, infer, encode: runs on the worker thread. Returns the reply frame."""
        clock = time.perf_counter
        t0 = clock()
        conn.requests += 1
        n = conn.requests
        try:
            obs, t1 = self._read(message)
            t2 = clock()
            self.policy.rng = conn.rng  # this connection's own noise stream
            chunk = self.policy.infer(obs)
            t3 = clock()
        except CLIENT_ERRORS as exc:
            with self._stats_lock:
                self._refused += 1
            log.warning("connection %d request %d refused: %s", conn.id, n, exc)
            self._record(conn, n, {"error": str(exc)})
            return f"edge-vla serve: request {n} refused: {exc}"
        except Exception as exc:
            with self._stats_lock:
                self._refused += 1
            log.exception("connection %d request %d: internal error", conn.id, n)
            return _Fatal(f"edge-vla serve: internal error on request {n} ({type(exc).__name__}: {exc}); "
                          "see the server log")
        pk = self._packer
        head = pk.pack_map_header(3) + pk.pack("actions") + pk.pack(chunk.actions)
        t4 = clock()
        timing = {"queue_ms": 1e3 * (t0 - arrived), "decode_ms": 1e3 * (t1 - t0), "map_ms": 1e3 * (t2 - t1),
                  "infer_ms": 1e3 * (t3 - t2), "encode_ms": 1e3 * (t4 - t3), "total_ms": 1e3 * (t4 - arrived)}
        if conn.prev_total_ms is not None:
            timing["prev_total_ms"] = conn.prev_total_ms  # the previous request, including its send
        policy_timing = {"infer_ms": chunk.timings_ms.get("total", timing["infer_ms"])}
        policy_timing |= {f"{k}_ms": v for k, v in chunk.timings_ms.items() if k != "total"}
        reply = head + pk.pack("policy_timing") + pk.pack(policy_timing) + pk.pack("server_timing") + pk.pack(timing)
        with self._stats_lock:
            self._served += 1
            self._recent_ms.append(timing["total_ms"])
        log.info("connection %d request %d: queue %.2f decode %.2f map %.2f infer %.2f encode %.2f total %.2f ms",
                 conn.id, n, timing["queue_ms"], timing["decode_ms"], timing["map_ms"], timing["infer_ms"],
                 timing["encode_ms"], timing["total_ms"])
        self._record(conn, n, {"server_timing": timing, "policy_timing": policy_timing})
        return reply

    def _read(self, message: bytes | str) -> tuple[Observation, float]:
        """Decode and map one request; returns the observation and when decoding ended. This reads the
        client's bytes and nothing else (no policy, no connection state), so whatever goes wrong here is
        answered as a refused request and the connection stays open. An exception other than RequestError
        means a check is missing: it is logged with its traceback, to be fixed, and still refused."""
        try:
            request = codec.decode(message, self.options.limits)  # type: ignore[arg-type]
            decoded = time.perf_counter()
            return self.mapper.to_observation(request), decoded
        except RequestError:
            raise
        except Exception as exc:
            log.exception("a request raised %s while being read: edge-vla's request checks missed this input "
                          "(please report it); the request is refused and the connection kept", type(exc).__name__)
            raise RequestError(f"the request could not be read ({type(exc).__name__}: {clip(str(exc), 200)})") from exc

    def _record(self, conn: _Connection, n: int, data: dict[str, Any]) -> None:
        if self._telemetry.enabled:
            self._telemetry.record("/serve/request", time.monotonic(), {"connection": conn.id, "request": n, **data})
            self._telemetry.drain(0.002)  # a little at a time; the rest at close

    def _metadata(self) -> dict[str, Any]:
        b, cfg, space = self.policy.bundle, self.policy.config, self.policy.action_space
        control = b.manifest.get("control", {})
        return {
            "server": "edge-vla", "edge_vla_version": __version__, "protocol": PROTOCOL,
            "model_family": b.manifest.get("family", "edge-vla-reference"), "model_preset": cfg.preset,
            "precision": self.policy.precision, "backend": type(self.policy.backend).__name__,
            "ode_steps": self.policy.steps, "solver": self.policy.solver,
            "bundle_manifest_sha256": sha256_file(b.root / MANIFEST),
            "action_space": space.to_dict(), "action_dim": space.dim, "chunk_len": cfg.chunk_len,
            "action_period_s": space.action_period_s, "execute_horizon": control.get("execute_horizon"),
            "observation": self.mapper.describe(),
            "reply": {"actions": f"float32 [{cfg.chunk_len}, {space.dim}] in {space.units}",
                      "timing": ["policy_timing", "server_timing"]},
        }


def _respond(status: http.HTTPStatus, body: str, content_type: str = "text/plain; charset=utf-8") -> Response:
    data = body.encode()
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(data))), ("Connection", "close")])
    return Response(status.value, status.phrase, headers, data)


class ServerThread:
    """Run a PolicyServer on its own event loop in a background thread (tests, benchmarks, embedding).

        with ServerThread(PolicyServer(policy, mapper, ServeOptions(port=0))) as st:
            ... ws://127.0.0.1:{st.port} ...
    """

    def __init__(self, server: PolicyServer, start_timeout_s: float = 30.0) -> None:
        self.server = server
        self._timeout = start_timeout_s
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="edge-vla-serve", daemon=True)

    @property
    def port(self) -> int:
        return self.server.port

    def __enter__(self) -> ServerThread:
        self._thread.start()
        if not self._ready.wait(self._timeout):
            raise ServeError(f"the policy server did not start within {self._timeout} s")
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)

    def _main(self) -> None:
        async def main() -> None:
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            try:
                await self.server.start()
            except BaseException as exc:
                self._error = exc
                self._ready.set()
                raise
            self._ready.set()
            try:
                await self._stop.wait()
            finally:
                await self.server.close()

        try:
            asyncio.run(main())
        except BaseException:
            if not self._ready.is_set():
                self._ready.set()
