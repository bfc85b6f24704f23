"""Build the CUDA kernels: AOT with nvcc (fatbin for Orin/H100/Thor + PTX), host references with g++,
and NVRTC at load time through cuda-python.

Outputs go to a cache directory (``$EDGE_VLA_KERNEL_CACHE`` or ``~/.cache/edge_vla/kernels``), keyed
by a hash of the sources, the flags and the compiler version, never into the source tree.

    python -m edge_vla.kernels.build                 # fatbins for every supported default arch
    python -m edge_vla.kernels.build --arch sm_87    # one arch (e.g. on the Jetson itself)
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from edge_vla.errors import EdgeVlaError
from edge_vla.optional import require

log = logging.getLogger(__name__)

KERNEL_DIR = Path(__file__).resolve().parent
SOURCES = ("ode_step.cu", "adaln_linear.cu")
HEADERS = ("ode_math.cuh", "ev_dtype.cuh")
# Orin (Jetson AGX/NX/Nano), H100, Thor. PTX of the newest is embedded for forward compatibility.
DEFAULT_ARCHS = ("sm_87", "sm_90", "sm_110")
# No --use_fast_math: __cosf/__sinf are inaccurate at the time embedding's 100 rad arguments.
NVCC_FLAGS = ("-O3", "-std=c++17", "--extra-device-vectorization")


class KernelBuildError(EdgeVlaError):
    """A kernel failed to compile, or no compiler is available."""


def cache_dir() -> Path:
    root = os.environ.get("EDGE_VLA_KERNEL_CACHE")
    path = Path(root) if root else Path.home() / ".cache" / "edge_vla" / "kernels"
    path.mkdir(parents=True, exist_ok=True)
    return path


def find_nvcc() -> str | None:
    """nvcc on PATH, else under $CUDA_HOME / /usr/local/cuda."""
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    return None


def _nvcc_or_raise(nvcc: str | None) -> str:
    nvcc = nvcc or find_nvcc()
    if not nvcc:
        raise KernelBuildError("nvcc not found: install the CUDA toolkit or set CUDA_HOME, or use NVRTC")
    return nvcc


@lru_cache(maxsize=4)
def nvcc_version(nvcc: str | None = None) -> str:
    out = subprocess.run([_nvcc_or_raise(nvcc), "--version"], capture_output=True, text=True, check=True)
    match = re.search(r"release ([\d.]+)", out.stdout)
    return match.group(1) if match else out.stdout.strip().splitlines()[-1]


@lru_cache(maxsize=4)
def supported_archs(nvcc: str | None = None) -> tuple[str, ...]:
    """Real architectures this nvcc can target, as 'sm_XY' (from `nvcc --list-gpu-arch`)."""
    out = subprocess.run([_nvcc_or_raise(nvcc), "--list-gpu-arch"], capture_output=True, text=True, check=True)
    return tuple(f"sm_{m}" for m in re.findall(r"compute_(\d+)", out.stdout))


def gencode_flags(archs: Sequence[str], ptx: bool = True) -> list[str]:
    """-gencode for SASS of each arch, plus PTX of the newest so newer GPUs can JIT it."""
    if not archs:
        raise KernelBuildError("no target architectures given")
    nums = sorted({a.removeprefix("sm_").removeprefix("compute_") for a in archs}, key=int)
    flags = [f"-gencode=arch=compute_{n},code=sm_{n}" for n in nums]
    if ptx:
        flags.append(f"-gencode=arch=compute_{nums[-1]},code=compute_{nums[-1]}")
    return flags


def source_hash(*extra: str) -> str:
    """Hash of every kernel source and header plus `extra` (flags, compiler version)."""
    h = hashlib.sha256()
    for name in (*SOURCES, *HEADERS):
        h.update(name.encode())
        h.update((KERNEL_DIR / name).read_bytes())
    for item in extra:
        h.update(item.encode())
    return h.hexdigest()[:16]


def _run(cmd: list[str]) -> None:
    log.debug("running %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise KernelBuildError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr.strip()}")


def nvcc_compile(
    source: str,
    out: Path,
    kind: str = "fatbin",
    archs: Sequence[str] = ("sm_90",),
    extra: Sequence[str] = (),
    nvcc: str | None = None,
) -> Path:
    """Compile one kernel source with nvcc. kind: fatbin | cubin | ptx | obj | exe (standalone bench)."""
    nvcc = _nvcc_or_raise(nvcc)
    src = KERNEL_DIR / source
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [nvcc, *NVCC_FLAGS, f"-I{KERNEL_DIR}", *extra]
    if kind == "fatbin":
        cmd += ["-fatbin", *gencode_flags(archs)]
    elif kind == "cubin":
        if len(archs) != 1:
            raise KernelBuildError("a cubin targets exactly one arch")
        cmd += ["-cubin", f"-arch={archs[0]}"]
    elif kind == "ptx":
        cmd += ["-ptx", f"-arch=compute_{archs[0].removeprefix('sm_')}"]
    elif kind == "obj":
        cmd += ["-c", *gencode_flags(archs, ptx=False)]
    elif kind == "exe":
        cmd += ["-DEV_STANDALONE", *gencode_flags(archs)]
    else:
        raise KernelBuildError(f"unknown output kind {kind!r}")
    _run([*cmd, str(src), "-o", str(out)])
    return out


def build_fatbins(archs: Sequence[str] | None = None, out_dir: Path | None = None) -> dict[str, Path]:
    """Fatbin (SASS per arch + PTX) of every kernel source, cached. Unsupported archs are skipped."""
    nvcc = _nvcc_or_raise(None)
    supported = set(supported_archs(nvcc))
    wanted = list(archs or DEFAULT_ARCHS)
    usable = [a for a in wanted if a in supported]
    skipped = sorted(set(wanted) - set(usable))
    if skipped:
        log.warning("nvcc %s cannot target %s; building for %s", nvcc_version(nvcc), skipped, usable)
    key = source_hash(nvcc_version(nvcc), *usable, *NVCC_FLAGS)
    out_dir = out_dir or cache_dir() / f"aot-{key}"
    result = {}
    for source in SOURCES:
        target = out_dir / (Path(source).stem + ".fatbin")
        if not target.exists():
            tmp = target.with_suffix(".tmp")
            nvcc_compile(source, tmp, "fatbin", usable, nvcc=nvcc)
            tmp.replace(target)  # atomic: a half-written fatbin is never picked up
        result[Path(source).stem] = target
    return result


def host_library(source: str, cxx: str | None = None) -> Path:
    """Compile the CPU reference half of a kernel source (same file, same header) as a shared library."""
    cxx = cxx or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise KernelBuildError("no C++ compiler (g++) found to build the host reference library")
    key = source_hash(cxx, "host")
    target = cache_dir() / f"host-{key}" / f"lib{Path(source).stem}_host.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        _run([cxx, "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", "-x", "c++",
              f"-I{KERNEL_DIR}", str(KERNEL_DIR / source), "-o", str(tmp)])
        tmp.replace(target)
    return target


def _nvrtc_check(result: tuple, what: str, prog: object | None = None) -> tuple:
    nvrtc = require("cuda.bindings.nvrtc")
    err = result[0]
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        detail = ""
        if prog is not None:
            _, size = nvrtc.nvrtcGetProgramLogSize(prog)
            buf = b" " * size
            nvrtc.nvrtcGetProgramLog(prog, buf)
            detail = "\n" + buf.decode(errors="replace")
        raise KernelBuildError(f"NVRTC {what} failed: {err}{detail}")
    return result[1:]


def cuda_include_dirs() -> list[str]:
    """Where cuda_fp16.h lives, for NVRTC (toolkit install or the nvidia-cuda-runtime wheel)."""
    dirs = []
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "include" / "cuda_fp16.h").is_file():
            dirs.append(str(Path(root) / "include"))
    try:
        pathfinder = require("cuda.pathfinder")
        found = pathfinder.find_nvidia_header_directory("cudart")
        if found:
            dirs.append(found)
    except Exception:  # pathfinder missing or too old: the toolkit path above may still do
        pass
    return list(dict.fromkeys(dirs))


def nvrtc_compile(source: str, arch: str, want: str = "cubin") -> bytes:
    """Compile one kernel source at run time with NVRTC; returns a cubin (or PTX with want='ptx')."""
    nvrtc = require("cuda.bindings.nvrtc")
    headers = [(KERNEL_DIR / h).read_bytes() for h in HEADERS]
    (prog,) = _nvrtc_check(
        nvrtc.nvrtcCreateProgram((KERNEL_DIR / source).read_bytes(), source.encode(), len(headers), headers,
                                 [h.encode() for h in HEADERS]),
        "create program",
    )
    num = arch.removeprefix("sm_").removeprefix("compute_")
    target = f"--gpu-architecture={'sm' if want == 'cubin' else 'compute'}_{num}"
    opts = [target.encode(), b"-std=c++17", *(f"-I{d}".encode() for d in cuda_include_dirs())]
    try:
        _nvrtc_check(nvrtc.nvrtcCompileProgram(prog, len(opts), opts), f"compile of {source}", prog)
        if want == "cubin":
            (size,) = _nvrtc_check(nvrtc.nvrtcGetCUBINSize(prog), "cubin size")
            buf = b" " * size
            _nvrtc_check(nvrtc.nvrtcGetCUBIN(prog, buf), "get cubin")
        else:
            (size,) = _nvrtc_check(nvrtc.nvrtcGetPTXSize(prog), "ptx size")
            buf = b" " * size
            _nvrtc_check(nvrtc.nvrtcGetPTX(prog, buf), "get ptx")
        return buf
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", help=f"target arch (repeatable), default {DEFAULT_ARCHS}")
    parser.add_argument("--out", type=Path, help="output directory (default: the kernel cache)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        built = build_fatbins(args.arch, args.out)
    except KernelBuildError as exc:
        log.error("%s", exc)
        return 1
    for name, path in built.items():
        log.info("%s -> %s", name, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
