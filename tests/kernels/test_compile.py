"""Every kernel source compiles with the machine's nvcc (no GPU needed), so CI catches syntax errors;
and the loader's argument signatures match the compiled kernels' PTX entry points."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from edge_vla.kernels import build, loader

nvcc = build.find_nvcc()
needs_nvcc = pytest.mark.skipif(nvcc is None, reason="nvcc not installed (CUDA toolkit absent)")
PTX_TYPE = {"u64": "p", "b64": "p", "u32": "i", "s32": "i", "b32": "i", "f32": "f"}


@needs_nvcc
@pytest.mark.parametrize("source", build.SOURCES)
def test_cubin_compiles_for_sm90(source: str, tmp_path: Path) -> None:
    out = build.nvcc_compile(source, tmp_path / "k.cubin", "cubin", ["sm_90"])
    assert out.stat().st_size > 1000


@needs_nvcc
@pytest.mark.parametrize("source", build.SOURCES)
def test_standalone_benchmark_compiles(source: str, tmp_path: Path) -> None:
    # The llm.c-style main (validation + timing) is host+device code: compile, do not link or run.
    out = build.nvcc_compile(source, tmp_path / "k.o", "obj", ["sm_90"], extra=["-DEV_STANDALONE"])
    assert out.stat().st_size > 1000


@needs_nvcc
def test_fatbins_for_default_archs(tmp_path: Path) -> None:
    supported = build.supported_archs()
    built = build.build_fatbins(out_dir=tmp_path)
    assert set(built) == {Path(s).stem for s in build.SOURCES}
    for path in built.values():
        assert path.stat().st_size > 10_000
    # Orin and H100 are in every CUDA 12/13 nvcc; Thor (sm_110) needs CUDA 13.
    assert {"sm_87", "sm_90"} <= set(supported)


def test_gencode_flags_embed_ptx_of_newest_arch() -> None:
    flags = build.gencode_flags(["sm_90", "sm_87", "sm_110"])
    assert flags[0] == "-gencode=arch=compute_87,code=sm_87"
    assert flags[-1] == "-gencode=arch=compute_110,code=compute_110"
    assert not any("compute_110" in f for f in build.gencode_flags(["sm_110"], ptx=False)[:-1])


def _ptx_entries(ptx: str) -> dict[str, str]:
    entries = {}
    for name, params in re.findall(r"\.entry\s+(\w+)\s*\(([^)]*)\)", ptx):
        types = re.findall(r"\.param\s+\.(\w+)", params)
        entries[name] = "".join(PTX_TYPE[t] for t in types)
    return entries


@needs_nvcc
def test_loader_signatures_match_ptx(tmp_path: Path) -> None:
    entries: dict[str, str] = {}
    for source in build.SOURCES:
        ptx = build.nvcc_compile(source, tmp_path / f"{source}.ptx", "ptx", ["sm_90"]).read_text()
        entries.update(_ptx_entries(ptx))
    assert entries == loader.SIGNATURES  # a kernel added or changed without the loader knowing fails here


def test_nvrtc_compiles_every_source() -> None:
    try:
        from cuda.bindings import nvrtc
        nvrtc.nvrtcVersion()
    except Exception as exc:
        pytest.skip(f"NVRTC (cuda-python + libnvrtc) not available: {exc}")
    for source in build.SOURCES:
        ptx = build.nvrtc_compile(source, "sm_87", want="ptx").decode(errors="replace")
        assert set(_ptx_entries(ptx)) == {k for k, m in loader.MODULE_OF.items() if f"{m}.cu" == source}


def test_makefile_lists_every_source() -> None:
    text = (build.KERNEL_DIR / "Makefile").read_text()
    for source in build.SOURCES:
        assert Path(source).stem in text
