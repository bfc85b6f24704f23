"""Export figures (issue 4, "5. Benchmarks"): export wall time, graph sizes and onnxruntime graph latency.

    .venv/bin/pytest benchmarks/bench_export.py -s --benchmark-disable-gc

- export wall time per preset and precision (ExportResult.seconds: ONNX export, FP16/INT8 conversion with
  calibration, numerics check against torch, TensorRT lint, bundle write), as a ratio to FP32's;
- graph file sizes (prefix, denoise_step) per precision, as a ratio to FP32's;
- onnxruntime CPU latency of the prefix graph and of one denoise step per precision (bound buffers, as
  the runtime runs them), as a speedup over FP32 measured interleaved in the same rounds.
Presets tiny and base (randomised weights; see conftest.py for the export options). Bundles are exported
once per session. BENCH_BASE_INT8=0 leaves out the base INT8 export (~2.5 min on a loaded 2-core CPU).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")

from edge_vla.export.model import count_parameters
from edge_vla.runtime.ort_backend import OrtBackend

CPUS = os.cpu_count() or 1
BASE_INT8 = os.environ.get("BENCH_BASE_INT8", "1") != "0"
PRECISIONS = {"tiny": ["fp32", "fp16", "int8"], "base": ["fp32", "fp16", "int8"] if BASE_INT8 else ["fp32", "fp16"]}
EXPORTS = [(n, p) for n in ("tiny", "base") for p in PRECISIONS[n]]
THREADS = {"tiny": sorted({1, CPUS}), "base": [CPUS]}
LATENCY = [(n, t) for n in ("tiny", "base") for t in THREADS[n]]
# Rounds; per round each precision runs the prefix `block` times and the step 5 * `block` times back to back
# (the first call of a block untimed where block > 1: it re-wakes the thread pool after the other sessions ran).
ROUNDS = {"tiny": 10, "base": 5}
BLOCK = {"tiny": 6, "base": 2}
GRAPHS = ("prefix", "denoise_step")


@pytest.fixture(scope="module")
def tables(bench_machine: Callable[[], str],
           bench_export_opts: dict[str, dict[str, int]]) -> Iterator[dict[str, list[Any]]]:
    data: dict[str, list[Any]] = {"export": [], "latency": []}
    yield data

    lines = ["", f"machine: {bench_machine()} (shared cores: other jobs ran alongside)"]
    exports = {(n, p): r for n, p, r, _ in data["export"]}
    if exports:
        lines += ["", "| preset | params | precision | export s | x fp32 export time | calib / numerics obs |",
                  "|---|---:|---|---:|---:|---|"]
        for n, p, r, params in data["export"]:
            ref = exports.get((n, "fp32"))
            ratio = f"{r.seconds / ref.seconds:.2f}x" if ref else "n/a"
            opts = bench_export_opts[n]
            calib = f"{opts['calib_count']} / {opts['numerics_count']}" if p == "int8" else f"- / {opts['numerics_count']}"
            lines.append(f"| {n} | {params / 1e6:.2f}M | {p} | {r.seconds:.1f} | {ratio} | {calib} |")
        lines += ["", "| preset | precision | prefix MB | denoise_step MB | total MB | x fp32 size |",
                  "|---|---|---:|---:|---:|---:|"]
        for n, p, r, _ in data["export"]:
            ref = exports.get((n, "fp32"))
            total = sum(r.sizes[g] for g in GRAPHS)
            ratio = f"{total / sum(ref.sizes[g] for g in GRAPHS):.3f}x" if ref else "n/a"
            lines.append(f"| {n} | {p} | {r.sizes['prefix'] / 1e6:.2f} | {r.sizes['denoise_step'] / 1e6:.2f} | "
                         f"{total / 1e6:.2f} | {ratio} |")
    if data["latency"]:
        lines += ["", "onnxruntime CPU latency per graph call (ms), speedup = fp32 median / this median:", "",
                  "| preset | threads | precision | prefix median | prefix p90 | prefix speedup | step median "
                  "| step p90 | step speedup |", "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
        for n, threads, results in data["latency"]:
            ref = results["fp32"]
            for p, r in results.items():
                cells = []
                for g in GRAPHS:
                    med, p90 = np.median(r[g]), np.percentile(r[g], 90)
                    cells += [f"{med:.2f}", f"{p90:.2f}", f"{np.median(ref[g]) / med:.2f}x"]
                lines.append(f"| {n} | {threads} | {p} | " + " | ".join(cells) + " |")
    print("\n".join(lines))


@pytest.mark.parametrize(("name", "precision"), EXPORTS, ids=[f"{n}-{p}" for n, p in EXPORTS])
def test_export(name: str, precision: str, benchmark: Any, bench_models: Callable[[str], Any],
                bench_exports: Callable[[str, str], Any], tables: dict[str, list[Any]]) -> None:
    result = benchmark.pedantic(lambda: bench_exports(name, precision), rounds=1, iterations=1)
    assert result.numerics.passed
    benchmark.extra_info.update(export_s=result.seconds, sizes=result.sizes)
    tables["export"].append((name, precision, result, count_parameters(bench_models(name))))
    print(f"\n{name} {precision}: export {result.seconds:.1f} s, graphs "
          + ", ".join(f"{g} {b / 1e6:.2f} MB" for g, b in result.sizes.items()))


def _fill(backend: OrtBackend, seed: int = 0) -> None:
    """Realistic-range inputs in the bound buffers; prefix_kv comes from running the prefix once."""
    rng = np.random.default_rng(seed)
    buf = backend.buf
    buf["images"][...] = rng.random(buf["images"].shape)
    buf["tokens"][...] = rng.integers(2, 258, buf["tokens"].shape)
    buf["state"][...] = rng.standard_normal(buf["state"].shape)
    backend.run_prefix()
    buf["x_t"][...] = rng.standard_normal(buf["x_t"].shape)
    for name in ("t", "time_cond"):  # the step graph's time input: scalar t or a time-table row
        if name in buf:
            buf[name][...] = 0.5


@pytest.mark.parametrize(("name", "threads"), LATENCY, ids=[f"{n}-{t}thr" for n, t in LATENCY])
def test_graph_latency(name: str, threads: int, benchmark: Any, bench_exports: Callable[[str, str], Any],
                       tables: dict[str, list[Any]]) -> None:
    backends = {}
    for p in PRECISIONS[name]:
        root = bench_exports(name, p).bundle
        backends[p] = OrtBackend(root / "graphs/prefix.onnx", root / "graphs/denoise_step.onnx", threads=threads,
                                 providers=["CPUExecutionProvider"])
        _fill(backends[p])
    results: dict[str, dict[str, list[float]]] = {p: {g: [] for g in GRAPHS} for p in backends}
    block = BLOCK[name]
    order = list(backends)
    rnd = [0]

    def timed(fn: Callable[[], None], out: list[float], n: int) -> None:
        for i in range(n):
            t0 = time.perf_counter()
            fn()
            if i or n == 1:
                out.append(1e3 * (time.perf_counter() - t0))

    def one_round() -> None:
        k = rnd[0] % len(order)  # rotate the order so that no precision always runs first
        for p in order[k:] + order[:k]:
            timed(backends[p].run_prefix, results[p]["prefix"], block)
            timed(backends[p].run_step, results[p]["denoise_step"], 5 * block)
        rnd[0] += 1

    one_round()  # warm-up
    for r in results.values():
        for v in r.values():
            v.clear()
    benchmark.pedantic(one_round, rounds=ROUNDS[name], iterations=1)
    tables["latency"].append((name, threads, results))
    benchmark.extra_info.update({p: {g: float(np.median(v)) for g, v in r.items()} for p, r in results.items()})
