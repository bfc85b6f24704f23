"""Control loop figures on this machine, with inference running (CPU-bound) in the same run.

    .venv/bin/pytest benchmarks/bench_control_loop.py -s --benchmark-disable-gc

Prints: control period error p50/p99/max and missed deadlines per minute at 100 Hz and 500 Hz for
three designs (baseline: the loop as a thread beside inference, sharing its GIL; the loop in its own
process; the same under SCHED_FIFO where permitted); time from a fault to the stop frame on the wire;
closed-loop success through the whole stack vs calling the same chunk source directly.
The chunk source is the bundle's Policy when EDGE_VLA_BUNDLE names one, else the sim expert plus
numpy work that holds a core (standing in for preprocessing + inference).

Thread settings (issue 28): the real control loop at 100 Hz over the firmware emulator beside a real bundle's
inference running back to back, under each thread setting, in interleaved rounds within one run:

    BENCH_THREADS_SECONDS=15 BENCH_THREADS_ROUNDS=3 .venv/bin/pytest benchmarks/bench_control_loop.py \
        -k thread_settings -s --benchmark-disable-gc

The bundle is EDGE_VLA_BUNDLE, else the BENCH_THREADS_PRESET preset (default base) exported FP32 here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from typing import Any
from unittest import mock

import numpy as np
import pytest

from edge_vla.action_space import sim_action_space
from edge_vla.onboard import shared as sh
from edge_vla.onboard.cameras import SimCamera
from edge_vla.onboard.cli import inference_engine
from edge_vla.onboard.control import ControlConfig, ControlLoop
from edge_vla.onboard.drill import (
    EMULATOR_LIMITS,
    SceneHolder,
    closed_loop,
    drill_corrupt,
    drill_stall,
    load_source,
    prioritize_emulator,
)
from edge_vla.onboard.rt import AUTO, DEFAULT_FIFO_PRIORITY, NONE, RealtimeConfig, plan_threads
from edge_vla.onboard.runner import OnboardRunner, bus_state_fn
from edge_vla.onboard.watchdog import WatchdogConfig
from edge_vla.onboard.worker import ExpertSource, InferenceWorker
from edge_vla.sim.env import ReachEnv
from edge_vla.sim.evaluate import EVAL_SEED_BASE, evaluate

emulator_process = pytest.importorskip("firmware_bridge.emulator_process")
RUN_S = float(os.environ.get("BENCH_LOOP_SECONDS", "6"))
BUNDLE = os.environ.get("EDGE_VLA_BUNDLE")


class BusyExpert(ExpertSource):
    """The sim expert plus ~`work_s` of numpy matmuls per chunk: inference-like CPU load with GIL churn."""

    def __init__(self, scene: Any, work_s: float = 0.04) -> None:
        super().__init__(scene)
        self.work_s = work_s
        self._a = np.random.default_rng(0).standard_normal((128, 128)).astype(np.float32)

    def infer(self, obs):  # type: ignore[no-untyped-def]
        end = time.perf_counter() + self.work_s
        x = self._a
        while time.perf_counter() < end:
            x = np.tanh(x @ self._a) * 0.5  # small ops: the GIL changes hands often, as in preprocessing
        return super().infer(obs)


def _source(holder: SceneHolder):
    if BUNDLE:
        return load_source(BUNDLE, holder)[0]
    return BusyExpert(holder)


def _thread_run(port: str, rate_hz: float, holder: SceneHolder, instruction: str) -> dict[str, Any]:
    """Baseline: the same ControlLoop as a thread of the inference process (one GIL for both)."""
    from firmware_bridge.schemes import open_link

    cfg = ControlConfig(link_url=f"serial://{port}", action_space=sim_action_space(), rate_hz=rate_hz,
                        duration_s=RUN_S, arm_on_start=True)  # bench mode: armed without an operator
    bus = sh.SharedBus(2)
    loop = ControlLoop(cfg, bus, open_link(cfg.link_url))
    result: dict[str, Any] = {}
    t = threading.Thread(target=lambda: result.update(loop.run()))
    t.start()
    while bus.read_state() is None and t.is_alive():
        time.sleep(0.01)
    worker = InferenceWorker(_source(holder), SimCamera(holder, bus_state_fn(bus), 64), bus, instruction, 64)
    stop = threading.Event()
    wt = threading.Thread(target=worker.run, args=(stop, t.is_alive), daemon=True)
    wt.start()
    t.join()
    stop.set()
    wt.join(5)
    return result


def _process_run(port: str, rate_hz: float, holder: SceneHolder, instruction: str, fifo: bool) -> dict[str, Any]:
    cfg = ControlConfig(link_url=f"serial://{port}", action_space=sim_action_space(), rate_hz=rate_hz,
                        duration_s=RUN_S, arm_on_start=True,
                        realtime=RealtimeConfig(fifo_priority=50 if fifo else None, lock_memory=fifo))
    run = OnboardRunner(cfg, _source(holder), lambda bus: SimCamera(holder, bus_state_fn(bus), 64), instruction,
                        image_size=64, log_level=logging.WARNING)
    with run:
        run.wait(RUN_S + 30)
    return run.summary or {}


def _row(name: str, s: dict[str, Any]) -> str:
    pe = s.get("period_error", {})
    if not pe:
        return f"{name:<34} no data ({s.get('error', '')})"
    trips = [t["kind"] for t in s.get("trips", []) if t["kind"] != "operator_stop"]
    return (f"{name:<34} p50 {pe['p50_ms']:7.3f}  p99 {pe['p99_ms']:7.3f}  max {pe['max_ms']:8.3f} ms  "
            f"missed/min {s['missed_per_minute']:7.1f}  trips {trips or '-'}")


@pytest.mark.slow
def test_control_period_error_with_inference_running(benchmark) -> None:
    env = ReachEnv()
    env.reset(EVAL_SEED_BASE)
    holder = SceneHolder()
    holder.scene = env.scene
    rows: list[str] = []

    def measure() -> None:
        with emulator_process.EmulatorProcess(joints=2, limits=EMULATOR_LIMITS) as emu:
            prioritize_emulator(emu.proc.pid)  # it stands in for the controller's own MCU
            for rate in (100.0, 500.0):
                base = _thread_run(emu.port, rate, holder, env.scene.instruction)
                proc = _process_run(emu.port, rate, holder, env.scene.instruction, fifo=False)
                fifo = _process_run(emu.port, rate, holder, env.scene.instruction, fifo=True)
                rows.append(_row(f"{rate:.0f} Hz thread beside inference", base))
                rows.append(_row(f"{rate:.0f} Hz own process", proc))
                rows.append(_row(f"{rate:.0f} Hz own process + SCHED_FIFO", fifo))
                rt = fifo.get("realtime", {}).get("sched_fifo", "n/a")
                b99, f99 = base.get("period_error", {}).get("p99_ms"), fifo.get("period_error", {}).get("p99_ms")
                if b99 and f99:
                    rows.append(f"  -> p99 period error, thread / process+FIFO: {b99 / max(f99, 1e-6):.0f}x "
                                f"(sched_fifo: {rt})")

    benchmark.pedantic(measure, rounds=1, iterations=1)
    print(f"\ncontrol loop, {RUN_S:g} s per run, 2-core CPU, source: {'bundle ' + BUNDLE if BUNDLE else 'busy expert'}")
    print("\n".join(rows))


@pytest.mark.slow
def test_fault_to_stop_frame_and_success_through_the_stack(benchmark) -> None:
    holder = SceneHolder()
    out: dict[str, Any] = {}

    def measure() -> None:
        with emulator_process.EmulatorProcess(joints=2, limits=EMULATOR_LIMITS) as emu:
            prioritize_emulator(emu.proc.pid)
            src = _source(holder)
            args = (emu.port, src, holder, sim_action_space(), 64, 1, 100.0, logging.WARNING)
            out["stall"] = [drill_stall(*args) for _ in range(3)]
            out["corrupt"] = [drill_corrupt(*args, events=emu.events) for _ in range(3)]
            out["stack"] = closed_loop(emu.port, src, holder, sim_action_space(), 64, 1, duration_s=1e9,
                                       max_episodes=10, rate_hz=100.0)
        # The same source called directly on the sim (no link, no scheduler, no safety), same seeds.
        direct_src = _source(holder)

        def direct(obs):  # type: ignore[no-untyped-def]
            return direct_src.infer(obs).actions

        env = ReachEnv()
        successes = 0
        for i in range(10):
            env.reset(EVAL_SEED_BASE + i)
            holder.scene = env.scene
            successes += evaluate(direct, episodes=1, seed_base=EVAL_SEED_BASE + i).successes
        out["direct"] = successes

    benchmark.pedantic(measure, rounds=1, iterations=1)
    stop_ms = [d["fault_to_stop_frame_ms"] for d in out["stall"] + out["corrupt"] if d["fault_to_stop_frame_ms"]]
    print("\nfault -> stop frame written (host, detection to wire): "
          + ", ".join(f"{v:.2f}" for v in stop_ms) + " ms")
    print("stall -> trip: " + ", ".join(f"{d['stall_to_trip_ms']} ms ({d['trip']['kind']})"
                                      for d in out["stall"] if d["trip"]))
    print("corrupt frames -> firmware torque off: "
          + ", ".join(f"{d['inject_to_firmware_torque_off_ms']} ms" for d in out["corrupt"])
          + "; -> host trip: " + ", ".join(f"{d['inject_to_host_trip_ms']} ms" for d in out["corrupt"]))
    stack = out["stack"]
    print(f"closed-loop success: whole stack {stack['successes']}/{stack['episodes']} vs direct "
          f"{out['direct']}/10 (same seeds {EVAL_SEED_BASE}..{EVAL_SEED_BASE + 9})")


# -- thread settings: the loop's deadlines with inference at full speed beside it (issue 28) ------------------

THREADS_S = float(os.environ.get("BENCH_THREADS_SECONDS", "15"))
THREADS_ROUNDS = int(os.environ.get("BENCH_THREADS_ROUNDS", "3"))
THREADS_PRESET = os.environ.get("BENCH_THREADS_PRESET", "base")
SPINNING = "session.intra_op.allow_spinning"


@dataclass(frozen=True)
class ThreadSetting:
    name: str
    loop: str  # --cpus
    inference: str  # --inference-cpus
    spinning: bool  # onnxruntime intra-op spin-waiting
    threads: int | None = None  # intra-op threads; None: the plan's (one per inference CPU)
    fifo: int | None = None  # --rt-priority


THREAD_SETTINGS = (  # a, b: before issue 28 (b: the backend's spinning off); d: `edge-vla run`'s defaults now
    ThreadSetting("a  no affinity, spinning on", NONE, NONE, spinning=True),
    ThreadSetting("b  no affinity, spinning off", NONE, NONE, spinning=False),
    ThreadSetting("e  no affinity, 1 thread, spinning off", NONE, NONE, spinning=False, threads=1),
    ThreadSetting("c  split, SCHED_OTHER (defaults where FIFO is not permitted)", AUTO, AUTO, spinning=False),
    ThreadSetting("d  defaults: split + SCHED_FIFO 50", AUTO, AUTO, spinning=False, fifo=DEFAULT_FIFO_PRIORITY),
)


@contextlib.contextmanager
def _spinning(on: bool) -> Iterator[None]:
    """Sessions created inside get intra-op spinning on, onnxruntime's own default, which the backend turns off
    (the bundle's graphs and the backend's other options unchanged); the engine line reads it back."""
    if not on:
        yield
        return
    import onnxruntime as ort

    class SpinningOptions(ort.SessionOptions):
        def add_session_config_entry(self, key: str, value: str) -> None:
            super().add_session_config_entry(key, "1" if key == SPINNING else value)

    with mock.patch.object(ort, "SessionOptions", SpinningOptions):
        yield


def _loop_beside_inference(setting: ThreadSetting, bundle: str, port: str, holder: SceneHolder,
                           instruction: str) -> dict[str, Any]:
    """One run: `edge-vla run`'s pieces (plan, policy, runner) under `setting`, inference back to back."""
    from edge_vla.runtime.policy import Policy

    plan = plan_threads(setting.loop, setting.inference)
    with _spinning(setting.spinning):
        policy = Policy.load(bundle, backend="onnxruntime", threads=setting.threads or plan.inference_threads)
    images = policy.contract.preprocessing["images"]
    size, cams = int(images["height"]), int(images["cameras"])
    # Count misses rather than stop on them; a slow base chunk must not trip either. The link's age check stays:
    # a loop starved of 100 ms trips link_stale, and the table says so.
    lenient = WatchdogConfig(camera_max_age_s=30, chunk_max_age_s=30, chunk_exhausted_max_s=30,
                             max_consecutive_overruns=10**6, worker_max_age_s=30)
    cfg = ControlConfig(link_url=f"serial://{port}", action_space=policy.action_space, rate_hz=100.0,
                        duration_s=THREADS_S, arm_on_start=True, watchdog=lenient,
                        realtime=RealtimeConfig(fifo_priority=setting.fifo, cpus=plan.loop_cpus))
    engine = inference_engine(policy)
    run = OnboardRunner(cfg, policy, lambda bus: SimCamera(holder, bus_state_fn(bus), size, cams), instruction,
                        image_size=size, log_level=logging.WARNING, threads=plan, engine=engine)
    try:
        run.start()
        assert run.worker is not None
        run.worker.min_interval_s = 0.0  # back to back: inference at full speed
        run.wait(THREADS_S + 30)
    finally:
        run.close()
        policy.close()
    return {**(run.summary or {}), "engine": engine, "plan": plan}


def _thread_table(results: dict[str, list[dict[str, Any]]]) -> list[str]:
    rows = ["| setting | engine | runs | cycles | missed / 1000 cycles | jitter p50 ms | jitter p99 ms | "
            "jitter max ms | wake late p99 ms | chunk p50 ms | chunk p99 ms | chunks/s | trips |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, runs in results.items():
        ok = [r for r in runs if r.get("period_error")]
        if not ok:
            rows.append(f"| {name} | - | 0 | no data: {runs[0].get('error', '') if runs else ''} |")
            continue
        cycles = sum(r["cycles"] for r in ok)
        missed = sum(r["missed_deadlines"] for r in ok)
        pe = [r["period_error"] for r in ok]
        wk = [r["worker"] for r in ok]
        chunks_s = sum(w["chunks"] for w in wk) / sum(r["duration_s"] for r in ok)
        rows.append(f"| {name} | {ok[0]['engine']} | {len(ok)} | {cycles} | {1000 * missed / cycles:.2f} ({missed}) "
                    f"| {statistics.median(p['p50_ms'] for p in pe):.3f} | {max(p['p99_ms'] for p in pe):.3f} "
                    f"| {max(p['max_ms'] for p in pe):.3f} | {max(r['wake_lateness']['p99_ms'] for r in ok):.3f} "
                    f"| {statistics.median(w['infer_p50_ms'] for w in wk):.1f} "
                    f"| {max(w['infer_p99_ms'] for w in wk):.1f} | {chunks_s:.2f} | {_trips(ok) or '-'} |")
    return rows


def _trips(runs: list[dict[str, Any]]) -> str:
    kinds = [t["kind"] for r in runs for t in r.get("trips", []) if t["kind"] != "operator_stop"]
    return ", ".join(f"{k} x{kinds.count(k)}" for k in sorted(set(kinds)))


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


@pytest.mark.slow
def test_thread_settings_loop_deadlines_beside_full_speed_inference(benchmark, bench_exports, bench_machine) -> None:
    bundle = BUNDLE or str(bench_exports(THREADS_PRESET, "fp32").bundle)
    env = ReachEnv()
    env.reset(EVAL_SEED_BASE)
    holder = SceneHolder()
    holder.scene = env.scene
    results: dict[str, list[dict[str, Any]]] = {s.name: [] for s in THREAD_SETTINGS}
    loads: list[str] = []

    def measure() -> None:
        with emulator_process.EmulatorProcess(joints=2, limits=EMULATOR_LIMITS) as emu:
            prioritize_emulator(emu.proc.pid)  # it stands in for the controller's own MCU
            for _ in range(THREADS_ROUNDS):  # interleaved: the box's load drifts over minutes
                loads.append(_uptime())
                for setting in THREAD_SETTINGS:
                    results[setting.name].append(
                        _loop_beside_inference(setting, bundle, emu.port, holder, env.scene.instruction))
            loads.append(_uptime())

    benchmark.pedantic(measure, rounds=1, iterations=1)
    print(f"\ncontrol loop at 100 Hz beside back-to-back inference, {THREADS_ROUNDS} interleaved rounds x "
          f"{THREADS_S:g} s per setting, {date.today()}, bundle {bundle}")
    print(f"machine: {bench_machine()}")
    print("load (uptime) per round: " + " | ".join(loads))
    print("\n".join(_thread_table(results)))
    for name, runs in results.items():
        for r in runs:
            trips = [t["kind"] for t in r.get("trips", []) if t["kind"] != "operator_stop"]
            print(f"  {name}: missed {r.get('missed_deadlines')} of {r.get('cycles')}, realtime {r.get('realtime')}, "
                  f"chunks {r.get('worker', {}).get('chunks')}, trips {trips or '-'}")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_soak_one_hour_of_cycles_keeps_rss_flat(benchmark) -> None:
    """Bounded memory (issue 12): one hour of control cycles in simulated time through every per-cycle
    structure of the real-time process (cycle statistics, safety layer, watchdog, tracking check, link
    command tracking, worker latency statistics); RSS sampled every simulated 5 minutes must stay flat.

        EDGE_VLA_SOAK_HOURS=1 EDGE_VLA_SOAK_HZ=100 .venv/bin/pytest benchmarks/bench_control_loop.py -k soak -s
    """
    from edge_vla.onboard.following import TrackingCheck, TrackingLimits
    from edge_vla.onboard.linkops import Commands
    from edge_vla.onboard.safety import SafetyLayer, SafetyLimits
    from edge_vla.onboard.telemetry import CycleStats
    from edge_vla.onboard.watchdog import Signals, Watchdog
    from edge_vla.onboard.worker import WorkerStats

    hours = float(os.environ.get("EDGE_VLA_SOAK_HOURS", "1"))
    rate, space = float(os.environ.get("EDGE_VLA_SOAK_HZ", "100")), sim_action_space()
    cycles = int(hours * 3600 * rate)
    samples: list[tuple[float, float]] = []

    def soak() -> None:
        stats, worker = CycleStats(1 / rate), WorkerStats()
        safety = SafetyLayer(SafetyLimits.from_action_space(space, rate))
        safety.reset(np.zeros(space.dim))
        wd = Watchdog()
        wd.arm(0.0)
        tracking = TrackingCheck(TrackingLimits.from_robot(space.names, 0.5))
        rng = np.random.default_rng(0)
        jitter = rng.exponential(50e-6, 4096)
        q = np.zeros(space.dim)

        class _Link:  # the command tracker's bookkeeping only (no frames): a STOP/ACK every second
            def send_stop(self, category: int) -> int:
                self.seq = getattr(self, "seq", 0) + 1
                return self.seq

            def ack_result(self, seq: int) -> bool:
                return True

        cmds = Commands(_Link())
        for i in range(cycles):
            t = i / rate
            target = 0.3 * np.sin(np.array([t, 0.7 * t]))
            res = safety.command(target)
            tracking.check(res.sent, q, None, space.names)
            q = res.sent
            wd.check(Signals(now=t, camera_age_s=0.03, chunk_age_s=0.1, link_age_s=0.002, worker_age_s=0.01,
                             link_errors_total=i // 100_000))
            stats.add(t + jitter[i % 4096], jitter[i % 4096], 2e-4, 0)
            if i % int(rate) == 0:
                cmds.result(cmds.stop(1))
            if i % int(rate / 20) == 0:  # inference at 20 Hz
                worker.record_latency(30.0 + jitter[i % 4096] * 1e3)
            if i % int(300 * rate) == 0:
                samples.append((t / 60, _rss_mb()))
        samples.append((cycles / rate / 60, _rss_mb()))

    benchmark.pedantic(soak, rounds=1, iterations=1)
    growth = samples[-1][1] - samples[1][1] if len(samples) > 2 else 0.0
    print(f"\nsoak: {cycles} cycles at {rate:.0f} Hz ({hours:g} h simulated); RSS MB by minute: "
          + ", ".join(f"{m:.0f}:{r:.1f}" for m, r in samples) + f"; growth after the first 5 min {growth:+.2f} MB")
    assert growth < 1.0, samples
