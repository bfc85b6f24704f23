"""onnxruntime backend: one session per graph, created once, with IO binding to preallocated buffers.

Every graph input and output is bound once to a numpy array, shared by name between graphs: the prefix
graph's per-layer K/V outputs are the very arrays the step graph's inputs read. The sampler updates
x_t in place and `run_step(slot)` copies the slot's time row into the bound time input, so a step
allocates nothing and binds nothing.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edge_vla.bundle import Bundle
from edge_vla.errors import BundleError
from edge_vla.runtime.backend import Backend
from edge_vla.runtime.contract import DTYPES, Contract

log = logging.getLogger(__name__)

_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int32)": "int32",
              "tensor(int64)": "int64", "tensor(uint8)": "uint8", "tensor(bool)": "bool"}


def choose_providers(requested: str = "auto") -> list[str]:
    """TensorRT EP, then CUDA EP, where the installed onnxruntime has them; CPU always last."""
    available = ort.get_available_providers()
    if requested == "cpu":
        return ["CPUExecutionProvider"]
    order = ["TensorrtExecutionProvider", "CUDAExecutionProvider"] if requested == "auto" else [requested]
    return [p for p in order if p in available] + ["CPUExecutionProvider"]


def make_session(path: Path, threads: int | None, providers: list[str]) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = threads or (os.cpu_count() or 1)
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    # No spin-waiting between ops: on a robot the control loop shares these cores, and a spinning
    # intra-op pool steals them (measured: barely any latency gain when the box is otherwise idle).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types per build
        raise BundleError(f"onnxruntime could not load {path}: {exc}") from exc


class Buffers:
    """Every array the policy touches per chunk, allocated once, keyed by graph IO name."""

    def __init__(self, specs: dict[str, dict]) -> None:
        self.arrays = {name: np.zeros(s["shape"], dtype=DTYPES[s["dtype"]]) for name, s in specs.items()}

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def __contains__(self, name: str) -> bool:
        return name in self.arrays


class OrtBackend(Backend):
    """Runs the prefix graph once per chunk and the step graph once per ODE evaluation."""

    name = "onnxruntime"

    def __init__(self, prefix_path: Path, step_path: Path, threads: int | None = None,
                 providers: list[str] | None = None) -> None:
        self.providers = providers or choose_providers()
        self.prefix_sess = make_session(prefix_path, threads, self.providers)
        self.step_sess = make_session(step_path, threads, self.providers)
        specs: dict[str, dict] = {}
        for sess in (self.prefix_sess, self.step_sess):
            for v in [*sess.get_inputs(), *sess.get_outputs()]:
                if not all(isinstance(d, int) for d in v.shape):
                    raise BundleError(f"graph IO {v.name} has a dynamic shape {v.shape}; export with static shapes")
                spec = {"shape": v.shape, "dtype": _ORT_TYPES.get(v.type, v.type)}
                if spec["dtype"] not in DTYPES:
                    raise BundleError(f"graph IO {v.name} has unsupported type {v.type}")
                if specs.setdefault(v.name, spec) != spec:
                    raise BundleError(f"graph IO {v.name} is {spec} in one graph and {specs[v.name]} in the other; "
                                      "re-export the bundle")
        self.buf = Buffers(specs)
        self._prefix_binding = self._bind(self.prefix_sess)
        self._step_binding = self._bind(self.step_sess)
        self._time: tuple[np.ndarray, np.ndarray] | None = None  # (bound input, rows)

    @classmethod
    def from_bundle(cls, bundle: Bundle, contract: Contract, threads: int | None = None,
                    providers: list[str] | None = None) -> OrtBackend:
        paths = [bundle.root / g.file for g in (contract.prefix, contract.step)]
        for p in paths:
            if not p.is_file():
                raise BundleError(f"bundle {bundle.root} lacks graph file {p.relative_to(bundle.root)}")
        return cls(*paths, threads=threads, providers=providers)

    def _bind(self, sess: ort.InferenceSession) -> ort.IOBinding:
        binding = sess.io_binding()
        for v in sess.get_inputs():
            binding.bind_cpu_input(v.name, self.buf[v.name])
        for v in sess.get_outputs():
            arr = self.buf[v.name]
            binding.bind_output(v.name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
        return binding

    def buffer(self, name: str) -> np.ndarray:
        if name not in self.buf:
            raise BundleError(f"no graph has an input or output named {name!r}")
        return self.buf[name]

    def set_time_rows(self, name: str, rows: np.ndarray) -> None:
        target = self.buffer(name)
        if rows.shape[1:] != target.shape or rows.dtype != target.dtype:
            raise BundleError(f"time rows {rows.dtype}{list(rows.shape)} do not fit input {name!r} "
                              f"{target.dtype}{list(target.shape)}")
        self._time = (target, np.ascontiguousarray(rows))

    def run_prefix(self) -> None:
        """Reads the observation buffers, writes the prefix outputs (the step graph's per-layer K/V)."""
        self.prefix_sess.run_with_iobinding(self._prefix_binding)

    def run_step(self, slot: int | None = None) -> None:
        """Reads x_t, the time input (row `slot` of the rows set; None: as it is in its buffer) and the
        prefix outputs; writes velocity."""
        if slot is not None:
            if self._time is None:
                raise BundleError("run_step(slot) before set_time_rows(): the sampler sets the schedule first")
            target, rows = self._time
            np.copyto(target, rows[slot])
        self.step_sess.run_with_iobinding(self._step_binding)

    def _release(self) -> None:
        # Sessions hold no device resources on the CPU provider; dropping them frees their arenas.
        self._prefix_binding = self._step_binding = None  # type: ignore[assignment]
        self.prefix_sess = self.step_sess = None  # type: ignore[assignment]
