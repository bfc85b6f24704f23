"""Native TensorRT backend: the bundle's engines, bound by tensor name, with the whole chunk in a CUDA graph.

Written against the TensorRT 10.3 (JetPack 6) and 11 (JetPack 7) Python APIs, which share what is used
here: `Runtime.deserialize_cuda_engine`, `num_io_tensors` / `get_tensor_name` / `get_tensor_mode`,
`IExecutionContext.set_tensor_address` and `execute_async_v3`. Memory, streams and graphs come from
cuda-python's runtime bindings. The Euler update between steps is the project's fused CUDA kernel
(edge_vla.kernels, `ode_step_v2`), launched on the same stream so that the capture holds
    H2D inputs -> prefix engine -> N x (step engine -> ode_step kernel) -> D2H actions
as one graph launch. If capture is refused (old driver, an engine that syncs), the same sequence
runs eagerly on the stream and the reason is logged.

There is no TensorRT on the development machines; this module is exercised on a target only, and
its tests skip where `tensorrt` does not import.
"""

from __future__ import annotations

import ctypes
import json
import logging
from typing import Any

import numpy as np

from edge_vla.bundle import Bundle, sha256_file
from edge_vla.errors import BundleError, EdgeVlaError
from edge_vla.optional import available, require

log = logging.getLogger(__name__)

MODE_INIT, MODE_EULER = 0, 1


def tensorrt_available() -> bool:
    return available("tensorrt") and available("cuda.bindings")


def _ck(result: Any, what: str) -> Any:
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise EdgeVlaError(f"CUDA error {err} in {what}")
    return rest[0] if len(rest) == 1 else (rest or None)


class _Pinned:
    """A page-locked host array (cudaMallocHost) seen as numpy, so async copies overlap nothing unsafe."""

    def __init__(self, cudart: Any, shape: tuple[int, ...], dtype: Any) -> None:
        self.cudart = cudart
        self.nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        self.ptr = int(_ck(cudart.cudaMallocHost(self.nbytes), "cudaMallocHost"))
        raw = (ctypes.c_byte * self.nbytes).from_address(self.ptr)
        self.array = np.frombuffer(raw, dtype=dtype).reshape(shape)

    def free(self) -> None:
        if self.ptr:
            self.cudart.cudaFreeHost(self.ptr)
            self.ptr = 0


class TrtBackend:
    name = "tensorrt"

    def __init__(self, prefix_plan: bytes, step_plan: bytes, num_steps: int) -> None:
        trt = require("tensorrt")
        self.cudart = require("cuda.bindings.runtime")
        self.logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self.logger)
        self.engines = {}
        self.contexts = {}
        for name, plan in (("prefix", prefix_plan), ("denoise_step", step_plan)):
            engine = runtime.deserialize_cuda_engine(plan)
            if engine is None:
                raise BundleError(f"TensorRT could not deserialize the {name} engine: it was built for another "
                                  "TensorRT version or GPU; rebuild with `edge-vla build-engines`")
            self.engines[name] = engine
            self.contexts[name] = engine.create_execution_context()
        self.stream = _ck(self.cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.dev: dict[str, int] = {}
        self.host: dict[str, _Pinned] = {}
        self.specs: dict[str, tuple[tuple[int, ...], Any]] = {}
        for engine in self.engines.values():
            for i in range(engine.num_io_tensors):
                tname = engine.get_tensor_name(i)
                shape = tuple(engine.get_tensor_shape(tname))
                if any(d < 0 for d in shape):
                    raise BundleError(f"engine tensor {tname} has a dynamic shape {shape}; build with static shapes")
                dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(tname)))
                if tname not in self.specs:
                    self.specs[tname] = (shape, dtype)
                    nbytes = int(np.prod(shape)) * dtype.itemsize
                    self.dev[tname] = int(_ck(self.cudart.cudaMalloc(nbytes), "cudaMalloc"))
        # The chunk graph bakes t addresses as float32[1] offsets and runs the fp32 ode_step kernel:
        # strongly typed engines keep the exporter's float32 IO, so anything else is a wrong bundle.
        for tname, want in (("t", ((1,), np.float32)), ("x_t", (self.specs["velocity"][0], np.float32)),
                            ("velocity", (self.specs["x_t"][0], np.float32))):
            if self.specs[tname] != (tuple(want[0]), np.dtype(want[1])):
                raise BundleError(f"engine tensor {tname} is {self.specs[tname]}, expected {want}; re-export the bundle")
        for tname in ("images", "tokens", "state", "velocity", "x_t", "t"):
            self.host[tname] = _Pinned(self.cudart, *self.specs[tname])
        self.buf = {k: v.array for k, v in self.host.items()}
        x_shape = self.specs["x_t"][0]
        self.noise = _Pinned(self.cudart, x_shape, np.float32)
        self.actions = _Pinned(self.cudart, x_shape, np.float32)
        self.x_dev = int(_ck(self.cudart.cudaMalloc(self.noise.nbytes), "cudaMalloc"))
        for name, ctx in self.contexts.items():
            engine = self.engines[name]
            for i in range(engine.num_io_tensors):
                tname = engine.get_tensor_name(i)
                ctx.set_tensor_address(tname, self.dev[tname])
        self.kernels = None
        self.graph_exec = None
        self.graph_steps = 0
        self.ts_dev = 0
        self.num_steps = num_steps

    @classmethod
    def from_bundle(cls, b: Bundle) -> TrtBackend:
        if not tensorrt_available():
            require("tensorrt")  # raises the error that names the extra to install
            require("cuda.bindings")
        index_path = b.target_dir / "engines" / "index.json"
        if not index_path.is_file():
            raise BundleError(f"{b.root} has no TensorRT engines; build them on this machine with "
                              f"`edge-vla build-engines {b.root}`")
        index = json.loads(index_path.read_text())
        plans = {}
        for name in ("prefix", "denoise_step"):
            entry = index["graphs"][name]
            path = index_path.parent / entry["file"]
            if not path.is_file() or sha256_file(path) != entry["sha256"]:
                raise BundleError(f"engine {path} is missing or does not match its recorded sha256; rebuild it")
            plans[name] = path.read_bytes()
        return cls(plans["prefix"], plans["denoise_step"], int(b.manifest["sampler"]["num_steps"]))

    # --- step-by-step path (used by OdeLoop for Heun/midpoint and as the capture fallback) ------------
    def _h2d(self, name: str) -> None:
        h = self.host[name]
        _ck(self.cudart.cudaMemcpyAsync(self.dev[name], h.ptr, h.nbytes,
                                        self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream), "H2D")

    def _d2h(self, name: str) -> None:
        h = self.host[name]
        _ck(self.cudart.cudaMemcpyAsync(h.ptr, self.dev[name], h.nbytes,
                                        self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream), "D2H")

    def _sync(self) -> None:
        _ck(self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def run_prefix(self) -> None:
        for name in ("images", "tokens", "state"):
            self._h2d(name)
        if not self.contexts["prefix"].execute_async_v3(int(self.stream)):
            raise EdgeVlaError("TensorRT prefix engine failed to enqueue")
        self._sync()

    def run_step(self) -> None:
        self._h2d("x_t")
        self._h2d("t")
        if not self.contexts["denoise_step"].execute_async_v3(int(self.stream)):
            raise EdgeVlaError("TensorRT denoise-step engine failed to enqueue")
        self._d2h("velocity")
        self._sync()

    # --- whole chunk: one CUDA graph ---------------------------------------------------------------------
    def _enqueue_chunk(self, stream: Any, steps: int) -> None:
        n = int(np.prod(self.specs["x_t"][0]))
        d = self.specs["x_t"][0][-1]
        kind = self.cudart.cudaMemcpyKind
        for name in ("images", "tokens", "state"):
            h = self.host[name]
            _ck(self.cudart.cudaMemcpyAsync(self.dev[name], h.ptr, h.nbytes, kind.cudaMemcpyHostToDevice, stream), "H2D")
        _ck(self.cudart.cudaMemcpyAsync(self.x_dev, self.noise.ptr, self.noise.nbytes, kind.cudaMemcpyHostToDevice,
                                        stream), "H2D noise")
        if not self.contexts["prefix"].execute_async_v3(int(stream)):
            raise EdgeVlaError("TensorRT prefix engine failed to enqueue")
        # x_in (the step engine's x_t) <- x; then per step: v = f(x_in, t_i); x += dt v; x_in <- x.
        self.kernels.ode_step(self.x_dev, self.dev["velocity"], 0, self.dev["x_t"], 0, 0, 0, n=n, D=d, E=0,
                              dt=1.0 / steps, t_next=0.0, mode=MODE_INIT, stream=stream)
        step_ctx = self.contexts["denoise_step"]
        for i in range(steps):
            step_ctx.set_tensor_address("t", self.ts_dev + 4 * i)  # baked into the captured graph
            if not step_ctx.execute_async_v3(int(stream)):
                raise EdgeVlaError("TensorRT denoise-step engine failed to enqueue")
            self.kernels.ode_step(self.x_dev, self.dev["velocity"], 0, self.dev["x_t"], 0, 0, 0, n=n, D=d, E=0,
                                  dt=1.0 / steps, t_next=(i + 1) / steps, mode=MODE_EULER, stream=stream)
        step_ctx.set_tensor_address("t", self.dev["t"])
        _ck(self.cudart.cudaMemcpyAsync(self.actions.ptr, self.x_dev, self.actions.nbytes, kind.cudaMemcpyDeviceToHost,
                                        stream), "D2H actions")

    def prepare_chunk(self, steps: int) -> None:
        """Load the kernels, upload the t schedule, warm up, and capture the chunk graph (or fall back)."""
        from edge_vla.kernels.loader import Kernels

        self.kernels = self.kernels or Kernels()
        ts = np.arange(steps, dtype=np.float32) / steps
        if self.ts_dev:
            self.cudart.cudaFree(self.ts_dev)
        self.ts_dev = int(_ck(self.cudart.cudaMalloc(ts.nbytes), "cudaMalloc"))
        _ck(self.cudart.cudaMemcpy(self.ts_dev, ts.ctypes.data, ts.nbytes,
                                   self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice), "upload schedule")
        self._enqueue_chunk(self.stream, steps)  # warm-up: TensorRT allocates lazily on the first run
        self._sync()
        self.graph_steps = steps
        try:
            mode = self.cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
            _ck(self.cudart.cudaStreamBeginCapture(self.stream, mode), "cudaStreamBeginCapture")
            try:
                self._enqueue_chunk(self.stream, steps)
            finally:
                graph = _ck(self.cudart.cudaStreamEndCapture(self.stream), "cudaStreamEndCapture")
            self.graph_exec = _ck(self.cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        except EdgeVlaError as exc:
            self.graph_exec = None
            log.warning("CUDA graph capture refused (%s); running the chunk eagerly on the stream", exc)

    def run_chunk(self, noise: np.ndarray, steps: int) -> np.ndarray:
        """Inputs already in buf; returns normalized actions [1, H, D] (a reused pinned buffer)."""
        if self.graph_steps != steps or self.kernels is None:
            self.prepare_chunk(steps)
        np.copyto(self.noise.array, noise)
        if self.graph_exec is not None:
            _ck(self.cudart.cudaGraphLaunch(self.graph_exec, self.stream), "cudaGraphLaunch")
        else:
            self._enqueue_chunk(self.stream, steps)
        self._sync()
        return self.actions.array
