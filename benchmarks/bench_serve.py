"""`edge-vla serve` round-trip overhead vs calling Policy.infer directly (issue 15).

    .venv/bin/pytest benchmarks/bench_serve.py -s --benchmark-disable-gc

Contenders, same tiny FP32 bundle, 1 intra-op thread each, same observation:
- direct: `Policy.infer(obs)` in this process (the observation already at the bundle's 64 px);
- served: a client on this machine sends the observation over a loopback websocket exactly as
  openpi-client 0.1.2 does (websockets sync client, compression off, msgpack-numpy packing) to a
  PolicyServer in a background thread, and waits for the reply: packing, the socket both ways, decoding,
  key mapping (+ resizing 224 px images to 64 px where the client sends openpi's usual 224 px), inference,
  reply encoding and unpacking.
Contenders run interleaved in each round (order rotated), so load from other jobs hits both alike. Prints
median and p90 ms per chunk, the ratio served/direct, the added milliseconds, the time per request spent
outside inference (round trip minus the server's own Policy.infer time, from the same request: immune to the
two Policy instances running at different speeds on a loaded box), and the server's per-stage medians.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

pytest.importorskip("websockets")
pytest.importorskip("msgpack")

from websockets.sync.client import connect

from edge_vla.runtime.policy import Policy
from edge_vla.runtime.types import Observation
from edge_vla.serve import codec
from edge_vla.serve.obs_map import ObservationMapper, parse_obs_map
from edge_vla.serve.server import PolicyServer, ServeOptions, ServerThread

ROUNDS = int(os.environ.get("BENCH_ROUNDS_SERVE", "40"))
BLOCK = 5  # calls per contender per round, the first untimed (it re-wakes caches after the other contender)
WARMUP = 3
CASES = [(10, 224), (10, 64), (1, 224)]  # (ODE steps, pixels the client sends)
SERVER_STAGES = ("queue_ms", "decode_ms", "map_ms", "infer_ms", "encode_ms", "total_ms")


@pytest.fixture(scope="module")
def report():
    rows: list[str] = []
    yield rows
    if rows:
        print("\n| steps | client image | direct ms (p50 / p90) | served ms (p50 / p90) | served / direct | added ms "
              "| outside inference ms (p50 / p90) |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        print("\n".join(rows))


@pytest.mark.parametrize(("steps", "pixels"), CASES)
def test_serve_overhead(steps: int, pixels: int, benchmark: Any, bench_exports: Callable[[str, str], Any],
                        bench_machine: Callable[[], str], report: list[str]) -> None:
    bundle = bench_exports("tiny", "fp32").bundle
    direct_policy = Policy.load(bundle, steps=steps, threads=1)
    served_policy = Policy.load(bundle, steps=steps, threads=1)
    cfg = direct_policy.config
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (pixels, pixels, 3), dtype=np.uint8)
    state = np.array([1.2, -0.3], dtype=np.float32)
    mapper = ObservationMapper(parse_obs_map(None, cfg.num_cameras), cfg)
    wire = {"images": {"cam0": img}, "state": state, "prompt": "reach the red block"}
    obs = Observation([mapper.to_observation(wire).images[0]], "reach the red block", state)
    direct: list[float] = []
    served: list[float] = []
    outside: list[float] = []  # per request: round trip minus the server's own Policy.infer time
    server_timing: dict[str, list[float]] = {k: [] for k in SERVER_STAGES}

    with ServerThread(PolicyServer(served_policy, mapper, ServeOptions(port=0))) as st, \
            connect(f"ws://127.0.0.1:{st.port}", compression=None, max_size=None) as ws:
        codec.decode(ws.recv(), codec.Limits())  # metadata
        packer = codec.packer()

        def run_direct(record: bool) -> None:
            for i in range(BLOCK):
                t0 = time.perf_counter()
                direct_policy.infer(obs)
                if record and i:
                    direct.append(1e3 * (time.perf_counter() - t0))

        def run_served(record: bool) -> None:
            for i in range(BLOCK):
                t0 = time.perf_counter()
                ws.send(packer.pack(wire))
                reply = codec.decode(ws.recv(), codec.Limits())
                if record and i:
                    served.append(1e3 * (time.perf_counter() - t0))
                    outside.append(served[-1] - reply["server_timing"]["infer_ms"])
                    for k in SERVER_STAGES:
                        server_timing[k].append(reply["server_timing"][k])
            assert reply["actions"].shape == (cfg.chunk_len, cfg.action_dim)

        rnd = [0]

        def one_round(record: bool = True) -> None:
            runners = [run_direct, run_served]
            k = rnd[0] % 2
            for fn in runners[k:] + runners[:k]:
                fn(record)
            rnd[0] += 1

        for _ in range(WARMUP):
            one_round(record=False)
        benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)

    d50, d90 = np.percentile(direct, [50, 90])
    s50, s90 = np.percentile(served, [50, 90])
    o50, o90 = np.percentile(outside, [50, 90])
    stages = {k: float(np.median(v)) for k, v in server_timing.items()}
    benchmark.extra_info.update(direct_p50_ms=d50, served_p50_ms=s50, ratio=s50 / d50, outside_infer_p50_ms=o50,
                                server_timing_p50=stages)
    report.append(f"| {steps} | {pixels} px | {d50:.2f} / {d90:.2f} | {s50:.2f} / {s90:.2f} | {s50 / d50:.2f}x "
                  f"| {s50 - d50:+.2f} | {o50:.2f} / {o90:.2f} |")
    print(f"\nserve {steps} steps, client sends {pixels} px: direct {d50:.2f} ms, served {s50:.2f} ms "
          f"({s50 / d50:.2f}x, {s50 - d50:+.2f} ms; outside inference {o50:.2f} ms); server medians "
          + ", ".join(f"{k[:-3]} {v:.2f}" for k, v in stages.items()) + f" ms\n  machine: {bench_machine()}")
