"""The Policy: load a verified bundle, take an observation, return an action chunk in physical units.

    policy = Policy.load("bundle/")             # verifies schema + hashes, creates sessions once
    chunk = policy.infer(Observation(images=[rgb], instruction="reach the red block", state=q))
    chunk.actions      # [H, D] joint targets (rad), chunk.timings_ms per stage

Everything model-specific comes from the bundle's manifest (docs/MANIFEST.md): the observation encoder
(preprocessing kind), the graphs' IO roles, the flow convention and the step graph's time input. The
prefix is computed once per chunk; the N denoise steps run through one Sampler on preallocated, bound
buffers. Noise comes from a seeded generator, so a run can be replayed with `reset(seed)`.
"""

from __future__ import annotations

import logging
import operator
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from edge_vla.action_space import ActionSpace
from edge_vla.bundle import Bundle
from edge_vla.errors import ConfigError, EdgeVlaError, PolicyOutputError
from edge_vla.runtime.backend import Backend
from edge_vla.runtime.contract import REFERENCE_FAMILY, Contract
from edge_vla.runtime.flow import SOLVERS
from edge_vla.runtime.observation import make_encoder
from edge_vla.runtime.sampler import Sampler
from edge_vla.runtime.types import ActionChunk, Observation

log = logging.getLogger(__name__)

BACKENDS = ("auto", "onnxruntime", "tensorrt", "openvino")
CPUINFO = Path("/proc/cpuinfo")
# x86 flags with which onnxruntime's u8s8 GEMM sums products in int32 (VPDPBUSD; AMX CPUs have them too) instead
# of in saturating int16 pairs (VPMADDUBSW, AVX2/AVX-512 without VNNI): export/quantize.py INT8_RANGES.
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni"})


class Policy:
    def __init__(self, bundle: Bundle, backend: Backend, steps: int, solver: str, seed: int,
                 contract: Contract | None = None) -> None:
        self.bundle = bundle
        self.contract = contract or bundle.contract
        # VLAConfig for edge-vla's own model; a third-party family's config is its manifest "model" dict.
        self.config: Any = bundle.config if self.contract.family == REFERENCE_FAMILY else bundle.manifest["model"]
        self.action_space: ActionSpace = bundle.action_space
        self.precision = bundle.precision
        self.backend = backend
        self.steps = steps
        self.solver = solver
        self.sampler = Sampler(backend, self.contract, solver, steps)
        self._encoder = make_encoder(bundle, self.contract)
        self._inputs = {role: backend.buffer(spec.name) for role, spec in self.contract.observation_inputs().items()}
        self._whole_chunk = solver == "euler" and backend.supports_fused_chunk()
        if self._whole_chunk:
            try:  # load the CUDA kernels and capture the chunk graph now, not on the first infer()
                backend.prepare_fused_chunk(steps, self.sampler.dt)
            except EdgeVlaError as exc:
                log.warning("whole-chunk graph unavailable (%s); stepping the ODE from the host", exc)
                self._whole_chunk = False
        norm = bundle.manifest["normalization"]["action"]
        self._action_mean = np.asarray(norm["mean"], dtype=np.float32)
        self._action_std = np.asarray(norm["std"], dtype=np.float32)
        action = self.contract.preprocessing.get("action", {})
        self._valid_dims = int(action.get("valid_dims", self._action_mean.shape[0]))
        self._noise = np.zeros(self.contract.x_t.shape, dtype=np.float32)
        self._step_times = [0.0] * steps
        self._step_keys = [f"step_{i}" for i in range(steps)]
        self._seed = seed
        self.rng = np.random.default_rng(seed)
        # infer() writes the observation into bound input buffers and integrates in one state array, all shared:
        # two threads at once would silently mix their observations. Calls are serialized instead.
        self._lock = threading.Lock()

    @classmethod
    def load(cls, bundle: str | os.PathLike[str] | Bundle, backend: str = "auto", steps: int | None = None,
             solver: str | None = None, seed: int = 0, threads: int | None = None,
             trusted_keys: list[str | Path] | None = None, precision: str | None = None) -> Policy:
        """Verify and load a bundle. `steps` may change the ODE step count where the bundle allows it.

        `backend`: "auto" follows this machine's `edge-vla tune` record for this bundle where there is a valid
        one, else TensorRT where engines are built, else onnxruntime; any other name is used as given.
        `precision`: the OpenVINO backend's arithmetic, "f32" (its default here) or "bf16".
        `trusted_keys`: Ed25519 public keys; the bundle must carry a valid signature by one of them.
        Default: the keys in /etc/edge-vla/trusted-keys, if any (else no signature is required).
        """
        if backend not in BACKENDS:
            raise ConfigError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
        if precision is not None and backend != "openvino":
            raise ConfigError(f"precision={precision!r}: the precision applies to the openvino backend only (the "
                              "others run the bundle's own precision); pass backend='openvino' or no precision")
        b = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        from edge_vla.provision.signing import trusted_keys_from_dir, verify_bundle_signature

        # A robot provisioned with trusted keys (edge-vla install --trusted-key) runs only signed bundles.
        keys = trusted_keys if trusted_keys is not None else trusted_keys_from_dir()
        if keys:
            # Over the manifest bytes Bundle.open parsed and hashed the files against, not a second read of the file.
            key_id = verify_bundle_signature(b.root, keys, b.manifest_bytes)
            log.info("bundle %s signed by trusted key %s", b.root, key_id)
        threads = checked_threads(threads)
        contract = b.contract
        solver = contract.solver if solver is None else solver
        if solver not in SOLVERS:
            raise ConfigError(f"unknown solver {solver!r}; choose one of {SOLVERS}")
        contract.check_solver(solver)
        steps = contract.num_steps if steps is None else _checked_int("steps", steps)
        contract.check_steps(steps)
        if steps < contract.recommended_min_steps:
            log.warning("running %d ODE steps; this model was trained for %d (not step-distilled): expect worse "
                        "actions", steps, contract.num_steps)
        engine = _make_backend(b, contract, backend, threads, precision)
        try:
            return cls(b, engine, steps, solver, seed, contract)
        except BaseException:
            engine.close()
            raise

    # --- API ---------------------------------------------------------------------------------------
    def reset(self, seed: int | None = None) -> None:
        """Forget per-episode state and restart the noise stream (same seed -> same actions)."""
        with self._lock:
            self.rng = np.random.default_rng(self._seed if seed is None else seed)

    def close(self) -> None:
        """Release the backend (sessions, device memory, CUDA graph). Idempotent; waits for a running infer()."""
        with self._lock:
            self.backend.close()

    def __enter__(self) -> Policy:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def rtc_max_delay(self) -> int:
        """How many leading actions `infer(prefix=...)` may freeze (real-time chunking); 0: this bundle takes none."""
        return self.contract.rtc_max_delay

    def infer(self, obs: Observation, prefix: np.ndarray | None = None) -> ActionChunk:
        """One action chunk for `obs`. With an RTC bundle, `prefix` [d, D] (physical units, d <= rtc_max_delay)
        are the actions that will execute while this inference runs: the chunk starts with them, unchanged, and
        continues consistent with them (hand over at index d).

        Thread-safe: calls from several threads run one at a time (they share the bound buffers), so a second
        caller waits; for parallel inference load one Policy per thread."""
        with self._lock:
            return self._infer(obs, prefix)

    def _infer(self, obs: Observation, prefix: np.ndarray | None) -> ActionChunk:
        if self.backend.closed:
            raise EdgeVlaError("this Policy was closed; load the bundle again with Policy.load()")
        clock = time.perf_counter
        t0 = clock()
        self._encoder.encode(obs, self._inputs)
        given = self._normalized_prefix(prefix)
        t1 = clock()
        self.rng.standard_normal(out=self._noise, dtype=np.float32)
        if self._whole_chunk and given is None:
            # TensorRT: prefix and every step in one CUDA graph launch; no per-stage host timings.
            x = self.backend.run_fused_chunk(self._noise)
            t2 = t3 = clock()
        else:
            self.backend.run_prefix()
            t2 = clock()
            x = self.sampler.run(self._noise, self._step_times, clock, given)
            t3 = clock()
        # float32 [H, D], the one array per chunk; padded action dims (pi0: 32) are dropped.
        actions = x[0, :, : self._valid_dims] * self._action_std + self._action_mean
        if given is not None and prefix is not None:
            actions[: len(prefix)] = prefix  # exactly the actions that execute meanwhile (no round trip)
        if not np.all(np.isfinite(actions)):
            raise PolicyOutputError("the policy produced a non-finite action; refusing to return it. Check the "
                                    "bundle's numerics report and the observation (image range, state units)")
        t4 = clock()
        timings = {"preprocess": 1e3 * (t1 - t0)}
        if self._whole_chunk and given is None:
            timings["chunk_graph"] = 1e3 * (t3 - t1)
        else:
            timings["prefix"] = 1e3 * (t2 - t1)
            for key, dt in zip(self._step_keys, self._step_times):
                timings[key] = 1e3 * dt
            timings["ode_total"] = 1e3 * (t3 - t2)
        timings["postprocess"] = 1e3 * (t4 - t3)
        timings["total"] = 1e3 * (t4 - t0)
        return ActionChunk(actions, self.action_space.action_period_s, obs.timestamp, timings)


    def _normalized_prefix(self, prefix: np.ndarray | None) -> np.ndarray | None:
        if prefix is None or len(prefix) == 0:
            return None
        p = np.asarray(prefix, dtype=np.float32)
        if p.ndim != 2 or p.shape[1] != self._valid_dims or not np.all(np.isfinite(p)):
            raise ConfigError(f"action prefix must be finite actions of shape [d, {self._valid_dims}], got "
                              f"{list(p.shape)}")
        if self.rtc_max_delay == 0:
            raise ConfigError(f"bundle {self.bundle.root} was not trained for real-time chunking: it takes no action "
                              "prefix (train with --rtc-max-delay and re-export, or use another chunk strategy)")
        if len(p) > self.rtc_max_delay:
            raise ConfigError(f"an action prefix of {len(p)} actions: this bundle takes at most {self.rtc_max_delay} "
                              "(its rtc.max_delay)")
        return (p - self._action_mean) / self._action_std


def _checked_int(name: str, value: object) -> int:
    """`value` as an int, refusing what int() would silently round or reinterpret (2.7, True, "3")."""
    if isinstance(value, bool):
        raise ConfigError(f"{name}={value!r}: give a whole number, not a bool")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ConfigError(f"{name}={value!r}: give a whole number") from None


def checked_threads(threads: object) -> int | None:
    """None (every CPU this process may use) or 1..os.cpu_count(): onnxruntime starts exactly as many threads as
    asked (10**6 hung the load and exhausted memory), and more threads than CPUs only preempt each other."""
    if threads is None:
        return None
    n = _checked_int("threads", threads)
    cpus = os.cpu_count() or 1
    if not 1 <= n <= cpus:
        raise ConfigError(f"threads={n}: give 1..{cpus} intra-op threads (this machine has {cpus} CPUs), or leave "
                          "it unset for every CPU this process may use")
    return n


def _make_backend(b: Bundle, contract: Contract, backend: str, threads: int | None,
                  precision: str | None = None) -> Backend:
    if backend == "auto":
        tuned = _tuned_backend(b, contract, threads)
        if tuned is not None:
            return tuned
    if backend == "openvino":
        return _openvino(b, contract, threads, precision)
    return _default_backend(b, contract, backend, threads)


def _openvino(b: Bundle, contract: Contract, threads: int | None, precision: str | None) -> Backend:
    from edge_vla.runtime.ov_backend import OvBackend

    engine = OvBackend.from_bundle(b, contract, precision=precision, threads=threads)
    log.info("backend openvino: CPU, precision %s, %d thread(s)", engine.precision, engine.threads)
    return engine


def _tuned_backend(b: Bundle, contract: Contract, threads: int | None) -> Backend | None:
    """The backend this machine's `edge-vla tune` record chose for this bundle, or None (said why in the log).
    A record that cannot be followed never stops the load: one warning, then the untuned rule."""
    from edge_vla.runtime import tune

    lookup = tune.read_record(b, _cpuinfo())
    fallback = "TensorRT" if _trt_engines_present(b) else "onnxruntime"
    if lookup.problem:
        log.warning("%s; using %s (re-run `edge-vla tune %s` on this machine)", lookup.problem, fallback, b.root)
        return None
    if lookup.choice is None:
        log.info("backend auto: not tuned on this machine (no record in %s); `edge-vla tune %s` measures the "
                 "backends here", ", ".join(str(d) for d in lookup.searched), b.root)
        return None
    choice = lookup.choice
    try:
        if choice.backend == "openvino":
            engine = _openvino(b, contract, threads, choice.precision)
        elif choice.backend == "tensorrt":
            engine = _default_backend(b, contract, "tensorrt", threads)
        else:
            engine = _default_backend(b, contract, "onnxruntime", threads)
    except EdgeVlaError as exc:
        log.warning("the tune record %s chose %s, which does not load here (%s); using %s (re-run `edge-vla tune "
                    "%s` on this machine)", lookup.path, choice.label, str(exc).splitlines()[0], fallback, b.root)
        return None
    log.info("backend auto: %s, from the tune record %s (%s)", choice.label, lookup.path, choice.summary)
    return engine


def _default_backend(b: Bundle, contract: Contract, backend: str, threads: int | None) -> Backend:
    if backend == "tensorrt" or (backend == "auto" and _trt_engines_present(b)):
        from edge_vla.runtime.trt_backend import TrtBackend, tensorrt_available

        if backend == "tensorrt" or tensorrt_available():
            log.info("backend %s: TensorRT (engines in %s)", backend, b.target_dir / "engines")
            return TrtBackend.from_bundle(b, contract)
        log.warning("backend auto: onnxruntime, although TensorRT engines are built in %s: tensorrt or "
                    "cuda.bindings does not import (run `edge-vla doctor`)", b.target_dir / "engines")
    elif backend == "auto":
        log.info("backend auto: onnxruntime (no TensorRT engines in %s)", b.target_dir / "engines")
    from edge_vla.runtime.ort_backend import OrtBackend

    risk = int8_saturation_risk(b.manifest, _cpuinfo())
    if risk:
        log.warning("bundle %s: %s", b.root, risk)
    return OrtBackend.from_bundle(b, contract, threads=threads)


def _cpuinfo() -> str:
    try:
        return CPUINFO.read_text(errors="replace")
    except OSError:  # no procfs (a container without it): nothing to say
        return ""


def int8_saturation_risk(manifest: dict, cpuinfo: str) -> str | None:
    """Why onnxruntime may compute this bundle's INT8 GEMMs wrong on the CPU `cpuinfo` (/proc/cpuinfo's text)
    describes, or None: full-range (8-bit) weights on an x86 CPU with AVX2 but no VNNI, where u8 x s8 products
    are added in pairs into int16 with saturation. ARM's cpuinfo has no "flags" line (its kernels sum in int32);
    Linux x86 without AVX2 uses an SSE kernel that widens to int16 before multiplying. Bundles from before the
    weight range was recorded were all exported with 7-bit weights."""
    calib = (manifest.get("provenance") or {}).get("calibration") or {}
    if manifest.get("precision") != "int8" or calib.get("weight_range", "reduced") != "full":
        return None
    flags = next((set(line.split(":", 1)[1].split()) for line in cpuinfo.splitlines()
                  if line.startswith("flags") and ":" in line), None)
    if flags is None or "avx2" not in flags or flags & VNNI_FLAGS:
        return None
    return ("full-range (8-bit) INT8 weights on an x86 CPU with AVX2 but neither avx512_vnni nor avx_vnni: "
            "onnxruntime's u8s8 GEMM saturates int16 pair sums here (the shipped tiny's chunk error doubled, "
            "docs/QUALITY.md 'INT8 weight range'); for this machine re-export with --int8-range reduced")


def _trt_engines_present(b: Bundle) -> bool:
    return (b.target_dir / "engines" / "index.json").is_file()
