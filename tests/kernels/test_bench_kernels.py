"""benchmarks/bench_kernels.py on a machine without a GPU: it says why and exits 0; its goal arithmetic."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_kernels.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_kernels", BENCH)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_skips_with_reason_without_gpu(bench: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    from edge_vla.kernels import loader

    torch = pytest.importorskip("torch")
    if loader.gpu_status()[0] and torch.cuda.is_available():
        pytest.skip("a GPU is present: the benchmark would run for real")
    assert bench.main(["--steps", "2"]) == 0
    assert "bench_kernels: skipped," in capsys.readouterr().out


def test_goals_from_rows(bench: ModuleType) -> None:
    ode = "tiny ODE 10 Euler steps"
    chunk = "tiny chunk: prefix + 10 Euler steps"
    rows = [
        (ode, "torch eager", 400.0, 0.0, 0.01, 1.0),
        (ode, "ode_step v2 in CUDA graph", 25.0, 0.0, 0.01, 16.0),
        (chunk, "torch eager, VLA.sample (time MLP per step) [max rel err 0.0e+00]", 5000.0, 0, 0, 1.0),
        (chunk, "fused kernels in a CUDA graph [MISMATCH vs torch eager: max rel err 1.0e+00]", 100.0, 0, 0, 50.0),
        (chunk, "torch CUDA graph, table expert [max rel err 1.0e-07]", 900.0, 0, 0, 5.6),
    ]
    goals = bench.summarise(rows, steps=10, graph_launch_us=2.0)
    # the floor is 10 dependent launches of 2 us (bytes/peak is far below); 25 us is 1.25x of it
    assert goals["ode_loop"]["floor_us"] == pytest.approx(20.0)
    assert goals["ode_loop"]["speedup"] == pytest.approx(16.0)
    assert goals["ode_loop"]["met"] is True
    # the mismatching variant is fastest but cannot meet the goal
    assert goals["tiny_chunk"]["best"] == "torch CUDA graph, table expert"
    assert goals["tiny_chunk"]["met"] is True
    slow = bench.summarise([(ode, "torch eager", 100.0, 0, 0.01, 1), (ode, "ode_step v2 in CUDA graph", 50.0, 0, 0.01, 2)],
                           steps=10, graph_launch_us=2.0)
    assert slow["ode_loop"]["met"] is False and "tiny_chunk" not in slow
