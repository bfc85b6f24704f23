"""onnxruntime backend: one session per graph, created once, with IO binding to preallocated buffers.

Every graph input and output is bound once to a numpy array, shared by name between graphs: the prefix
graph's per-layer K/V outputs are the very arrays the step graph's inputs read. The sampler updates
x_t in place and `run_step(slot)` copies the slot's time row into the bound time input, so a step
allocates nothing and binds nothing.

On the CPU provider the graphs are first rewritten in memory with onnxruntime-only fusions
(edge_vla.runtime.ort_fuse; default: FastGelu), never in the bundle: EDGE_VLA_ORT_FUSE (or the
`fuse` argument) picks them ("gelu,attention", "none"); a rewrite that fails falls back to the plain
graph with a warning.

Also on the CPU provider, a whole Euler chunk runs as one onnxruntime call (the Backend's fused-chunk
capability, which Policy uses for Euler chunks without an action prefix): prepare_fused_chunk composes the
prefix graph and N copies of the step graph, each with its time row as a constant, into one graph
(ort_fuse.compose_chunk) and binds it once. Same float32 operations as the Sampler, in the same order: FP32 and
INT8 chunks equal the stepping path's to the bit (FP16 graphs to FP16 rounding: onnxruntime folds the constant
time rows through their casts). What it saves is the 1 + N run calls and the Python between them (tiny, 1
thread: ~8% of a chunk). EDGE_VLA_ORT_CHUNK (or the `chunk` argument) turns it off ("off").
Graphs with external weights, or over CHUNK_MAX_BYTES, keep stepping: there the per-call overhead is noise
and the chunk session would hold a second copy of the weights.

Where edge_vla.runtime.cpu_step applies (an FP32 FoldedStep step graph, a C compiler, its load-time numerics check
passed; EDGE_VLA_CPU_STEP=auto, the default), the one-call chunk is the prefix graph in onnxruntime and then every
Euler step in one C call instead of the composed graph; `chunk_path` says which runs ("cpu_step" or "onnxruntime").
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edge_vla.bundle import Bundle
from edge_vla.errors import BundleError, EdgeVlaError
from edge_vla.runtime import cpu_step
from edge_vla.runtime import onnx_proto as pb
from edge_vla.runtime.backend import HostBufferBackend, env_switch
from edge_vla.runtime.contract import DTYPES, Contract
from edge_vla.runtime.ort_fuse import CHUNK_NOISE, KINDS, ChunkReport, FuseReport, compose_chunk, fuse_file

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


# A chunk in one call: on by default; "off" steps the ODE from the host (one call per graph run).
CHUNK_ENV = "EDGE_VLA_ORT_CHUNK"
# Above this many bytes of graph files (prefix + step) the chunk is not composed: the run-call overhead it saves
# (~25 us per step) is noise against such graphs' GEMMs, and the chunk session would hold a second copy of
# their weights. tiny: 4.5 MB.
CHUNK_MAX_BYTES = 64 << 20


def chunk_enabled(chunk: bool | str | None = None) -> bool:
    """Whether to run Euler chunks as one call: `chunk` if given, else $EDGE_VLA_ORT_CHUNK, else on."""
    return env_switch(chunk, CHUNK_ENV, "one onnxruntime call per chunk", "one call per graph run")


def make_session(path: Path, threads: int | None, providers: list[str],
                 fuse: tuple[str, ...] = ()) -> tuple[ort.InferenceSession, FuseReport | None]:
    """A session on `path`, on the CPU provider first rewritten with the `fuse` fusions (report: None if not)."""
    model, report = load_graph(path, providers, fuse)
    return _session(model if model is not None else str(path), threads, providers, path), report


def load_graph(path: Path, providers: list[str], fuse: tuple[str, ...] = ()) -> tuple[bytes | None, FuseReport | None]:
    """The fused model bytes of `path` and the fusion report, or (None, None) where the plain file runs."""
    if fuse and providers == ["CPUExecutionProvider"]:
        try:
            model, report = fuse_file(path, fuse)
            if model is not None:
                log.debug("%s: fused %s (%d -> %d nodes)", path.name, report, report.nodes_before, report.nodes_after)
                return model, report
        except Exception as exc:  # any failure of an optional rewrite: run the bundle's own graph
            log.warning("onnxruntime fusion of %s failed (%s: %s); running the plain graph (set %s=none to skip "
                        "the attempt)", path, type(exc).__name__, exc, FUSE_ENV)
    return None, None


def _session(model: str | bytes, threads: int | None, providers: list[str], path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # The CPUs this process may run on (taskset, systemd's CPUAffinity=, edge-vla run's split), not the machine's:
    # two threads on one allowed core only preempt each other.
    opts.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    # No spin-waiting between ops: on a robot the control loop shares these cores, and a spinning
    # intra-op pool steals them (measured: barely any latency gain when the box is otherwise idle).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(model, sess_options=opts, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types per build
        raise BundleError(f"onnxruntime could not load {path}: {exc}") from exc


def _chunk_sources(*graphs: tuple[Path, bytes | None]) -> tuple[bytes, bytes] | None:
    """The (prefix, step) model bytes to compose the one-call chunk from, or None where it is not built: graph files
    over CHUNK_MAX_BYTES in all, or weights in external data files (large models)."""
    if sum(path.stat().st_size for path, _ in graphs) > CHUNK_MAX_BYTES:
        log.debug("one-call chunk not built: the graphs are over %d MiB", CHUNK_MAX_BYTES >> 20)
        return None
    out = [model if model is not None else path.read_bytes() for path, model in graphs]
    if any(t.data_location == pb.EXTERNAL for data in out for t in pb.load_model(data).graph.initializer):
        log.debug("one-call chunk not built: weights in external data")
        return None
    return out[0], out[1]


class Buffers:
    """Every array the policy touches per chunk, allocated once, keyed by graph IO name."""

    def __init__(self, specs: dict[str, dict]) -> None:
        self.arrays = {name: np.zeros(s["shape"], dtype=DTYPES[s["dtype"]]) for name, s in specs.items()}

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def __contains__(self, name: str) -> bool:
        return name in self.arrays


class OrtBackend(HostBufferBackend):
    """Runs the prefix graph once per chunk and the step graph once per ODE evaluation; on the CPU provider, an
    Euler chunk without an action prefix as one call of the composed chunk graph."""

    name = "onnxruntime"

    def __init__(self, prefix_path: Path, step_path: Path, threads: int | None = None,
                 providers: list[str] | None = None, fuse: tuple[str, ...] | str | None = None,
                 chunk: bool | str | None = None, x_t: str = "x_t", velocity: str = "velocity",
                 prefix_mask: str | None = None) -> None:
        self.providers = providers or choose_providers()
        self.threads = threads
        kinds = fuse_kinds(fuse)
        prefix_model, prefix_report = load_graph(prefix_path, self.providers, kinds)
        step_model, step_report = load_graph(step_path, self.providers, kinds)
        self.prefix_sess = _session(prefix_model or str(prefix_path), threads, self.providers, prefix_path)
        self.step_sess = _session(step_model or str(step_path), threads, self.providers, step_path)
        # What the load-time rewrite did per graph (None: the plain graph runs).
        self.fused: dict[str, FuseReport | None] = {"prefix": prefix_report, "step": step_report}
        self.x_name, self.v_name, self.mask_name = x_t, velocity, prefix_mask
        # The graphs the chunk is composed from (as the sessions run them), kept where the chunk may be built.
        self._chunk_sources: tuple[bytes, bytes] | None = None
        if chunk_enabled(chunk) and self.providers == ["CPUExecutionProvider"]:
            self._chunk_sources = _chunk_sources((Path(prefix_path), prefix_model), (Path(step_path), step_model))
        self.chunk: ChunkReport | None = None  # set by prepare_fused_chunk
        self.step_path, self._cpu_step_on = Path(step_path), cpu_step.cpu_step_enabled()
        self.cpu_step: cpu_step.CpuStep | None = None  # the C Euler loop, where prepare_fused_chunk set it up
        self.chunk_sess: ort.InferenceSession | None = None
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
        self._time_name: str | None = None
        self._chunk_binding: ort.IOBinding | None = None
        self._chunk_noise: np.ndarray | None = None
        self._chunk_x: np.ndarray | None = None

    @classmethod
    def from_bundle(cls, bundle: Bundle, contract: Contract, threads: int | None = None,
                    providers: list[str] | None = None, fuse: tuple[str, ...] | str | None = None) -> OrtBackend:
        paths = [bundle.root / g.file for g in (contract.prefix, contract.step)]
        for p in paths:
            if not p.is_file():
                raise BundleError(f"bundle {bundle.root} lacks graph file {p.relative_to(bundle.root)}")
        mask = contract.prefix_mask
        return cls(*paths, threads=threads, providers=providers, fuse=fuse, x_t=contract.x_t.name,
                   velocity=contract.velocity.name, prefix_mask=None if mask is None else mask.name)

    def _bind(self, sess: ort.InferenceSession) -> ort.IOBinding:
        binding = sess.io_binding()
        for v in sess.get_inputs():
            binding.bind_cpu_input(v.name, self.buf[v.name])
        for v in sess.get_outputs():
            arr = self.buf[v.name]
            binding.bind_output(v.name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
        return binding

    def set_time_rows(self, name: str, rows: np.ndarray) -> None:
        self._time = self._fit_time_rows(name, rows)
        self._time_name = name

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

    # --- whole chunk: one onnxruntime call -----------------------------------------------------------------
    def supports_fused_chunk(self) -> bool:
        """CPU provider, the chunk not turned off, graphs small enough, and float32 x_t and velocity (the state's
        dtype: the Euler update runs on them directly)."""
        if self._chunk_sources is None or self.x_name not in self.buf or self.v_name not in self.buf:
            return False
        return self.buf[self.x_name].dtype == np.float32 and self.buf[self.v_name].dtype == np.float32

    def prepare_fused_chunk(self, steps: int, dt: float) -> None:
        """Compose prefix + `steps` Euler steps into one graph (time rows from set_time_rows) and bind it once."""
        if not self.supports_fused_chunk() or self._chunk_sources is None:
            raise EdgeVlaError(f"the one-call chunk is off here ({CHUNK_ENV}, a provider other than the CPU, or "
                               "graphs over CHUNK_MAX_BYTES)")
        if self._time is None or self._time_name is None:
            raise EdgeVlaError("prepare_fused_chunk() before set_time_rows(): the sampler sets the schedule first")
        rows = self._time[1]
        if len(rows) < 2 * steps + 1:
            raise EdgeVlaError(f"set_time_rows() gave {len(rows)} time slots; {steps} steps need {2 * steps + 1}")
        self.cpu_step = cpu_step.prepare(
            self.step_path, self.buf, x_t=self.x_name, time=self._time_name, velocity=self.v_name,
            mask=self.mask_name, rows=rows, steps=steps, dt=dt, run_ort_step=self._ort_velocity,
        ) if self._cpu_step_on else None
        if self.cpu_step is not None:  # no onnxruntime chunk graph: the prefix session and the C loop run it
            self.chunk_sess = self.chunk = self._chunk_binding = None
            return
        # RTC bundles: a chunk without an action prefix has an all-zero mask (what the sampler writes for d = 0).
        fixed = {} if self.mask_name is None else {self.mask_name: np.zeros_like(self.buf[self.mask_name])}
        try:
            model, report = compose_chunk(pb.load_model(self._chunk_sources[0]), pb.load_model(self._chunk_sources[1]),
                                          steps=steps, dt=dt, time_name=self._time_name, time_rows=rows,
                                          x_t=self.x_name, velocity=self.v_name, fixed=fixed)
            sess = _session(model.SerializeToString(), self.threads, self.providers, Path("<one-call chunk graph>"))
        except Exception as exc:  # an optional speed-up: the caller steps the ODE instead
            raise EdgeVlaError(f"no one-call onnxruntime chunk ({type(exc).__name__}: {exc}); set {CHUNK_ENV}=off to "
                               "skip the attempt") from exc
        noise = np.zeros(self.buf[self.x_name].shape, dtype=np.float32)
        x = np.zeros_like(noise)
        binding = sess.io_binding()
        for v in sess.get_inputs():
            binding.bind_cpu_input(v.name, noise if v.name == CHUNK_NOISE else self.buffer(v.name))
        binding.bind_output(report.output, "cpu", 0, x.dtype, list(x.shape), x.ctypes.data)
        self.chunk_sess, self.chunk, self._chunk_binding = sess, report, binding
        self._chunk_noise, self._chunk_x = noise, x
        log.debug("one-call chunk: prefix + %d Euler steps, %d nodes", steps, report.nodes)

    @property
    def chunk_path(self) -> str | None:
        """Which one-call chunk prepare_fused_chunk set up: "cpu_step" (the C loop), "onnxruntime" (the composed
        graph), or None (none yet, or stepping)."""
        return "cpu_step" if self.cpu_step is not None else "onnxruntime" if self.chunk_sess is not None else None

    def run_fused_chunk(self, noise: np.ndarray) -> np.ndarray:
        """Observation inputs already in their buffers; returns the float32 state after the chunk's steps (a reused
        buffer). The prefix outputs' buffers are not written (the chunk keeps the K/V inside), except by the C loop's
        path, which runs the prefix session and then the C loop on its K/V buffers."""
        if self.cpu_step is not None:
            self.run_prefix()
            return self.cpu_step.run(noise)
        if self.chunk_sess is None or self._chunk_binding is None or self._chunk_noise is None:
            raise EdgeVlaError("run_fused_chunk() before prepare_fused_chunk()")
        np.copyto(self._chunk_noise, noise)
        self.chunk_sess.run_with_iobinding(self._chunk_binding)
        return self._chunk_x  # type: ignore[return-value]

    def _ort_velocity(self, x: np.ndarray, slot: int) -> np.ndarray:
        """onnxruntime's velocity at state x and time slot `slot` (the C loop's load-time check)."""
        np.copyto(self.buf[self.x_name], x, casting="same_kind")
        self.run_step(slot)
        return self.buf[self.v_name]

    def _release(self) -> None:
        self.cpu_step = None
        # Sessions hold no device resources on the CPU provider; dropping them frees their arenas.
        self._prefix_binding = self._step_binding = self._chunk_binding = None  # type: ignore[assignment]
        self.prefix_sess = self.step_sess = self.chunk_sess = None  # type: ignore[assignment]
        self._chunk_sources = None
