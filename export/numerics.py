"""Numerics check of exported graphs against the PyTorch model, always run by `edge-vla export`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from edge_vla.runtime.compare import THRESHOLDS, Metrics
from edge_vla.runtime.contract import Contract
from edge_vla.runtime.ort_backend import OrtBackend, make_session
from edge_vla.runtime.sampler import Sampler

from .model import VLA
from .onnx_graphs import StepTime, kv_names, split_kv


@dataclass
class NumericsReport:
    precision: str
    observations: int
    steps: int
    graphs: dict[str, dict]
    actions: dict
    threshold_rel_l2: float
    threshold_cosine: float
    passed: bool
    # The action chunk's error per observation (Metrics as dicts, in order), and the whole chunk's error without the
    # worst observation: a policy with several modes (MetaWorld's) can take another one at an observation near a
    # decision boundary under any small perturbation, and one such observation then decides a check over a few.
    per_observation: list[dict] = field(default_factory=list)
    without_worst: dict | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        a = self.actions
        return (f"{self.precision}: normalized action chunk max|err| {a['max_abs']:.2e}, rel L2 {a['rel_l2']:.2e}, "
                f"cosine {a['cosine']:.6f} over {self.observations} observations "
                f"(limits rel L2 <= {self.threshold_rel_l2:g}, cosine >= {self.threshold_cosine:g}): "
                + ("PASS" if self.passed else "FAIL") + self._one_observation_decides())

    def _one_observation_decides(self) -> str:
        """Where the chunk error fails only because of one observation, says so (the gate itself is unchanged)."""
        rest = self.without_worst
        if self.passed or rest is None or not self.per_observation:
            return ""
        if rest["rel_l2"] > self.threshold_rel_l2 or rest["cosine"] < self.threshold_cosine:
            return ""
        i = max(range(len(self.per_observation)), key=lambda k: self.per_observation[k]["rel_l2"])
        worst = self.per_observation[i]
        return (f"; one observation decides it: observation {i} has rel L2 {worst['rel_l2']:.2e} (max|err| "
                f"{worst['max_abs']:.2e}), the other {self.observations - 1} together {rest['rel_l2']:.2e} (cosine "
                f"{rest['cosine']:.6f}). A policy with several modes can take another one near a decision boundary: "
                "check on more observations (--numerics-count 32) or with another calibration sample "
                "(docs/QUALITY.md, 'When one observation decides the numerics check')")


@torch.no_grad()
def check(model: VLA, precision: str, contract: Contract, graphs: Mapping[str, Path], obs: dict[str, torch.Tensor],
          seed: int = 1234) -> NumericsReport:
    """Compare every graph, and the full sampler through the runtime's own Sampler, with PyTorch (VLA.sample)."""
    cfg = model.config
    steps = contract.num_steps
    backend = OrtBackend(graphs[contract.prefix.name], graphs[contract.step.name], providers=["CPUExecutionProvider"])
    sampler = Sampler(backend, contract, "euler", steps)
    step_time = StepTime(model, contract.time_input.kind)
    names = kv_names(model)
    kv_bufs = [backend.buffer(name) for name in names]
    g = torch.Generator().manual_seed(seed)
    n = len(obs["state"])
    worst = {name: Metrics(0.0, 0.0, 1.0) for name in ("prefix", "denoise_step", "chunk")}
    ref_all, got_all = [], []
    rtc_ref: list[np.ndarray] = []
    rtc_got: list[np.ndarray] = []
    chunk = contract.chunk
    chunk_sess = make_session(graphs[chunk.name], None, ["CPUExecutionProvider"])[0] if chunk else None
    for i in range(n):
        images, tokens, state = (obs[k][i : i + 1] for k in ("images", "tokens", "state"))
        kv = model.prefix_kv(images, tokens, state)
        ref_kv = [t.numpy() for t in split_kv(kv)]
        backend.buffer("images")[...] = images.numpy()
        backend.buffer("tokens")[...] = tokens.numpy()
        backend.buffer("state")[...] = state.numpy()
        backend.run_prefix()
        worst["prefix"] = worst["prefix"].worst(
            Metrics.of(np.concatenate([r.ravel() for r in ref_kv]), np.concatenate([b.ravel() for b in kv_bufs])))
        # One denoise step from a random (x_t, t), on the reference prefix so errors don't compound.
        x = torch.randn(1, cfg.chunk_len, cfg.action_dim, generator=g)
        t = torch.rand(1, generator=g)
        ref_v = model.velocity(x, t, kv).numpy()
        saved_kv = [b.copy() for b in kv_bufs]
        for buf, ref in zip(kv_bufs, ref_kv, strict=True):
            buf[...] = ref
        backend.buffer("x_t")[...] = x.numpy()
        for name, value in step_time.feed(float(t)).items():
            backend.buffer(name)[...] = value
        backend.run_step(None)
        worst["denoise_step"] = worst["denoise_step"].worst(Metrics.of(ref_v, backend.buffer("velocity")))
        for buf, saved in zip(kv_bufs, saved_kv, strict=True):
            buf[...] = saved
        # The whole chunk through the runtime's Sampler, same noise as PyTorch.
        noise = torch.randn(1, cfg.chunk_len, cfg.action_dim, generator=g)
        # Compared in the normalized action space: in physical units a joint's offset (its mean)
        # would dilute the relative error and push the cosine towards 1 whatever the graph did.
        ref_actions = model.normalize_actions(model.sample(images, tokens, state, noise, steps=steps))
        got = sampler.run(noise.numpy())
        ref_all.append(ref_actions.numpy())
        got_all.append(got.copy())
        if contract.rtc_max_delay:
            # RTC: the same chunk given its first d actions (d cycling 1..max_delay), as the runtime will run it.
            d = 1 + i % contract.rtc_max_delay
            given = model.denormalize_actions(ref_actions)[:, :d]
            ref_p = model.normalize_actions(model.sample(images, tokens, state, noise, steps=steps, prefix=given))
            got_p = sampler.run(noise.numpy(), prefix=model.normalize_actions(given)[0].numpy())
            rtc_ref.append(ref_p[0, d:].numpy().ravel())
            rtc_got.append(got_p[0, d:].copy().ravel())
        if chunk_sess is not None and chunk is not None:
            out = chunk_sess.run(None, {"images": images.numpy(), "tokens": tokens.numpy(), "state": state.numpy(),
                                        "noise": noise.numpy()})[0]
            ref_u = model.normalize_actions(model.sample(images, tokens, state, noise, steps=chunk.steps)).numpy()
            worst["chunk"] = worst["chunk"].worst(Metrics.of(ref_u, out))
    backend.close()
    actions = Metrics.of(np.concatenate(ref_all), np.concatenate(got_all))
    per_observation = [Metrics.of(r, g) for r, g in zip(ref_all, got_all, strict=True)]
    without_worst = None
    if n >= 3:  # with fewer, "the others" would be one or none
        worst_i = int(np.argmax([m.rel_l2 for m in per_observation]))
        keep = [k for k in range(n) if k != worst_i]
        without_worst = asdict(Metrics.of(np.concatenate([ref_all[k] for k in keep]),
                                          np.concatenate([got_all[k] for k in keep])))
    rel_max, cos_min = THRESHOLDS[precision]
    passed = actions.rel_l2 <= rel_max and actions.cosine >= cos_min
    if chunk_sess is not None:
        passed = passed and worst["chunk"].rel_l2 <= rel_max and worst["chunk"].cosine >= cos_min
    graphs_report = {k: asdict(v) for k, v in worst.items() if k != "chunk" or chunk_sess is not None}
    if rtc_ref:  # the generated part of prefix-given chunks, under the same gate
        rtc = Metrics.of(np.concatenate(rtc_ref), np.concatenate(rtc_got))
        graphs_report["rtc_chunk"] = asdict(rtc)
        passed = passed and rtc.rel_l2 <= rel_max and rtc.cosine >= cos_min
    return NumericsReport(precision, n, steps, graphs_report, asdict(actions), rel_max, cos_min, passed,
                          [asdict(m) for m in per_observation], without_worst)
