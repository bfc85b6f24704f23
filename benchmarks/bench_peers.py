"""edge-vla's runtime against what a user would run instead, on the same machine, and the floor (issue 17).

    .venv/bin/pytest benchmarks/bench_peers.py -s --benchmark-disable-gc

One chunk, batch 1, same observation, same intra-op thread count for every contender, contenders
interleaved in each round (order rotated), so load from other jobs hits all of them alike:
- eager: PyTorch eager with the prefix cached (bench_runtime.eager_chunk, the existing baseline);
- torch.compile: inductor on the same sampler (prefix + the unrolled Euler loop + denormalisation, one
  compiled function per step count), cold cache; compile seconds are reported in the row's label. A compile
  that fails is reported in the table, not raised;
- onnxruntime plain: the bundle's prefix/step ONNX graphs in `InferenceSession`s with default
  SessionOptions (only intra_op_num_threads set), driven by a plain Python Euler loop: what a user writes
  without edge-vla (PlainLoop below), checked allclose to the runtime's chunk for the same noise;
- OpenVINO (optional, `pip install 'edge-vla[bench-peers]'`; the rows are skipped when it does not import):
  the same ONNX graphs compiled for CPU with the default config plus INFERENCE_NUM_THREADS, same plain loop.
  Its default inference precision is BF16 on CPUs with AVX512-BF16/AMX, so a second row forces f32
  (INFERENCE_PRECISION_HINT=f32), the one that is checked allclose;
- edge-vla runtime (Policy on onnxruntime CPU, backend pinned) for each exported precision: fp32, fp16, int8 and
  int8-prefix (INT8 prefix graph, FP32 step graph);
- edge-vla runtime, OpenVINO backend (`Policy.load(backend="openvino", precision=...)`, edge_vla.runtime.ov_backend)
  on the fp32 bundle: f32, and bf16 where the CPU plugin reports BF16 (rows skipped without openvino);
- edge-vla tuned default: `edge-vla tune` run on the fp32 bundle at the row's thread count into a fresh state
  directory, then `Policy.load` with no backend (what a robot runs after build-engines / tune); the label names what
  tune chose, and its chunk is held to that choice's numerics gate.
Every row carries its numerics: relative L2 of its chunk against the runtime FP32 chunk for the same noise.

The floor, measured in the same run at the same thread count: the best FP32 GEMM rate of onnxruntime (MLAS)
and torch (MKL) over model-like and large sizes, the INT8 GEMM rate (onnxruntime MatMulInteger, for INT8
graphs), and copy bandwidth at each graph's footprint (cache-resident for small graphs, DRAM for large).
Per graph, floor = max(FLOPs / GEMM rate, bytes / bandwidth) with the graph-level FLOPs and bytes that
`edge-vla profile` counts (edge_vla.runtime.roofline.graph_cost); a chunk's floor is prefix + N x step.
"measured / floor" is how far a configuration is from it (1.0 = at the floor).

Environment (defaults in brackets):
  BENCH_PEERS_QUICK=1          smoke size: tiny only, 2 rounds, short microbenchmarks [0]
  BENCH_PEERS_PRESETS          presets ["tiny,base"; quick "tiny"]
  BENCH_PEERS_THREADS          intra-op threads, a comma list [tiny "1", base os.cpu_count()]
  BENCH_PEERS_STEPS            ODE step counts ["10"]
  BENCH_PEERS_ROUNDS           timed rounds [tiny 12, base 6; quick 2]
  BENCH_PEERS_PRECISIONS       runtime bundles, fp32 first ["fp32,fp16,int8,int8-prefix"]
  BENCH_PEERS_COMPILE_MODE     torch.compile mode, "default" for inductor's default, "off" to skip the row
                               ["max-autotune-no-cudagraphs"]
  BENCH_PEERS_COMPILE_BASE=1   also compile base (minutes per step count) [0]
  BENCH_BASE_INT8=0            leave out the base full-INT8 export (conftest.py) [1]
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as bench_runtime.py: idle OpenMP workers sleep
torch = pytest.importorskip("torch")

# bench_runtime.py's baseline and helpers, not copies (benchmarks/ is on sys.path under pytest's rootdir
# import mode; tests/runtime/test_bench_peers.py prepends it).
from bench_runtime import Series, eager_chunk, interleaved_rounds, observation  # noqa: E402

from edge_vla.export.data import observation_tensors  # noqa: E402
from edge_vla.runtime.compare import Metrics  # noqa: E402
from edge_vla.runtime.ort_backend import CHUNK_ENV, FUSE_ENV  # noqa: E402
from edge_vla.runtime.ov_backend import shared_core  # noqa: E402
from edge_vla.runtime.policy import Policy  # noqa: E402
from edge_vla.runtime.roofline import GraphCost, bundle_costs  # noqa: E402
from edge_vla.runtime.types import Observation  # noqa: E402
from edge_vla.tokenizer import tokenize  # noqa: E402

CPUS = os.cpu_count() or 1
QUICK = os.environ.get("BENCH_PEERS_QUICK", "0") == "1"


def _ints(var: str, default: str) -> list[int]:
    return [int(v) for v in os.environ.get(var, default).split(",") if v.strip()]


PRESETS = os.environ.get("BENCH_PEERS_PRESETS", "tiny" if QUICK else "tiny,base").split(",")
THREADS = {n: _ints("BENCH_PEERS_THREADS", "1" if n == "tiny" else str(CPUS)) for n in PRESETS}
STEPS = _ints("BENCH_PEERS_STEPS", "10")
ROUNDS = {"tiny": 2 if QUICK else 12, "base": 2 if QUICK else 6}
if "BENCH_PEERS_ROUNDS" in os.environ:
    ROUNDS = dict.fromkeys(ROUNDS, int(os.environ["BENCH_PEERS_ROUNDS"]))
WARMUP = {"tiny": 1 if QUICK else 3, "base": 1}
BLOCK = {"tiny": 2 if QUICK else 6, "base": 1}  # calls per contender per round, the first untimed (bench_runtime)
PRECISIONS = os.environ.get("BENCH_PEERS_PRECISIONS", "fp32,fp16,int8,int8-prefix").split(",")
COMPILE_MODE = os.environ.get("BENCH_PEERS_COMPILE_MODE", "max-autotune-no-cudagraphs")
COMPILE_BASE = os.environ.get("BENCH_PEERS_COMPILE_BASE", "0") == "1"
MICRO_S = 0.03 if QUICK else 0.2  # seconds per microbenchmark repeat (3 repeats, best kept)
CASES = [(n, k, t) for n in PRESETS for t in THREADS[n] for k in STEPS]
SEED = 3  # the noise seed every numerics check uses
GOALS = "tiny fp32 10 steps 1 thread: >= 3x eager, >= 2x torch.compile; fastest tiny >= 5x eager; base fp32 2 thr >= 2x eager"


# --- the floor --------------------------------------------------------------------------------------
@dataclass
class Roof:
    """This machine's measured rates at one thread count: GEMM FLOP/s (FP32; INT8 ops/s) and copy bandwidth
    (bytes/s) as a function of the footprint in bytes."""

    threads: int
    gemm_fp32: float
    gemm_int8: float
    bandwidth: Callable[[int], float]
    detail: dict[str, float] = field(default_factory=dict)  # what was measured, for the report

    def gemm(self, precision: str) -> float:
        # No FP16 arithmetic on x86 CPUs: FP16 graphs compute in FP32.
        return self.gemm_int8 if precision == "int8" else self.gemm_fp32


@dataclass(frozen=True)
class Floor:
    ms: float  # sum over graph runs of max(compute, memory)
    compute_ms: float  # sum of the compute terms
    memory_ms: float  # sum of the memory terms

    @property
    def bound(self) -> str:
        return "compute" if self.compute_ms >= self.memory_ms else "memory"


def graph_floor(cost: GraphCost, roof: Roof) -> tuple[float, float]:
    """(compute ms, memory ms) of one run of a graph at the roof's rates."""
    return 1e3 * cost.flops / roof.gemm(cost.precision), 1e3 * cost.bytes / roof.bandwidth(cost.bytes)


def chunk_floor(costs: dict[str, GraphCost], steps: int, roof: Roof, evals_per_step: int = 1) -> Floor:
    """prefix once + steps * evals_per_step step-graph runs, each at max(FLOPs / rate, bytes / bandwidth)
    (the per-graph roofline of edge_vla.runtime.roofline, with this machine's measured rates and no launch
    overhead)."""
    pc, pm = graph_floor(costs["prefix"], roof)
    sc, sm = graph_floor(costs["denoise_step"], roof)
    runs = steps * evals_per_step
    return Floor(max(pc, pm) + runs * max(sc, sm), pc + runs * sc, pm + runs * sm)


def _best_rate(work: float, fn: Callable[[], Any], budget_s: float, repeats: int = 3) -> float:
    """work units / second of fn, best of `repeats` runs of about budget_s each (after one warm-up call)."""
    fn()
    best = 0.0
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= budget_s:
                break
        best = max(best, work * n / elapsed)
    return best


def _ort_gemm(m: int, k: int, n: int, threads: int, int8: bool) -> Callable[[], None]:
    """A one-MatMul onnxruntime session (B a constant, as weights are), run through bound buffers."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if int8:
        a = rng.integers(0, 255, (m, k), dtype=np.uint8)
        b = rng.integers(-127, 127, (k, n), dtype=np.int8)
        op, a_type, y_type, y = "MatMulInteger", TensorProto.UINT8, TensorProto.INT32, np.zeros((m, n), np.int32)
    else:
        a, b = rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((k, n), dtype=np.float32)
        op, a_type, y_type, y = "MatMul", TensorProto.FLOAT, TensorProto.FLOAT, np.zeros((m, n), np.float32)
    graph = helper.make_graph([helper.make_node(op, ["A", "B"], ["Y"])], "gemm",
                              [helper.make_tensor_value_info("A", a_type, [m, k])],
                              [helper.make_tensor_value_info("Y", y_type, [m, n])],
                              [numpy_helper.from_array(b, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    binding = sess.io_binding()
    binding.bind_cpu_input("A", a)
    binding.bind_output("Y", "cpu", 0, y.dtype, list(y.shape), y.ctypes.data)

    def run(keep: tuple[np.ndarray, ...] = (a, y)) -> None:  # the binding points into a and y: keep them alive
        sess.run_with_iobinding(binding)

    return run


def _torch_gemm(m: int, k: int, n: int) -> Callable[[], None]:
    a, b, c = torch.randn(m, k), torch.randn(k, n), torch.empty(m, n)
    return lambda: torch.mm(a, b, out=c)


GEMM_SIZES = {"tiny-like 89x128x512": (89, 128, 512), "base-like 425x768x3072": (425, 768, 3072),
              "square 1024": (1024, 1024, 1024)}


class RoofMeter:
    """Measures this machine's rates at one thread count, keeping the best value seen over every call to
    measure(): on a shared machine a rate measured while another job ran is too low, and a floor from it
    too high. Bandwidth is measured per footprint on first use and again at each later measure()."""

    def __init__(self, threads: int, budget_s: float = MICRO_S, dram_bytes: int = 512 << 20) -> None:
        self.threads, self.budget_s, self.dram_bytes = threads, budget_s, dram_bytes
        self.detail: dict[str, float] = {}
        self._bw: dict[int, float] = {}

    def _keep(self, key: str, rate: float) -> None:
        self.detail[key] = max(rate, self.detail.get(key, 0.0))

    def measure(self) -> Roof:
        prev = torch.get_num_threads()
        torch.set_num_threads(self.threads)  # for the torch kernels; restored below
        try:
            for label, (m, k, n) in GEMM_SIZES.items():
                work = 2.0 * m * k * n
                self._keep(f"ort fp32 {label}", _best_rate(work, _ort_gemm(m, k, n, self.threads, False), self.budget_s))
                self._keep(f"torch fp32 {label}", _best_rate(work, _torch_gemm(m, k, n), self.budget_s))
            m, k, n = GEMM_SIZES["square 1024"]
            self._keep("ort int8 square 1024",
                       _best_rate(2.0 * m * k * n, _ort_gemm(m, k, n, self.threads, True), self.budget_s))
        finally:
            torch.set_num_threads(prev)
        for key in {*self._bw, self._key(self.dram_bytes)}:
            self._measure_bw(key)
        self.detail["copy bandwidth DRAM"] = self._bw[self._key(self.dram_bytes)]
        return self.roof()

    def roof(self) -> Roof:
        fp32 = max(v for key, v in self.detail.items() if " fp32 " in key)
        return Roof(self.threads, fp32, max(self.detail["ort int8 square 1024"], fp32), self.bandwidth,
                    dict(self.detail))

    @staticmethod
    def _key(nbytes: int) -> int:
        # Rounded to 1/8 of a power of two, so that nearby footprints share one measurement; at least 64 KiB.
        return max(1 << 16, int(2 ** (round(8 * math.log2(max(nbytes, 1))) / 8)))

    def bandwidth(self, nbytes: int) -> float:
        """Copy bandwidth (bytes/s) with `nbytes` as the footprint: half copied into the other half."""
        key = self._key(nbytes)
        if key not in self._bw:
            self._measure_bw(key)
        return self._bw[key]

    def _measure_bw(self, key: int) -> None:
        prev = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            src = torch.ones(key // 8)  # float32: key / 2 bytes each side, key bytes moved per copy
            dst = torch.empty_like(src)
            rate = _best_rate(float(key), lambda: dst.copy_(src), self.budget_s)
        finally:
            torch.set_num_threads(prev)
        self._bw[key] = max(rate, self._bw.get(key, 0.0))
        self.detail[f"copy bandwidth {key / 2**20:.3g} MiB"] = self._bw[key]  # reported: every footprint used


def measure_roof(threads: int, budget_s: float = MICRO_S, dram_bytes: int = 512 << 20) -> Roof:
    """GEMM rates and a copy-bandwidth function, measured once now at `threads`."""
    return RoofMeter(threads, budget_s, dram_bytes).measure()


# --- a plain loop over the bundle's graphs --------------------------------------------------------------
GraphRun = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]  # feeds by name -> outputs by name


def ort_runner(path: Path, threads: int) -> GraphRun:
    """onnxruntime as a user runs it: default SessionOptions, only the thread count set."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return lambda feeds: dict(zip(names, sess.run(names, feeds)))


def openvino_runner(path: Path, threads: int, precision: str | None = None) -> GraphRun:
    """OpenVINO CPU with its default config plus INFERENCE_NUM_THREADS (and INFERENCE_PRECISION_HINT when
    `precision` is given, e.g. "f32")."""
    config: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads}
    if precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    # The process's one Core (a second Core let go out of order leaves the thread on an unmapped signal stack:
    # see shared_core); sharing it changes no compile setting.
    compiled = shared_core().compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()
    outputs = [(o, o.get_any_name()) for o in compiled.outputs]
    names = {o: sorted(o.get_names()) for o, _ in outputs}

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        res = request.infer(feeds)
        # An output may carry several tensor names (the ONNX name and the producing node's): expose all.
        return {name: res[o] for o, _ in outputs for name in names[o]}

    return run


def openvino_default_precision() -> str:
    hint = shared_core().get_property("CPU", "INFERENCE_PRECISION_HINT")
    return hint.to_string() if hasattr(hint, "to_string") else str(hint)  # an ov.Type: "bf16", "f32"


class PlainLoop:
    """A schema-2 bundle driven the way a user would without edge-vla: read manifest.json, preprocess in
    numpy, run the prefix graph once, then the step graph N times in a Python Euler loop x <- x + dt * v,
    feeding it x_t, the per-layer K/V outputs of the prefix and the time input (a row of the bundle's
    time-conditioning table, or the scalar t), and denormalise. Reference-family bundles only."""

    def __init__(self, root: Path, steps: int, make: Callable[[Path], GraphRun]) -> None:
        m = json.loads((root / "manifest.json").read_text())
        if m.get("schema_version") != 2 or m["preprocessing"]["kind"] != "edge-vla-reference":
            raise ValueError(f"{root}: PlainLoop drives schema-2 edge-vla-reference bundles only")
        graphs = {g["role"]: g for g in m["graphs"].values()}
        prefix, step = graphs["prefix"], graphs["step"]
        self.prefix, self.step = make(root / prefix["file"]), make(root / step["file"])
        self.inputs = {i["role"]: i for i in prefix["inputs"]}  # images, tokens, state
        by_role = {i["role"]: i for i in step["inputs"]}
        self.kv_names = [i["name"] for i in step["inputs"] if i["role"] == "prefix"]
        self.x_name, self.x_dtype = by_role["x_t"]["name"], np.dtype(by_role["x_t"]["dtype"])
        self.v_name = next(o["name"] for o in step["outputs"] if o["role"] == "velocity")
        sampler = m["sampler"]
        start, end = float(sampler["time"]["start"]), float(sampler["time"]["end"])
        self.steps, self.dt = steps, (end - start) / steps
        ti = sampler["time_input"]
        spec = next(i for i in step["inputs"] if i["name"] == ti["input"])
        self.t_name = spec["name"]
        if ti["kind"] == "table":  # row 2i is the conditioning at t_i (the half-step grid, docs/MANIFEST.md)
            table = np.load(root / ti["tables"][str(steps)], allow_pickle=False)
            self.times = [table[2 * i] for i in range(steps)]
        else:
            self.times = [np.full(spec["shape"], start + i * self.dt, dtype=spec["dtype"]) for i in range(steps)]
        norm = m["normalization"]["action"]
        self.mean, self.std = np.asarray(norm["mean"], np.float32), np.asarray(norm["std"], np.float32)
        self.valid = int(m["preprocessing"]["action"].get("valid_dims", len(self.mean)))
        self.max_len = int(m["tokenizer"]["max_len"])

    def encode(self, obs: Observation) -> dict[str, np.ndarray]:
        images = np.stack([img.transpose(2, 0, 1) for img in obs.images])[None].astype(np.float32) / 255.0
        tokens = tokenize(obs.instruction, self.max_len)[None].astype(self.inputs["tokens"]["dtype"])
        state = np.asarray(obs.state, np.float32)[None]
        return {self.inputs["images"]["name"]: images, self.inputs["tokens"]["name"]: tokens,
                self.inputs["state"]["name"]: state}

    def chunk(self, obs: Observation, noise: np.ndarray) -> np.ndarray:
        """[H, valid action dims] in physical units, from `noise` [1, H, D]."""
        out = self.prefix(self.encode(obs))
        feeds = {name: out[name] for name in self.kv_names}
        x = noise
        for i in range(self.steps):
            feeds[self.x_name] = x.astype(self.x_dtype, copy=False)
            feeds[self.t_name] = self.times[i]
            x = x + self.dt * self.step(feeds)[self.v_name].astype(np.float32)
        return x[0, :, : self.valid] * self.std + self.mean


def policy_noise(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """The noise a Policy draws first after reset(seed) (its generator, the same float32 stream)."""
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


# --- torch.compile ----------------------------------------------------------------------------------
def compile_sampler(model: Any, steps: int, mode: str) -> Callable[..., Any]:
    """torch.compile of eager_chunk's computation (prefix + unrolled Euler loop + denormalisation)."""

    def sampler(images: Any, tokens: Any, state: Any, noise: Any) -> Any:
        kv = model.prefix_kv(images, tokens, state)
        x, dt = noise, 1.0 / steps
        for i in range(steps):
            x = x + dt * model.velocity(x, torch.full((1,), i * dt, dtype=x.dtype), kv)
        return model.denormalize_actions(x)

    return torch.compile(sampler, mode=None if mode == "default" else mode)


# --- the benchmark ----------------------------------------------------------------------------------
@dataclass
class Row:
    series: Series
    floor: Floor | None = None  # set after the rounds, from the best rates of the whole run
    precision: str = "fp32"  # whose bundle's graph-level counts give the floor
    numerics: str = ""  # rel L2 vs the runtime FP32 chunk, or why there is no timing
    failed: str = ""  # set when the contender could not run: the table says so


@pytest.fixture(scope="module")
def peer_report(bench_machine: Callable[[], str]) -> Iterator[list[tuple[str, int, int, list[Row], Roof]]]:
    rows: list[tuple[str, int, int, list[Row], Roof]] = []
    yield rows
    if not rows:
        return
    print("\n".join(format_report(rows, bench_machine())))


def format_report(rows: list[tuple[str, int, int, list[Row], Roof]], machine: str) -> list[str]:
    lines = ["", f"machine: {machine}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}"]
    for threads, roof in {r[2]: r[4] for r in rows}.items():
        lines.append(f"floor rates at {threads} thread(s): FP32 GEMM {roof.gemm_fp32 / 1e9:.1f} GFLOP/s, INT8 GEMM "
                     f"{roof.gemm_int8 / 1e9:.1f} GOP/s; " + ", ".join(
                         f"{k} {v / 1e9:.1f} G/s" for k, v in roof.detail.items()))
    lines += ["", "| preset | configuration | threads | steps | median ms | p90 ms | speedup vs eager | floor ms "
              "(bound) | measured / floor | rel L2 vs runtime fp32 |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, steps, threads, series_rows, _ in rows:
        eager = series_rows[0].series
        for r in series_rows:
            s = r.series
            head = f"| {name} | {s.name} | {threads} | {steps} |"
            if r.failed or not s.total:
                lines.append(f"{head} - | - | - | - | - | {r.failed or r.numerics or 'no timings'} |")
                continue
            floor = f"{r.floor.ms:.2f} ({r.floor.bound})" if r.floor else "n/a"
            ratio = f"{s.median() / r.floor.ms:.2f}" if r.floor else "n/a"
            lines.append(f"{head} {s.median():.2f} | {s.p90():.2f} | {eager.median() / s.median():.2f}x | {floor} | "
                         f"{ratio} | {r.numerics} |")
    lines += ["", f"goals (issue 17): {GOALS}",
              "floor: per graph max(FLOPs / GEMM rate, bytes / copy bandwidth at the graph's footprint), prefix + N "
              "steps, graph-level counts of `edge-vla profile` (eager and torch.compile recompute the time MLP per "
              "step: same floor, more work). Rates: the best seen in this run (measured before and after each "
              "case's rounds). A lower bound, not a prediction; absolute, so only meaningful on an idle machine."]
    return lines


@pytest.fixture(scope="module")
def inductor_cache() -> Iterator[Path]:
    """A fresh inductor cache, so that the reported compile time is a cold compile (as a user's first)."""
    with tempfile.TemporaryDirectory(prefix="bench_peers_inductor_") as d:
        old = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = d
        yield Path(d)
        if old is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = old


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160] if text else ''}"


def _rel_l2(ref: np.ndarray, got: np.ndarray) -> str:
    m = Metrics.of(ref, got)
    return f"{m.rel_l2:.1e}"


_meters: dict[int, RoofMeter] = {}


@pytest.mark.parametrize(("name", "steps", "threads"), CASES, ids=[f"{n}-{k}steps-{t}thr" for n, k, t in CASES])
def test_peers(name: str, steps: int, threads: int, benchmark: Any, bench_models: Callable[[str], Any],
               bench_exports: Callable[[str, str], Any], bench_precisions: Callable[[str], list[str]],
               peer_report: list, inductor_cache: Path) -> None:
    model = bench_models(name).eval()
    cfg = model.config
    torch.set_num_threads(threads)
    obs = observation(cfg)
    # fp32 always (the peers run its graphs); base full INT8 only where conftest's BENCH_BASE_INT8 allows it
    precisions = ["fp32", *(p for p in PRECISIONS if p != "fp32" and (p == "fp16" or p in bench_precisions(name)))]
    bundles = {p: bench_exports(name, p).bundle for p in precisions}
    meter = _meters.setdefault(threads, RoofMeter(threads))
    meter.measure()  # again after the rounds: the floor uses the best rates seen in the run
    costs = {p: bundle_costs(_open(b)) for p, b in bundles.items()}
    for c in costs.values():  # measure each footprint's bandwidth now, outside the timed rounds
        meter.bandwidth(c["prefix"].bytes), meter.bandwidth(c["denoise_step"].bytes)

    # Numerics: every contender's chunk for the noise a Policy seeded with SEED draws first. The runtime rows pin
    # onnxruntime: a tune record on this machine must not move them (the tuned row below is the one that follows it).
    policies = {p: Policy.load(b, backend="onnxruntime", steps=steps, threads=threads, seed=SEED)
                for p, b in bundles.items()}
    ref = {p: pol.infer(obs).actions for p, pol in policies.items()}
    noise = policy_noise(SEED, policies["fp32"].contract.x_t.shape)
    noise_t = torch.from_numpy(noise)
    fp32 = ref["fp32"]

    rows: list[Row] = []
    runners: list[Callable[[], None]] = []

    def add(label: str, fn: Callable[[], Any], precision: str, numerics: str) -> None:
        row = Row(Series(label), numerics=numerics, precision=precision)
        rows.append(row)
        runners.append(lambda: _timed_block(row.series, fn, BLOCK[name]))

    eager_out = eager_chunk(model, obs, noise_t, steps)[0]
    m = Metrics.of(fp32, eager_out)
    assert m.within("fp32"), f"eager torch vs runtime fp32: rel L2 {m.rel_l2:.1e}; the bundle does not match its model"
    add("eager torch fp32 (prefix cached)", lambda: eager_chunk(model, obs, noise_t, steps), "fp32",
        _rel_l2(fp32, eager_out))

    compile_label = f"torch.compile ({COMPILE_MODE})"
    if COMPILE_MODE == "off" or (name != "tiny" and not COMPILE_BASE):
        why = "BENCH_PEERS_COMPILE_MODE=off" if COMPILE_MODE == "off" else "BENCH_PEERS_COMPILE_BASE=0"
        rows.append(Row(Series(compile_label), failed=f"skipped ({why})"))
    else:
        try:
            fn = compile_sampler(model, steps, COMPILE_MODE)
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = fn(*observation_tensors(obs, cfg), noise_t)[0].numpy()
            compile_s = time.perf_counter() - t0
            vs_eager = Metrics.of(eager_out, out)
            note = _rel_l2(fp32, out) + ("" if vs_eager.within("fp32") else
                                         f" (MISMATCH vs eager: rel L2 {vs_eager.rel_l2:.1e})")

            def run_compiled(fn: Callable[..., Any] = fn) -> Any:
                with torch.inference_mode():
                    return fn(*observation_tensors(obs, cfg), noise_t)[0].numpy()

            add(f"{compile_label}, compile {compile_s:.0f} s", run_compiled, "fp32", note)
        except Exception as exc:  # a peer that cannot compile is a finding, not a crash
            rows.append(Row(Series(compile_label), failed=f"FAILED: {_one_line(exc)}"))

    plain = PlainLoop(bundles["fp32"], steps, lambda p: ort_runner(p, threads))
    got = plain.chunk(obs, noise)
    np.testing.assert_allclose(got, fp32, rtol=1e-5, atol=1e-5, err_msg="plain onnxruntime loop != runtime fp32")
    add("onnxruntime plain loop, default SessionOptions (fp32 graphs)", lambda: plain.chunk(obs, noise),
        "fp32", _rel_l2(fp32, got))

    try:
        importlib.import_module("openvino")
    except ImportError:
        rows.append(Row(Series("OpenVINO CPU"), failed="skipped (openvino does not import: "
                                                       "pip install 'edge-vla[bench-peers]')"))
    else:
        default = openvino_default_precision()
        ov_default = PlainLoop(bundles["fp32"], steps, lambda p: openvino_runner(p, threads))
        got = ov_default.chunk(obs, noise)
        m = Metrics.of(fp32, got)
        note = f"{m.rel_l2:.1e}" + ("" if m.within("fp16") else " (outside the FP16 export gate)")
        add(f"OpenVINO CPU default config (inference precision {default}; fp32 graphs)",
            lambda: ov_default.chunk(obs, noise), "fp32", note)
        ov_f32 = PlainLoop(bundles["fp32"], steps, lambda p: openvino_runner(p, threads, "f32"))
        got = ov_f32.chunk(obs, noise)
        np.testing.assert_allclose(got, fp32, rtol=1e-4, atol=1e-4, err_msg="OpenVINO f32 loop != runtime fp32")
        add("OpenVINO CPU, INFERENCE_PRECISION_HINT=f32 (fp32 graphs)", lambda: ov_f32.chunk(obs, noise),
            "fp32", _rel_l2(fp32, got))

    for p, pol in policies.items():
        path = getattr(pol.backend, "chunk_path", None)  # which code ran the steps: "cpu_step" is the C Euler loop
        add(f"edge-vla runtime {p}" + (f" (steps: {path})" if path else ""), lambda pol=pol: pol.infer(obs), p,
            _rel_l2(fp32, ref[p]))
    # The runtime's load-time onnxruntime fusion (edge_vla.runtime.ort_fuse), attributed in the same run.
    with _env(FUSE_ENV, "none"):
        unfused = Policy.load(bundles["fp32"], backend="onnxruntime", steps=steps, threads=threads, seed=SEED)
    policies["fp32, ort fusion off"] = unfused
    got = unfused.infer(obs)
    add("edge-vla runtime fp32, load-time fusion off (EDGE_VLA_ORT_FUSE=none)", lambda: unfused.infer(obs), "fp32",
        _rel_l2(fp32, got.actions))
    # The one-onnxruntime-call Euler chunk (ort_fuse.compose_chunk), attributed the same way.
    with _env(CHUNK_ENV, "off"):
        stepped = Policy.load(bundles["fp32"], backend="onnxruntime", steps=steps, threads=threads, seed=SEED)
    policies["fp32, one-call chunk off"] = stepped
    got = stepped.infer(obs)
    add("edge-vla runtime fp32, one-call chunk off (EDGE_VLA_ORT_CHUNK=off)", lambda: stepped.infer(obs), "fp32",
        _rel_l2(fp32, got.actions))

    # The C Euler loop (edge_vla.runtime.cpu_step), attributed the same way: the one-call onnxruntime chunk instead.
    with _env("EDGE_VLA_CPU_STEP", "off"):
        ort_chunk = Policy.load(bundles["fp32"], backend="onnxruntime", steps=steps, threads=threads, seed=SEED)
    policies["fp32, C Euler loop off"] = ort_chunk
    got = ort_chunk.infer(obs)
    add("edge-vla runtime fp32, C Euler loop off (EDGE_VLA_CPU_STEP=off)", lambda: ort_chunk.infer(obs), "fp32",
        _rel_l2(fp32, got.actions))

    # The OpenVINO backend behind the runtime's Backend interface, on the fp32 bundle.
    for precision, why_not in openvino_backend_precisions():
        label = f"edge-vla runtime, OpenVINO backend {precision} (fp32 graphs)"
        if why_not:
            rows.append(Row(Series(label), failed=f"skipped ({why_not})"))
            continue
        ov_pol = Policy.load(bundles["fp32"], backend="openvino", precision=precision, steps=steps, threads=threads,
                             seed=SEED)
        policies[f"openvino {precision}"] = ov_pol
        got = ov_pol.infer(obs).actions
        gate = "fp16" if precision == "bf16" else "fp32"
        m = Metrics.of(fp32, got)
        add(label, lambda pol=ov_pol: pol.infer(obs), "fp32",
            f"{m.rel_l2:.1e}" + ("" if m.within(gate) else f" (outside the {gate.upper()} gate)"))

    # What a robot runs after build-engines / tune: tune here, then Policy.load with no backend.
    with tempfile.TemporaryDirectory(prefix="bench_peers_tune_") as state:
        tuned, label, gate = tuned_default(bundles["fp32"], steps, threads, Path(state))
    policies["tuned default"] = tuned
    got = tuned.infer(obs).actions
    m = Metrics.of(fp32, got)
    add(label, lambda: tuned.infer(obs), "fp32",
        f"{m.rel_l2:.1e}" + ("" if m.within(gate) else f" (outside the {gate.upper()} gate)"))


    def reset() -> None:
        for r in rows:
            r.series.total.clear()

    interleaved_rounds(benchmark, runners, WARMUP[name], ROUNDS[name], reset)
    roof = meter.measure()
    for r in rows:
        r.floor = chunk_floor(costs[r.precision], steps, roof)
    peer_report.append((name, steps, threads, rows, roof))
    for pol in policies.values():
        pol.close()
    timed = [r for r in rows if r.series.total]
    benchmark.extra_info.update({r.series.name: {"median_ms": r.series.median(), "p90_ms": r.series.p90(),
                                                 "floor_ms": r.floor.ms if r.floor else None} for r in timed})
    eager = rows[0].series
    print(f"\n{name} {steps} steps {threads} thread(s): " + ", ".join(
        f"{r.series.name} {r.series.median():.2f} ms ({eager.median() / r.series.median():.2f}x)" for r in timed))


def openvino_backend_precisions() -> list[tuple[str, str]]:
    """(precision, why it is skipped or "") for the OpenVINO backend rows: f32, then bf16."""
    from edge_vla.runtime.ov_backend import bf16_supported, openvino_available

    if not openvino_available():
        why = "openvino does not import: pip install 'edge-vla[openvino]'"
        return [("f32", why), ("bf16", why)]
    return [("f32", ""), ("bf16", "" if bf16_supported() else "this CPU reports no BF16 to OpenVINO")]


def tuned_default(bundle: Path, steps: int, threads: int, state: Path) -> tuple[Policy, str, str]:
    """`edge-vla tune` on `bundle` at `threads` into `state`, then Policy.load with backend auto following it:
    (the policy, a row label naming tune's choice, the gate that choice was held to)."""
    from edge_vla.runtime import tune

    result = tune.tune(bundle, state_dir=state, threads=threads)
    choice = result.record["choice"]
    figures = next(c for c in result.record["candidates"]
                   if (c["backend"], c["precision"]) == (choice["backend"], choice["precision"]))
    with _env(tune.STATE_ENV, str(state)):
        policy = Policy.load(bundle, steps=steps, threads=threads, seed=SEED)
    chose = f"{choice['backend']} {choice['precision']}"
    loaded = f"{policy.backend.name} {getattr(policy.backend, 'precision', policy.precision)}"
    if loaded != chose:
        policy.close()
        raise AssertionError(f"tune chose {chose} but Policy.load ran {loaded}")
    return policy, f"edge-vla tuned default (tune chose {chose}; fp32 graphs)", figures["gate"]


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def _timed_block(series: Series, fn: Callable[[], Any], block: int) -> None:
    for i in range(block):
        t0 = time.perf_counter()
        fn()
        if i or block == 1:  # the first call of a block is untimed: it re-wakes this contender's thread pool
            series.total.append(1e3 * (time.perf_counter() - t0))


def _open(bundle: Path) -> Any:
    from edge_vla.bundle import Bundle

    return Bundle.open(bundle)

