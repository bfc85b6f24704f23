"""Native TensorRT backend: the bundle's engines, bound by tensor name, with the whole chunk in a CUDA graph.

Written against the TensorRT 10.x Python API (JetPack 6: 10.3, JetPack 7: 10.13; the same calls in
both): `Runtime.deserialize_cuda_engine`, `num_io_tensors` / `get_tensor_name` / `get_tensor_mode`,
`IExecutionContext.set_tensor_address` (returns False on a bad address, e.g. one not 256-byte aligned:
every call is checked) and `execute_async_v3`. Memory, the (non-blocking) stream and graphs come from
cuda-python's runtime bindings (`cuda.bindings.runtime`).

Engines are bound by name as the manifest's contract says (docs/MANIFEST.md): the prefix engine's
per-layer K/V outputs are the very device buffers the step engine reads. The step engine's time input
(scalar t or a time-table row) lives in a device array of 256-byte-aligned slots, one per half-grid
time of the schedule; each evaluation binds its own slot, so a captured graph bakes a distinct,
aligned address per step. The Euler update between steps is the project's fused CUDA kernel
(edge_vla.kernels, `ode_step_v2`), launched on the same stream, so that one capture holds
    H2D inputs -> prefix engine -> N x (step engine at slot 2i -> ode_step kernel) -> D2H actions
If capture is refused (old driver, an engine that syncs), the same sequence runs eagerly on the stream
and the reason is logged. `close()` frees every buffer, the stream, the graph and its exec.

There is no TensorRT on the development machines; tests/runtime/test_trt_binding.py drives this module
through a recording fake of TensorRT and the CUDA runtime, and the GPU tests run it for real.
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
from edge_vla.runtime.backend import Backend
from edge_vla.runtime.contract import Contract

log = logging.getLogger(__name__)

MODE_INIT, MODE_EULER = 0, 1
ALIGN = 256  # TensorRT's setTensorAddress contract (NvInferRuntime.h): at least 256-byte aligned


def tensorrt_available() -> bool:
    return available("tensorrt") and available("cuda.bindings")


def _ck(result: Any, what: str) -> Any:
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise EdgeVlaError(f"CUDA error {err} in {what}")
    return rest[0] if len(rest) == 1 else (rest or None)


def aligned(nbytes: int) -> int:
    return (nbytes + ALIGN - 1) // ALIGN * ALIGN


class _Pinned:
    """A page-locked host array (cudaMallocHost) seen as numpy, so async copies overlap nothing unsafe."""

    def __init__(self, cudart: Any, shape: tuple[int, ...], dtype: Any) -> None:
        self.cudart = cudart
        self.nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        self.ptr = int(_ck(cudart.cudaMallocHost(max(self.nbytes, 1)), "cudaMallocHost"))
        raw = (ctypes.c_byte * self.nbytes).from_address(self.ptr)
        self.array = np.frombuffer(raw, dtype=dtype).reshape(shape)

    def free(self) -> None:
        if self.ptr:
            self.array = None  # type: ignore[assignment]
            _ck(self.cudart.cudaFreeHost(self.ptr), "cudaFreeHost")
            self.ptr = 0


class TrtBackend(Backend):
    name = "tensorrt"

    def __init__(self, prefix_plan: bytes, step_plan: bytes, x_t: str = "x_t", velocity: str = "velocity") -> None:
        trt = require("tensorrt")
        self.x_name, self.v_name = x_t, velocity
        self.cudart = require("cuda.bindings.runtime")
        self._pinned: list[_Pinned] = []
        self._device: list[int] = []
        self.stream: Any = None
        self.graph: Any = None
        self.graph_exec: Any = None
        self._opened = True  # from here on, close() has something to release
        try:
            self._setup(trt, prefix_plan, step_plan)
        except BaseException:
            self.close()
            raise

    def _setup(self, trt: Any, prefix_plan: bytes, step_plan: bytes) -> None:
        cudart = self.cudart
        self.logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self.logger)
        self.engines: dict[str, Any] = {}
        self.contexts: dict[str, Any] = {}
        for name, plan in (("prefix", prefix_plan), ("step", step_plan)):
            engine = runtime.deserialize_cuda_engine(plan)
            if engine is None:
                raise BundleError(f"TensorRT could not deserialize the {name} engine: it was built for another "
                                  "TensorRT version or GPU; rebuild with `edge-vla build-engines`")
            context = engine.create_execution_context()
            if context is None:
                raise EdgeVlaError(f"TensorRT could not create an execution context for the {name} engine "
                                   "(out of device memory?)")
            self.engines[name], self.contexts[name] = engine, context
        # Non-blocking: no implicit synchronisation with the legacy default stream (other libraries' work).
        self.stream = _ck(cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking), "cudaStreamCreateWithFlags")
        self.specs: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        self.dev: dict[str, int] = {}
        modes: dict[str, dict[str, str]] = {"prefix": {}, "step": {}}
        for ename, engine in self.engines.items():
            for i in range(engine.num_io_tensors):
                tname = engine.get_tensor_name(i)
                shape = tuple(engine.get_tensor_shape(tname))
                if any(d < 0 for d in shape):
                    raise BundleError(f"engine tensor {tname} has a dynamic shape {shape}; build with static shapes")
                dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(tname)))
                is_input = engine.get_tensor_mode(tname) == trt.TensorIOMode.INPUT
                modes[ename][tname] = "in" if is_input else "out"
                if self.specs.setdefault(tname, (shape, dtype)) != (shape, dtype):
                    raise BundleError(f"engine tensor {tname} is {(shape, dtype)} in one engine and "
                                      f"{self.specs[tname]} in the other; rebuild the engines")
                if tname not in self.dev:
                    self.dev[tname] = self._malloc(int(np.prod(shape)) * dtype.itemsize)
        prefix_out = {n for n, m in modes["prefix"].items() if m == "out"}
        # Host-fed: every input no engine produces (observation inputs, x_t, the time input's default slot);
        # host-read: the step engine's outputs (velocity).
        self.per_chunk = [n for n, m in modes["prefix"].items() if m == "in"]
        self.per_chunk += [n for n, m in modes["step"].items() if m == "in" and n not in prefix_out
                           and n not in self.per_chunk]
        self.step_outputs = [n for n, m in modes["step"].items() if m == "out"]
        self.host = {n: _Pinned(cudart, *self.specs[n]) for n in [*self.per_chunk, *self.step_outputs]}
        self._pinned += self.host.values()
        for ename, ctx in self.contexts.items():
            for tname in modes[ename]:
                self._bind(ctx, tname, self.dev[tname])
        self.time_name: str | None = None
        self.time_dev = 0
        self.time_stride = 0
        self.time_slots = 0
        self.kernels: Any = None
        self.chunk_steps = 0
        self.chunk_dt = 0.0
        self.x_dev = 0
        self.noise: _Pinned | None = None
        self.actions: _Pinned | None = None

    @classmethod
    def from_bundle(cls, b: Bundle, contract: Contract | None = None) -> TrtBackend:
        if not tensorrt_available():
            require("tensorrt")  # raises the error that names the extra to install
            require("cuda.bindings")
        contract = contract or b.contract
        index_path = b.target_dir / "engines" / "index.json"
        if not index_path.is_file():
            raise BundleError(f"{b.root} has no TensorRT engines; build them on this machine with "
                              f"`edge-vla build-engines {b.root}`")
        index = json.loads(index_path.read_text())
        if index.get("verified") is False:
            log.warning("TensorRT engines in %s are UNVERIFIED against the bundle's ONNX graphs: %s",
                        index_path.parent, index.get("verification", {}).get("summary", "no comparison ran"))
        plans = {}
        for name in (contract.prefix.name, contract.step.name):
            entry = index.get("graphs", {}).get(name)
            if entry is None:
                raise BundleError(f"engine index {index_path} has no engine for graph {name!r}; rebuild them")
            path = index_path.parent / entry["file"]
            if not path.is_file() or sha256_file(path) != entry["sha256"]:
                raise BundleError(f"engine {path} is missing or does not match its recorded sha256; rebuild it")
            plans[name] = path.read_bytes()
        return cls(plans[contract.prefix.name], plans[contract.step.name], contract.x_t.name, contract.velocity.name)

    # --- allocation and binding -------------------------------------------------------------------
    def _malloc(self, nbytes: int) -> int:
        ptr = int(_ck(self.cudart.cudaMalloc(aligned(max(nbytes, 1))), "cudaMalloc"))
        self._device.append(ptr)
        if ptr % ALIGN:
            raise EdgeVlaError(f"cudaMalloc returned {ptr:#x}, not {ALIGN}-byte aligned")
        return ptr

    @staticmethod
    def _bind(ctx: Any, name: str, ptr: int) -> None:
        if ptr % ALIGN:
            raise EdgeVlaError(f"refusing to bind {name} at {ptr:#x}: TensorRT needs {ALIGN}-byte aligned addresses")
        if not ctx.set_tensor_address(name, ptr):
            raise EdgeVlaError(f"TensorRT refused the address {ptr:#x} for tensor {name!r} (set_tensor_address "
                               "returned False); see the TensorRT log above")

    # --- the Backend interface ---------------------------------------------------------------------
    def buffer(self, name: str) -> np.ndarray:
        if name not in self.host:
            raise BundleError(f"the TensorRT backend has no host buffer {name!r}; it has {sorted(self.host)}")
        return self.host[name].array

    def set_time_rows(self, name: str, rows: np.ndarray) -> None:
        """Upload the schedule's time inputs, row k at its own 256-byte-aligned device slot k."""
        shape, dtype = self.specs.get(name, ((), None))
        if dtype is None or rows.shape[1:] != shape or rows.dtype != dtype:
            raise BundleError(f"time rows {rows.dtype}{list(rows.shape)} do not fit engine input {name!r} "
                              f"{dtype}{list(shape)}")
        row_bytes = int(np.prod(shape)) * dtype.itemsize
        stride = aligned(row_bytes)
        padded = np.zeros((len(rows), stride), dtype=np.uint8)
        padded[:, :row_bytes] = np.ascontiguousarray(rows).reshape(len(rows), -1).view(np.uint8)
        self._free_time_slots()
        self.time_dev = self._malloc(padded.nbytes)
        _ck(self.cudart.cudaMemcpy(self.time_dev, padded.ctypes.data, padded.nbytes,
                                   self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice), "upload time slots")
        self.time_name, self.time_stride, self.time_slots = name, stride, len(rows)
        self._drop_graph()  # a captured graph baked the old slot addresses

    def time_slot(self, slot: int) -> int:
        if self.time_name is None or not 0 <= slot < self.time_slots:
            raise EdgeVlaError(f"time slot {slot} is not among the {self.time_slots} uploaded by set_time_rows()")
        return self.time_dev + slot * self.time_stride

    def _h2d(self, name: str, stream: Any) -> None:
        h = self.host[name]
        _ck(self.cudart.cudaMemcpyAsync(self.dev[name], h.ptr, h.nbytes,
                                        self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream), f"H2D {name}")

    def _d2h(self, name: str, stream: Any) -> None:
        h = self.host[name]
        _ck(self.cudart.cudaMemcpyAsync(h.ptr, self.dev[name], h.nbytes,
                                        self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream), f"D2H {name}")

    def _sync(self) -> None:
        _ck(self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def _execute(self, which: str, stream: Any) -> None:
        if not self.contexts[which].execute_async_v3(int(stream)):
            raise EdgeVlaError(f"TensorRT {which} engine failed to enqueue")

    def run_prefix(self) -> None:
        """Uploads every per-chunk input (observation inputs of both engines), runs the prefix engine."""
        for name in self.per_chunk:
            if name not in (self.x_name, self.time_name):
                self._h2d(name, self.stream)
        self._execute("prefix", self.stream)
        self._sync()

    def run_step(self, slot: int) -> None:
        self._h2d(self.x_name, self.stream)
        self._bind(self.contexts["step"], str(self.time_name), self.time_slot(slot))
        self._execute("step", self.stream)
        for name in self.step_outputs:
            self._d2h(name, self.stream)
        self._sync()

    # --- whole chunk: one CUDA graph ---------------------------------------------------------------
    def supports_fused_chunk(self) -> bool:
        return True

    def _enqueue_chunk(self, stream: Any) -> None:
        assert self.noise is not None and self.actions is not None
        shape = self.specs[self.x_name][0]
        n, d = int(np.prod(shape)), shape[-1]
        x_in, v = self.dev[self.x_name], self.dev[self.v_name]
        kind = self.cudart.cudaMemcpyKind
        for name in self.per_chunk:
            if name not in (self.x_name, self.time_name):
                self._h2d(name, stream)
        _ck(self.cudart.cudaMemcpyAsync(self.x_dev, self.noise.ptr, self.noise.nbytes, kind.cudaMemcpyHostToDevice,
                                        stream), "H2D noise")
        self._execute("prefix", stream)
        # x_in (the step engine's x_t) <- x; then per step: v = f(x_in, slot 2i); x += dt v; x_in <- x.
        dt = self.chunk_dt
        self.kernels.ode_step(self.x_dev, v, 0, x_in, 0, 0, 0, n=n, D=d, E=0, dt=dt, t_next=0.0, mode=MODE_INIT,
                              stream=stream)
        ctx = self.contexts["step"]
        for i in range(self.chunk_steps):
            self._bind(ctx, str(self.time_name), self.time_slot(2 * i))  # baked into the captured graph
            self._execute("step", stream)
            self.kernels.ode_step(self.x_dev, v, 0, x_in, 0, 0, 0, n=n, D=d, E=0, dt=dt, t_next=0.0,
                                  mode=MODE_EULER, stream=stream)
        _ck(self.cudart.cudaMemcpyAsync(self.actions.ptr, self.x_dev, self.actions.nbytes,
                                        kind.cudaMemcpyDeviceToHost, stream), "D2H actions")

    def prepare_fused_chunk(self, steps: int, dt: float) -> None:
        """Load the kernels, warm up, and capture the chunk graph (or fall back to eager launches)."""
        from edge_vla.kernels.loader import Kernels

        for tname in (self.x_name, self.v_name):
            if self.specs[tname] != (self.specs[self.x_name][0], np.dtype(np.float32)):
                raise EdgeVlaError(f"the fused chunk runs the fp32 ode_step kernel; engine tensor {tname} is "
                                   f"{self.specs[tname]}")
        if self.time_slots < 2 * steps + 1:
            raise EdgeVlaError(f"set_time_rows() uploaded {self.time_slots} slots; {steps} steps need {2 * steps + 1}")
        self.kernels = self.kernels or Kernels()
        if self.noise is None:
            shape = self.specs[self.x_name][0]
            self.noise = _Pinned(self.cudart, shape, np.float32)
            self.actions = _Pinned(self.cudart, shape, np.float32)
            self._pinned += [self.noise, self.actions]
            self.x_dev = self._malloc(self.noise.nbytes)
        self._drop_graph()
        self.chunk_steps, self.chunk_dt = steps, dt
        self._enqueue_chunk(self.stream)  # warm-up: TensorRT allocates lazily on the first run
        self._sync()
        try:
            self.graph_exec = self._capture()
        except EdgeVlaError as exc:
            self.graph_exec = None
            log.warning("CUDA graph capture refused (%s); running the chunk eagerly on the stream", exc)

    def _capture(self) -> Any:
        cudart = self.cudart
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        _ck(cudart.cudaStreamBeginCapture(self.stream, mode), "cudaStreamBeginCapture")
        try:
            self._enqueue_chunk(self.stream)
        except BaseException:
            # End the capture so the stream is usable again, but report the error that broke it,
            # not the invalidated-capture status that EndCapture returns after it.
            err, graph = cudart.cudaStreamEndCapture(self.stream)
            if int(err) == 0 and graph is not None:
                cudart.cudaGraphDestroy(graph)
            raise
        self.graph = _ck(cudart.cudaStreamEndCapture(self.stream), "cudaStreamEndCapture")
        return _ck(cudart.cudaGraphInstantiate(self.graph, 0), "cudaGraphInstantiate")

    def run_fused_chunk(self, noise: np.ndarray) -> np.ndarray:
        """Observation inputs already in their buffers; returns normalized actions (a reused pinned buffer)."""
        if self.noise is None or self.actions is None or not self.chunk_steps:
            raise EdgeVlaError("run_fused_chunk() before prepare_fused_chunk()")
        np.copyto(self.noise.array, noise)
        if self.graph_exec is not None:
            _ck(self.cudart.cudaGraphLaunch(self.graph_exec, self.stream), "cudaGraphLaunch")
        else:
            self._enqueue_chunk(self.stream)
        self._sync()
        return self.actions.array

    # --- lifetime ----------------------------------------------------------------------------------
    def _drop_graph(self) -> None:
        if self.graph_exec is not None:
            _ck(self.cudart.cudaGraphExecDestroy(self.graph_exec), "cudaGraphExecDestroy")
            self.graph_exec = None
        if self.graph is not None:
            _ck(self.cudart.cudaGraphDestroy(self.graph), "cudaGraphDestroy")
            self.graph = None

    def _free_time_slots(self) -> None:
        if self.time_dev:
            self._device.remove(self.time_dev)
            _ck(self.cudart.cudaFree(self.time_dev), "cudaFree")
            self.time_dev, self.time_slots = 0, 0

    def _release(self) -> None:
        errors: list[str] = []

        def attempt(fn: Any, *args: Any) -> None:
            try:
                fn(*args)
            except Exception as exc:  # free everything else even if one call fails
                errors.append(str(exc))

        if self.stream is not None:
            attempt(self._sync)
        attempt(self._drop_graph)
        for pinned in self._pinned:
            attempt(pinned.free)
        self._pinned.clear()
        for ptr in self._device:
            attempt(lambda p: _ck(self.cudart.cudaFree(p), "cudaFree"), ptr)
        self._device.clear()
        self.time_dev = self.x_dev = 0
        if self.stream is not None:
            attempt(lambda s: _ck(self.cudart.cudaStreamDestroy(s), "cudaStreamDestroy"), self.stream)
            self.stream = None
        self.contexts, self.engines = {}, {}  # contexts before engines: TensorRT's destruction order
        if errors:
            log.warning("TensorRT backend close(): %s", "; ".join(errors))


class TrtEngineRunner:
    """One engine with its own device buffers, run synchronously on named numpy inputs (engine verification)."""

    def __init__(self, plan: bytes, name: str = "engine") -> None:
        trt = require("tensorrt")
        self.cudart = require("cuda.bindings.runtime")
        self.name = name
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan)
        if self.engine is None:
            raise BundleError(f"TensorRT could not deserialize the {name} engine; rebuild it on this machine")
        self.context = self.engine.create_execution_context()
        self.stream = _ck(self.cudart.cudaStreamCreateWithFlags(self.cudart.cudaStreamNonBlocking),
                          "cudaStreamCreateWithFlags")
        self.tensors: dict[str, tuple[tuple[int, ...], np.dtype, bool, int]] = {}
        try:
            for i in range(self.engine.num_io_tensors):
                tname = self.engine.get_tensor_name(i)
                shape = tuple(self.engine.get_tensor_shape(tname))
                dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(tname)))
                ptr = int(_ck(self.cudart.cudaMalloc(aligned(max(int(np.prod(shape)) * dtype.itemsize, 1))),
                              "cudaMalloc"))
                self.tensors[tname] = (shape, dtype, self.engine.get_tensor_mode(tname) == trt.TensorIOMode.INPUT, ptr)
                TrtBackend._bind(self.context, tname, ptr)
        except BaseException:
            self.close()
            raise

    def run(self, feeds: dict[str, np.ndarray] | Any) -> dict[str, np.ndarray]:
        kind = self.cudart.cudaMemcpyKind
        keep = []
        for tname, (shape, dtype, is_input, ptr) in self.tensors.items():
            if is_input:
                arr = np.ascontiguousarray(feeds[tname], dtype=dtype).reshape(shape)
                keep.append(arr)
                _ck(self.cudart.cudaMemcpy(ptr, arr.ctypes.data, arr.nbytes, kind.cudaMemcpyHostToDevice), "H2D")
        if not self.context.execute_async_v3(int(self.stream)):
            raise EdgeVlaError(f"TensorRT {self.name} engine failed to enqueue")
        _ck(self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        out = {}
        for tname, (shape, dtype, is_input, ptr) in self.tensors.items():
            if not is_input:
                arr = np.empty(shape, dtype)
                _ck(self.cudart.cudaMemcpy(arr.ctypes.data, ptr, arr.nbytes, kind.cudaMemcpyDeviceToHost), "D2H")
                out[tname] = arr
        return out

    def close(self) -> None:
        for _, _, _, ptr in self.tensors.values():
            self.cudart.cudaFree(ptr)
        self.tensors = {}
        if self.stream is not None:
            self.cudart.cudaStreamDestroy(self.stream)
            self.stream = None
