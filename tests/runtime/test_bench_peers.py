"""benchmarks/bench_peers.py's parts that its figures rest on: the floor arithmetic, the machine
microbenchmarks, and the plain onnxruntime / OpenVINO loops producing the runtime's chunk for the same noise;
and benchmarks/bench_chunk_parts.py's split of a chunk into its parts."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from edge_vla.runtime.policy import Policy
from edge_vla.runtime.roofline import GraphCost
from edge_vla.runtime.types import Observation

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"


def _load_bench(name: str) -> ModuleType:
    pytest.importorskip("onnx")
    sys.path.insert(0, str(BENCH_DIR))  # the benchmarks import each other (bench_runtime's baseline) from their folder
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH_DIR / f"{name}.py")
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses resolve their annotations through sys.modules
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH_DIR))
        sys.modules.pop(name, None)
    return module


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return _load_bench("bench_peers")


def _obs(seed: int = 0) -> Observation:
    rng = np.random.default_rng(seed)
    return Observation(images=[rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)], instruction="reach the red block",
                       state=rng.standard_normal(2).astype(np.float32))


def test_floor_arithmetic(bench: ModuleType) -> None:
    roof = bench.Roof(threads=1, gemm_fp32=1e11, gemm_int8=4e11, bandwidth=lambda nbytes: 1e10)
    costs = {"prefix": GraphCost(flops=2e9, weight_bytes=900_000, io_bytes=100_000, precision="fp32"),
             "denoise_step": GraphCost(flops=1e7, weight_bytes=4_000_000, io_bytes=0, precision="fp32")}
    # prefix: 2e9 / 1e11 = 20 ms compute vs 1e6 / 1e10 = 0.1 ms memory; step: 0.1 ms compute vs 0.4 ms memory
    floor = bench.chunk_floor(costs, steps=10, roof=roof)
    assert floor.ms == pytest.approx(20.0 + 10 * 0.4)
    assert floor.compute_ms == pytest.approx(20.0 + 10 * 0.1)
    assert floor.memory_ms == pytest.approx(0.1 + 10 * 0.4)
    assert floor.bound == "compute"
    # heun: two step-graph runs per step
    assert bench.chunk_floor(costs, steps=10, roof=roof, evals_per_step=2).ms == pytest.approx(20.0 + 20 * 0.4)
    # INT8 graphs compute at the INT8 rate; the bandwidth is asked for at the graph's own footprint
    seen: list[int] = []
    roof8 = bench.Roof(1, 1e11, 4e11, lambda n: seen.append(n) or 1e10)
    int8 = {"prefix": GraphCost(4e9, 10**6, 0, "int8"), "denoise_step": GraphCost(0.0, 3 * 10**6, 0, "int8")}
    f8 = bench.chunk_floor(int8, steps=2, roof=roof8)
    assert f8.ms == pytest.approx(10.0 + 2 * 0.3) and f8.bound == "compute"
    assert sorted(set(seen)) == [10**6, 3 * 10**6]


def test_measure_roof_is_positive_and_finite(bench: ModuleType) -> None:
    roof = bench.measure_roof(threads=1, budget_s=0.002, dram_bytes=64 << 20)
    assert roof.gemm_fp32 > 1e8 and np.isfinite(roof.gemm_fp32)  # any CPU does > 0.1 GFLOP/s
    assert roof.gemm_int8 >= roof.gemm_fp32
    assert 1e8 < roof.bandwidth(1 << 20) < 1e13
    assert roof.detail["copy bandwidth DRAM"] == roof.detail["copy bandwidth 64 MiB"] > 1e8


@pytest.mark.parametrize(("fixture", "steps"), [("tiny_bundle", 10), ("tiny_bundle", 2), ("tiny_bundle_scalar_t", 3)])
def test_plain_onnxruntime_loop_is_the_runtime_chunk(bench: ModuleType, request: pytest.FixtureRequest,
                                                     fixture: str, steps: int) -> None:
    bundle: Path = request.getfixturevalue(fixture)  # time table (10 and 2 steps) and scalar t
    obs = _obs()
    with Policy.load(bundle, steps=steps, threads=1, seed=7) as policy:
        want = policy.infer(obs).actions
        shape = policy.contract.x_t.shape
    plain = bench.PlainLoop(bundle, steps, lambda p: bench.ort_runner(p, 1))
    np.testing.assert_allclose(plain.chunk(obs, bench.policy_noise(7, shape)), want, rtol=1e-5, atol=1e-5)
    # the check can fail: other noise gives another chunk
    assert not np.allclose(plain.chunk(obs, bench.policy_noise(8, shape)), want, rtol=1e-5, atol=1e-5)


def test_openvino_f32_loop_is_the_runtime_chunk(bench: ModuleType, tiny_bundle: Path) -> None:
    pytest.importorskip("openvino", reason="optional: pip install 'edge-vla[bench-peers]'")
    obs = _obs(1)
    with Policy.load(tiny_bundle, steps=10, threads=1, seed=5) as policy:
        want = policy.infer(obs).actions
        shape = policy.contract.x_t.shape
    plain = bench.PlainLoop(tiny_bundle, 10, lambda p: bench.openvino_runner(p, 1, "f32"))
    np.testing.assert_allclose(plain.chunk(obs, bench.policy_noise(5, shape)), want, rtol=1e-4, atol=1e-4)


def test_tuned_default_row_runs_what_tune_chose(bench: ModuleType, tiny_bundle: Path, tmp_path: Path) -> None:
    """The "edge-vla tuned default" row: tune into a fresh state dir, then Policy.load with no backend."""
    from edge_vla.runtime.compare import Metrics

    policy, label, gate = bench.tuned_default(tiny_bundle, 10, 1, tmp_path)
    with policy:
        record = json.loads(next((tmp_path / "tune").glob("*.json")).read_text())
        chose = f"{record['choice']['backend']} {record['choice']['precision']}"
        assert f"tune chose {chose}" in label
        assert f"{policy.backend.name} {getattr(policy.backend, 'precision', policy.precision)}" == chose
        got = policy.infer(_obs(2)).actions
    with Policy.load(tiny_bundle, backend="onnxruntime", steps=10, threads=1, seed=bench.SEED) as reference:
        want = reference.infer(_obs(2)).actions
    assert Metrics.of(want, got).within(gate)


def test_openvino_backend_rows(bench: ModuleType) -> None:
    from edge_vla.runtime.ov_backend import bf16_supported

    rows = dict(bench.openvino_backend_precisions())
    assert rows["f32"] == "" and (rows["bf16"] == "") == bf16_supported()


def test_chunk_parts_splits_a_chunk_and_refuses_without_the_c_loop(tiny_bundle: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_vla.runtime.cpu_step import CPU_STEP_ENV

    parts = _load_bench("bench_chunk_parts")
    with Policy.load(tiny_bundle, backend="onnxruntime", threads=1) as policy:
        if policy.backend.cpu_step is None:
            pytest.skip("no C step loop here (no C compiler)")
        times = parts.part_times(policy, rounds=3, evict_bytes=1 << 20)
        assert set(times) == {*parts.MODES, "Policy.infer"}
        for mode in parts.MODES:
            assert set(times[mode]) == {"prefix", "steps"}
            assert all(0.0 < t < 1e4 for t in times[mode].values()), times
        assert 0.0 < times["Policy.infer"]["total"] < 1e4
    monkeypatch.setenv(CPU_STEP_ENV, "off")  # control: no C loop, nothing to split, and it says so
    with Policy.load(tiny_bundle, backend="onnxruntime", threads=1) as policy, \
            pytest.raises(RuntimeError, match="runs no C step loop"):
        parts.part_times(policy, rounds=1)
