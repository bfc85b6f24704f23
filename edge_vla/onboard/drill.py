"""The embedded default's onboard part: closed loop on sim + emulator, then the watchdog drills.

`run_demo(bundle_dir, duration_s)`:
1. closed loop: the policy (or the scripted expert when no bundle is given) drives the emulated motor
   controller over a real pty at the control rate; the sim camera renders the arm at the joint angles
   the emulator reports; success is scored by the scene; episodes run until `duration_s` is used.
2. drills, each on a fresh control process:
   - stall: inference hangs -> the host watchdog makes a category-1 stop;
   - corrupt: garbage frames are written into the pty -> the firmware trips (category 0) and reports
     it; the host watchdog stops too;
   - kill -9: the process holding the link dies without a `finally` -> the firmware's heartbeat
     watchdog stops the motors; reported as time from the last heartbeat to motors stopped.
   - restart: after that crash a new control process starts (what systemd's Restart= does) without
     bench mode -> it must stay disarmed, faults latched, until an explicit operator arm.
   The demo arms through the operator interface in bench mode (`ControlConfig.arm_on_start`).
3. returns the summary (and `main()` prints it).

A drill's faults make the control process log ERROR lines, exactly as on a real robot (the loop's own
logging is not changed for drills). So that a reader can tell them from failures, each drill announces its
injection first (a WARNING: visible wherever the ERROR lines are), and the summary counts the expected trips,
the missed ones, and the unexpected ones (trips in the closed loop, where nothing was injected).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_vla.action_space import ActionSpace, sim_action_space
from edge_vla.onboard.cameras import SimCamera
from edge_vla.onboard.control import ControlConfig
from edge_vla.onboard.rt import RealtimeConfig
from edge_vla.onboard.runner import OnboardRunner, bus_state_fn
from edge_vla.onboard.scheduler import RTC, RUN_STRATEGIES
from edge_vla.onboard.worker import ChunkSource, ExpertSource, StallableSource, not_rtc_error
from edge_vla.runtime.types import ActionChunk, Observation
from edge_vla.sim.env import ACTION_PERIOD_S, MAX_STEPS, ReachEnv
from edge_vla.sim.evaluate import EVAL_SEED_BASE

log = logging.getLogger(__name__)

# The emulator's joints must cover the sim arm's (shoulder 0..pi, elbow -2.6..2.6). The leading space
# keeps argparse from reading the negative number as an option.
EMULATOR_LIMITS = " -3.2,3.2,3,20"

DRILLS = ("stall", "corrupt", "kill", "restart")
# A closed-loop episode whose loop never hands over to the policy (a trip while homing, an arm that failed)
# is given up after this long instead of being waited on forever.
START_BUDGET_S = 30.0


class SceneHolder:
    """The scene of the current episode, shared by the sim camera and the expert (swapped per episode)."""

    def __init__(self) -> None:
        self.scene: Any = None

    def cameras(self, q: np.ndarray, size: int, num_cameras: int) -> list[np.ndarray]:
        return self.scene.cameras(q, size, num_cameras)

    @property
    def target_xy(self) -> np.ndarray:
        return self.scene.target_xy


class _PolicyAdapter:
    """Policy.infer plus the per-episode reset the runtime Policy offers."""

    def __init__(self, policy: Any) -> None:
        self.policy = policy

    @property
    def rtc_max_delay(self) -> int:
        """The bundle's rtc.max_delay (0 without an rtc block): the longest prefix `infer` takes."""
        return int(getattr(self.policy, "rtc_max_delay", 0))

    def infer(self, obs: Observation, prefix: np.ndarray | None = None) -> ActionChunk:
        return self.policy.infer(obs) if prefix is None else self.policy.infer(obs, prefix=prefix)


def load_source(bundle_dir: str | Path | None, holder: SceneHolder, backend: str = "auto",
                steps: int | None = None, expert_delay_s: float = 0.03,
                strategy: str = "receding", threads: int | None = None,
                precision: str | None = None) -> tuple[ChunkSource, ActionSpace, int, int]:
    """(source, action space, image size, cameras): the bundle's Policy, or the sim expert without one.

    `threads`: the backend's intra-op threads (None: its default), e.g. one per CPU left to inference.

    `strategy` rtc needs a source that takes an action prefix: a bundle without an rtc block is refused here, from
    its manifest, before its sessions are created (the expert takes one)."""
    if bundle_dir is None:
        return ExpertSource(holder, chunk_len=8, delay_s=expert_delay_s), sim_action_space(), 64, 1
    from edge_vla.bundle import Bundle
    from edge_vla.runtime.policy import Policy

    bundle = Bundle.open(bundle_dir)
    if strategy == RTC and bundle.contract.rtc_max_delay <= 0:
        raise not_rtc_error(f"bundle {bundle_dir}")
    policy = Policy.load(bundle, backend=backend, steps=steps, threads=threads, precision=precision)
    images = policy.contract.preprocessing["images"]  # any model family (docs/MANIFEST.md)
    return _PolicyAdapter(policy), policy.action_space, int(images["height"]), int(images["cameras"])


# The demo asks for SCHED_FIFO and memory locking; where not permitted the loop logs it and runs anyway.
DEMO_REALTIME = RealtimeConfig(fifo_priority=50, lock_memory=True)


def _config(port: str, space: ActionSpace, rate_hz: float, **kw: Any) -> ControlConfig:
    """Bench mode: the demo and its drills arm through the operator interface at start (never under systemd)."""
    kw.setdefault("realtime", DEMO_REALTIME)
    kw.setdefault("arm_on_start", True)
    return ControlConfig(link_url=f"serial://{port}", action_space=space, rate_hz=rate_hz, **kw)


def prioritize_emulator(pid: int, priority: int = 40) -> bool:
    """The emulator stands in for a motor controller's own MCU, which no host load can delay: give it
    SCHED_FIFO (below the control loop) where permitted, so host-side load does not fake firmware trips."""
    try:
        os.sched_setscheduler(pid, os.SCHED_FIFO, os.sched_param(priority))
        return True
    except (PermissionError, OSError, AttributeError) as exc:
        log.warning("could not give the emulator SCHED_FIFO (%s); its timing shares the host's load", exc)
        return False


def _runner(cfg: ControlConfig, source: ChunkSource, holder: SceneHolder, instruction: str, size: int,
            cams: int, log_level: int) -> OnboardRunner:
    return OnboardRunner(cfg, source, lambda bus: SimCamera(holder, bus_state_fn(bus), size, cams), instruction,
                         image_size=size, log_level=log_level)


def closed_loop(port: str, source: ChunkSource, holder: SceneHolder, space: ActionSpace, size: int, cams: int,
                duration_s: float, rate_hz: float = 100.0, strategy: str = "receding", max_episodes: int = 50,
                log_level: int = logging.WARNING, telemetry: str | None = None) -> dict[str, Any]:
    """Episodes on held-out seeds until `duration_s` is used; each gets the sim's step budget."""
    env = ReachEnv(image_size=size, num_cameras=cams)
    budget_s = MAX_STEPS * ACTION_PERIOD_S + 0.5  # the sim's 30 actions, plus the first inference
    results, t_end = [], time.monotonic() + duration_s
    summaries = []
    for i in range(max_episodes):
        if results and time.monotonic() >= t_end:
            break
        env.reset(EVAL_SEED_BASE + i)
        holder.scene = env.scene
        if hasattr(source, "policy") and hasattr(source.policy, "reset"):
            source.policy.reset()
        cfg = _config(port, space, rate_hz, strategy=strategy, home=tuple(float(x) for x in env.q),
                      home_time_s=1.0, telemetry_path=telemetry if i == 0 else None)
        run = _runner(cfg, source, holder, env.scene.instruction, size, cams, log_level)
        reached, t_policy, t_start = False, None, time.monotonic()
        with run:
            while run.proc.is_alive():
                st = run.bus.read_state()
                status = run.status()
                if status == "running" and t_policy is None:
                    t_policy = time.monotonic()
                if status in ("stopped", "exited"):  # tripped (latched until an operator arms) or gone
                    break
                if t_policy is None and time.monotonic() - t_start > START_BUDGET_S:
                    log.error("episode %d: the loop did not hand over to the policy within %.0f s (status %s)",
                              i, START_BUDGET_S, status)
                    break
                if t_policy is not None and st is not None and holder.scene.reached(st.positions):
                    reached = True
                    break
                if t_policy is not None and time.monotonic() - t_policy > budget_s:
                    break
                time.sleep(0.01)
        summaries.append(run.summary or {})
        trip = _stop_trip(run.summary)
        results.append({"seed": EVAL_SEED_BASE + i, "success": reached,
                        "time_s": None if t_policy is None else round(time.monotonic() - t_policy, 3),
                        "disarmed": not (run.summary or {}).get("armed_at_exit", True),
                        "trip": None if trip is None else f"cat {trip['category']} {trip['kind']}"})
    successes = sum(r["success"] for r in results)
    return {"episodes": len(results), "successes": successes, "success_rate": successes / max(1, len(results)),
            "all_disarmed": all(r["disarmed"] for r in results), "per_episode": results,
            "unexpected_trips": sum(r["trip"] is not None for r in results),
            "control": summaries[0] if summaries else {}}


def _trip(summary: dict[str, Any] | None) -> dict[str, Any] | None:
    trips = [t for t in (summary or {}).get("trips", []) if t["kind"] != "operator_stop"]
    return trips[0] if trips else None


def _stop_trip(summary: dict[str, Any] | None) -> dict[str, Any] | None:
    """The fault that stopped a run (the one logged as a SAFETY STOP ERROR), or None where it ended as planned.

    Only the first trip starts a stop; later ones (while stopping) are logged at INFO."""
    trips = (summary or {}).get("trips", [])
    return trips[0] if trips and trips[0]["kind"] != "operator_stop" else None


def announce(drill: str, injection: str) -> None:
    """Say before the injection that the ERROR lines about to follow are this drill's, not a failure."""
    log.warning("drill %s: injecting %s; the ERROR lines that follow are expected (the reaction under test)",
                drill, injection)


def _drill_runner(episode: int, port: str, source: ChunkSource, holder: SceneHolder, space: ActionSpace, size: int,
                  cams: int, rate_hz: float, log_level: int) -> OnboardRunner:
    """A fresh 8 s control process on held-out episode `episode`, for one drill."""
    env = ReachEnv(image_size=size, num_cameras=cams)
    env.reset(EVAL_SEED_BASE + episode)
    holder.scene = env.scene
    cfg = _config(port, space, rate_hz, duration_s=8.0)
    return _runner(cfg, source, holder, env.scene.instruction, size, cams, log_level)


def drill_stall(port: str, source: ChunkSource, holder: SceneHolder, space: ActionSpace, size: int, cams: int,
                rate_hz: float, log_level: int) -> dict[str, Any]:
    stallable = StallableSource(source)
    run = _drill_runner(100, port, stallable, holder, space, size, cams, rate_hz, log_level)
    with run:
        run.wait_ready(30)
        time.sleep(0.5)
        announce("stall", "a 4 s inference hang")
        t_stall = time.monotonic()
        stallable.stall(4.0)
        _wait_status(run, "stopped", 5.0)
    trip = _trip(run.summary)
    stop = (run.summary or {}).get("stop", {})
    return {"injected": "inference worker hung for 4 s", "trip": trip,
            "stall_to_trip_ms": None if trip is None else round((trip["t"] - t_stall) * 1e3, 1),
            "fault_to_stop_frame_ms": stop.get("fault_to_stop_frame_ms"),
            "disarmed": not (run.summary or {}).get("armed_at_exit", True)}


def drill_corrupt(port: str, source: ChunkSource, holder: SceneHolder, space: ActionSpace, size: int, cams: int,
                  rate_hz: float, log_level: int, events: Any) -> dict[str, Any]:
    run = _drill_runner(101, port, source, holder, space, size, cams, rate_hz, log_level)
    n_events = len(events())
    with run:
        run.wait_ready(30)
        time.sleep(0.5)
        announce("corrupt", "8 corrupted frames into the serial line")
        t_inject = inject_garbage(port)
        _wait_status(run, "stopped", 5.0)
    trip = _trip(run.summary)
    fw = [e for e in events()[n_events:] if e["event"] in ("stop_cat0", "torque_off")]
    return {"injected": "8 corrupted frames written into the pty (host -> firmware)", "trip": trip,
            "inject_to_host_trip_ms": None if trip is None else round((trip["t"] - t_inject) * 1e3, 1),
            "fault_to_stop_frame_ms": (run.summary or {}).get("stop", {}).get("fault_to_stop_frame_ms"),
            "inject_to_firmware_torque_off_ms": round((fw[-1]["t"] - t_inject) * 1e3, 1) if fw else None,
            "disarmed": not (run.summary or {}).get("armed_at_exit", True)}


def inject_garbage(port: str, frames: int = 8, seed: int = 0) -> float:
    """Write COBS-delimited garbage into the serial line, as a noisy cable would; returns the time."""
    rng = np.random.default_rng(seed)
    payload = b"".join(bytes(rng.integers(1, 256, size=12, dtype=np.uint8)) + b"\x00" for _ in range(frames))
    fd = os.open(os.path.realpath(port), os.O_WRONLY | os.O_NOCTTY)
    try:
        t = time.monotonic()
        os.write(fd, payload)
    finally:
        os.close(fd)
    return t


def drill_kill(port: str, source: ChunkSource, holder: SceneHolder, space: ActionSpace, size: int, cams: int,
               rate_hz: float, log_level: int, events: Any) -> dict[str, Any]:
    run = _drill_runner(102, port, source, holder, space, size, cams, rate_hz, log_level)
    n_events = len(events())
    with run:
        run.wait_ready(30)
        time.sleep(0.5)
        pid = run.control_pid
        assert pid is not None
        announce("kill", f"kill -9 of the control process (pid {pid})")
        t_kill = time.monotonic()
        os.kill(pid, signal.SIGKILL)  # no finally, no stop frame: only the firmware can stop the motors
        run.proc.join(5.0)
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and not any(e["event"] == "torque_off" for e in events()[n_events:]):
            time.sleep(0.01)
    new = events()[n_events:]
    timeout_ev = next((e for e in new if e["event"] == "heartbeat_timeout"), None)
    off = next((e for e in new if e["event"] == "torque_off"), None)
    stopped = next((e for e in new if e["event"] == "motion_stopped"), None)
    return {"injected": f"kill -9 of the control process (pid {pid})",
            "firmware_detected": timeout_ev is not None,
            "last_heartbeat_to_detection_ms": None if timeout_ev is None or "since_last_heartbeat_s" not in timeout_ev
            else round(timeout_ev["since_last_heartbeat_s"] * 1e3, 1),
            "last_heartbeat_to_torque_off_ms": None if off is None or "since_last_heartbeat_s" not in off
            else round(off["since_last_heartbeat_s"] * 1e3, 1),
            "last_heartbeat_to_motion_stopped_ms": None if stopped is None or "since_last_heartbeat_s" not in stopped
            else round(stopped["since_last_heartbeat_s"] * 1e3, 1),
            "kill_to_torque_off_ms": None if off is None else round((off["t"] - t_kill) * 1e3, 1)}


def drill_restart(port: str, source: ChunkSource, holder: SceneHolder, space: ActionSpace, size: int, cams: int,
                  rate_hz: float, log_level: int, events: Any, watch_s: float = 1.5) -> dict[str, Any]:
    """A host restarted after a crash comes up disarmed and stays so until an operator arms it."""
    env = ReachEnv(image_size=size, num_cameras=cams)
    env.reset(EVAL_SEED_BASE + 103)
    holder.scene = env.scene
    crashed = _runner(_config(port, space, rate_hz, duration_s=8.0), source, holder, env.scene.instruction, size,
                      cams, log_level)
    with crashed:
        crashed.wait_ready(30)
        time.sleep(0.3)
        announce("restart", "kill -9, then a fresh control process that must stay disarmed")
        os.kill(crashed.control_pid, signal.SIGKILL)  # type: ignore[arg-type]
        crashed.proc.join(5.0)
    n_armed = sum(e["event"] == "armed" for e in events())
    restarted = _runner(_config(port, space, rate_hz, duration_s=8.0, arm_on_start=False), source, holder,
                        env.scene.instruction, size, cams, log_level)
    with restarted:
        deadline = time.monotonic() + 30
        while restarted.status() != "disarmed" and time.monotonic() < deadline and restarted.proc.is_alive():
            time.sleep(0.01)
        time.sleep(watch_s)
        status = restarted.operator.status()
        rearmed = sum(e["event"] == "armed" for e in events()) > n_armed
        reply = restarted.operator.arm()  # the explicit operator act
    return {"injected": "kill -9, then a fresh control process (as systemd's Restart= would)",
            "stayed_disarmed_s": watch_s, "rearmed_by_itself": rearmed, "phase_after_restart": status["phase"],
            "firmware_after_restart": (status.get("firmware") or {}).get("mode"),
            "operator_arm_ok": bool(reply.get("ok"))}


def _wait_status(run: OnboardRunner, status: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and run.proc.is_alive():
        if run.status() == status:
            return True
        time.sleep(0.01)
    return False


def run_demo(bundle_dir: str | Path | None = None, duration_s: float = 15.0, rate_hz: float = 100.0,
             strategy: str = "receding", drills: bool | Sequence[str] = True, backend: str = "auto",
             telemetry: str | None = None, log_level: int = logging.WARNING) -> dict[str, Any]:
    """Closed loop over the emulator on a real pty, then the drills (all of DRILLS for True, or the ones
    named); returns the summary dict."""
    chosen = DRILLS if drills is True else () if drills is False else tuple(drills)
    unknown = sorted(set(chosen) - set(DRILLS))
    if unknown:
        raise ValueError(f"unknown drills {unknown}; choose from {', '.join(DRILLS)}")
    from firmware_bridge.emulator_process import EmulatorProcess

    holder = SceneHolder()
    source, space, size, cams = load_source(bundle_dir, holder, backend=backend, strategy=strategy)
    out: dict[str, Any] = {"policy": str(bundle_dir) if bundle_dir else "sim expert (no bundle)",
                           "rate_hz": rate_hz, "strategy": strategy}
    with EmulatorProcess(joints=space.dim, limits=EMULATOR_LIMITS) as emu:
        assert emu.proc is not None
        prioritize_emulator(emu.proc.pid)
        out["closed_loop"] = closed_loop(emu.port, source, holder, space, size, cams, duration_s, rate_hz,
                                         strategy, log_level=log_level, telemetry=telemetry)
        args = (emu.port, source, holder, space, size, cams, rate_hz, log_level)
        if "stall" in chosen:
            out["drill_stall"] = drill_stall(*args)
        if "corrupt" in chosen:
            out["drill_corrupt"] = drill_corrupt(*args, events=emu.events)
        if "kill" in chosen:
            out["drill_kill"] = drill_kill(*args, events=emu.events)
        if "restart" in chosen:
            out["drill_restart"] = drill_restart(*args, events=emu.events)
    return out


def trip_counts(d: dict[str, Any]) -> dict[str, int]:
    """Faults injected, expected trips seen (a missed one is a failed drill), and trips nobody injected."""
    seen = {"stall": lambda r: r["trip"] is not None, "corrupt": lambda r: r["trip"] is not None,
            "kill": lambda r: bool(r["firmware_detected"])}
    ran = [(name, d[f"drill_{name}"]) for name in seen if f"drill_{name}" in d]
    expected = sum(seen[name](r) for name, r in ran)
    return {"injected": len(ran), "expected": expected, "missed": len(ran) - expected,
            "unexpected": int(d["closed_loop"].get("unexpected_trips", 0))}


def format_demo(d: dict[str, Any]) -> str:
    cl = d["closed_loop"]
    ctrl = cl.get("control", {})
    pe = ctrl.get("period_error", {})
    lines = [
        f"onboard closed loop ({d['policy']}, {d['strategy']}, {d['rate_hz']:.0f} Hz, sim camera + firmware "
        "emulator on a pty)",
        f"  success {cl['successes']}/{cl['episodes']} episodes; every episode ended disarmed: {cl['all_disarmed']}",
    ]
    if pe:
        lines.append(f"  control period error p50 {pe['p50_ms']:.3f} / p99 {pe['p99_ms']:.3f} / max {pe['max_ms']:.3f} "
                     f"ms, missed deadlines {ctrl.get('missed_deadlines', 0)}")
    if any(f"drill_{name}" in d for name in DRILLS):
        lines += ["watchdog drills", *_drill_lines(d)]
        n = trip_counts(d)
        lines.append(f"  drills: {n['injected']} injected, {n['expected']} expected trip{'s' * (n['expected'] != 1)}"
                     f" (their ERROR lines above are expected), {n['missed']} missed; {n['unexpected']} unexpected "
                     f"trip{'s' * (n['unexpected'] != 1)} (in the closed loop, where nothing was injected)")
    return "\n".join(lines)


def _drill_lines(d: dict[str, Any]) -> list[str]:
    def trip(t: dict[str, Any] | None) -> str:
        return "NO TRIP" if t is None else f"cat {t['category']} {t['kind']}"

    lines = []
    if (s := d.get("drill_stall")) is not None:
        lines.append(f"  stall inference  -> {trip(s['trip'])} after {s['stall_to_trip_ms']} ms; stop frame "
                     f"{_ms(s['fault_to_stop_frame_ms'])} after the trip; disarmed {s['disarmed']}")
    if (c := d.get("drill_corrupt")) is not None:
        lines.append(f"  corrupt link     -> firmware torque off {c['inject_to_firmware_torque_off_ms']} ms after "
                     f"injection; host {trip(c['trip'])} after {c['inject_to_host_trip_ms']} ms; disarmed {c['disarmed']}")
    if (k := d.get("drill_kill")) is not None:
        lines.append(f"  kill -9 host     -> firmware watchdog fired {k['last_heartbeat_to_detection_ms']} ms after the "
                     f"last heartbeat; -> torque off {k['last_heartbeat_to_torque_off_ms']} ms, -> motion stopped "
                     f"{k['last_heartbeat_to_motion_stopped_ms']} ms")
    if (r := d.get("drill_restart")) is not None:
        lines.append(f"  restart after crash -> {'RE-ARMED BY ITSELF' if r['rearmed_by_itself'] else 'stayed disarmed'} "
                     f"for {r['stayed_disarmed_s']:g} s (firmware {r['firmware_after_restart']}); operator arm "
                     f"{'ok' if r['operator_arm_ok'] else 'failed'}")
    return lines


def _ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f} ms"


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m edge_vla.onboard.drill", description=__doc__.splitlines()[0])
    parser.add_argument("bundle", nargs="?", help="bundle directory (default: the sim expert)")
    parser.add_argument("--duration", type=float, default=15.0, metavar="S",
                        help="seconds of closed-loop episodes before the drills (default %(default)g)")
    parser.add_argument("--rate-hz", type=float, default=100.0, metavar="HZ",
                        help="control rate in Hz (default %(default)g)")
    # choices: a misspelt name is refused here, not after the emulator and the control process have started.
    parser.add_argument("--strategy", default="receding", choices=RUN_STRATEGIES, metavar="NAME",
                        help=f"chunk scheduling, one of {', '.join(RUN_STRATEGIES)} (default %(default)s; rtc needs a "
                        "bundle trained with --rtc-max-delay)")
    parser.add_argument("--no-drills", action="store_true",
                        help="run the closed loop only, no watchdog drills (same as --drills '')")
    parser.add_argument("--drills", default=",".join(DRILLS),
                        help=f"the drills to run, comma-separated (default all: {','.join(DRILLS)})")
    args = parser.parse_args(argv)
    chosen = [] if args.no_drills else [name.strip() for name in args.drills.split(",") if name.strip()]
    if unknown := sorted(set(chosen) - set(DRILLS)):
        parser.error(f"--drills: unknown {', '.join(unknown)}; choose from {','.join(DRILLS)}")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    d = run_demo(args.bundle, args.duration, args.rate_hz, args.strategy, drills=chosen)
    print(format_demo(d))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
