"""The Policy: load a verified bundle, take an observation, return an action chunk in physical units.

    policy = Policy.load("bundle/")             # verifies schema + hashes, creates sessions once
    chunk = policy.infer(Observation(images=[rgb], instruction="reach the red block", state=q))
    chunk.actions      # [H, D] joint targets (rad), chunk.timings_ms per stage

The prefix is computed once per chunk; the N denoise steps run on preallocated, bound buffers.
Noise comes from a seeded generator, so a run can be replayed with `reset(seed)`.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from edge_vla.action_space import ActionSpace
from edge_vla.bundle import Bundle
from edge_vla.config import VLAConfig
from edge_vla.errors import BundleError, ConfigError, EdgeVlaError, ObservationError, PolicyOutputError
from edge_vla.runtime.solvers import SOLVERS, OdeLoop
from edge_vla.runtime.types import ActionChunk, Observation
from edge_vla.tokenizer import tokenize

log = logging.getLogger(__name__)

BACKENDS = ("auto", "onnxruntime", "tensorrt")


class Policy:
    def __init__(self, bundle: Bundle, backend: Any, steps: int, solver: str, seed: int) -> None:
        self.bundle = bundle
        self.config: VLAConfig = bundle.config
        self.action_space: ActionSpace = bundle.action_space
        self.precision = bundle.precision
        self.backend = backend
        self.steps = steps
        self.solver = solver
        self.ode = OdeLoop(backend, solver)
        self._whole_chunk = solver == "euler" and hasattr(backend, "prepare_chunk")
        if self._whole_chunk:
            try:  # load the CUDA kernels and capture the chunk graph now, not on the first infer()
                backend.prepare_chunk(steps)
            except EdgeVlaError as exc:
                log.warning("whole-chunk CUDA graph unavailable (%s); stepping the ODE from the host", exc)
                self._whole_chunk = False
        norm = bundle.manifest["normalization"]["action"]
        self._action_mean = np.asarray(norm["mean"], dtype=np.float32)
        self._action_std = np.asarray(norm["std"], dtype=np.float32)
        cfg = self.config
        self._noise = np.zeros((1, cfg.chunk_len, cfg.action_dim), dtype=np.float32)
        self._step_times = [0.0] * steps
        self._step_keys = [f"step_{i}" for i in range(steps)]
        self._token_cache: dict[str, np.ndarray] = {}
        self._seed = seed
        self.rng = np.random.default_rng(seed)

    @classmethod
    def load(cls, bundle: str | os.PathLike[str] | Bundle, backend: str = "auto", steps: int | None = None,
             solver: str | None = None, seed: int = 0, threads: int | None = None,
             trusted_keys: list[str | Path] | None = None) -> Policy:
        """Verify and load a bundle. `steps` may lower the ODE step count where the bundle allows it.

        `trusted_keys`: Ed25519 public keys; the bundle must carry a valid signature by one of them.
        Default: the keys in /etc/edge-vla/trusted-keys, if any (else no signature is required).
        """
        if backend not in BACKENDS:
            raise ConfigError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
        b = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        from edge_vla.provision.signing import trusted_keys_from_dir, verify_bundle_signature

        # A robot provisioned with trusted keys (edge-vla install --trusted-key) runs only signed bundles.
        keys = trusted_keys if trusted_keys is not None else trusted_keys_from_dir()
        if keys:
            key_id = verify_bundle_signature(b.root, keys)
            log.info("bundle %s signed by trusted key %s", b.root, key_id)
        sampler = b.manifest["sampler"]
        solver = solver or sampler.get("solver", "euler")
        if solver not in SOLVERS:
            raise ConfigError(f"unknown solver {solver!r}; choose one of {SOLVERS}")
        steps = int(steps or sampler["num_steps"])
        lo, hi = sampler.get("min_steps", 1), sampler.get("max_steps", 64)
        if not lo <= steps <= hi:
            raise ConfigError(f"this bundle allows {lo}..{hi} ODE steps, not {steps}")
        if steps < sampler.get("recommended_min_steps", 1):
            log.warning("running %d ODE steps; this model was trained for %d (not step-distilled): expect worse "
                        "actions", steps, sampler["num_steps"])
        engine = _make_backend(b, backend, threads)
        return cls(b, engine, steps, solver, seed)

    # --- API ---------------------------------------------------------------------------------------
    def reset(self, seed: int | None = None) -> None:
        """Forget per-episode state and restart the noise stream (same seed -> same actions)."""
        self.rng = np.random.default_rng(self._seed if seed is None else seed)

    def infer(self, obs: Observation) -> ActionChunk:
        clock = time.perf_counter
        t0 = clock()
        self._preprocess(obs)
        t1 = clock()
        self.rng.standard_normal(out=self._noise, dtype=np.float32)
        if self._whole_chunk:
            # TensorRT: prefix and every step in one CUDA graph launch; no per-stage host timings.
            x = self.backend.run_chunk(self._noise, self.steps)
            t2 = t3 = clock()
        else:
            self.backend.run_prefix()
            t2 = clock()
            x = self.ode.run(self._noise, self.steps, self._step_times, clock)
            t3 = clock()
        actions = x[0] * self._action_std + self._action_mean  # float32 [H, D], the one array per chunk
        if not np.all(np.isfinite(actions)):
            raise PolicyOutputError("the policy produced a non-finite action; refusing to return it. Check the "
                                    "bundle's numerics report and the observation (image range, state units)")
        t4 = clock()
        timings = {"preprocess": 1e3 * (t1 - t0)}
        if self._whole_chunk:
            timings["chunk_graph"] = 1e3 * (t3 - t1)
        else:
            timings["prefix"] = 1e3 * (t2 - t1)
            for key, dt in zip(self._step_keys, self._step_times):
                timings[key] = 1e3 * dt
            timings["ode_total"] = 1e3 * (t3 - t2)
        timings["postprocess"] = 1e3 * (t4 - t3)
        timings["total"] = 1e3 * (t4 - t0)
        return ActionChunk(actions, self.action_space.action_period_s, obs.timestamp, timings)

    # --- internals ---------------------------------------------------------------------------------
    def _preprocess(self, obs: Observation) -> None:
        cfg, buf = self.config, self.backend.buf
        if not isinstance(obs, Observation):
            raise ObservationError(f"expected an Observation, got {type(obs).__name__}")
        if len(obs.images) != cfg.num_cameras:
            raise ObservationError(f"expected {cfg.num_cameras} camera image(s), got {len(obs.images)}")
        want = (cfg.image_size, cfg.image_size, 3)
        images = buf["images"]
        for i, img in enumerate(obs.images):
            if not isinstance(img, np.ndarray) or img.shape != want or img.dtype != np.uint8:
                got = f"{img.dtype} {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
                raise ObservationError(
                    f"camera {i}: expected a uint8 RGB image of shape {want}, got {got}; "
                    "resize/convert frames before inference"
                )
            # HWC uint8 -> CHW float in [0, 1], written into the bound input buffer.
            np.multiply(img.transpose(2, 0, 1), 1.0 / 255.0, out=images[0, i], casting="unsafe")
        tokens = self._token_cache.get(obs.instruction)
        if tokens is None:
            tokens = tokenize(obs.instruction, cfg.max_text_len).astype(buf["tokens"].dtype)
            if len(self._token_cache) >= 256:  # bounded: a stream of distinct instructions must not grow memory
                self._token_cache.clear()
            self._token_cache[obs.instruction] = tokens
        buf["tokens"][0] = tokens
        state = np.asarray(obs.state)
        if state.shape != (cfg.state_dim,):
            raise ObservationError(f"state must have shape ({cfg.state_dim},), got {state.shape}")
        if not np.all(np.isfinite(state)):
            raise ObservationError(f"state contains NaN or Inf: {state.tolist()}; check the joint encoder feed")
        buf["state"][0] = state


def _make_backend(b: Bundle, backend: str, threads: int | None) -> Any:
    if backend == "tensorrt" or (backend == "auto" and _trt_engines_present(b)):
        from edge_vla.runtime.trt_backend import TrtBackend, tensorrt_available

        if backend == "tensorrt" or tensorrt_available():
            log.info("backend %s: TensorRT (engines in %s)", backend, b.target_dir / "engines")
            return TrtBackend.from_bundle(b)
        log.warning("backend auto: onnxruntime, although TensorRT engines are built in %s: tensorrt or "
                    "cuda.bindings does not import (run `edge-vla doctor`)", b.target_dir / "engines")
    elif backend == "auto":
        log.info("backend auto: onnxruntime (no TensorRT engines in %s)", b.target_dir / "engines")
    from edge_vla.runtime.ort_backend import OrtBackend

    prefix, step = b.graph("prefix"), b.graph("denoise_step")
    for spec in (prefix, step):
        if not (b.root / spec.file).is_file():
            raise BundleError(f"bundle {b.root} lacks graph file {spec.file}")
    return OrtBackend(b.root / prefix.file, b.root / step.file, threads=threads)


def _trt_engines_present(b: Bundle) -> bool:
    return (b.target_dir / "engines" / "index.json").is_file()
