"""Closed-loop success through the onboard stack: `edge-vla evaluate BUNDLE --onboard`.

Each held-out seed runs one episode of the sim task through what `edge-vla run --emulate` runs: the
control loop in its own process at the control rate (scheduler, safety layer, watchdog), the inference
worker with the bundle's Policy, and the firmware emulator over a real pty; the sim camera renders the
arm at the joint angles the emulator reports. One emulator and one control process serve every episode.
Between episodes the bench does what an operator would: a category-1 stop through the operator API,
the disarmed arm placed at the episode's start pose (the emulator's `set_position`), then an operator
arm (CLEAR_FAULTS, ARM). An episode succeeds when a joint state the loop receives puts the end effector
within SUCCESS_RADIUS of the named block before `episode_s` (the offline evaluator's 30 actions, 3.0 s)
has passed since the first chunk of the episode was published.

How this differs from the offline runtime evaluation (edge_vla.sim.evaluate) on the same seeds:
- Plant. Offline, ReachEnv integrates a kinematic, rate-limited joint model: per 0.1 s action each joint
  moves straight toward its target by at most v_max * 0.1 s (no acceleration limit, no tracking error,
  no dynamics). Onboard, the safety layer also limits the command's acceleration (20 rad/s^2) at the
  control rate, the scheduler interpolates the 10 Hz waypoints (cubic, a plan-clock ramp on a start from
  rest) and the emulator integrates a PD drive (kp 50, kd 2, inertia 0.05, friction 0.1 at 1 kHz) that
  tracks the command with velocity feedforward (lag about friction * v / kp, 5 mrad at 2.25 rad/s).
- Replanning. Offline replans after `execute` actions (4, sync, no latency). Onboard, `receding` replans
  whenever the worker is free (at most every 50 ms) on the real inference latency, and every chunk
  draws new noise, so the noise streams differ even though each episode reseeds the Policy.
- Scoring. Offline checks success at the end of each action; onboard at every state frame (~100 Hz).
`edge-vla evaluate --execute 1` replans offline after every action, the nearest offline match to the
receding cadence: a policy that holds at execute 4 but not at 1 will lose onboard too (issue 13: an INT8
state projection did exactly that).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_vla.atomic import atomic_write
from edge_vla.errors import EdgeVlaError
from edge_vla.onboard.cameras import SimCamera
from edge_vla.onboard.control import ControlConfig
from edge_vla.onboard.drill import EMULATOR_LIMITS, SceneHolder, load_source
from edge_vla.onboard.rt import RealtimeConfig
from edge_vla.onboard.runner import OnboardRunner, bus_state_fn
from edge_vla.sim.env import ACTION_PERIOD_S, MAX_STEPS, ReachEnv
from edge_vla.sim.evaluate import (
    EVAL_SEED_BASE,
    EvalResult,
    evaluate,
    evaluate_expert,
    paired_difference,
    wilson_interval,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OnboardEvalConfig:
    rate_hz: float = 100.0
    strategy: str = "receding"
    episode_s: float = MAX_STEPS * ACTION_PERIOD_S  # the offline evaluator's 30 actions
    first_chunk_timeout_s: float = 10.0
    backend: str = "auto"
    steps: int | None = None
    heartbeat_timeout_ms: int = 100  # the emulator's; a loaded shared box may need more
    realtime: RealtimeConfig = field(default_factory=RealtimeConfig)


@dataclass
class OnboardEpisode:
    seed: int
    success: bool
    time_s: float | None  # from the first chunk to success (or to the end of the episode)
    trip: str | None = None  # a stop other than the bench's own, if one happened
    setup_s: float = 0.0  # stop + place + arm before the episode


def _wait(pred: Any, timeout: float, step: float = 0.002) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return False


def run_onboard(bundle_dir: str | Path | None, episodes: int, seed_base: int = EVAL_SEED_BASE,
                config: OnboardEvalConfig = OnboardEvalConfig(), log_level: int = logging.WARNING,
                ) -> tuple[EvalResult, list[OnboardEpisode], dict[str, Any]]:
    """(result, episodes, control-loop summary) for `episodes` held-out seeds; `bundle_dir` None: the sim expert."""
    from firmware_bridge.emulator_process import EmulatorProcess

    holder = SceneHolder()
    source, space, size, cams = load_source(bundle_dir, holder, backend=config.backend, steps=config.steps)
    policy = getattr(source, "policy", None)
    env = ReachEnv(image_size=size, num_cameras=cams)
    env.reset(seed_base)
    holder.scene = env.scene
    assert env.scene is not None
    tracking = policy.bundle.manifest["action_space"].get("tracking") if policy is not None else None
    out: list[OnboardEpisode] = []
    with EmulatorProcess(joints=space.dim, limits=EMULATOR_LIMITS,
                         heartbeat_timeout_ms=config.heartbeat_timeout_ms) as emu:
        from edge_vla.provision.robot_config import RobotConfig

        limits = RobotConfig().tracking_limits(space.names)  # as `edge-vla run` without a robot config
        if tracking:
            limits = limits.narrowed(tracking.get("max_position_error"), tracking.get("max_effort"))
        cfg = ControlConfig(link_url=f"serial://{emu.port}", action_space=space, rate_hz=config.rate_hz,
                            strategy=config.strategy, tracking=limits, realtime=config.realtime,
                            first_chunk_timeout_s=config.first_chunk_timeout_s)
        runner = OnboardRunner(cfg, source, lambda bus: SimCamera(holder, bus_state_fn(bus), size, cams),
                               env.scene.instruction, image_size=size, log_level=log_level)
        with runner:
            if not _wait(lambda: runner.status() == "disarmed", 30.0, 0.01):
                raise EdgeVlaError(f"the control loop did not come up disarmed (phase {runner.status()})")
            for i in range(episodes):
                if runner._thread is None or not runner._thread.is_alive():
                    raise EdgeVlaError(f"the inference worker died before episode {i} "
                                       f"({runner._worker_error!r}); the remaining episodes would measure nothing")
                out.append(_episode(runner, emu, holder, env, policy, seed_base + i, config))
                log.debug("onboard episode %d: %s", i, out[-1])
        summary = runner.summary or {}
    successes = sum(e.success for e in out)
    lo, hi = wilson_interval(successes, episodes)
    steps = [(e.time_s if e.time_s is not None else config.episode_s) / ACTION_PERIOD_S for e in out]
    name = f"onboard {bundle_dir or 'expert'} ({config.rate_hz:.0f} Hz {config.strategy}, emulator)"
    result = EvalResult(name, episodes, successes, lo, hi, float(np.mean(steps)) if steps else 0.0, seed_base, 0,
                        tuple(int(e.success) for e in out))
    return result, out, summary


def _episode(runner: OnboardRunner, emu: Any, holder: SceneHolder, env: ReachEnv, policy: Any, seed: int,
             config: OnboardEvalConfig) -> OnboardEpisode:
    t_setup = time.monotonic()
    op, bus = runner.operator, runner.bus
    if runner.status() not in ("disarmed", "stopped"):
        op.stop()
        if not _wait(lambda: runner.status() in ("disarmed", "stopped"), 5.0):
            raise EdgeVlaError(f"the arm did not stop before episode seed {seed} (phase {runner.status()})")
    env.reset(seed)
    scene = env.scene
    assert scene is not None and runner.worker is not None
    # Chunks observed before the arm are never adopted (the loop's adopt_after), so swapping the scene and the
    # instruction under a running worker cannot leak the last episode into this one.
    holder.scene = scene
    runner.worker.instruction = scene.instruction
    if policy is not None:
        policy.reset(seed)
    q0 = np.asarray(env.q, np.float64)
    emu.set_position(q0.tolist())
    if not _wait(lambda: (st := bus.read_state()) is not None and np.allclose(st.positions, q0, atol=1e-5), 2.0):
        raise EdgeVlaError(f"the emulator did not report the start pose of seed {seed}")
    reply = op.arm()
    if not reply.get("ok"):
        raise EdgeVlaError(f"operator arm failed before seed {seed}: {reply.get('error')}")
    armed_t = bus.get("armed_since")
    setup_s = time.monotonic() - t_setup

    def first_chunk() -> float | None:
        got = bus.read_chunk()
        return got[1] if got is not None and got[0].obs_timestamp >= armed_t else None

    if not _wait(lambda: first_chunk() is not None, config.first_chunk_timeout_s):
        op.stop()
        return OnboardEpisode(seed, False, None, "no chunk after the arm", setup_s)
    t0 = first_chunk() or time.monotonic()
    deadline = t0 + config.episode_s
    success, trip, t_end = False, None, None
    while True:
        now = time.monotonic()
        st = bus.read_state()
        if st is not None and st.time >= armed_t and scene.reached(st.positions):
            success, t_end = True, max(0.0, st.time - t0)
            break
        if runner.status() not in ("running", "homing"):
            trip = op.status().get("trip") or {}
            trip = f"{trip.get('kind', 'unknown')} (category {trip.get('category')})"
            break
        if now >= deadline:
            break
        time.sleep(0.002)
    op.stop()
    return OnboardEpisode(seed, success, t_end if success else config.episode_s, trip, setup_s)


def offline(bundle_dir: str | Path | None, episodes: int, seed_base: int, steps: int | None = None,
            backend: str = "auto") -> EvalResult:
    """The offline runtime evaluation of the same bundle on the same seeds (sim.evaluate, execute 4)."""
    if bundle_dir is None:
        return evaluate_expert(episodes, seed_base)
    from edge_vla.runtime.policy import Policy

    policy = Policy.load(bundle_dir, backend=backend, steps=steps)
    images = policy.contract.preprocessing["images"]
    return evaluate(lambda obs: policy.infer(obs).actions, episodes, seed_base, image_size=int(images["height"]),
                    num_cameras=int(images["cameras"]), name=f"offline runtime {bundle_dir}", reseed=policy.reset)


def compare(target: str, episodes: int, seed_base: int = EVAL_SEED_BASE, config: OnboardEvalConfig = OnboardEvalConfig(),
            json_out: str | None = None) -> dict[str, Any]:
    """Onboard and offline success on the same seeds, their paired difference, and the loop's clamp counts;
    printed, and returned (and written to `json_out`) as a dict."""
    bundle = None if target == "expert" else target
    if bundle is not None and not (Path(bundle) / "manifest.json").is_file():
        raise EdgeVlaError(f"--onboard runs a bundle (a directory with manifest.json) or `expert`; got {target!r}")
    t0 = time.monotonic()
    onboard, per_episode, summary = run_onboard(bundle, episodes, seed_base, config)
    onboard_s = time.monotonic() - t0
    base = offline(bundle, episodes, seed_base, config.steps, config.backend)
    diff = paired_difference(onboard, base)
    clamps = summary.get("clamps", {})
    cycles = summary.get("cycles", 0)
    trips = [e for e in per_episode if e.trip]
    print(base)
    print(onboard)
    print(f"paired: {diff}")
    print(f"onboard loop: {cycles} cycles, clamps velocity {clamps.get('velocity', 0)} acceleration "
          f"{clamps.get('acceleration', 0)} braking {clamps.get('braking', 0)}; missed deadlines "
          f"{summary.get('missed_deadlines', 0)}; {len(trips)} episodes ended by a trip; "
          f"{onboard_s:.0f} s for {episodes} episodes "
          f"(setup {np.mean([e.setup_s for e in per_episode]):.2f} s each)")
    doc = {"target": target, "episodes": episodes, "seed_base": seed_base, "config": asdict(config),
           "offline": base.as_dict(), "onboard": onboard.as_dict(), "paired": diff.as_dict(),
           "per_episode": [asdict(e) for e in per_episode], "control": summary, "onboard_wall_s": onboard_s}
    if json_out:
        with atomic_write(Path(json_out), "w") as f:
            f.write(json.dumps(doc, indent=2, default=str) + "\n")
    return doc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edge_vla.onboard.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("target", help="bundle directory, or `expert`")
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--seed-base", type=int, default=EVAL_SEED_BASE)
    parser.add_argument("--rate-hz", type=float, default=100.0)
    parser.add_argument("--strategy", default="receding", choices=("receding", "sync", "ensemble"))
    parser.add_argument("--steps", type=int, help="ODE steps (default: the bundle's)")
    parser.add_argument("--heartbeat-timeout-ms", type=int, default=100)
    parser.add_argument("--json", dest="json_out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cfg = OnboardEvalConfig(rate_hz=args.rate_hz, strategy=args.strategy, steps=args.steps,
                            heartbeat_timeout_ms=args.heartbeat_timeout_ms)
    compare(args.target, args.episodes, args.seed_base, cfg, args.json_out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
