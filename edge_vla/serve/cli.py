"""`edge-vla serve BUNDLE`: answer openpi-client robots (openpi's websocket protocol) from a bundle.

    edge-vla serve bundle/ --obs-map aloha,state_fit=cut                     # loopback, port 8000
    edge-vla serve bundle/ --host 0.0.0.0 --api-key-file /etc/edge-vla/api-key --obs-map libero
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
import signal
import stat
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from edge_vla.cli_flags import with_epilog
from edge_vla.serve.errors import ServeError

if TYPE_CHECKING:
    from edge_vla.serve.server import PolicyServer

log = logging.getLogger(__name__)
MIN_KEY_LEN = 16


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle directory or .tar.gz")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default loopback; any other needs --api-key-file or "
                             "--allow-remote-without-key)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (openpi's examples use 8000; 0 = any free)")
    parser.add_argument("--api-key-file", type=Path,
                        help="file holding the API key clients must send as 'Authorization: Api-Key <key>'")
    parser.add_argument("--allow-remote-without-key", action="store_true",
                        help="allow a non-loopback bind without an API key (isolated networks only)")
    parser.add_argument("--obs-map", default=None,
                        help="aloha | libero | droid | native (default) | KEY=ROLE,... (roles cameraN, state, "
                             "instruction; state_fit=exact|pad|cut|pad_or_cut); a preset may be followed by overrides")
    parser.add_argument("--prompt", default=None, help="instruction to use when a request carries none")
    parser.add_argument("--seed", type=int, default=0,
                        help="noise seed; the k-th connection (from 0) uses seed + k (default 0)")
    parser.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "tensorrt", "openvino"],
                        help="default auto: what `edge-vla tune` recorded for this bundle here, else TensorRT engines where built, else onnxruntime")
    parser.add_argument("--ov-precision", choices=["f32", "bf16"],
                        help="--backend openvino only: its arithmetic, f32 (default) or bf16 (where the CPU has it; "
                             "edge-vla tune checks it against the FP16 numerics gate)")
    parser.add_argument("--steps", type=int, default=None, help="ODE steps (default: the bundle's)")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    parser.add_argument("--max-message-mb", type=float, default=32.0,
                        help="largest request accepted, MiB (default %(default)s MiB)")
    parser.add_argument("--max-array-mb", type=float, default=16.0,
                        help="largest single array accepted, MiB (default %(default)s MiB)")
    parser.add_argument("--max-clients", type=int, default=8, help="concurrent connections accepted (default %(default)s)")
    parser.add_argument("--telemetry", default=None,
                        help="record every request's timings to FILE (.mcap with edge-vla[telemetry], else JSON lines)")
    with_epilog(parser, EXIT_STATUSES)


EXIT_STATUSES = """exit status:
  0  stopped by SIGINT/SIGTERM after serving
  1  could not start: bad arguments, an unusable bundle or API key file, a non-loopback bind without a key,
     the port in use (one line on stderr)
  2  command-line usage error"""


def read_api_key(path: Path) -> str:
    """The key from a file: one line, no spaces, at least 16 characters; warns if others may read the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ServeError(f"cannot read the API key file {path}: {exc}") from exc
    key = text.strip()
    if len(key) < MIN_KEY_LEN or any(c.isspace() for c in key):
        raise ServeError(f"the API key in {path} must be one line of at least {MIN_KEY_LEN} characters without "
                         "spaces; make one with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))' > "
                         f"{path}; chmod 600 {path}")
    if os.name == "posix" and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("API key file %s is readable by other users; chmod 600 it", path)
    return key


def main(args: argparse.Namespace) -> int:
    from edge_vla.runtime.policy import Policy
    from edge_vla.serve.codec import Limits  # the serve extra is needed from here on, not for --help
    from edge_vla.serve.obs_map import ObservationMapper, parse_obs_map
    from edge_vla.serve.server import PolicyServer, ServeOptions, check_bind

    mb = 1024 * 1024
    limits = Limits(max_message_bytes=int(args.max_message_mb * mb), max_array_bytes=int(args.max_array_mb * mb))
    options = ServeOptions(host=args.host, port=args.port,
                           api_key=read_api_key(args.api_key_file) if args.api_key_file else None,
                           allow_remote_without_key=args.allow_remote_without_key, seed=args.seed, limits=limits,
                           max_clients=args.max_clients, telemetry=args.telemetry)
    check_bind(options)  # before the (slow) bundle load
    policy = Policy.load(args.bundle, backend=args.backend, steps=args.steps, seed=args.seed, threads=args.threads,
                         precision=args.ov_precision)
    mapper = ObservationMapper(parse_obs_map(args.obs_map, policy.config.num_cameras), policy.config, args.prompt)
    server = PolicyServer(policy, mapper, options)
    raise_descriptor_limit()
    return asyncio.run(_serve(server))


def raise_descriptor_limit(ceiling: int = 65536) -> None:
    """The soft RLIMIT_NOFILE up to the hard one (at most `ceiling`), as Go's runtime does for every program:
    a systemd service starts at 1024 soft (524288 hard), and every connection is a descriptor. The server's
    own bounds (idle handshakes, clients) still keep it far below; this is headroom against a flood."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = ceiling if hard == resource.RLIM_INFINITY else min(hard, ceiling)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        log.info("descriptor limit raised from %d to %d", soft, target)


async def _serve(server: PolicyServer) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    # One line on stdout for scripts (and the tests) that start the server on port 0.
    print(f"edge-vla serve: listening on ws://{server.options.host}:{server.port}", flush=True)
    try:
        await stop.wait()
    finally:
        await server.close()
    print("edge-vla serve: stopped", file=sys.stderr)
    return 0
