"""Latency budget profiling: run the policy many times per configuration and report every stage.

    results = profile_bundle("bundle/", steps_list=[1, 2, 10], iterations=200, warmup=20)
    report = bundle_report(bundle, results, budget_ms=20.0)      # JSON-ready; also written to target/

Stages are the Policy's own `timings_ms` (preprocess, prefix, step_i, ode_total, postprocess, total),
so what is profiled is exactly what runs on the robot. Verdict rule: p99 of `total` within the budget
(the max on a shared, non-RT machine is dominated by scheduler noise; it is reported, not judged).
"""

from __future__ import annotations

import gc
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_vla.bundle import Bundle
from edge_vla.errors import ConfigError
from edge_vla.runtime.policy import Policy
from edge_vla.runtime.types import Observation

log = logging.getLogger(__name__)

REPORT_KIND = "edge-vla-profile"
REPORT_VERSION = 1
VERDICT_RULE = "pass when p99(total) <= budget_ms"
PERCENTILES = (50, 90, 99)


@dataclass
class ConfigResult:
    """Raw per-iteration timings (ms) of one configuration; stats are derived from these."""

    label: str
    precision: str
    steps: int
    solver: str
    samples: dict[str, np.ndarray]  # stage -> [iterations]
    backend: str

    def stage_names(self) -> list[str]:
        steps = [f"step_{i}" for i in range(self.steps)]
        return ["preprocess", "prefix", *steps, "ode_total", "postprocess", "total"]

    def representative(self) -> dict[str, float]:
        """The run whose total is closest to the median: what a typical inference looks like."""
        total = self.samples["total"]
        i = int(np.argmin(np.abs(total - np.median(total))))
        return {k: float(v[i]) for k, v in self.samples.items()}


def observations(bundle: Bundle, count: int = 8, seed: int = 0) -> list[Observation]:
    """Realistic inputs from the reaching sim (rendered once, outside the timed region)."""
    from edge_vla.sim.env import ReachEnv

    images = bundle.contract.preprocessing["images"]  # any model family: the manifest says what it takes
    state_dim = int(bundle.contract.preprocessing.get("state", {}).get("dim", 2))
    env = ReachEnv(image_size=int(images["height"]), num_cameras=int(images["cameras"]))
    obs = [env.reset(seed + i) for i in range(count)]
    # The sim arm has 2 joints; a robot with another state size gets the sim's joints, zero-padded or cut
    # (latency does not depend on the values).
    for o in obs:
        o.state = np.resize(np.pad(o.state, (0, max(0, state_dim - len(o.state)))), state_dim).astype(np.float32)
    return obs


def measure(policy: Policy, obs: list[Observation], iterations: int, warmup: int) -> dict[str, np.ndarray]:
    """`iterations` timed inferences after `warmup` untimed ones (allocator, caches, thread pools)."""
    if iterations < 1 or warmup < 0:
        raise ConfigError(f"need iterations >= 1 and warmup >= 0, got {iterations} and {warmup}")
    for i in range(warmup):
        policy.infer(obs[i % len(obs)])
    gc.collect()  # don't bill a collection of warm-up garbage to the first timed runs
    rows: list[dict[str, float]] = []
    for i in range(iterations):
        rows.append(policy.infer(obs[i % len(obs)]).timings_ms)
    return {k: np.array([r[k] for r in rows]) for k in rows[0]}


def profile_bundle(bundle: Bundle, steps_list: list[int], iterations: int = 200, warmup: int = 20,
                   threads: int | None = None, solver: str | None = None, seed: int = 0,
                   backend: str = "auto") -> list[ConfigResult]:
    """Profile each ODE step count on one (already verified) bundle."""
    obs = observations(bundle, seed=seed)
    results = []
    for steps in steps_list:
        policy = Policy.load(bundle, backend=backend, steps=steps, solver=solver, seed=seed, threads=threads)
        t0 = time.perf_counter()
        samples = measure(policy, obs, iterations, warmup)
        log.info("%s steps=%d: %d runs in %.1f s", bundle.precision, steps, iterations, time.perf_counter() - t0)
        label = f"{bundle.precision} {policy.solver} x{steps}"
        results.append(ConfigResult(label, bundle.precision, steps, policy.solver, samples,
                                    getattr(policy.backend, "name", type(policy.backend).__name__)))
    return results


# --- statistics --------------------------------------------------------------------------------------
def stage_stats(x: np.ndarray) -> dict[str, float]:
    p50, p90, p99 = (float(v) for v in np.percentile(x, PERCENTILES))
    return {"p50": p50, "p90": p90, "p99": p99, "max": float(x.max()), "min": float(x.min()),
            "mean": float(x.mean()), "std": float(x.std()), "jitter_p99_p50": p99 - p50}


def verdict(total: np.ndarray, budget_ms: float) -> dict[str, Any]:
    p99 = float(np.percentile(total, 99))
    misses = int(np.count_nonzero(total > budget_ms))
    return {"budget_ms": budget_ms, "rule": VERDICT_RULE, "pass": p99 <= budget_ms,
            "headroom_ms": budget_ms - p99, "misses": misses, "miss_rate": misses / len(total)}


def summarize(result: ConfigResult, budget_ms: float) -> dict[str, Any]:
    s = result.samples
    host_sum = s["preprocess"] + s["prefix"] + s["ode_total"] + s["postprocess"]
    return {
        "label": result.label, "precision": result.precision, "steps": result.steps, "solver": result.solver,
        "backend": result.backend, "iterations": len(s["total"]),
        "stages": {k: stage_stats(s[k]) for k in result.stage_names()},
        # time inside `infer` not attributed to a stage (clock reads, the noise draw): should be ~0
        "unattributed_ms_p50": float(np.median(s["total"] - host_sum)),
        "verdict": verdict(s["total"], budget_ms),
    }


def host_info(threads: int | None) -> dict[str, Any]:
    import onnxruntime as ort

    return {"machine": platform.machine(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine(), "python": platform.python_version(),
            "onnxruntime": ort.__version__, "threads": threads or os.cpu_count(),
            "node": platform.node(), "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def bundle_report(bundle: Bundle, results: list[ConfigResult], budget_ms: float, rate_hz: float | None,
                  threads: int | None, warmup: int, roofline: dict[str, Any]) -> dict[str, Any]:
    return {
        "kind": REPORT_KIND, "version": REPORT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": host_info(threads),
        "bundle": {"path": str(bundle.root), "precision": bundle.precision,
                   "preset": bundle.manifest["model"].get("preset"), "parameters": bundle.manifest.get("parameters")},
        "budget_ms": budget_ms, "rate_hz": rate_hz, "warmup": warmup, "verdict_rule": VERDICT_RULE,
        "configurations": [summarize(r, budget_ms) for r in results],
        "roofline": roofline,
    }


# --- presentation ------------------------------------------------------------------------------------
def format_table(config: dict[str, Any]) -> str:
    """One configuration's stages as a fixed-width table (ms)."""
    v = config["verdict"]
    total_p50 = config["stages"]["total"]["p50"] or 1.0
    head = (f"{config['label']} ({config['backend']}, {config['iterations']} runs): "
            f"{'PASS' if v['pass'] else 'FAIL'} p99 {config['stages']['total']['p99']:.3f} ms vs budget "
            f"{v['budget_ms']:.3f} ms, headroom {v['headroom_ms']:+.3f} ms, {v['misses']} over budget")
    lines = [head, f"  {'stage':<12}{'p50':>9}{'p90':>9}{'p99':>9}{'max':>9}{'std':>8}{'p99-p50':>9}{'%p50':>6}"]
    steps = [f"step_{i}" for i in range(config["steps"])]
    for name in ["preprocess", "prefix", *steps, "ode_total", "postprocess", "total"]:  # JSON sorts keys
        st = config["stages"][name]
        share = 100.0 * st["p50"] / total_p50
        lines.append(f"  {name:<12}{st['p50']:9.3f}{st['p90']:9.3f}{st['p99']:9.3f}{st['max']:9.3f}"
                     f"{st['std']:8.3f}{st['jitter_p99_p50']:9.3f}{share:6.1f}")
    return "\n".join(lines)


def format_roofline(roofline: dict[str, Any], measured: dict[int, float] | None = None) -> str:
    if "targets" not in roofline:
        return f"roofline: skipped ({roofline.get('skipped', 'no data')})"
    steps = list(next(iter(roofline["targets"].values()))["total_ms"])
    g = roofline["graphs"]
    lines = [f"roofline {roofline['label']}",
             f"  prefix {g['prefix']['flops'] / 1e6:.1f} MFLOP {g['prefix']['bytes'] / 1e6:.2f} MB; "
             f"denoise_step {g['denoise_step']['flops'] / 1e6:.1f} MFLOP {g['denoise_step']['bytes'] / 1e6:.2f} MB; "
             f"{g['prefix']['precision']} peaks; +{roofline['launch_overhead_ms'] * 1e3:.0f} us per graph launch",
             f"  {'target':<26}{'prefix':>9}{'step':>9}  {'bound':<15}" + "".join(f"{'x' + s:>9}" for s in steps)]
    for t in roofline["targets"].values():
        bound = f"{t['prefix']['bound'][:3]}/{t['step']['bound'][:3]}"
        lines.append(f"  {t['name']:<26}{t['prefix']['ms']:9.3f}{t['step']['ms']:9.3f}  {bound:<15}"
                     + "".join(f"{t['total_ms'][s]:9.3f}" for s in steps))
    if measured:
        lines.append(f"  {'here: prefix+ODE p50':<26}{'':>9}{'':>9}  {'':<15}"
                     + "".join(f"{measured[int(s)]:9.3f}" if int(s) in measured else f"{'-':>9}" for s in steps))
    return "\n".join(lines)


def plot_latency(results: list[ConfigResult], budget_ms: float, path: str | Path) -> Path:
    """Per configuration: the distribution of `total` (box + points) and the p50 stage breakdown."""
    from edge_vla.optional import require

    matplotlib = require("matplotlib")
    matplotlib.use("Agg")  # headless robots and CI have no display
    plt = require("matplotlib.pyplot")
    fig, (ax_dist, ax_stack) = plt.subplots(1, 2, figsize=(12, 0.6 * len(results) + 3.5))
    labels = [r.label for r in results]
    totals = [r.samples["total"] for r in results]
    box = {"whis": (1, 99), "showfliers": True, "flierprops": {"markersize": 2}}
    try:
        ax_dist.boxplot(totals, orientation="horizontal", **box)
    except TypeError:  # matplotlib < 3.10 only knows vert=
        ax_dist.boxplot(totals, vert=False, **box)
    ax_dist.set_yticks(range(1, len(labels) + 1), labels)
    ax_dist.axvline(budget_ms, color="red", linestyle="--", label=f"budget {budget_ms:g} ms")
    ax_dist.set_xlabel("total latency per chunk (ms); whiskers p1..p99")
    ax_dist.legend(loc="lower right")
    ax_dist.set_title("latency distribution")
    parts = {"preprocess": "preprocess", "prefix": "prefix", "ode_total": "ODE steps", "postprocess": "postprocess"}
    left = np.zeros(len(results))
    for key, name in parts.items():
        widths = np.array([float(np.median(r.samples[key])) for r in results])
        ax_stack.barh(range(1, len(results) + 1), widths, left=left, label=name)
        left += widths
    ax_stack.set_yticks(range(1, len(labels) + 1), labels)
    ax_stack.axvline(budget_ms, color="red", linestyle="--")
    ax_stack.set_xlabel("p50 per stage (ms)")
    ax_stack.legend(loc="lower right")
    ax_stack.set_title("where the milliseconds go")
    fig.suptitle(f"edge-vla profile on {platform.node()} ({os.cpu_count()} CPUs)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
