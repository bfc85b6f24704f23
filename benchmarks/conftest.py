"""Shared fixtures for bench_runtime.py and bench_export.py: models, exported bundles (cached per session), machine.

Only named fixtures live here (no hooks, nothing autouse), and torch is imported lazily, so the other
benchmark files are unaffected.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# Export options per preset: the exporter's defaults for tiny; fewer calibration/numerics observations for
# base, whose INT8 calibration and torch numerics reference dominate its export time on a 2-core CPU.
EXPORT_OPTS: dict[str, dict[str, int]] = {
    "tiny": {"calib_count": 32, "numerics_count": 8},
    "base": {"calib_count": 8, "numerics_count": 2},
}
# Base INT8 export takes ~2.5 min here; BENCH_BASE_INT8=0 leaves it out.
BASE_INT8 = os.environ.get("BENCH_BASE_INT8", "1") != "0"


def machine() -> str:
    """CPU model (from /proc/cpuinfo), cores, load and library versions: quoted next to every absolute time."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = "n/a"
    if hasattr(os, "getloadavg"):
        load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    import onnxruntime

    versions = f"onnxruntime {onnxruntime.__version__}"
    try:
        import torch

        versions += f", torch {torch.__version__}"
    except ImportError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, load avg (1/5/15 min) {load}, {versions}"


def randomized_model(name: str, seed: int = 0) -> Any:
    """A VLA preset whose zero-initialised 2-D layers are randomised (as tests/conftest.py does for tiny),
    so that actions depend on the inputs and every layer does real work."""
    pytest.importorskip("torch")
    from edge_vla.config import preset
    from edge_vla.export.model import untrained_with_live_outputs

    return untrained_with_live_outputs(preset(name), seed)


@pytest.fixture(scope="session")
def bench_machine() -> Callable[[], str]:
    """Call at report time (the load average is read then)."""
    return machine


@pytest.fixture(scope="session")
def bench_export_opts() -> dict[str, dict[str, int]]:
    """preset -> the ExportOptions overrides used by bench_exports."""
    return EXPORT_OPTS


@pytest.fixture(scope="session")
def bench_precisions() -> Callable[[str], list[str]]:
    """preset -> the precisions the runtime benchmark exports (INT8 for base unless BENCH_BASE_INT8=0)."""
    return lambda name: ["fp32", "int8", "int8-prefix"] if name != "base" or BASE_INT8 else ["fp32", "int8-prefix"]


@pytest.fixture(scope="session")
def bench_models() -> Callable[[str], Any]:
    """preset name -> the (cached) randomised model."""
    cache: dict[str, Any] = {}

    def get(name: str) -> Any:
        if name not in cache:
            cache[name] = randomized_model(name)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def bench_exports(tmp_path_factory: pytest.TempPathFactory, bench_models: Callable[[str], Any]) -> Callable[[str, str], Any]:
    """(preset, precision) -> ExportResult, exported once per session into a session tmp dir."""
    pytest.importorskip("torch")
    from edge_vla.export.exporter import ExportOptions, export_model

    root: Path = tmp_path_factory.mktemp("bench_bundles")
    cache: dict[tuple[str, str], Any] = {}

    def get(name: str, precision: str) -> Any:
        key = (name, precision)
        if key not in cache:
            # "int8-prefix": INT8 prefix graph, FP32 denoise-step graph (ExportOptions.int8_graphs).
            kw = {"precision": "int8", "int8_graphs": ("prefix",)} if precision == "int8-prefix" else {"precision": precision}
            opts = ExportOptions(overwrite=True, **kw, **EXPORT_OPTS[name])
            cache[key] = export_model(bench_models(name), root / f"{name}_{precision}", opts)
        return cache[key]

    return get
