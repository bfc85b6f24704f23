"""Latency budget profiling: run the policy many times per configuration and report every stage.

    results = profile_bundle(bundle, steps_list=[1, 2, 10], iterations=200, warmup=20)
    timing = loop_timing(bundle.manifest)                      # the onboard loop's own numbers
    report = bundle_report(bundle, results, timing, ...)       # JSON-ready; also written to target/

Stages are the Policy's own `timings_ms` (preprocess, prefix, step_i, ode_total, postprocess, total),
so what is profiled is exactly what runs on the robot.

The verdict answers "will my robot keep up?". `edge-vla run` infers in a worker thread, asynchronously
from the control loop, on chunks of H actions P seconds apart, and its watchdog trips only when the newest
chunk ages past its limit or the robot holds past a chunk's end for too long. So an inference is judged
against the latency its chunk strategy tolerates (`tolerances`), computed from the bundle's chunk length
and action period and the limits `edge-vla run` itself would use (its own argument parser and
`_control_config`, so thresholds passed as `--run-args` count, and nothing is copied here). The control
period is the budget of the control loop's own cycle (scheduler + safety + link write), a separate line.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import logging
import os
import platform
import re
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_vla.action_space import ActionSpace, require_executable
from edge_vla.bundle import Bundle
from edge_vla.errors import ConfigError
from edge_vla.runtime.policy import Policy
from edge_vla.runtime.types import Observation

log = logging.getLogger(__name__)

REPORT_KIND = "edge-vla-profile"
REPORT_VERSION = 2  # 2: chunk-strategy verdicts, stage means, control-loop line, power mode
VERDICT_RULE = ("pass when p99(total) <= the latency the chunk strategy tolerates and max(total) <= the latency "
                "past which the watchdog stops the robot; and, where --budget-ms is given, p99(total) <= it")
BUDGET_RULE = "pass when p99(total) <= budget_ms"
PERCENTILES = (50, 90, 99)
FUSED = "chunk_graph"  # the one stage of a whole-chunk (TensorRT CUDA graph) inference, instead of prefix + ODE


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
        if FUSED in self.samples:  # TensorRT: prefix and steps are one CUDA graph launch, timed as one
            return ["preprocess", FUSED, "postprocess", "total"]
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
                   backend: str = "auto", precision: str | None = None) -> list[ConfigResult]:
    """Profile each ODE step count on one (already verified) bundle."""
    obs = observations(bundle, seed=seed)
    results = []
    for steps in steps_list:
        policy = Policy.load(bundle, backend=backend, steps=steps, solver=solver, seed=seed, threads=threads,
                             precision=precision)
        t0 = time.perf_counter()
        samples = measure(policy, obs, iterations, warmup)
        log.info("%s steps=%d: %d runs in %.1f s", bundle.precision, steps, iterations, time.perf_counter() - t0)
        label = f"{bundle.precision} {policy.solver} x{steps}"
        name = getattr(policy.backend, "name", type(policy.backend).__name__)
        if getattr(policy.backend, "chunk_path", None) == "cpu_step":  # the steps ran in the C Euler loop
            name += " + C Euler loop"
        results.append(ConfigResult(label, bundle.precision, steps, policy.solver, samples, name))
    return results


# --- the onboard loop's numbers ----------------------------------------------------------------------
RTC = "rtc"  # a verdict only for bundles whose manifest declares an `rtc` block (real-time chunking)


class _RunArgsParser(argparse.ArgumentParser):
    """`edge-vla run`'s own parser, raising a one-line ConfigError instead of exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"--run-args: {message} (they are `edge-vla run` flags, e.g. '--chunk-max-age 1.0 "
                          "--execute 4')")


@dataclass(frozen=True)
class LoopTiming:
    """What an inference's latency is judged against: the chunk's shape and the limits `edge-vla run` uses."""

    rate_hz: float
    action_period_s: float
    chunk_len: int
    strategy: str  # the strategy `edge-vla run` would use with these flags: the one --check judges
    execute: int  # sync: actions played per chunk
    chunk_max_age_s: float  # the watchdog's CHUNK_STALE limit
    exhausted_max_s: dict[str, float]  # per strategy: holding past the last chunk's end (run's default differs)
    min_interval_s: float  # the inference worker replans no faster than this
    start_ramp_s: float  # plan-clock ramp after a start from rest (every sync chunk starts from rest)
    rtc_max_delay: int | None = None  # the manifest's rtc.max_delay (actions), when it declares a valid one
    rtc_error: str | None = None  # why a declared rtc block cannot be judged
    run_args: tuple[str, ...] = ()

    @property
    def control_period_s(self) -> float:
        return 1.0 / self.rate_hz

    @property
    def chunk_s(self) -> float:
        return self.chunk_len * self.action_period_s

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "control_period_s": self.control_period_s, "chunk_s": self.chunk_s,
                "source": "edge-vla run's parser and _control_config (WatchdogConfig defaults), "
                          "InferenceWorker.min_interval_s, scheduler.start_ramp_s; the bundle's control block"}


def _run_config(space: ActionSpace, argv: Sequence[str]) -> Any:
    """The ControlConfig `edge-vla run --emulate ARGV` would build (robot config included)."""
    from edge_vla.onboard import cli as run_cli

    parser = _RunArgsParser(prog="edge-vla run", add_help=False)
    run_cli.configure(parser)
    args = parser.parse_args(["--emulate", *argv])
    return run_cli._control_config(args, "emulate", space)


def _rtc_delay(manifest: Mapping[str, Any], chunk_len: int) -> tuple[int | None, str | None]:
    """(max_delay, None) for a usable rtc block, (None, why) for a declared but unusable one, (None, None) else."""
    if "rtc" not in manifest:
        return None, None
    rtc = manifest.get("rtc")
    delay = rtc.get("max_delay") if isinstance(rtc, Mapping) else None
    if isinstance(delay, bool) or not isinstance(delay, int) or not 1 <= delay < chunk_len:
        return None, (f"the manifest's rtc block needs max_delay, an integer number of actions in 1..{chunk_len - 1}, "
                      f"got {str(rtc)[:80]}")
    return delay, None


def loop_timing(manifest: Mapping[str, Any], rate_hz: float | None = None, run_args: Sequence[str] = (),
                strategy: str | None = None) -> LoopTiming:
    """The numbers `edge-vla run` would judge this bundle's chunks by. `rate_hz` None: the bundle's
    default_rate_hz (else run's own default); `run_args`: `edge-vla run` flags (thresholds, --execute, ...).
    Raises ConfigError where `edge-vla run` would refuse (a rate out of range, actions it cannot execute)."""
    from edge_vla.onboard.scheduler import STRATEGIES, start_ramp_s
    from edge_vla.onboard.worker import InferenceWorker

    space = ActionSpace.from_dict(manifest["action_space"])
    control = manifest.get("control") or {}
    period = float(control.get("action_period_s") or space.action_period_s)
    chunk_len = int(control.get("chunk_len") or manifest["model"]["chunk_len"])
    rate = rate_hz or control.get("default_rate_hz")
    base = [*(["--rate-hz", str(float(rate))] if rate else []), *run_args]
    chosen = strategy or _run_config(space, base).strategy
    configs = {s: _run_config(space, [*base, "--strategy", s]) for s in STRATEGIES}
    cfg = configs.get(chosen, configs["receding"])  # rtc runs asynchronously, as receding
    sync = configs["sync"]
    ramp = start_ramp_s(space.max_velocity, space.max_acceleration) if sync.start_ramp_s is None \
        else sync.start_ramp_s
    delay, rtc_error = _rtc_delay(manifest, chunk_len)
    if chosen == RTC and delay is None and rtc_error is None:
        raise ConfigError(f"--strategy {RTC}: this bundle's manifest declares no rtc block (real-time chunking); "
                          f"judge one of {', '.join(STRATEGIES)}")
    return LoopTiming(
        rate_hz=float(cfg.rate_hz), action_period_s=period, chunk_len=chunk_len, strategy=chosen,
        execute=max(1, min(sync.execute or chunk_len, chunk_len)),
        chunk_max_age_s=float(cfg.watchdog.chunk_max_age_s),
        exhausted_max_s={s: float(c.watchdog.chunk_exhausted_max_s) for s, c in configs.items()},
        min_interval_s=float(inspect.signature(InferenceWorker).parameters["min_interval_s"].default),
        start_ramp_s=float(ramp) if sync.handover == "continuous" else 0.0,
        rtc_max_delay=delay, rtc_error=rtc_error, run_args=tuple(run_args))


def onboard_timing(bundle: Bundle, rate_hz: float | None = None, run_args: Sequence[str] = (),
                   strategy: str | None = None) -> tuple[LoopTiming | None, str | None]:
    """loop_timing for a bundle, or (None, why) when `edge-vla run` cannot execute its actions at all."""
    from edge_vla.onboard.control import EXECUTABLE_ACTION_KINDS, EXECUTES_BECAUSE

    try:
        require_executable(bundle.action_space, EXECUTABLE_ACTION_KINDS, f"bundle {bundle.root}", "edge-vla run",
                           EXECUTES_BECAUSE)
    except ConfigError as exc:
        return None, str(exc)
    return loop_timing(bundle.manifest, rate_hz, run_args, strategy), None


@dataclass(frozen=True)
class Tolerance:
    """How much inference latency a strategy tolerates (seconds)."""

    tolerated_s: float  # the robot keeps up (PASS) up to this p99
    trip_s: float  # past this the watchdog stops the robot
    why: str  # the rule, with the numbers
    trip_why: str  # which watchdog limit binds


def _async_latency(budget_s: float, min_interval_s: float) -> float:
    """The L with max(L, min_interval) + L = budget: an asynchronous worker observes again as soon as it
    publishes (but no sooner than min_interval after its last start), so a chunk lands that long after
    the previous chunk's observation."""
    return max(0.0, budget_s / 2 if budget_s / 2 >= min_interval_s else budget_s - min_interval_s)


def tolerances(t: LoopTiming) -> dict[str, Tolerance]:
    """Per chunk strategy of the onboard loop (and rtc where the bundle declares it): the tolerated latency.

    Asynchronous (receding, ensemble): chunk n is observed at o, lands at o + L + Tc (Tc: one control
    period until the loop adopts it), and its actions run out at o + H*P; the worker's next observation is at
    o + max(L, m), so chunk n+1 lands at o + max(L, m) + L + Tc. Keeping up: that is <= H*P. The watchdog
    trips when the chunk age before it lands exceeds chunk_max_age, or the hold past H*P exceeds
    exhausted_max. Sync: the worker observes only after the loop played `execute` actions (E*P, plus half
    the plan clock's ramp r from rest), so the robot pauses L + Tc per chunk by design, and the newest
    chunk is 2 (L + Tc) + E*P + r/2 old when the next lands. RTC: the actions played while inferring
    (L + Tc) must fit in the block's max_delay * P, within the asynchronous limits."""
    hp, tc, m = t.chunk_s, t.control_period_s, t.min_interval_s
    out: dict[str, Tolerance] = {}
    for name in ("receding", "ensemble"):
        x = t.exhausted_max_s[name]
        keep = _async_latency(hp - tc, m)
        by_age, by_hold = _async_latency(t.chunk_max_age_s - tc, m), _async_latency(hp + x - tc, m)
        trip = min(by_age, by_hold)
        trip_why = (f"chunk age limit {t.chunk_max_age_s:g} s" if by_age <= by_hold
                    else f"hold-past-the-chunk limit {x:g} s")
        out[name] = Tolerance(min(keep, trip), trip,
                              f"the next chunk lands max(L, {m * 1e3:.0f} ms) + L + {tc * 1e3:.1f} ms after the last "
                              f"observation; its {t.chunk_len} x {t.action_period_s * 1e3:.0f} ms actions last "
                              f"{hp * 1e3:.0f} ms", trip_why)
    x, e = t.exhausted_max_s["sync"], t.execute
    ep = e * t.action_period_s + t.start_ramp_s / 2
    by_age, by_hold = (t.chunk_max_age_s - ep) / 2 - tc, x - tc
    trip = max(0.0, min(by_age, by_hold))
    out["sync"] = Tolerance(trip, trip,
                            f"the robot pauses L + {tc * 1e3:.1f} ms for every chunk of {e} x "
                            f"{t.action_period_s * 1e3:.0f} ms (+{t.start_ramp_s / 2 * 1e3:.0f} ms ramp from rest); "
                            f"the newest chunk is 2 (L + Tc) + {ep * 1e3:.0f} ms old when the next lands",
                            f"chunk age limit {t.chunk_max_age_s:g} s" if by_age <= by_hold
                            else f"hold limit {x:g} s")
    if t.rtc_max_delay is not None:
        rec = out["receding"]
        # An inference starts anywhere within an action, which is then partly played: max_delay frozen actions
        # guarantee (max_delay - 1) action periods, less the wait for the loop's next cycle. Up to max_delay periods
        # are on time only for an inference that starts on an action boundary (docs/rtc.md, "Tolerated latency").
        frozen = (t.rtc_max_delay - 1) * t.action_period_s - tc
        out[RTC] = Tolerance(max(0.0, min(frozen, rec.tolerated_s)), rec.trip_s,
                             f"real-time chunking freezes up to {t.rtc_max_delay} actions that play while the next "
                             f"chunk is inferred: on time for any start within an action up to "
                             f"{(t.rtc_max_delay - 1) * t.action_period_s * 1e3:.0f} ms, less one control period",
                             rec.trip_why)
    return out


def _reason(name: str, tol: Tolerance, p50: float, p99: float, mx: float, t: LoopTiming) -> tuple[bool, str]:
    """PASS/FAIL and one sentence of why (latencies in ms)."""
    lim, trip = 1e3 * tol.tolerated_s, 1e3 * tol.trip_s
    if p99 > trip or mx > trip:
        which, value = ("p99", p99) if p99 > trip else ("max", mx)
        return False, (f"the watchdog would stop the robot: {which} {value:.1f} ms is past the {trip:.0f} ms its "
                       f"{tol.trip_why} allows")
    if p99 > lim:
        if name == RTC:
            return False, (f"falls behind: p99 {p99:.1f} ms is past the {lim:.0f} ms rtc tolerates, so the next "
                           "chunk is inpainted against actions already played")
        return False, (f"falls behind: at p99 {p99:.1f} ms the chunk runs out before the next one lands, so the robot "
                       f"holds still between chunks (the watchdog stops it past {trip:.0f} ms)")
    if name == "sync":
        return True, (f"keeps up with pauses: the robot waits ~{p50:.1f} ms (p50) for every chunk of {t.execute} "
                      f"actions by design; the watchdog allows {lim:.0f} ms")
    return True, f"keeps up: p99 {p99:.1f} ms is within the {lim:.0f} ms this strategy tolerates"


def chunk_verdicts(total_ms: np.ndarray, t: LoopTiming) -> dict[str, dict[str, Any]]:
    """Per strategy: tolerated latency, measured p50/p99/max, margin (tolerated - p99), PASS/FAIL and why."""
    p50, p99 = (float(v) for v in np.percentile(total_ms, (50, 99)))
    mx = float(np.max(total_ms))
    out: dict[str, dict[str, Any]] = {}
    for name, tol in tolerances(t).items():
        ok, why = _reason(name, tol, p50, p99, mx, t)
        out[name] = {"strategy": name, "tolerated_ms": 1e3 * tol.tolerated_s, "trip_ms": 1e3 * tol.trip_s,
                     "p50_ms": p50, "p99_ms": p99, "max_ms": mx, "margin_ms": 1e3 * tol.tolerated_s - p99,
                     "pass": ok, "reason": why, "rule": tol.why}
    if t.rtc_error is not None:
        out[RTC] = {"strategy": RTC, "tolerated_ms": None, "trip_ms": None, "p50_ms": p50, "p99_ms": p99,
                    "max_ms": mx, "margin_ms": None, "pass": False, "reason": f"cannot judge rtc: {t.rtc_error}",
                    "rule": "rtc: max_delay actions x action period"}
    return out


# --- statistics --------------------------------------------------------------------------------------
# The stages that partition one inference, in order; "other" is what none of them accounts for (clock
# reads, the noise draw, Python between the stages, a descheduling between two stages).
BREAKDOWN = (("preprocess", "preprocess"), ("prefix", "prefix"), ("ode", "ode_total"), ("postprocess", "postprocess"))
BREAKDOWN_FUSED = (("preprocess", "preprocess"), (FUSED, FUSED), ("postprocess", "postprocess"))


def breakdown_stages(samples: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """(row name, timings key) of the stages that partition one inference, in order."""
    return BREAKDOWN_FUSED if FUSED in samples else BREAKDOWN


def stage_stats(x: np.ndarray) -> dict[str, float]:
    p50, p90, p99 = (float(v) for v in np.percentile(x, PERCENTILES))
    return {"p50": p50, "p90": p90, "p99": p99, "max": float(x.max()), "min": float(x.min()),
            "mean": float(x.mean()), "std": float(x.std()), "jitter_p99_p50": p99 - p50}


def breakdown_ms(samples: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Mean per stage, "other" = mean(total) - their sum, and the total: means add up, percentiles do not
    (the p50 of a sum is not the sum of p50s, least of all under load, where tails land in different runs)."""
    rows = {name: float(np.mean(samples[key])) for name, key in breakdown_stages(samples)}
    total = float(np.mean(samples["total"]))
    return {**rows, "other": total - sum(rows.values()), "total": total}


def budget_verdict(total: np.ndarray, budget_ms: float) -> dict[str, Any]:
    """The plain gate: p99 of one inference within a fixed budget (--budget-ms)."""
    p99 = float(np.percentile(total, 99))
    misses = int(np.count_nonzero(total > budget_ms))
    return {"budget_ms": budget_ms, "rule": BUDGET_RULE, "pass": p99 <= budget_ms,
            "headroom_ms": budget_ms - p99, "misses": misses, "miss_rate": misses / len(total)}



def summarize(result: ConfigResult, timing: LoopTiming | None = None, budget_ms: float | None = None,
              not_judged: str | None = None) -> dict[str, Any]:
    """Stats per stage, the mean breakdown, per-strategy verdicts (with `timing`) and the headline verdict:
    the judged strategy's, and-ed with the --budget-ms gate where one is given."""
    s = result.samples
    host_sum = sum(s[key] for _, key in breakdown_stages(s))
    verdicts = chunk_verdicts(s["total"], timing) if timing is not None else {}
    head: dict[str, Any]
    if timing is not None:
        head = dict(verdicts[timing.strategy])
    else:
        head = {"strategy": None, "pass": True,
                "reason": f"no onboard verdict: {not_judged or 'no loop timing given'}"}
    if budget_ms is not None:
        gate = budget_verdict(s["total"], budget_ms)
        head.update(budget_ms=budget_ms, headroom_ms=gate["headroom_ms"], misses=gate["misses"],
                    miss_rate=gate["miss_rate"], budget_pass=gate["pass"])
        if not gate["pass"]:
            head["reason"] = (f"p99 {np.percentile(s['total'], 99):.3f} ms is over the --budget-ms "
                              f"{budget_ms:g} ms" + ("" if timing is None else f"; {timing.strategy}: {head['reason']}"))
        head["pass"] = bool(head["pass"] and gate["pass"])
    return {
        "label": result.label, "precision": result.precision, "steps": result.steps, "solver": result.solver,
        "backend": result.backend, "iterations": len(s["total"]),
        "stages": {k: stage_stats(s[k]) for k in result.stage_names()},
        "breakdown_ms": breakdown_ms(s),
        # time inside `infer` not attributed to a stage (clock reads, the noise draw): should be ~0
        "unattributed_ms_p50": float(np.median(s["total"] - host_sum)),
        "chunk_verdicts": verdicts,
        "verdict": head,
    }


# --- the control loop's own cycle ----------------------------------------------------------------------
def control_cycle_ms(manifest: Mapping[str, Any], t: LoopTiming, cycles: int = 1000) -> np.ndarray:
    """Host compute of one control cycle as `edge-vla run` does it (scheduler sample + safety layer), on
    this bundle's action space at its rate. The link write and wake-up jitter are I/O and scheduling, not
    measured here: `edge-vla run --emulate` reports the period error."""
    from edge_vla.onboard.safety import SafetyLayer, SafetyLimits
    from edge_vla.onboard.scheduler import Chunk, make_scheduler

    space = ActionSpace.from_dict(manifest["action_space"])
    lo, hi = np.asarray(space.lower, np.float64), np.asarray(space.upper, np.float64)
    mid = (lo + hi) / 2
    sched = make_scheduler(t.strategy if t.strategy != RTC else "receding")
    sched.reset(mid)
    safety = SafetyLayer(SafetyLimits.from_action_space(space, t.rate_hz))
    safety.reset(mid)
    ramp = np.linspace(0.0, 0.1, t.chunk_len)[:, None] * (hi - lo)[None, :] + lo  # a gentle plan, inside limits
    out = np.empty(cycles)
    period, every = t.control_period_s, max(1, round(t.chunk_s / 2 / t.control_period_s))
    for i in range(cycles):
        now = i * period
        t0 = time.perf_counter()
        if i % every == 0:
            sched.push(Chunk(ramp, t.action_period_s, now, mid, seq=i), now)
        safety.command(sched.sample(now).q)
        out[i] = (time.perf_counter() - t0) * 1e3
    return out


def control_loop_report(manifest: Mapping[str, Any], t: LoopTiming) -> dict[str, Any]:
    cycle = control_cycle_ms(manifest, t)
    period_ms = 1e3 * t.control_period_s
    st = stage_stats(cycle)
    ok = st["p99"] <= period_ms
    return {"rate_hz": t.rate_hz, "period_ms": period_ms, "cycle_compute_ms": st, "pass": ok,
            "reason": (f"scheduler + safety p99 {st['p99']:.3f} ms {'fits' if ok else 'does NOT fit'} in the "
                       f"{period_ms:.1f} ms period; the link write and wake-up jitter come on top (edge-vla run "
                       "reports the period error)")}


# --- the machine ---------------------------------------------------------------------------------------
NVPMODEL_TIMEOUT_S = 5.0
NOT_A_JETSON = {"jetson": False, "note": "not a Jetson"}


def _read(path: Path, limit: int = 4096) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("utf-8", "replace")
    except OSError:
        return None


def _mhz(text: str | None, per_mhz: float) -> float | None:
    try:
        return float(text.strip()) / per_mhz if text is not None and text.strip() else None
    except ValueError:
        return None


def _nvpmodel(root: Path) -> dict[str, Any]:
    """`nvpmodel -q`: the power mode's name and number. On a real root the binary is found on PATH too."""
    import shutil

    candidates = [root / "usr/sbin/nvpmodel", root / "usr/bin/nvpmodel"]
    if root == Path("/") and shutil.which("nvpmodel"):
        candidates.insert(0, Path(shutil.which("nvpmodel")))  # type: ignore[arg-type]
    exe = next((c for c in candidates if os.access(c, os.X_OK)), None)
    if exe is None:
        return {"mode": None, "output": None, "error": "nvpmodel not found"}
    try:
        done = subprocess.run([str(exe), "-q"], capture_output=True, text=True, errors="replace",
                              timeout=NVPMODEL_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return {"mode": None, "output": None, "error": f"nvpmodel -q timed out after {NVPMODEL_TIMEOUT_S:g} s"}
    except OSError as exc:
        return {"mode": None, "output": None, "error": f"nvpmodel -q: {exc}"}
    output = done.stdout.strip()[:2000]
    if done.returncode != 0:
        return {"mode": None, "output": output or None,
                "error": f"nvpmodel -q exited {done.returncode}: {done.stderr.strip()[:300]}"}
    found = re.search(r"NV Power Mode:\s*(\S.*)", output)
    return {"mode": found.group(1).strip() if found else None, "output": output, "error": None}


def power_info(root: str | Path = "/") -> dict[str, Any]:
    """The Jetson power mode and current clocks (`nvpmodel -q`, cpufreq, GPU devfreq) under `root`, or
    {"jetson": False, ...} elsewhere. Missing or unreadable files are left out; never raises."""
    root = Path(root)
    release = _read(root / "etc/nv_tegra_release")
    compatible = (_read(root / "proc/device-tree/compatible") or "").replace("\0", " ").strip()
    if release is None and "tegra" not in compatible and "nvidia,p3" not in compatible:
        return dict(NOT_A_JETSON)
    cpus: dict[str, float] = {}
    for f in sorted((root / "sys/devices/system/cpu").glob("cpu[0-9]*/cpufreq/scaling_cur_freq")):
        mhz = _mhz(_read(f), 1e3)  # kHz
        if mhz is not None:
            cpus[f.parent.parent.name] = mhz
    gpu = None
    for pattern in ("sys/devices/gpu.0/devfreq/*/cur_freq", "sys/devices/platform/gpu.0/devfreq/*/cur_freq",
                    "sys/class/devfreq/*gpu*/cur_freq"):
        gpu = next((v for f in sorted(root.glob(pattern)) if (v := _mhz(_read(f), 1e6)) is not None), None)
        if gpu is not None:
            break
    return {"jetson": True, "release": (release or "").strip().splitlines()[0][:200] if release else None,
            "model": compatible[:200] or None, "nvpmodel": _nvpmodel(root), "cpu_mhz": cpus, "gpu_mhz": gpu}


def format_power(info: Mapping[str, Any]) -> str:
    if not info.get("jetson"):
        return f"power: {info.get('note', 'not a Jetson')} (no nvpmodel mode to record)"
    nv = info.get("nvpmodel") or {}
    mode = nv.get("mode") or f"unknown ({nv.get('error') or 'no mode in nvpmodel -q'})"
    cpus = list((info.get("cpu_mhz") or {}).values())
    cpu = f"{min(cpus):.0f}-{max(cpus):.0f} MHz over {len(cpus)} cores" if cpus else "unknown"
    gpu = f"{info['gpu_mhz']:.0f} MHz" if info.get("gpu_mhz") is not None else "unknown"
    return (f"power: Jetson, nvpmodel {mode}; CPU {cpu}; GPU {gpu} (figures are for this mode only; "
            "compare profiles taken in the same mode, and check `jetson_clocks`)")


def host_info(threads: int | None, power_root: str | Path = "/") -> dict[str, Any]:
    import onnxruntime as ort

    return {"machine": platform.machine(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine(), "python": platform.python_version(),
            "onnxruntime": ort.__version__, "threads": threads or os.cpu_count(),
            "node": platform.node(), "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "power": power_info(power_root)}


def bundle_report(bundle: Bundle, results: list[ConfigResult], timing: LoopTiming | None, budget_ms: float | None,
                  threads: int | None, warmup: int, roofline: dict[str, Any], not_judged: str | None = None,
                  host: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "kind": REPORT_KIND, "version": REPORT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": host or host_info(threads),
        "bundle": {"path": str(bundle.root), "precision": bundle.precision,
                   "preset": bundle.manifest["model"].get("preset"), "parameters": bundle.manifest.get("parameters")},
        "budget_ms": budget_ms, "rate_hz": timing.rate_hz if timing else None, "warmup": warmup,
        "verdict_rule": VERDICT_RULE,
        "onboard": timing.as_dict() if timing else {"skipped": not_judged},
        "control_loop": control_loop_report(bundle.manifest, timing) if timing else {"skipped": not_judged},
        "configurations": [summarize(r, timing, budget_ms, not_judged) for r in results],
        "roofline": roofline,
    }


# --- presentation ------------------------------------------------------------------------------------
def format_table(config: dict[str, Any]) -> str:
    """One configuration: its stages (ms; means add up to the total, with an "other" row) and its verdicts."""
    st, v = config["stages"], config["verdict"]
    total = st["total"]
    lines = [f"{config['label']} ({config['backend']}, {config['iterations']} runs): total mean {total['mean']:.3f} "
             f"p50 {total['p50']:.3f} p99 {total['p99']:.3f} max {total['max']:.3f} ms",
             f"  {'stage':<12}{'mean':>9}{'p50':>9}{'p90':>9}{'p99':>9}{'max':>9}{'std':>8}{'p99-p50':>9}"
             f"{'mean %':>8}"]
    rows = config["breakdown_ms"]
    whole = rows["total"] or 1.0

    def row(name: str, key: str | None, indent: int = 2, share: bool = True) -> str:
        mean = rows.get(name, st[key]["mean"] if key else 0.0)
        cols = (f"{st[key]['p50']:9.3f}{st[key]['p90']:9.3f}{st[key]['p99']:9.3f}{st[key]['max']:9.3f}"
                f"{st[key]['std']:8.3f}{st[key]['jitter_p99_p50']:9.3f}") if key else f"{'':>53}"
        pct = f"{100.0 * mean / whole:7.1f}%" if share else ""
        return f"{' ' * indent}{name:<{14 - indent}}{mean:9.3f}{cols}{pct}"

    for name, key in breakdown_stages(st):
        lines.append(row(name, key))
        if name == "ode":  # the steps are inside the ODE row: shown, not added again
            lines += [row(f"step_{i}", f"step_{i}", indent=4, share=False) for i in range(config["steps"])]
    lines += [row("other", None), row("total", "total")]
    for name, cv in config.get("chunk_verdicts", {}).items():
        mark = "*" if name == v.get("strategy") else " "
        tol = "-" if cv["tolerated_ms"] is None else f"{cv['tolerated_ms']:.1f}"
        lines.append(f"  {'PASS' if cv['pass'] else 'FAIL'} {name + mark:<10} tolerates {tol:>7} ms, p99 "
                     f"{cv['p99_ms']:.1f} ms: {cv['reason']}")
    if "budget_ms" in v:
        lines.append(f"  {'PASS' if v['budget_pass'] else 'FAIL'} --budget-ms {v['budget_ms']:g}: p99 "
                     f"{total['p99']:.3f} ms, headroom {v['headroom_ms']:+.3f} ms, {v['misses']} run(s) over")
    if not config.get("chunk_verdicts"):
        lines.append(f"  {v['reason']}")
    return "\n".join(lines)


def format_timing(t: LoopTiming) -> str:
    ex = ", ".join(f"{k} {v:g} s" for k, v in t.exhausted_max_s.items())
    rtc = (f"; rtc max_delay {t.rtc_max_delay} actions" if t.rtc_max_delay is not None
           else f"; rtc: {t.rtc_error}" if t.rtc_error else "")
    return (f"onboard loop (edge-vla run{' ' + ' '.join(t.run_args) if t.run_args else ''}): chunks of "
            f"{t.chunk_len} x {t.action_period_s * 1e3:.0f} ms = {t.chunk_s * 1e3:.0f} ms, inferred asynchronously "
            f"(sync: {t.execute} played per chunk); watchdog: chunk age {t.chunk_max_age_s:g} s, hold past a chunk "
            f"{ex}{rtc}. Judged strategy: {t.strategy} (* below)")


def format_control_loop(c: Mapping[str, Any]) -> str:
    if "skipped" in c:
        return f"control loop: not judged ({c['skipped']})"
    return (f"control loop: {c['rate_hz']:g} Hz = {c['period_ms']:.3f} ms per cycle, its own budget (not the "
            f"inference's): {'PASS' if c['pass'] else 'FAIL'} {c['reason']}")


def format_roofline(roofline: dict[str, Any], measured: dict[int, float] | None = None) -> str:
    if "targets" not in roofline:
        return f"roofline: skipped ({roofline.get('skipped', 'no data')})"
    steps = list(next(iter(roofline["targets"].values()))["total_ms"])
    g = roofline["graphs"]
    lines = [f"roofline {roofline['label']}",
             f"  prefix {g['prefix']['flops'] / 1e6:.1f} MFLOP {g['prefix']['bytes'] / 1e6:.2f} MB; "
             f"denoise_step {g['denoise_step']['flops'] / 1e6:.1f} MFLOP {g['denoise_step']['bytes'] / 1e6:.2f} MB; "
             f"{g['prefix']['precision']} peaks; +{roofline['launch_overhead_ms'] * 1e3:.0f} us per graph launch",
             f"  {'target (power mode)':<36}{'prefix':>9}{'step':>9}  {'bound':<15}"
             + "".join(f"{'x' + s:>9}" for s in steps)]
    for t in roofline["targets"].values():
        bound = f"{t['prefix']['bound'][:3]}/{t['step']['bound'][:3]}"
        name = f"{t['name']} ({t.get('power_mode') or '?'})"
        lines.append(f"  {name:<36}{t['prefix']['ms']:9.3f}{t['step']['ms']:9.3f}  {bound:<15}"
                     + "".join(f"{t['total_ms'][s]:9.3f}" for s in steps))
    if measured:
        lines.append(f"  {'here: prefix+ODE mean':<36}{'':>9}{'':>9}  {'':<15}"
                     + "".join(f"{measured[int(s)]:9.3f}" if int(s) in measured else f"{'-':>9}" for s in steps))
    return "\n".join(lines)


def plot_latency(results: list[ConfigResult], budget_ms: float | None, path: str | Path,
                 tolerated_ms: float | None = None) -> Path:
    """Per configuration: the distribution of `total` (box + points, its mean marked) and the mean stage
    breakdown, whose bar ends at that same mean (stages + other = total)."""
    from edge_vla.optional import require

    matplotlib = require("matplotlib")
    matplotlib.use("Agg")  # headless robots and CI have no display
    plt = require("matplotlib.pyplot")
    fig, (ax_dist, ax_stack) = plt.subplots(1, 2, figsize=(12, 0.6 * len(results) + 3.5))
    labels = [r.label for r in results]
    ticks = range(1, len(labels) + 1)
    totals = [r.samples["total"] for r in results]
    rows = [breakdown_ms(r.samples) for r in results]
    box = {"whis": (1, 99), "showfliers": True, "flierprops": {"markersize": 2}}
    try:
        ax_dist.boxplot(totals, orientation="horizontal", **box)
    except TypeError:  # matplotlib < 3.10 only knows vert=
        ax_dist.boxplot(totals, vert=False, **box)
    for y, row in zip(ticks, rows, strict=True):
        ax_dist.plot([row["total"]], [y], marker="D", color="black", markersize=4, linestyle="", label="_mean")
    top = max(float(np.max(x)) for x in totals)
    # a limit far off the data (a 390 ms tolerance against 4 ms runs) would squash the boxes: it is in the title
    for value, style, name in ((budget_ms, "--", "budget"), (tolerated_ms, ":", "tolerated")):
        if value is not None and value <= 1.5 * top:
            for ax in (ax_dist, ax_stack):
                ax.axvline(value, color="red", linestyle=style, label=f"{name} {value:g} ms" if ax is ax_dist else None)
    ax_dist.set_yticks(list(ticks), labels)
    ax_dist.set_xlabel("total latency per chunk (ms); whiskers p1..p99, diamond = mean")
    if ax_dist.get_legend_handles_labels()[0]:
        ax_dist.legend(loc="lower right")
    ax_dist.set_title("latency distribution")
    left = np.zeros(len(results))
    names = dict.fromkeys(n for r in results for n, _ in breakdown_stages(r.samples))
    for name in (*names, "other"):
        widths = np.array([row.get(name, 0.0) for row in rows])  # fused and unfused configurations side by side
        ax_stack.barh(list(ticks), widths, left=left, label=name)
        left += widths
    ax_stack.set_yticks(list(ticks), labels)
    ax_stack.set_xlim(ax_dist.get_xlim())  # one scale: the bar's end sits under the distribution's diamond
    ax_stack.set_xlabel("mean per stage (ms); the bar ends at the mean total")
    ax_stack.legend(loc="lower right")
    ax_stack.set_title("where the milliseconds go")
    extra = f"; the judged strategy tolerates {tolerated_ms:.0f} ms" if tolerated_ms is not None else ""
    fig.suptitle(f"edge-vla profile on {platform.node()} ({os.cpu_count()} CPUs){extra}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
