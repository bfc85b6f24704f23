"""OpenVINO backend: the bundle's prefix and step graphs compiled for OpenVINO's CPU plugin (issue 28).

    Policy.load(bundle, backend="openvino", precision="bf16")     # pip install 'edge-vla[openvino]'

Compiled once per graph with everything that changes speed or numerics set, never left to the plugin:
- INFERENCE_PRECISION_HINT: "f32" unless "bf16" is asked for (OpenVINO's own default is BF16 on CPUs with
  AVX512-BF16 or AMX, which would change the numbers silently). BF16 is refused on a CPU whose
  OPTIMIZATION_CAPABILITIES lacks it; the compiled model's own value is what `precision` reports.
- INFERENCE_NUM_THREADS (as the onnxruntime backend: `threads`, else every CPU), one stream, the LATENCY hint.
- ENABLE_CPU_PINNING off: on a robot the control loop shares these cores, and pinned inference threads could
  not be moved off its core. OpenVINO has no spin-wait setting (its TBB workers spin briefly after a task;
  there is no public switch), so this is all it allows.
- DYNAMIC_QUANTIZATION_GROUP_SIZE 0: no on-the-fly INT8 of activations the bundle did not ask for.

Every graph input and output is an ov.Tensor over a numpy array allocated once and set on the infer
request once (shared memory): the prefix request's K/V outputs are the very arrays the step request
reads, the sampler writes x_t in place and reads velocity in place, and `run_step(slot)` copies the
slot's time row into the bound time input, as the onnxruntime backend does. A step allocates no buffer.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from edge_vla.bundle import Bundle
from edge_vla.errors import BundleError, ConfigError, EdgeVlaError
from edge_vla.optional import available, require
from edge_vla.runtime.backend import HostBufferBackend
from edge_vla.runtime.contract import DTYPES, Contract

log = logging.getLogger(__name__)

PRECISIONS = ("f32", "bf16")
DEFAULT_PRECISION = "f32"
DEVICE = "CPU"
# ov.Type names as the plugin reports them -> this module's precision names
_HINT_NAMES = {"f32": "f32", "float32": "f32", "bf16": "bf16", "bfloat16": "bf16", "f16": "f16", "float16": "f16"}


def openvino_available() -> bool:
    return available("openvino")


@functools.cache
def shared_core() -> Any:
    """The one ov.Core of this process, kept for its lifetime. Why one: each Core's CPU plugin gives the thread a
    signal stack of its own and, when let go, puts back the stack it found and unmaps its own (OpenVINO 2026.4
    does this on every CPU). Let go out of creation order (a BF16 probe, then two backends closed in turn, as
    `edge-vla tune` does), the thread is left on an unmapped signal stack, and the next signal whose handler runs
    on it (CPython's all do: SIGTERM to a motor backend's torque-off hook, Ctrl-C) kills the process by SIGSEGV
    instead. One Core never lets its plugin go."""
    return require("openvino").Core()


def _core(core: Any = None) -> Any:
    return core if core is not None else shared_core()


def cpu_capabilities(core: Any = None) -> list[str]:
    """OpenVINO's OPTIMIZATION_CAPABILITIES of the CPU plugin (e.g. ["BF16", "FP32", "INT8", ...])."""
    return [str(c) for c in _core(core).get_property(DEVICE, "OPTIMIZATION_CAPABILITIES")]


def bf16_supported(core: Any = None) -> bool:
    """True where openvino imports and its CPU plugin reports BF16 (AVX512-BF16 or AMX)."""
    if not openvino_available():
        return False
    return "BF16" in cpu_capabilities(core)


def check_precision(precision: str | None, core: Any = None) -> str:
    """The precision to compile with: `precision` (f32 when None), refused where this CPU cannot run it."""
    precision = precision or DEFAULT_PRECISION
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown OpenVINO precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "bf16" and "BF16" not in (caps := cpu_capabilities(core)):
        raise ConfigError(f"OpenVINO precision bf16: this CPU reports no BF16 (its OPTIMIZATION_CAPABILITIES are "
                          f"{', '.join(caps)}); use precision f32")
    return precision


def compile_config(precision: str, threads: int | None) -> dict[str, Any]:
    """The CPU plugin properties the backend compiles with (every one that changes speed or numerics)."""
    return {
        "INFERENCE_PRECISION_HINT": precision,
        "INFERENCE_NUM_THREADS": int(threads or len(os.sched_getaffinity(0))),  # the allowed CPUs
        "NUM_STREAMS": 1,
        "PERFORMANCE_HINT": "LATENCY",
        "ENABLE_CPU_PINNING": False,
        "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0,
    }


def _precision_name(hint: Any) -> str:
    """"f32" / "bf16" from the compiled model's INFERENCE_PRECISION_HINT (an ov.Type)."""
    text = hint.to_string() if hasattr(hint, "to_string") else str(hint)
    return _HINT_NAMES.get(text, text)


class OvBackend(HostBufferBackend):
    """Runs the prefix graph once per chunk and the step graph once per ODE evaluation on OpenVINO CPU."""

    name = "openvino"

    def __init__(self, prefix_path: Path, step_path: Path, precision: str | None = None, threads: int | None = None,
                 names: dict[str, set[str]] | None = None) -> None:
        """`names`: per graph role, the IO names the bundle's manifest gives (a port may carry several names)."""
        ov = require("openvino")
        core = shared_core()
        self.requested = check_precision(precision, core)
        self.config = compile_config(self.requested, threads)
        self.compiled: dict[str, Any] = {}
        for role, path in (("prefix", prefix_path), ("step", step_path)):
            try:
                self.compiled[role] = core.compile_model(str(path), DEVICE, self.config)
            except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own per failure
                raise BundleError(f"OpenVINO could not compile {path}: {str(exc).strip().splitlines()[0]}") from exc
        # What the plugin actually runs, not what was asked: a mismatch means the hint was not applied.
        applied = {_precision_name(c.get_property("INFERENCE_PRECISION_HINT")) for c in self.compiled.values()}
        if applied != {self.requested}:
            raise EdgeVlaError(f"OpenVINO compiled with inference precision {sorted(applied)} although "
                               f"{self.requested} was asked for; report this with `edge-vla doctor` output")
        self.precision = self.requested
        self.threads = self.config["INFERENCE_NUM_THREADS"]
        self.ports = {role: self._ports(role, c, (names or {}).get(role, set())) for role, c in self.compiled.items()}
        self.buf = self._allocate(ov)
        self.requests = {role: c.create_infer_request() for role, c in self.compiled.items()}
        self._tensors = {name: ov.Tensor(arr, shared_memory=True) for name, arr in self.buf.items()}
        for role, req in self.requests.items():
            for port, name in self.ports[role]:
                req.set_tensor(port, self._tensors[name])
        self._prefix, self._step = self.requests["prefix"], self.requests["step"]
        self._time: tuple[np.ndarray, np.ndarray] | None = None  # (bound input, rows)
        log.debug("OpenVINO %s: precision %s, %d thread(s)", ov.__version__, self.precision, self.threads)

    @classmethod
    def from_bundle(cls, bundle: Bundle, contract: Contract, precision: str | None = None,
                    threads: int | None = None) -> OvBackend:
        paths = [bundle.root / g.file for g in (contract.prefix, contract.step)]
        for p in paths:
            if not p.is_file():
                raise BundleError(f"bundle {bundle.root} lacks graph file {p.relative_to(bundle.root)}")
        names = {role: {s.name for s in (*g.inputs, *g.outputs)}
                 for role, g in (("prefix", contract.prefix), ("step", contract.step))}
        return cls(*paths, precision=precision, threads=threads, names=names)

    @staticmethod
    def _ports(role: str, compiled: Any, known: set[str]) -> list[tuple[Any, str]]:
        """(port, IO name) for every input and output: the manifest's name where the port carries it."""
        out = []
        for port in [*compiled.inputs, *compiled.outputs]:
            port_names = port.get_names()
            name = next((n for n in sorted(port_names) if n in known), None) or port.get_any_name()
            if not port.get_partial_shape().is_static:
                raise BundleError(f"{role} graph IO {name} has a dynamic shape {port.get_partial_shape()}; export "
                                  "with static shapes")
            out.append((port, name))
        return out

    def _allocate(self, ov: Any) -> dict[str, np.ndarray]:
        specs: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        for role, ports in self.ports.items():
            for port, name in ports:
                dtype = np.dtype(port.get_element_type().to_dtype())
                if dtype.type not in DTYPES.values():
                    raise BundleError(f"{role} graph IO {name} has unsupported type {port.get_element_type()}")
                spec = (tuple(int(d) for d in port.get_shape()), dtype)
                if specs.setdefault(name, spec) != spec:
                    raise BundleError(f"graph IO {name} is {spec} in one graph and {specs[name]} in the other; "
                                      "re-export the bundle")
        return {name: np.zeros(shape, dtype) for name, (shape, dtype) in specs.items()}

    def set_time_rows(self, name: str, rows: np.ndarray) -> None:
        self._time = self._fit_time_rows(name, rows)

    def _check_open(self) -> None:
        if self._closed:
            raise EdgeVlaError("this OpenVINO backend was closed; load the bundle again")

    def run_prefix(self) -> None:
        """Reads the observation buffers, writes the prefix outputs (the step graph's per-layer K/V)."""
        self._check_open()
        # share_outputs: the returned views point into our own buffers (no copy per call).
        self._prefix.infer(share_outputs=True)

    def run_step(self, slot: int | None = None) -> None:
        """Reads x_t, the time input (row `slot` of the rows set; None: as it is in its buffer) and the
        prefix outputs; writes velocity."""
        self._check_open()
        if slot is not None:
            if self._time is None:
                raise BundleError("run_step(slot) before set_time_rows(): the sampler sets the schedule first")
            target, rows = self._time
            np.copyto(target, rows[slot])
        self._step.infer(share_outputs=True)

    def _release(self) -> None:
        # Requests first (they hold the tensors), then the compiled models; the numpy buffers go last.
        self.requests = {}
        self._prefix = self._step = None
        self._tensors = {}
        self.compiled = {}
