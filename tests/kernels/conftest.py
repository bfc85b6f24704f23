"""Fixtures for the kernel tests: a per-session build cache, the host reference libraries, the GPU."""

from __future__ import annotations

import ctypes
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def kernel_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Keep build outputs out of the user's cache and the source tree."""
    path = tmp_path_factory.mktemp("kernel_cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("EDGE_VLA_KERNEL_CACHE", str(path))
    yield path
    mp.undo()


def _host_lib(source: str) -> ctypes.CDLL:
    if not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("no C++ compiler (g++) to build the host reference library")
    from edge_vla.kernels import build

    return ctypes.CDLL(str(build.host_library(source)))


@pytest.fixture(scope="session")
def ode_host() -> ctypes.CDLL:
    return _host_lib("ode_step.cu")


@pytest.fixture(scope="session")
def adaln_host() -> ctypes.CDLL:
    return _host_lib("adaln_linear.cu")


@pytest.fixture(scope="session")
def gpu_kernels():  # -> edge_vla.kernels.loader.Kernels
    from edge_vla.kernels import loader

    ok, why = loader.gpu_status()
    if not ok:
        pytest.skip(f"no GPU: {why}")
    return loader.Kernels()
