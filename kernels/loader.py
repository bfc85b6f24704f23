"""Load and launch the kernels through cuda-python's driver API (`cuda.bindings.driver`); no pycuda.

    from edge_vla.kernels.loader import Kernels
    k = Kernels()                      # device 0, primary context (shared with TensorRT / torch)
    k.ode_step(x, v, None, x_in, temb, lo, hi, n=16, D=2, E=128, dt=0.1, t_next=0.1,
               mode=MODE_EULER, dtype="fp16", stream=stream_handle)

Pointers are device addresses as ints (TensorRT bindings, `torch.Tensor.data_ptr()`, `DeviceBuffer.ptr`;
0 = null). Streams are raw handles (int or CUstream): the kernels go on the caller's stream, so the
TensorRT backend can interleave them with `context.execute_async_v3(stream)` and capture the whole
N-step loop into one CUDA graph (`capture_graph`): a kernel launched on a capturing stream becomes a
graph node with its arguments copied at capture time, so pointers must be the preallocated buffers
and (t, dt, mode) are baked per node, which a fixed schedule wants anyway.

Module sources, in order (``source="auto"``): a prebuilt fatbin directory (``prebuilt=`` or
``$EDGE_VLA_KERNEL_DIR``), an nvcc build for this GPU's arch into the cache, NVRTC for this GPU's arch.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_vla.errors import EdgeVlaError
from edge_vla.optional import require

from . import build
from .reference import ACT_NONE, LN_EPS

log = logging.getLogger(__name__)

DTYPES = ("fp32", "fp16", "bf16")
_SUFFIX = {"fp32": "f32", "fp16": "f16", "bf16": "bf16"}

# Argument types of every exported kernel: p = device pointer, i = int32, f = float32.
SIGNATURES: dict[str, str] = {
    **{f"ode_step_v2_{s}": "pppppppiiiffi" for s in _SUFFIX.values()},
    "time_embed_v1_f32": "pfi",
    "axpy_v1_f32": "ppfi",
    "clamp_v1_f32": "pppii",
    "time_embed_schedule_f32": "ppii",
    "adaln_v1_f32": "ppppiif",
    **{f"linear_v1_{s}": "ppppiiii" for s in _SUFFIX.values()},
    **{f"adaln_linear_v2_{s}": "ppppppiiiif" for s in _SUFFIX.values()},
}
MODULE_OF = {name: ("ode_step" if name.startswith(("ode_step", "time_embed", "axpy", "clamp"))
                    else "adaln_linear") for name in SIGNATURES}

ADALN_THREADS = 256
ADALN_MAX_SMEM = 48 * 1024  # default dynamic shared memory limit without opt-in


class KernelError(EdgeVlaError):
    """A kernel could not be loaded or launched, or its arguments are invalid."""


def _driver() -> Any:
    return require("cuda.bindings.driver")


def _check(result: Any, what: str) -> Any:
    """Unwrap a cuda.bindings (err, *values) tuple, raising KernelError with the driver's message."""
    drv = _driver()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != drv.CUresult.CUDA_SUCCESS:
        _, msg = drv.cuGetErrorString(err)
        raise KernelError(f"{what} failed: {err.name if hasattr(err, 'name') else err} "
                          f"({msg.decode() if isinstance(msg, bytes) else msg})")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def gpu_status() -> tuple[bool, str]:
    """(True, device name) when cuda-python, a driver and a GPU are present; else (False, why)."""
    try:
        drv = _driver()
    except ImportError as exc:
        return False, str(exc)
    try:
        _check(drv.cuInit(0), "cuInit")
        count = _check(drv.cuDeviceGetCount(), "cuDeviceGetCount")
        if count < 1:
            return False, "the CUDA driver reports no GPU"
        name = _check(drv.cuDeviceGetName(256, 0), "cuDeviceGetName")
        return True, name.split(b"\0", 1)[0].decode()
    except Exception as exc:  # driver library missing (DynamicLibNotFoundError), no device, ...
        return False, f"no usable CUDA driver/GPU: {exc}"


def as_ptr(obj: Any) -> int:
    """A device address from an int, None (null), DeviceBuffer, CUdeviceptr or torch tensor."""
    if obj is None:
        return 0
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if hasattr(obj, "data_ptr"):
        return int(obj.data_ptr())
    if hasattr(obj, "ptr"):
        return int(obj.ptr)
    return int(obj)  # CUdeviceptr supports int()


def pack_args(signature: str, args: Sequence[Any]) -> tuple[np.ndarray, list[Any]]:
    """kernelParams for cuLaunchKernel: an array of addresses, each pointing at one argument's bytes.

    Returns (address array, the ctypes storage it points into); keep both alive until the launch
    returns (the driver copies the values at launch, and at capture time inside a graph).
    """
    if len(signature) != len(args):
        raise KernelError(f"kernel takes {len(signature)} arguments ({signature}), got {len(args)}")
    storage: list[Any] = []
    for code, arg in zip(signature, args, strict=True):
        if code == "p":
            storage.append(ctypes.c_uint64(as_ptr(arg)))
        elif code == "i":
            storage.append(ctypes.c_int32(int(arg)))
        elif code == "f":
            storage.append(ctypes.c_float(float(arg)))
        else:
            raise KernelError(f"unknown argument code {code!r}")
    addresses = np.array([ctypes.addressof(s) for s in storage], dtype=np.uint64)
    return addresses, storage


def _stream(stream: Any) -> Any:
    drv = _driver()
    if isinstance(stream, drv.CUstream):
        return stream
    if hasattr(stream, "cuda_stream"):  # torch.cuda.Stream
        stream = stream.cuda_stream
    return drv.CUstream(int(stream or 0))


class DeviceBuffer:
    """A plain cuMemAlloc'ed buffer with numpy upload/download (tests, benchmarks, small runtimes)."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = int(nbytes)
        self._dptr = _check(_driver().cuMemAlloc(max(self.nbytes, 1)), "cuMemAlloc")

    @property
    def ptr(self) -> int:
        return int(self._dptr)

    @classmethod
    def from_array(cls, array: np.ndarray) -> DeviceBuffer:
        array = np.ascontiguousarray(array)
        buf = cls(array.nbytes)
        buf.upload(array)
        return buf

    def upload(self, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        if array.nbytes > self.nbytes:
            raise KernelError(f"upload of {array.nbytes} bytes into a {self.nbytes}-byte buffer")
        _check(_driver().cuMemcpyHtoD(self._dptr, array, array.nbytes), "cuMemcpyHtoD")

    def download(self, shape: Sequence[int] | int, dtype: Any = np.float32) -> np.ndarray:
        out = np.empty(shape, dtype=dtype)
        _check(_driver().cuMemcpyDtoH(out, self._dptr, out.nbytes), "cuMemcpyDtoH")
        return out

    def free(self) -> None:
        if self._dptr is not None:
            _check(_driver().cuMemFree(self._dptr), "cuMemFree")
            self._dptr = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown or context already gone
            self.free()


class Kernels:
    """The compiled kernel modules on one device, with typed launchers."""

    def __init__(self, device: int = 0, source: str = "auto", prebuilt: str | Path | None = None) -> None:
        if source not in ("auto", "prebuilt", "nvcc", "nvrtc"):
            raise KernelError(f"source must be auto, prebuilt, nvcc or nvrtc, got {source!r}")
        drv = _driver()
        _check(drv.cuInit(0), "cuInit")
        self.device = _check(drv.cuDeviceGet(device), "cuDeviceGet")
        # Share the primary context with the CUDA runtime (TensorRT, torch) rather than making a new one:
        # pointers and streams from those libraries are only valid in it.
        current = _check(drv.cuCtxGetCurrent(), "cuCtxGetCurrent")
        if not int(current):
            self._ctx = _check(drv.cuDevicePrimaryCtxRetain(self.device), "cuDevicePrimaryCtxRetain")
            _check(drv.cuCtxSetCurrent(self._ctx), "cuCtxSetCurrent")
        major = _check(drv.cuDeviceGetAttribute(
            drv.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, self.device), "attribute")
        minor = _check(drv.cuDeviceGetAttribute(
            drv.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, self.device), "attribute")
        self.arch = f"sm_{major}{minor}"
        prebuilt = prebuilt or os.environ.get("EDGE_VLA_KERNEL_DIR")
        self._modules = {stem: self._load(stem, source, prebuilt) for stem in ("ode_step", "adaln_linear")}
        self._functions: dict[str, Any] = {}

    def _load(self, stem: str, source: str, prebuilt: str | Path | None) -> Any:
        drv = _driver()
        errors: list[str] = []
        if source in ("auto", "prebuilt") and prebuilt:
            path = Path(prebuilt) / f"{stem}.fatbin"
            try:
                return _check(drv.cuModuleLoadData(path.read_bytes()), f"loading {path}")
            except (OSError, KernelError) as exc:  # wrong arch / missing file: fall through
                errors.append(str(exc))
        if source in ("auto", "nvcc") and build.find_nvcc():
            try:
                path = build.build_fatbins([self.arch])[stem]
                return _check(drv.cuModuleLoadData(path.read_bytes()), f"loading {path}")
            except (build.KernelBuildError, KernelError) as exc:
                errors.append(str(exc))
        if source in ("auto", "nvrtc"):
            try:
                image = build.nvrtc_compile(f"{stem}.cu", self.arch)
                return _check(drv.cuModuleLoadData(image), f"loading NVRTC output for {stem}")
            except (ImportError, build.KernelBuildError, KernelError) as exc:
                errors.append(str(exc))
        raise KernelError(f"could not load kernel module {stem} for {self.arch} via {source}: "
                          + ("; ".join(errors) or "no prebuilt dir, nvcc or NVRTC available"))

    def function(self, name: str) -> Any:
        if name not in SIGNATURES:
            raise KernelError(f"unknown kernel {name!r}; known: {sorted(SIGNATURES)}")
        if name not in self._functions:
            module = self._modules[MODULE_OF[name]]
            self._functions[name] = _check(_driver().cuModuleGetFunction(module, name.encode()),
                                           f"cuModuleGetFunction({name})")
        return self._functions[name]

    def launch(self, name: str, grid: int | Sequence[int], block: int | Sequence[int], args: Sequence[Any],
               stream: Any = 0, shared_bytes: int = 0) -> None:
        """Launch `name` with arguments packed per its signature on `stream` (asynchronous)."""
        g = (grid, 1, 1) if isinstance(grid, int) else (*grid, 1, 1)[:3]
        b = (block, 1, 1) if isinstance(block, int) else (*block, 1, 1)[:3]
        addresses, _storage = pack_args(SIGNATURES[name], args)
        _check(_driver().cuLaunchKernel(self.function(name), *g, *b, shared_bytes, _stream(stream),
                                        addresses.ctypes.data, 0), f"launch {name}")

    # ---- typed launchers

    def ode_step(self, x: Any, v: Any, v_prev: Any, x_in: Any, temb: Any, lo: Any, hi: Any, *, n: int,
                 D: int, E: int, dt: float, t_next: float, mode: int, dtype: str = "fp32",
                 stream: Any = 0) -> None:
        """Fused integrator step (see ode_step.cu); v, x_in and temb have storage type `dtype`."""
        if dtype not in DTYPES:
            raise KernelError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if (lo is None) != (hi is None):
            raise KernelError("give both bounds lo and hi, or neither")
        if mode in (2, 3) and v_prev is None:
            raise KernelError("Heun modes need the v_prev scratch buffer")
        threads = min(1024, ((max(n, E) + 31) // 32) * 32)
        self.launch(f"ode_step_v2_{_SUFFIX[dtype]}", 1, threads,
                    (x, v, v_prev, x_in, temb, lo, hi, n, D, E, dt, t_next, mode), stream)

    def time_embed_schedule(self, out: Any, ts: Any, nt: int, E: int, stream: Any = 0) -> None:
        self.launch("time_embed_schedule_f32", nt, min(1024, ((E + 31) // 32) * 32), (out, ts, nt, E), stream)

    def adaln_linear(self, x: Any, shift: Any, scale: Any, w: Any, b: Any, out: Any, *, T: int, K: int,
                     N: int, act: int = ACT_NONE, eps: float = LN_EPS, wdtype: str = "fp32",
                     stream: Any = 0) -> None:
        """out[T, N] = act(W @ adaLN(x) + b) with W [N, K] in `wdtype` (see adaln_linear.cu)."""
        if wdtype not in DTYPES:
            raise KernelError(f"wdtype must be one of {DTYPES}, got {wdtype!r}")
        smem = T * K * 4
        if K % 4 or smem > ADALN_MAX_SMEM:
            raise KernelError(f"adaln_linear_v2 needs K % 4 == 0 and T*K <= {ADALN_MAX_SMEM // 4} (got T={T}, K={K})")
        warps = ADALN_THREADS // 32
        self.launch(f"adaln_linear_v2_{_SUFFIX[wdtype]}", (N + warps - 1) // warps, ADALN_THREADS,
                    (x, shift, scale, w, b, out, T, K, N, act, eps), stream, smem)

    def adaln_linear_unfused(self, x: Any, shift: Any, scale: Any, w: Any, b: Any, out: Any, y: Any, *,
                             T: int, K: int, N: int, act: int = ACT_NONE, eps: float = LN_EPS,
                             wdtype: str = "fp32", stream: Any = 0) -> None:
        """v1 baseline: adaln_v1 into scratch `y` [T, K] fp32, then linear_v1."""
        self.launch("adaln_v1_f32", T, 128, (x, shift, scale, y, T, K, eps), stream)
        self.launch(f"linear_v1_{_SUFFIX[wdtype]}", (T * N + 255) // 256, 256, (y, w, b, out, T, K, N, act),
                    stream)


def new_stream() -> Any:
    return _check(_driver().cuStreamCreate(0), "cuStreamCreate")


def synchronize(stream: Any = 0) -> None:
    _check(_driver().cuStreamSynchronize(_stream(stream)), "cuStreamSynchronize")


class CapturedGraph:
    """A CUDA graph captured from everything `record(stream)` enqueues (kernels, TensorRT, copies)."""

    def __init__(self, stream: Any, record: Callable[[Any], None]) -> None:
        drv = _driver()
        self.stream = _stream(stream)
        _check(drv.cuStreamBeginCapture(self.stream, drv.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL),
               "cuStreamBeginCapture")
        try:
            record(self.stream)
        finally:
            self.graph = _check(drv.cuStreamEndCapture(self.stream), "cuStreamEndCapture")
        self.exec = _check(drv.cuGraphInstantiate(self.graph, 0), "cuGraphInstantiate")

    def launch(self, stream: Any = None) -> None:
        _check(_driver().cuGraphLaunch(self.exec, self.stream if stream is None else _stream(stream)),
               "cuGraphLaunch")
