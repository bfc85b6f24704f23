"""onnxruntime backend: one session per graph, created once, with IO binding to preallocated buffers.

Every graph input and output is bound once to a numpy array, shared by name between graphs: the prefix
graph's per-layer K/V outputs are the very arrays the step graph's inputs read. The sampler updates
x_t in place and `run_step(slot)` copies the slot's time row into the bound time input, so a step
allocates nothing and binds nothing.

On the CPU provider the graphs are first rewritten in memory with onnxruntime-only fusions
(edge_vla.runtime.ort_fuse; default: FastGelu), never in the bundle: EDGE_VLA_ORT_FUSE (or the
`fuse` argument) picks them ("gelu,attention", "none"); a rewrite that fails falls back to the plain
graph with a warning.
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
from edge_vla.runtime.ort_fuse import KINDS, FuseReport, fuse_file

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


# Measured (interleaved A/B, 1 thread, tiny, shared 2-core box): FastGelu makes the step graph 1.07x and the
# prefix 1.06x faster; MultiHeadAttention gains ~1% on the step graph and loses ~4% on the prefix, so it is
# opt-in.
DEFAULT_FUSE = ("gelu",)
FUSE_ENV = "EDGE_VLA_ORT_FUSE"


def fuse_kinds(fuse: tuple[str, ...] | str | None = None) -> tuple[str, ...]:
    """The fusions to apply: `fuse` if given, else $EDGE_VLA_ORT_FUSE, else DEFAULT_FUSE."""
    if fuse is None:
        fuse = os.environ.get(FUSE_ENV, ",".join(DEFAULT_FUSE))
    if isinstance(fuse, str):
        names = (k.strip() for k in fuse.split(","))
        fuse = tuple(k for k in names if k and k.lower() not in ("none", "0", "off"))
    unknown = set(fuse) - set(KINDS)
    if unknown:
        raise BundleError(f"unknown onnxruntime fusion(s) {sorted(unknown)} (from the fuse argument or ${FUSE_ENV}); "
                          f"choose from {', '.join(KINDS)} or 'none'")
    return tuple(fuse)


def make_session(path: Path, threads: int | None, providers: list[str],
                 fuse: tuple[str, ...] = ()) -> tuple[ort.InferenceSession, FuseReport | None]:
    """A session on `path`, on the CPU provider first rewritten with the `fuse` fusions (report: None if not)."""
    if fuse and providers == ["CPUExecutionProvider"]:
        try:
            model, report = fuse_file(path, fuse)
            if model is not None:
                log.debug("%s: fused %s (%d -> %d nodes)", path.name, report, report.nodes_before, report.nodes_after)
                return _session(model, threads, providers, path), report
        except Exception as exc:  # any failure of an optional rewrite: run the bundle's own graph
            log.warning("onnxruntime fusion of %s failed (%s: %s); running the plain graph (set %s=none to skip "
                        "the attempt)", path, type(exc).__name__, exc, FUSE_ENV)
    return _session(str(path), threads, providers, path), None


def _session(model: str | bytes, threads: int | None, providers: list[str], path: Path) -> ort.InferenceSession:
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
        return ort.InferenceSession(model, sess_options=opts, providers=providers)
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
                 providers: list[str] | None = None, fuse: tuple[str, ...] | str | None = None) -> None:
        self.providers = providers or choose_providers()
        kinds = fuse_kinds(fuse)
        self.prefix_sess, prefix_report = make_session(prefix_path, threads, self.providers, kinds)
        self.step_sess, step_report = make_session(step_path, threads, self.providers, kinds)
        # What the load-time rewrite did per graph (None: the plain graph runs).
        self.fused: dict[str, FuseReport | None] = {"prefix": prefix_report, "step": step_report}
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
                    providers: list[str] | None = None, fuse: tuple[str, ...] | str | None = None) -> OrtBackend:
        paths = [bundle.root / g.file for g in (contract.prefix, contract.step)]
        for p in paths:
            if not p.is_file():
                raise BundleError(f"bundle {bundle.root} lacks graph file {p.relative_to(bundle.root)}")
        return cls(*paths, threads=threads, providers=providers, fuse=fuse)

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
