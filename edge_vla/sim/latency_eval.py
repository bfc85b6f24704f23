"""Closed-loop evaluation with injected inference latency: sync, receding, ensemble and rtc on the same seeds.

`edge_vla.sim.evaluate` steps the world in lockstep with inference. Here an inference started at step s with
latency L returns k = ceil(L / action period) steps later, and the world moves on meanwhile (docs/rtc.md,
"Latency model"):

- sync: the arm holds its last command for the k steps, then the new chunk plays from index 0 (`execute` actions),
  then the next inference starts.
- receding: the current chunk keeps executing during the k steps; the new chunk, planned from the observation taken
  at s, takes over at its index k. A new inference starts `execute` actions after the previous one started (or as
  soon as it returns, if it took longer): the lockstep cadence when L = 0.
- ensemble: receding's timing; each step executes the average of every arrived chunk that covers it, weights
  exp(-m i) with i = 0 the oldest (ACT, and the onboard EnsembleScheduler's m and chunk cap).
- rtc: receding's timing; the policy is also given the prefix, the k actions that execute during the delay
  (`policy(obs, prefix)`, prefix [k, D] in physical units, None when k = 0), capped at its `rtc_max_delay`.
If the old chunk runs out before the new one arrives, the arm holds its last action ("exhausted").

Latencies are drawn per inference from a lognormal (sigma 0.25) whose 90th percentile is the nominal latency, from an
RNG seeded by (episode seed, inference index): every strategy, and every nominal latency, sees the same draws.
"""

from __future__ import annotations

import inspect
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from edge_vla.errors import ConfigError
from edge_vla.onboard.scheduler import STRATEGIES as ONBOARD_STRATEGIES
from edge_vla.onboard.scheduler import EnsembleScheduler
from edge_vla.runtime.types import Observation
from edge_vla.sim.env import ReachEnv
from edge_vla.sim.evaluate import (
    EVAL_SEED_BASE,
    EXECUTE,
    EvalResult,
    PairedDifference,
    Reseed,
    check_execute,
    paired_difference,
    wilson_interval,
)
from edge_vla.sim.expert import expert_chunk

STRATEGIES: tuple[str, ...] = tuple(dict.fromkeys((*ONBOARD_STRATEGIES, "rtc")))
DEFAULT_STRATEGIES = ("sync", "receding", "ensemble")  # rtc needs a policy trained for it: asked for by name

# The nominal latency is this quantile of the per-inference draw: a deployment budgets its delay from a high
# percentile of measured latency (the onboard latency tracker does), so 10% of inferences run past the nominal.
NOMINAL_QUANTILE = 0.9
_Z_NOMINAL = 1.2815515655446004  # the standard normal's 90th percentile
LATENCY_SIGMA = 0.25  # lognormal shape: p99 = 1.30 x nominal, median = 0.73 x nominal
_LATENCY_STREAM = 0x1A7E  # keeps these draws apart from any other RNG seeded by the episode seed
MAX_LATENCY_MS = 60_000.0

_ENSEMBLE = inspect.signature(EnsembleScheduler).parameters  # the onboard defaults, not a copy of them
ENSEMBLE_M: float = _ENSEMBLE["m"].default
ENSEMBLE_MAX_CHUNKS: int = _ENSEMBLE["max_chunks"].default

Policy = Callable[..., np.ndarray]  # policy(obs) -> [H, D]; rtc: policy(obs, prefix) with prefix [k, D] or None


class StepEnv(Protocol):
    """What the latency loop needs of an environment (SimStepEnv, MetaWorldStepEnv, a test's fake)."""

    action_period_s: float

    @property
    def t(self) -> int: ...  # steps taken this episode

    def begin(self, seed: int) -> None: ...

    def observe(self) -> Observation: ...

    def step(self, action: np.ndarray) -> tuple[bool, bool]: ...  # (success, done)

    def hold(self, last: np.ndarray | None) -> np.ndarray: ...  # the command that keeps the arm where it is


class SimStepEnv:
    """The sim's ReachEnv: joint-position targets, so holding means repeating the last target (the measured
    position before any command)."""

    def __init__(self, env: ReachEnv) -> None:
        self.env = env
        self.action_period_s = env.action_period_s
        self._obs: Observation | None = None

    @property
    def t(self) -> int:
        return self.env.t

    def begin(self, seed: int) -> None:
        self._obs = self.env.reset(seed)

    def observe(self) -> Observation:
        assert self._obs is not None, "call begin() first"
        return self._obs

    def step(self, action: np.ndarray) -> tuple[bool, bool]:
        self._obs, success, done = self.env.step(action)
        return success, done

    def hold(self, last: np.ndarray | None) -> np.ndarray:
        return self.env.q.copy() if last is None else np.asarray(last, np.float32)


class MetaWorldStepEnv:
    """A MetaWorldEnv: end-effector deltas, so holding means zero motion with the last gripper command."""

    def __init__(self, env: Any) -> None:
        from edge_vla.sim.metaworld import ACTION_PERIOD_S

        self.env = env
        self.action_period_s = ACTION_PERIOD_S

    @property
    def t(self) -> int:
        return int(self.env.t)

    def begin(self, seed: int) -> None:
        self.env.reset(seed)

    def observe(self) -> Observation:
        return self.env.observation()  # rendered only here: once per inference

    def step(self, action: np.ndarray) -> tuple[bool, bool]:
        return self.env.step(action)

    def hold(self, last: np.ndarray | None) -> np.ndarray:
        held = np.zeros(4, np.float32)
        if last is not None:
            held[3] = np.asarray(last, np.float32).reshape(-1)[3]
        return held


class SimExpert:
    """The sim's scripted expert as a chunk policy that also takes an action prefix: it returns the prefix and plans
    on from its last target, as a model trained with action-prefix conditioning should. It reads the scene (no
    learned policy can), so its rtc rows are the upper bound the prefix mechanism allows, not a model's result."""

    def __init__(self, env: ReachEnv, chunk_len: int = 8) -> None:
        self.env, self.chunk_len = env, chunk_len
        self.rtc_max_delay = chunk_len - 1

    def __call__(self, obs: Observation, prefix: np.ndarray | None = None) -> np.ndarray:
        scene = self.env.scene
        assert scene is not None, "reset the env first"
        if prefix is None or len(prefix) == 0:
            return expert_chunk(scene, obs.state, self.chunk_len)
        given = np.asarray(prefix, np.float32)[: self.rtc_max_delay]
        return np.concatenate([given, expert_chunk(scene, given[-1], self.chunk_len - len(given))])


# --- the latency model ------------------------------------------------------------------------------------------
def delay_steps(latency_ms: float, period_s: float) -> int:
    """k = ceil(L / action period): the environment steps that pass before a chunk inferred in L ms can act.
    (A 1e-9 tolerance keeps 300 ms / 100 ms at 3 despite float rounding.)"""
    return max(0, math.ceil(latency_ms / (1000.0 * period_s) - 1e-9))


def draw_latency_ms(nominal_ms: float, seed: int, index: int, sigma: float = LATENCY_SIGMA) -> float:
    """Inference `index` of the episode with seed `seed`: nominal * exp(sigma * (z - z_0.9)), z standard normal
    from an RNG seeded by (seed, index) only, so each strategy and each nominal latency gets the same z."""
    if nominal_ms <= 0:
        return 0.0
    if sigma <= 0:
        return float(nominal_ms)
    z = np.random.default_rng([_LATENCY_STREAM, int(seed) & 0xFFFFFFFF, int(index)]).standard_normal()
    return float(nominal_ms * math.exp(sigma * (z - _Z_NOMINAL)))


def rtc_max_delay(policy: Any) -> int:
    """The longest action prefix a policy accepts: its `rtc_max_delay` (> 0), or unlimited if it says
    `supports_prefix = True` without one; 0 when it declares neither (it was not trained for a prefix)."""
    declared = getattr(policy, "rtc_max_delay", None)
    if isinstance(declared, (int, np.integer)) and not isinstance(declared, bool) and declared > 0:
        return int(declared)
    return 2**31 if getattr(policy, "supports_prefix", False) is True else 0


def require_rtc(policy: Any, name: str = "the policy") -> int:
    delay = rtc_max_delay(policy)
    if delay <= 0:
        raise ConfigError(f"strategy rtc needs a policy trained with action-prefix conditioning, and {name} declares "
                          "none (no rtc_max_delay): train it with --rtc-max-delay D, or drop rtc from --strategies")
    return delay


# --- one episode --------------------------------------------------------------------------------------------------
@dataclass
class _Chunk:
    actions: np.ndarray  # [H, D]
    origin: int  # the step at which actions[0] is due (sync: the step it starts playing)
    arrive: int  # the first step it may act at


@dataclass(frozen=True)
class EpisodeTrace:
    """One episode under one strategy and nominal latency: what ran, and when."""

    seed: int
    success: bool
    steps: int
    latencies_ms: tuple[float, ...]  # per inference, in order
    delays: tuple[int, ...]  # k per inference
    inference_steps: tuple[int, ...]  # the step at which each inference started (its observation)
    handover_disagreement: tuple[float, ...]  # L2 per hand-over, old vs new chunk at the takeover step
    exhausted: int  # times the old chunk ran out before the new one arrived (sync: 0, it holds by design)
    held_steps: int  # steps that executed a hold (start-up wait, sync's waits, exhausted steps)
    prefix_truncated: int = 0  # rtc: inferences whose delay exceeded the policy's rtc_max_delay

    @property
    def handovers(self) -> int:
        return len(self.handover_disagreement)


class _Episode:
    """The step loop of one episode; `strategy` decides what executes while a chunk is in flight."""

    def __init__(self, env: StepEnv, policy: Policy, strategy: str, latency_ms: float, seed: int, execute: int,
                 sigma: float, ensemble_m: float, ensemble_max_chunks: int, max_prefix: int) -> None:
        self.env, self.policy, self.strategy = env, policy, strategy
        self.latency_ms, self.seed, self.sigma = latency_ms, seed, sigma
        self.execute = execute
        self.m, self.max_chunks, self.max_prefix = ensemble_m, ensemble_max_chunks, max_prefix
        self.chunks: list[_Chunk] = []  # arrived, oldest first
        self.pending: _Chunk | None = None
        self.next_start = 0
        self.last: np.ndarray | None = None  # the command executed last
        self.was_exhausted = False
        self.latencies: list[float] = []
        self.delays: list[int] = []
        self.starts: list[int] = []
        self.disagreement: list[float] = []
        self.exhausted = self.held = self.truncated = 0

    def run(self) -> EpisodeTrace:
        done = success = False
        while not done:
            self._schedule(self.env.t)
            action, held, exhausted = self._command(self.env.t, self.last)
            self.held += held
            self.exhausted += int(exhausted and not self.was_exhausted)  # one event per run-out
            self.was_exhausted = exhausted
            success, done = self.env.step(action)
            self.last = action
        return EpisodeTrace(self.seed, bool(success), self.env.t, tuple(self.latencies), tuple(self.delays),
                            tuple(self.starts), tuple(self.disagreement), self.exhausted, self.held, self.truncated)

    def _schedule(self, t: int) -> None:
        """Hand over to a chunk that arrives now, and start inferences that are due (k = 0 arrives at once)."""
        while True:
            if self.pending is not None and t >= self.pending.arrive:
                self._take_over(self.pending, t)
                self.pending = None
            if self.pending is None and t >= self.next_start:
                self._start(t)
                continue
            return

    def _start(self, t: int) -> None:
        index = len(self.starts)
        latency = draw_latency_ms(self.latency_ms, self.seed, index, self.sigma)
        k = delay_steps(latency, self.env.action_period_s)
        self.latencies.append(latency)
        self.delays.append(k)
        self.starts.append(t)
        obs = self.env.observe()
        if self.strategy == "rtc":
            prefix = self._prefix(t, k)
            chunk = self.policy(obs, prefix)
        else:
            chunk = self.policy(obs)
        actions = np.asarray(chunk, np.float32)
        if actions.ndim != 2 or len(actions) == 0:
            raise ConfigError(f"a chunk policy must return [H, action_dim] actions, got shape {actions.shape}")
        origin = t + k if self.strategy == "sync" else t  # sync's plan clock waits with the arm
        self.pending = _Chunk(actions, origin, t + k)

    def _prefix(self, t: int, k: int) -> np.ndarray | None:
        """The k actions the current chunks execute during the delay (nothing is in flight now), capped."""
        if k == 0:
            return None
        upcoming, last = [], self.last
        for j in range(k):
            action, _, _ = self._command(t + j, last)
            upcoming.append(action)
            last = action
        if k > self.max_prefix:
            self.truncated += 1
        return np.stack(upcoming[: self.max_prefix]).astype(np.float32)

    def _take_over(self, new: _Chunk, t: int) -> None:
        if self.chunks:
            old = self.chunks[-1]
            old_index = min(self.execute, len(old.actions)) if self.strategy == "sync" else t - old.origin
            gap = self._planned(old, old_index) - self._planned(new, t - new.origin)
            self.disagreement.append(float(np.linalg.norm(gap)))
        self.chunks = [*self.chunks, new][-self.max_chunks:]
        played = min(self.execute, len(new.actions))
        self.next_start = new.origin + played if self.strategy == "sync" else max(new.origin + played, t)

    def _planned(self, chunk: _Chunk, index: int) -> np.ndarray:
        """The chunk's action at `index`; past its end, the hold of its last action (what the arm would do)."""
        if index < len(chunk.actions):
            return chunk.actions[index].astype(np.float64)
        return np.asarray(self.env.hold(chunk.actions[-1]), np.float64)

    def _command(self, t: int, last: np.ndarray | None) -> tuple[np.ndarray, bool, bool]:
        """(action at step t, whether it is a hold, whether it is an exhausted hold) for the arrived chunks."""
        if not self.chunks:
            return self.env.hold(last), True, False  # start-up: waiting for the first chunk
        newest = self.chunks[-1]
        i = t - newest.origin
        if self.strategy == "sync":
            if self.pending is not None or i >= min(self.execute, len(newest.actions)):
                return self.env.hold(last), True, False  # sync waits for the chunk in flight
            return newest.actions[i], False, False
        if self.strategy == "ensemble":
            live = [c for c in self.chunks if 0 <= t - c.origin < len(c.actions)]
            if live:
                w = np.exp(-self.m * np.arange(len(live)))  # i = 0 the oldest, as ACT and the onboard scheduler
                votes = np.stack([c.actions[t - c.origin] for c in live]).astype(np.float64)
                return (w @ votes / w.sum()).astype(np.float32), False, False
            return self.env.hold(last), True, True
        if i < len(newest.actions):
            return newest.actions[i], False, False
        return self.env.hold(last), True, True


def check_strategy(strategy: str) -> str:
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown chunk strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    return strategy


def run_episode(env: StepEnv, policy: Policy, strategy: str, latency_ms: float, seed: int, execute: int = EXECUTE,
                sigma: float = LATENCY_SIGMA, reseed: Reseed | None = None, ensemble_m: float = ENSEMBLE_M,
                ensemble_max_chunks: int = ENSEMBLE_MAX_CHUNKS, name: str = "the policy") -> EpisodeTrace:
    """One seeded episode of `strategy` at nominal latency `latency_ms` (see the module docstring)."""
    check_strategy(strategy)
    check_execute(execute)
    max_prefix = require_rtc(policy, name) if strategy == "rtc" else 0
    env.begin(seed)
    if reseed is not None:
        reseed(seed)
    return _Episode(env, policy, strategy, latency_ms, seed, execute, sigma, ensemble_m, ensemble_max_chunks,
                    max_prefix).run()


# --- the grid ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LatencyResult:
    """One (strategy, nominal latency) over the seeded episodes."""

    strategy: str
    latency_ms: float
    result: EvalResult
    traces: tuple[EpisodeTrace, ...]
    vs_zero_latency: PairedDifference | None = None
    vs_sync: PairedDifference | None = None

    @property
    def completion_steps(self) -> float | None:
        """Mean steps to success over the successful episodes."""
        done = [tr.steps for tr in self.traces if tr.success]
        return float(np.mean(done)) if done else None

    @property
    def disagreements(self) -> np.ndarray:
        return np.array([d for tr in self.traces for d in tr.handover_disagreement], np.float64)

    @property
    def handover_disagreement(self) -> float | None:
        d = self.disagreements
        return float(d.mean()) if d.size else None

    @property
    def exhausted_per_episode(self) -> float:
        return float(np.mean([tr.exhausted for tr in self.traces])) if self.traces else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = self.disagreements
        delays = Counter(k for tr in self.traces for k in tr.delays)
        return {
            "strategy": self.strategy, "latency_ms": self.latency_ms, "result": self.result.as_dict(),
            "completion_steps": self.completion_steps,
            "handover_disagreement": {"mean": self.handover_disagreement, "p95": float(np.percentile(d, 95))
                                      if d.size else None, "handovers": int(d.size)},
            "exhausted_per_episode": self.exhausted_per_episode,
            "held_steps_per_episode": float(np.mean([tr.held_steps for tr in self.traces])) if self.traces else 0.0,
            "prefix_truncated": sum(tr.prefix_truncated for tr in self.traces),
            "delay_steps": {str(k): n for k, n in sorted(delays.items())},
            "vs_zero_latency": None if self.vs_zero_latency is None else self.vs_zero_latency.as_dict(),
            "vs_sync": None if self.vs_sync is None else self.vs_sync.as_dict(),
        }


@dataclass(frozen=True)
class LatencyGrid:
    name: str
    rows: tuple[LatencyResult, ...]
    action_period_s: float
    execute: int
    sigma: float
    meta: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "action_period_s": self.action_period_s, "execute": self.execute,
                "sigma": self.sigma, **self.meta, "rows": [r.as_dict() for r in self.rows]}

    def table(self) -> str:
        """Markdown: one row per (strategy, latency)."""
        head = ("| strategy | latency (ms) | delay (actions, mean) | success [95% CI] | vs 0 ms (paired) | vs sync "
                "(paired) | completion (steps) | hand-over disagreement | exhausted / episode |\n"
                "|---|---:|---:|---|---|---|---:|---:|---:|")
        lines = [head]
        for r in self.rows:
            res = r.result
            delays = [k for tr in r.traces for k in tr.delays]
            lines.append(
                f"| {r.strategy} | {r.latency_ms:g} | {np.mean(delays) if delays else 0:.2f} | "
                f"{100 * res.success_rate:.1f}% [{100 * res.ci_low:.1f}, {100 * res.ci_high:.1f}] | "
                f"{_paired(r.vs_zero_latency)} | {_paired(r.vs_sync)} | {_num(r.completion_steps, '.1f')} | "
                f"{_num(r.handover_disagreement, '.4f')} | {r.exhausted_per_episode:.2f} |")
        return "\n".join(lines) + "\n"


def _paired(d: PairedDifference | None) -> str:
    if d is None:
        return "-"
    return f"{100 * d.diff:+.1f} [{100 * d.ci_low:+.1f}, {100 * d.ci_high:+.1f}]"


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _result(name: str, traces: Sequence[EpisodeTrace], seed_base: int) -> EvalResult:
    outcomes = tuple(int(tr.success) for tr in traces)
    k, n = sum(outcomes), len(outcomes)
    lo, hi = wilson_interval(k, n)
    steps = float(np.mean([tr.steps for tr in traces])) if traces else 0.0
    return EvalResult(name, n, k, lo, hi, steps, seed_base, 0, outcomes)


def pair_rows(cells: dict[tuple[str, float], tuple[EvalResult, tuple[EpisodeTrace, ...]]],
              strategies: Sequence[str], latencies: Sequence[float]) -> tuple[LatencyResult, ...]:
    """Rows in (strategy, latency) order, each paired with its strategy at 0 ms and with sync at its latency."""
    rows = []
    for s in strategies:
        for lat in latencies:
            res, traces = cells[(s, lat)]
            zero = cells.get((s, 0.0))
            sync = cells.get(("sync", lat))
            rows.append(LatencyResult(
                s, lat, res, traces,
                paired_difference(res, zero[0]) if zero is not None and lat != 0 else None,
                paired_difference(res, sync[0]) if sync is not None and s != "sync" else None))
    return tuple(rows)


def with_zero(latencies: Sequence[float]) -> list[float]:
    """The nominal latencies in order, 0 first: the paired baseline of every strategy."""
    return sorted(set(map(float, latencies)) | {0.0})


def check_grid(policy: Policy, strategies: Sequence[str], latencies: Sequence[float], name: str) -> None:
    """Every refusal before the first episode: unknown strategies, negative latencies, rtc without support."""
    for s in strategies:
        check_strategy(s)
    bad = [x for x in latencies if not (0 <= x <= MAX_LATENCY_MS)]
    if bad:
        raise ConfigError(f"--latency-ms {bad[0]}: a latency is 0-{MAX_LATENCY_MS:g} ms")
    if "rtc" in strategies:
        require_rtc(policy, name)


def evaluate_latency(policy: Policy, strategies: Sequence[str], latencies_ms: Sequence[float], episodes: int = 50,
                     seed_base: int = EVAL_SEED_BASE, image_size: int = 64, num_cameras: int = 1,
                     execute: int = EXECUTE, name: str = "policy", env: ReachEnv | None = None,
                     reseed: Reseed | None = None, split: str = "base", sigma: float = LATENCY_SIGMA,
                     ensemble_m: float = ENSEMBLE_M) -> LatencyGrid:
    """The sim: every (strategy, latency) on the same `episodes` seeds; latency 0 is always included (the
    paired baseline). `reseed(seed)` restarts the policy's noise per episode, as `evaluate` does."""
    check_execute(execute)
    latencies = with_zero(latencies_ms)
    check_grid(policy, strategies, latencies, name)
    step_env = SimStepEnv(env or ReachEnv(image_size=image_size, num_cameras=num_cameras, split=split))
    cells = {}
    for s in strategies:
        for lat in latencies:
            traces = tuple(run_episode(step_env, policy, s, lat, seed_base + i, execute, sigma, reseed, ensemble_m,
                                       name=name) for i in range(episodes))
            cells[(s, lat)] = (_result(f"{name} [{s} @ {lat:g} ms]", traces, seed_base), traces)
    return LatencyGrid(name, pair_rows(cells, strategies, latencies), step_env.action_period_s, execute, sigma,
                       {"episodes": episodes, "seed_base": seed_base, "split": split})


def evaluate_latency_metaworld(policy: Policy, spec: Any, strategies: Sequence[str], latencies_ms: Sequence[float],
                               episodes: int = 20, seed_base: int = EVAL_SEED_BASE, image_size: int = 64,
                               num_cameras: int = 1, execute: int = EXECUTE, name: str = "policy",
                               reseed: Reseed | None = None, sigma: float = LATENCY_SIGMA,
                               ensemble_m: float = ENSEMBLE_M) -> LatencyGrid:
    """MetaWorld (80 Hz: a 25-50 ms latency is 2-4 actions): `episodes` per task, pooled task by task in seed
    order, as `metaworld.evaluate` pools them."""
    from edge_vla.sim import metaworld

    check_execute(execute)
    spec = metaworld.MetaWorldSpec.parse(spec) if isinstance(spec, str) else spec
    latencies = with_zero(latencies_ms)
    check_grid(policy, strategies, latencies, name)
    cams = spec.camera_names(num_cameras)
    per_cell: dict[tuple[str, float], list[EpisodeTrace]] = {(s, lat): [] for s in strategies for lat in latencies}
    for task in spec.tasks:
        t0 = time.perf_counter()
        with metaworld.MetaWorldEnv(task, cams, image_size, spec.horizon) as raw:
            step_env = MetaWorldStepEnv(raw)
            for (s, lat), traces in per_cell.items():
                traces += [run_episode(step_env, policy, s, lat, seed_base + i, execute, sigma, reseed, ensemble_m,
                                       name=name) for i in range(episodes)]
        metaworld.log.info("%s: latency grid on %s in %.1f s", name, task, time.perf_counter() - t0)
    cells = {key: (_result(f"{name} [{key[0]} @ {key[1]:g} ms]", tr, seed_base), tuple(tr))
             for key, tr in per_cell.items()}
    return LatencyGrid(name, pair_rows(cells, strategies, latencies), metaworld.ACTION_PERIOD_S, execute, sigma,
                       {"episodes_per_task": episodes, "seed_base": seed_base, "env": str(spec)})


# --- flags -----------------------------------------------------------------------------------------------------------
def parse_latencies(text: str) -> list[float]:
    """`--latency-ms 0,100,200`: distinct, finite, 0-60000 ms."""
    out: list[float] = []
    for part in (p.strip() for p in str(text).split(",")):
        try:
            value = float(part)
        except ValueError:
            raise ConfigError(f"--latency-ms {text!r}: {part!r} is not a number; give milliseconds separated by "
                              "commas, e.g. 0,100,200") from None
        if not (0 <= value <= MAX_LATENCY_MS):  # nan fails this too
            raise ConfigError(f"--latency-ms {text!r}: {part} is outside 0-{MAX_LATENCY_MS:g} ms")
        if value in out:
            raise ConfigError(f"--latency-ms {text!r}: {part} is given twice")
        out.append(value)
    return out


def parse_strategies(text: str) -> list[str]:
    """`--strategies sync,receding,ensemble,rtc`: known and distinct."""
    names = [p.strip() for p in str(text).split(",")]
    for n in names:
        if n not in STRATEGIES:
            raise ConfigError(f"--strategies {text!r}: unknown strategy {n!r}; choose from {', '.join(STRATEGIES)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"--strategies {text!r}: a strategy is given twice")
    return names
