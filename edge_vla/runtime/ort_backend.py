"""onnxruntime backend: one session per graph, created once, with IO binding to preallocated buffers.

The denoise step's inputs (x_t, t, prefix_kv) and output (velocity) are bound once to numpy arrays
that the ODE loop updates in place, so a step allocates nothing and copies nothing on the host.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edge_vla.errors import BundleError

log = logging.getLogger(__name__)

_NP = {"float32": np.float32, "float16": np.float16, "int32": np.int32, "int64": np.int64, "uint8": np.uint8}


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
    """Every array the policy touches per chunk, allocated once."""

    def __init__(self, specs: dict[str, dict]) -> None:
        self.arrays = {name: np.zeros(s["shape"], dtype=_NP[s["dtype"]]) for name, s in specs.items()}

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]


class OrtBackend:
    """Runs the prefix graph once per chunk and the denoise-step graph once per ODE evaluation."""

    name = "onnxruntime"

    def __init__(self, prefix_path: Path, step_path: Path, threads: int | None = None,
                 providers: list[str] | None = None) -> None:
        self.providers = providers or choose_providers()
        self.prefix_sess = make_session(prefix_path, threads, self.providers)
        self.step_sess = make_session(step_path, threads, self.providers)
        specs = {}
        for sess in (self.prefix_sess, self.step_sess):
            for v in [*sess.get_inputs(), *sess.get_outputs()]:
                if not all(isinstance(d, int) for d in v.shape):
                    raise BundleError(f"graph IO {v.name} has a dynamic shape {v.shape}; export with static shapes")
                specs[v.name] = {"shape": v.shape, "dtype": _onnx_dtype(v.type)}
        self.buf = Buffers(specs)
        self._prefix_binding = self._bind(self.prefix_sess)
        self._step_binding = self._bind(self.step_sess)

    def _bind(self, sess: ort.InferenceSession) -> ort.IOBinding:
        binding = sess.io_binding()
        for v in sess.get_inputs():
            binding.bind_cpu_input(v.name, self.buf[v.name])
        for v in sess.get_outputs():
            arr = self.buf[v.name]
            binding.bind_output(v.name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
        return binding

    def run_prefix(self) -> None:
        """Reads buf images/tokens/state, writes buf prefix_kv."""
        self.prefix_sess.run_with_iobinding(self._prefix_binding)

    def run_step(self) -> None:
        """Reads buf x_t/t/prefix_kv, writes buf velocity."""
        self.step_sess.run_with_iobinding(self._step_binding)


def _onnx_dtype(type_str: str) -> str:
    return {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int32)": "int32",
            "tensor(int64)": "int64", "tensor(uint8)": "uint8"}[type_str]
