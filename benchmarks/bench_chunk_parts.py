"""Where a tiny FP32 chunk's time goes on a CPU: each part warm, inside a chunk, and after cache eviction.

    .venv/bin/python -m pytest benchmarks/bench_chunk_parts.py -s

The tiny chunk on one thread is the prefix graph in onnxruntime, then the ten Euler steps in the C loop
(edge_vla/runtime/cpu_step.c). bench_peers.py compares the whole chunk with its floor (FLOPs at the best GEMM
rate measured in the run); this benchmark splits the gap. Each part is timed three ways, interleaved in rounds:
- warm: the part run back to back, so its weights and scratch stay in the core's caches between runs (what a
  per-kernel microbenchmark measures, and what the floor's compute term assumes);
- in a chunk: the parts in the order `Policy.infer` runs them, so each finds the other's data in the caches;
- evicted: a buffer several times the L2 written before the part (the model's data in no private cache).
"in a chunk - warm" is what the parts pay for sharing the caches: the weights (prefix ~2.6 MB, step ~1.8 MB,
FP32) do not fit one core's L2 together, so every chunk refills them. Also reported: `Policy.infer` whole, and
the per-part floor from bench_peers' roof.

Environment: BENCH_PARTS_ROUNDS (default 400), BENCH_PARTS_EVICT_MB (default 32).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
pytest.importorskip("torch")

from bench_peers import RoofMeter, graph_floor
from bench_runtime import observation

from edge_vla.runtime.policy import Policy
from edge_vla.runtime.roofline import bundle_costs

ROUNDS = int(os.environ.get("BENCH_PARTS_ROUNDS", "400"))
EVICT_BYTES = int(float(os.environ.get("BENCH_PARTS_EVICT_MB", "32")) * 2**20)
MODES = ("warm", "in a chunk", "evicted")


def part_times(policy: Policy, rounds: int, evict_bytes: int = EVICT_BYTES) -> dict[str, dict[str, float]]:
    """Median ms of the prefix, the C step loop and the whole `Policy.infer`, per mode (see the module doc).

    The modes are interleaved round by round so that load from other jobs hits them alike."""
    backend = policy.backend
    loop = getattr(backend, "cpu_step", None)
    if loop is None:
        raise RuntimeError("this Policy runs no C step loop (EDGE_VLA_CPU_STEP=off, no C compiler, or not an FP32 "
                           "tiny-style bundle): nothing to split")
    obs = observation(policy.config, 0)
    noise = np.random.default_rng(3).standard_normal(policy._noise.shape, dtype=np.float32)
    policy.infer(obs)  # the observation's inputs are in the backend's buffers from here on
    junk = np.zeros(evict_bytes // 4, np.float32)
    clock = time.perf_counter
    samples: dict[str, dict[str, list[float]]] = {m: {"prefix": [], "steps": []} for m in MODES}
    whole: list[float] = []

    def timed(fn: Callable[[], Any]) -> float:
        t0 = clock()
        fn()
        return 1e3 * (clock() - t0)

    def evict() -> None:
        np.add(junk, 1.0, out=junk)  # read and write every line of a buffer several times the L2

    def warm() -> None:
        for _ in range(3):  # the last of three back-to-back runs of each part
            p = timed(backend.run_prefix)
        for _ in range(3):
            s = timed(lambda: loop.run(noise))
        samples["warm"]["prefix"].append(p)
        samples["warm"]["steps"].append(s)

    def chunk() -> None:
        samples["in a chunk"]["prefix"].append(timed(backend.run_prefix))
        samples["in a chunk"]["steps"].append(timed(lambda: loop.run(noise)))

    def evicted() -> None:
        evict()
        samples["evicted"]["prefix"].append(timed(backend.run_prefix))
        evict()
        samples["evicted"]["steps"].append(timed(lambda: loop.run(noise)))

    def infer() -> None:
        whole.append(timed(lambda: policy.infer(obs)))

    runners = [warm, chunk, evicted, infer]
    for r in range(rounds + 20):  # 20 warm-up rounds, dropped below
        for fn in runners[r % 4:] + runners[: r % 4]:
            fn()
    out = {m: {part: float(np.median(v[20:])) for part, v in parts.items()} for m, parts in samples.items()}
    out["Policy.infer"] = {"total": float(np.median(whole[20:]))}
    return out


def test_chunk_parts(bench_exports: Callable[[str, str], Any], bench_machine: Callable[[], str]) -> None:
    bundle = bench_exports("tiny", "fp32").bundle
    policy = Policy.load(bundle, backend="onnxruntime", threads=1)
    try:
        if getattr(policy.backend, "cpu_step", None) is None:
            pytest.skip("no C step loop on this machine (no C compiler, or EDGE_VLA_CPU_STEP=off)")
        meter = RoofMeter(threads=1)
        meter.measure()
        times = part_times(policy, ROUNDS)
        roof = meter.measure()  # again after the rounds: the best rates seen in the run
        costs = bundle_costs(policy.bundle)
        steps = policy.steps
    finally:
        policy.close()
    floors = {"prefix": max(graph_floor(costs["prefix"], roof)),
              "steps": steps * max(graph_floor(costs["denoise_step"], roof))}
    chunk_floor = floors["prefix"] + floors["steps"]
    lines = ["", f"tiny fp32, 1 thread, {steps} Euler steps, {ROUNDS} interleaved rounds; {bench_machine()}",
             f"floor rates: FP32 GEMM {roof.gemm_fp32 / 1e9:.1f} GFLOP/s", "",
             "| part | floor ms | " + " | ".join(f"{m} ms (/ floor)" for m in MODES) + " |",
             "|---|---:|" + "---:|" * len(MODES)]
    for part in ("prefix", "steps"):
        cells = " | ".join(f"{times[m][part]:.3f} ({times[m][part] / floors[part]:.2f}x)" for m in MODES)
        lines.append(f"| {part} | {floors[part]:.3f} | {cells} |")
    sums = {m: times[m]["prefix"] + times[m]["steps"] for m in MODES}
    lines.append(f"| prefix + steps | {chunk_floor:.3f} | "
                 + " | ".join(f"{sums[m]:.3f} ({sums[m] / chunk_floor:.2f}x)" for m in MODES) + " |")
    total = times["Policy.infer"]["total"]
    lines += ["", f"Policy.infer whole: {total:.3f} ms = {total / chunk_floor:.2f}x the floor ({chunk_floor:.3f} ms); "
              f"1.5x the floor is {1.5 * chunk_floor:.3f} ms.",
              f"Sharing the caches costs the parts {sums['in a chunk'] - sums['warm']:+.3f} ms a chunk (in a chunk - "
              f"warm); outside the two parts (inputs, noise, outputs, Python): {total - sums['in a chunk']:+.3f} ms."]
    print("\n".join(lines))
    for m in MODES:
        assert sums[m] > 0.0 and np.isfinite(sums[m])
    assert total >= chunk_floor * 0.5, "a chunk measured at under half its floor: the floor's rates are wrong"
