"""A recording fake of TensorRT's Python API and cuda-python's runtime, for the TensorRT backend's CPU tests.

It behaves like the real libraries where the backend depends on it (and checks what they document):
- "device" memory is real host memory at 256-byte aligned addresses; copies move bytes;
- `set_tensor_address` returns False, binding nothing, for an address that is not 256-byte aligned
  (TensorRT's setTensorAddress contract) or for a name listed in `refuse`;
- `execute_async_v3` reads the addresses bound *at enqueue time*, as TensorRT does, and computes a
  simple function of its inputs through them, so a wrong binding gives wrong numbers;
- stream capture records enqueued work and a graph launch replays it; a failed enqueue during capture
  invalidates it and `cudaStreamEndCapture` then returns cudaErrorStreamCaptureInvalidated;
- every allocation, stream, graph and graph exec is tracked, so a test can see what was never freed.
The kernels' `ode_step` is faked through kernels/reference.py, the CPU oracle of the real kernel.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np

from edge_vla.kernels import reference as kref

ALIGN = 256
CAPTURE_INVALIDATED = 901
CAPTURE_UNSUPPORTED = 900


class Memory:
    def __init__(self) -> None:
        self.blocks: dict[int, tuple[Any, int]] = {}

    def alloc(self, nbytes: int) -> int:
        raw = ctypes.create_string_buffer(nbytes + ALIGN)
        ptr = (ctypes.addressof(raw) + ALIGN - 1) // ALIGN * ALIGN
        self.blocks[ptr] = (raw, nbytes)
        return ptr

    def free(self, ptr: int) -> bool:
        return self.blocks.pop(int(ptr), None) is not None

    def check(self, ptr: int, nbytes: int) -> None:
        for base, (_, size) in self.blocks.items():
            if base <= ptr and ptr + nbytes <= base + size:
                return
        raise AssertionError(f"access of {nbytes} bytes at {ptr:#x} is outside every live allocation")

    def view(self, ptr: int, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        self.check(ptr, nbytes)
        return np.frombuffer((ctypes.c_byte * nbytes).from_address(ptr), dtype=dtype).reshape(shape)


class FakeCudart:
    """The subset of cuda.bindings.runtime the backend uses, with the same (err, value) tuples."""

    cudaStreamNonBlocking = 1
    cudaMemcpyKind = SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)
    cudaStreamCaptureMode = SimpleNamespace(cudaStreamCaptureModeThreadLocal=1)

    def __init__(self) -> None:
        self.mem = Memory()
        self.device: set[int] = set()
        self.pinned: set[int] = set()
        self.streams: dict[int, int] = {}  # handle -> flags
        self.capturing: dict[int, list[Callable[[], None]]] = {}
        self.invalid: set[int] = set()
        self.graphs: set[int] = set()
        self.execs: dict[int, list[Callable[[], None]]] = {}
        self._graph_ops: dict[int, list[Callable[[], None]]] = {}
        self._next = 1

    def _handle(self) -> int:
        self._next += 1
        return self._next

    def enqueue(self, stream: Any, op: Callable[[], None]) -> None:
        s = int(stream)
        if s in self.capturing:
            self.capturing[s].append(op)
        else:
            op()

    # memory
    def cudaMalloc(self, n: int) -> tuple[int, int]:
        ptr = self.mem.alloc(n)
        self.device.add(ptr)
        return 0, ptr

    def cudaFree(self, ptr: int) -> tuple[int]:
        if int(ptr) not in self.device:
            return (1,)
        self.device.discard(int(ptr))
        self.mem.free(ptr)
        return (0,)

    def cudaMallocHost(self, n: int) -> tuple[int, int]:
        ptr = self.mem.alloc(n)
        self.pinned.add(ptr)
        return 0, ptr

    def cudaFreeHost(self, ptr: int) -> tuple[int]:
        if int(ptr) not in self.pinned:
            return (1,)
        self.pinned.discard(int(ptr))
        self.mem.free(ptr)
        return (0,)

    def _copy(self, dst: int, src: int, n: int) -> None:
        self.mem.check(int(dst), n)
        self.mem.check(int(src), n)
        ctypes.memmove(int(dst), int(src), n)

    def cudaMemcpy(self, dst: int, src: int, n: int, kind: int) -> tuple[int]:
        """Synchronous copy between fake device memory and any host memory (a plain numpy array's data)."""
        device_side = int(dst) if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice else int(src)
        self.mem.check(device_side, n)
        ctypes.memmove(int(dst), int(src), n)
        return (0,)

    def cudaMemcpyAsync(self, dst: int, src: int, n: int, kind: int, stream: Any) -> tuple[int]:
        self.enqueue(stream, lambda: self._copy(dst, src, n))
        return (0,)

    # streams and graphs
    def cudaStreamCreate(self) -> tuple[int, int]:
        h = self._handle()
        self.streams[h] = 0
        return 0, h

    def cudaStreamCreateWithFlags(self, flags: int) -> tuple[int, int]:
        h = self._handle()
        self.streams[h] = int(flags)
        return 0, h

    def cudaStreamDestroy(self, stream: Any) -> tuple[int]:
        return (0,) if self.streams.pop(int(stream), None) is not None else (1,)

    def cudaStreamSynchronize(self, stream: Any) -> tuple[int]:
        return (CAPTURE_UNSUPPORTED,) if int(stream) in self.capturing else (0,)

    def cudaStreamBeginCapture(self, stream: Any, mode: int) -> tuple[int]:
        self.capturing[int(stream)] = []
        self.invalid.discard(int(stream))
        return (0,)

    def invalidate(self, stream: Any) -> None:
        self.invalid.add(int(stream))

    def cudaStreamEndCapture(self, stream: Any) -> tuple[int, Any]:
        ops = self.capturing.pop(int(stream))
        if int(stream) in self.invalid:
            return CAPTURE_INVALIDATED, None
        g = self._handle()
        self.graphs.add(g)
        self._graph_ops[g] = ops
        return 0, g

    def cudaGraphInstantiate(self, graph: int, flags: int) -> tuple[int, int]:
        e = self._handle()
        self.execs[e] = list(self._graph_ops[graph])
        return 0, e

    def cudaGraphLaunch(self, exec_: int, stream: Any) -> tuple[int]:
        for op in self.execs[exec_]:
            op()
        return (0,)

    def cudaGraphDestroy(self, graph: int) -> tuple[int]:
        self.graphs.discard(graph)
        self._graph_ops.pop(graph, None)
        return (0,)

    def cudaGraphExecDestroy(self, exec_: int) -> tuple[int]:
        return (0,) if self.execs.pop(exec_, None) is not None else (1,)

    def live(self) -> dict[str, int]:
        return {"device": len(self.device), "pinned": len(self.pinned), "streams": len(self.streams),
                "graphs": len(self.graphs), "execs": len(self.execs)}


@dataclass
class EngineSpec:
    tensors: list[tuple[str, tuple[int, ...], Any, str]]  # name, shape, numpy dtype, "in" | "out"
    compute: Callable[[dict[str, np.ndarray]], None]  # reads inputs, writes outputs, through bound views


@dataclass
class Call:
    name: str
    ptr: int
    ok: bool


@dataclass
class FakeContext:
    engine: FakeEngine
    calls: list[Call] = field(default_factory=list)
    bound: dict[str, int] = field(default_factory=dict)
    enqueued: list[dict[str, int]] = field(default_factory=list)
    refuse: set[str] = field(default_factory=set)
    fail_enqueue_in_capture: bool = False

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        known = any(t[0] == name for t in self.engine.spec.tensors)
        ok = known and int(ptr) % ALIGN == 0 and name not in self.refuse
        self.calls.append(Call(name, int(ptr), ok))
        if ok:
            self.bound[name] = int(ptr)
        return ok

    def execute_async_v3(self, stream: int) -> bool:
        cudart = self.engine.cudart
        if self.fail_enqueue_in_capture and int(stream) in cudart.capturing:
            cudart.invalidate(stream)
            return False
        if any(t[0] not in self.bound for t in self.engine.spec.tensors):
            return False
        snapshot = dict(self.bound)  # TensorRT reads the addresses when the work is enqueued
        self.enqueued.append(snapshot)
        spec = self.engine.spec

        def run() -> None:
            views = {name: cudart.mem.view(snapshot[name], shape, dtype) for name, shape, dtype, _ in spec.tensors}
            spec.compute(views)

        cudart.enqueue(stream, run)
        return True


class FakeEngine:
    def __init__(self, spec: EngineSpec, cudart: FakeCudart, fake: FakeTensorRT) -> None:
        self.spec, self.cudart, self.fake = spec, cudart, fake
        self.num_io_tensors = len(spec.tensors)

    def get_tensor_name(self, i: int) -> str:
        return self.spec.tensors[i][0]

    def _t(self, name: str) -> tuple[str, tuple[int, ...], Any, str]:
        return next(t for t in self.spec.tensors if t[0] == name)

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self._t(name)[1]

    def get_tensor_dtype(self, name: str) -> Any:
        return self._t(name)[2]

    def get_tensor_mode(self, name: str) -> str:
        return self._t(name)[3]

    def create_execution_context(self) -> FakeContext:
        ctx = FakeContext(self, refuse=set(self.fake.refuse),
                          fail_enqueue_in_capture=self.fake.fail_enqueue_in_capture.get(self.fake.name_of(self), False))
        self.fake.contexts.append(ctx)
        return ctx


class FakeTensorRT:
    """Build with the engine specs keyed by plan bytes; install() puts it (and the cudart fake) in sys.modules."""

    TensorIOMode = SimpleNamespace(INPUT="in", OUTPUT="out")

    class Logger:
        WARNING = 2

        def __init__(self, severity: int = 2) -> None:
            self.severity = severity

    def __init__(self, engines: dict[bytes, EngineSpec], cudart: FakeCudart) -> None:
        self.engines, self.cudart = engines, cudart
        self.contexts: list[FakeContext] = []
        self.refuse: set[str] = set()
        self.fail_enqueue_in_capture: dict[str, bool] = {}
        self._names: dict[int, str] = {}
        fake = self

        class Runtime:
            def __init__(self, logger: Any) -> None:
                pass

            def deserialize_cuda_engine(self, plan: bytes) -> FakeEngine | None:
                spec = fake.engines.get(bytes(plan))
                if spec is None:
                    return None
                engine = FakeEngine(spec, fake.cudart, fake)
                fake._names[id(engine)] = bytes(plan).decode()
                return engine

        self.Runtime = Runtime

    def name_of(self, engine: FakeEngine) -> str:
        return self._names.get(id(engine), "")

    @staticmethod
    def nptype(dtype: Any) -> Any:
        return dtype

    def module(self) -> ModuleType:
        m = ModuleType("tensorrt")
        m.__dict__.update(Logger=self.Logger, Runtime=self.Runtime, TensorIOMode=self.TensorIOMode,
                          nptype=self.nptype, __version__="10.13-fake")
        return m

    def context(self, engine_plan: bytes) -> FakeContext:
        return next(c for c in self.contexts if self.name_of(c.engine) == engine_plan.decode())


class FakeKernels:
    """edge_vla.kernels.loader.Kernels' ode_step on fake device memory, computed by the CPU reference."""

    def __init__(self, cudart: FakeCudart) -> None:
        self.cudart = cudart
        self.launches: list[dict[str, Any]] = []

    def ode_step(self, x: int, v: int, v_prev: int, x_in: int, temb: int, lo: int, hi: int, *, n: int, D: int,
                 E: int, dt: float, t_next: float, mode: int, dtype: str = "fp32", stream: Any = 0) -> None:
        self.launches.append({"mode": mode, "dt": dt})
        mem = self.cudart.mem

        def run() -> None:
            xs, vs, xin = mem.view(x, (n,), np.float32), mem.view(v, (n,), np.float32), mem.view(x_in, (n,), np.float32)
            new_x, new_in, _, _ = kref.ode_step(xs.copy(), vs.copy(), None, dt, t_next, mode, 2)
            xs[...] = new_x
            xin[...] = new_in

        self.cudart.enqueue(stream, run)


def install(monkeypatch: Any, fake: FakeTensorRT) -> FakeKernels:
    """Put the fakes where the backend imports them from; returns the fake kernels."""
    import sys

    import edge_vla.kernels.loader as loader

    cuda = ModuleType("cuda")
    bindings = ModuleType("cuda.bindings")
    runtime = ModuleType("cuda.bindings.runtime")
    for name in dir(fake.cudart):
        if name.startswith("cuda"):
            setattr(runtime, name, getattr(fake.cudart, name))
    bindings.runtime = runtime  # type: ignore[attr-defined]
    cuda.bindings = bindings  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", fake.module())
    monkeypatch.setitem(sys.modules, "cuda", cuda)
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", runtime)
    kernels = FakeKernels(fake.cudart)
    monkeypatch.setattr(loader, "Kernels", lambda *a, **k: kernels)
    return kernels


# --- a small "model" the fake engines compute: velocity depends on x_t, the time input and the prefix ------

H, D, LAYERS = 8, 2, 2
KV_SHAPE = (1, 2, 3, 4)


def prefix_spec() -> EngineSpec:
    tensors = [("images", (1, 1, 3, 4, 4), np.float32, "in"), ("tokens", (1, 6), np.int32, "in"),
               ("state", (1, 2), np.float32, "in")]
    tensors += [(f"prefix_{kv}_{i}", KV_SHAPE, np.float32, "out") for i in range(LAYERS) for kv in ("k", "v")]

    def compute(t: dict[str, np.ndarray]) -> None:
        for i in range(LAYERS):
            t[f"prefix_k_{i}"][...] = float(t["state"].sum()) + i
            t[f"prefix_v_{i}"][...] = float(t["images"].mean()) * (i + 1) + float(t["tokens"].sum()) * 1e-3

    return EngineSpec(tensors, compute)


def prefix_term(k0: float, v1: float) -> float:
    return 0.1 * k0 - 0.2 * v1


def step_spec(time_input: str = "t", row: int = 1) -> EngineSpec:
    """velocity = -x_t * a(t) + b(t) + prefix term; scalar t: a = 1 + t, b = t; a table row holds (a, b)."""
    shape = (1,) if time_input == "t" else (1, row)
    tensors = [("x_t", (1, H, D), np.float32, "in"), (time_input, shape, np.float32, "in")]
    tensors += [(f"prefix_{kv}_{i}", KV_SHAPE, np.float32, "in") for i in range(LAYERS) for kv in ("k", "v")]
    tensors += [("velocity", (1, H, D), np.float32, "out")]

    def compute(t: dict[str, np.ndarray]) -> None:
        if time_input == "t":
            a, b = 1.0 + float(t["t"][0]), float(t["t"][0])
        else:
            a, b = float(t[time_input][0, 0]), float(t[time_input][0, 1])
        extra = prefix_term(float(t["prefix_k_0"].mean()), float(t["prefix_v_1"].mean()))
        t["velocity"][...] = -t["x_t"] * a + b + extra

    return EngineSpec(tensors, compute)


def onnx_engine(path: Any, perturb: float = 0.0, seed: int = 0) -> EngineSpec:
    """A fake engine that computes an ONNX graph with onnxruntime (a stand-in for an engine built from it);
    `perturb` adds relative noise to its outputs, like an engine that lost precision."""
    import onnxruntime as ort

    from edge_vla.runtime.contract import DTYPES

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    types = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int32)": "int32",
             "tensor(int64)": "int64"}
    tensors = [(v.name, tuple(v.shape), DTYPES[types[v.type]], "in") for v in sess.get_inputs()]
    tensors += [(v.name, tuple(v.shape), DTYPES[types[v.type]], "out") for v in sess.get_outputs()]
    rng = np.random.default_rng(seed)

    def compute(t: dict[str, np.ndarray]) -> None:
        outs = sess.run(None, {v.name: t[v.name].copy() for v in sess.get_inputs()})
        for v, out in zip(sess.get_outputs(), outs, strict=True):
            noise = perturb * float(np.abs(out).mean()) * rng.standard_normal(out.shape) if perturb else 0.0
            t[v.name][...] = out + noise

    return EngineSpec(tensors, compute)
