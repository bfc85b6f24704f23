"""The onboard motion path in virtual time: chunk source -> scheduler -> safety layer -> joint plant.

No processes, no pty, no wall clock: the control loop's own Scheduler and SafetyLayer, an inference
worker that observes the measured joints, takes `latency_s` to infer and publishes (at most every
`min_interval_s`, as InferenceWorker does), and the emulator's joints (firmware_bridge.plant: PD with
the firmware's default gains, inertia, friction) or an ideal plant that sits exactly on the command. It
is deterministic, so the safety layer's clamp counts can be attributed to one factor at a time:

    python -m edge_vla.onboard.replay            # the clamp study of issue 13 (expert, held-out seeds)

The real loop (edge_vla.onboard.control) does the same per cycle: adopt a new chunk (`push`, with the
command continuing at its velocity for a continuous hand-over), `sample`, `SafetyLayer.command`, send
the position (and, with feedforward, the command's velocity) to the motor controller.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from edge_vla.action_space import ActionSpace, sim_action_space
from edge_vla.onboard.safety import CLAMP_KINDS, SafetyLayer, SafetyLimits
from edge_vla.onboard.scheduler import Chunk, SyncScheduler, make_scheduler, start_ramp_s

Plan = Callable[[np.ndarray], np.ndarray]  # measured joint positions -> [H, D] joint targets

# The firmware's default gains (firmware_bridge.firmware.FirmwareRef) and the emulator's joint limits.
FIRMWARE_KP, FIRMWARE_KD = 50.0, 2.0


@dataclass(frozen=True)
class MotionConfig:
    rate_hz: float = 100.0
    strategy: str = "receding"
    interp: str = "cubic"
    blend_s: float = 0.1
    handover: str = "continuous"
    velocity_feedforward: bool = True
    execute: int | None = None
    latency_s: float = 0.075  # inference time of one chunk
    min_interval_s: float = 0.05  # InferenceWorker.min_interval_s
    period_s: float = 0.1  # action period of the chunks
    plant: str = "pd"  # "pd": the emulator's joints; "ideal": exactly at the command
    ramp_fraction: float | None = 0.5  # plan-clock ramp within this fraction of a_max (None: no ramp)
    jitter_s: float = 0.0  # each wake-up is late by uniform(0, jitter_s) (seeded)
    sample_at: str = "deadline"  # the scheduler is sampled at the cycle's deadline, or at its (late) "wakeup"


@dataclass
class MotionRun:
    cycles: int
    clamps: dict[str, int]
    reached_s: float | None  # virtual time the `done` predicate first held (None: never)
    t: np.ndarray = field(repr=False)
    requested: np.ndarray = field(repr=False)
    sent: np.ndarray = field(repr=False)
    measured: np.ndarray = field(repr=False)

    def acceleration(self, dt: float) -> np.ndarray:
        """The sent command's acceleration per cycle (finite differences, rad/s^2)."""
        v = np.diff(self.sent, axis=0) / dt
        return np.diff(v, axis=0) / dt


def _plant(kind: str, q0: np.ndarray) -> object:
    if kind == "ideal":
        return None
    from firmware_bridge.plant import JointPlant
    from firmware_bridge.protocol import JointLimits

    n = len(q0)
    plant = JointPlant([JointLimits(f"joint{i}", -3.2, 3.2, 3.0, 20.0) for i in range(n)])  # EMULATOR_LIMITS
    plant.q = np.asarray(q0, np.float64).copy()
    return plant


def replay(plan: Plan, q0: np.ndarray, duration_s: float, config: MotionConfig = MotionConfig(),
           space: ActionSpace | None = None, done: Callable[[np.ndarray], bool] | None = None) -> MotionRun:
    """Run the motion path for `duration_s` from rest at q0 (armed at t = 0); stop early once `done`
    holds for the measured joints."""
    cfg = config
    space = space or sim_action_space()
    dt = 1.0 / cfg.rate_hz
    safety = SafetyLayer(SafetyLimits.from_action_space(space, cfg.rate_hz))
    ramp = 0.0 if cfg.ramp_fraction is None else start_ramp_s(space.max_velocity, space.max_acceleration,
                                                              cfg.ramp_fraction)
    sched = make_scheduler(cfg.strategy, cfg.interp, cfg.blend_s, cfg.execute, handover=cfg.handover, ramp_s=ramp)
    q0 = np.asarray(q0, np.float64)
    safety.reset(q0)
    sched.reset(q0)
    plant = _plant(cfg.plant, q0)
    measured = q0.copy()
    next_obs, pending, seq, published = 0.0, None, 0, 0
    rows_t, rows_req, rows_sent, rows_meas = [], [], [], []
    reached = None
    n_cycles = round(duration_s * cfg.rate_hz)
    rng = np.random.default_rng(0)
    for n in range(n_cycles):
        late = float(rng.uniform(0.0, cfg.jitter_s)) if cfg.jitter_s > 0 else 0.0
        t = n * dt + (late if cfg.sample_at == "wakeup" else 0.0)
        # The worker: observe (the sync strategy waits until the last chunk was played), infer, publish.
        waiting = isinstance(sched, SyncScheduler) and published and sched.consumed_seq < published
        if pending is None and t >= next_obs - 1e-9 and not waiting:
            actions = np.asarray(plan(measured.copy()), np.float64)
            seq += 1
            pending = (t + cfg.latency_s, Chunk(actions, cfg.period_s, t, measured.copy(), seq))
            next_obs = t + max(cfg.latency_s, cfg.min_interval_s)
        if pending is not None and t >= pending[0] - 1e-9:
            v = safety.velocity
            sched.push(pending[1], t, commanded=(safety.last_sent + v * dt, v))
            published, pending = pending[1].seq, None
        target = sched.sample(t).q
        res = safety.command(target)
        if plant is None:
            measured = res.sent.copy()
        else:
            vff = safety.velocity if cfg.velocity_feedforward else np.zeros_like(res.sent)
            cmd = np.column_stack([res.sent, vff, np.zeros_like(res.sent), np.full_like(res.sent, FIRMWARE_KP),
                                   np.full_like(res.sent, FIRMWARE_KD)])
            plant.step(dt, True, cmd)  # type: ignore[attr-defined]
            measured = plant.q.copy()  # type: ignore[attr-defined]
        rows_t.append(t)
        rows_req.append(target)
        rows_sent.append(res.sent)
        rows_meas.append(measured)
        if done is not None and reached is None and done(measured):
            reached = t + dt
            break
    return MotionRun(len(rows_t), dict(safety.counts), reached, np.array(rows_t), np.array(rows_req),
                     np.array(rows_sent), np.array(rows_meas))


def expert_plan(scene: object, chunk_len: int = 8, max_accel: object = "default") -> Plan:
    """The sim expert as a Plan (`max_accel=None`: the constant-speed plans of the data before issue 13)."""
    from edge_vla.sim.expert import PLAN_ACCEL, expert_chunk

    accel = PLAN_ACCEL if isinstance(max_accel, str) else max_accel
    return lambda q: expert_chunk(scene, q, chunk_len, max_accel=accel)  # type: ignore[arg-type]


def expert_episodes(config: MotionConfig, seeds: Sequence[int], max_accel: object = "default",
                    duration_s: float = 3.0, stop_at_goal: bool = False) -> dict[str, float]:
    """Clamps per kind summed over expert episodes (the sim's start poses, from rest), and the cycles."""
    from edge_vla.sim.env import ReachEnv

    env = ReachEnv()
    totals = dict.fromkeys(CLAMP_KINDS, 0)
    cycles, reached = 0, 0
    for seed in seeds:
        env.reset(seed)
        scene = env.scene
        assert scene is not None
        run = replay(expert_plan(scene, max_accel=max_accel), env.q, duration_s, config,
                     done=scene.reached if stop_at_goal else None)
        cycles += run.cycles
        reached += int(run.reached_s is not None or scene.reached(run.measured[-1]))
        for k, v in run.clamps.items():
            totals[k] += v
    return {**totals, "cycles": cycles, "reached": reached, "episodes": len(seeds)}


# Rows of the clamp study: (label, config, expert's max_accel: None = the constant-speed plans before issue 13).
BEFORE = MotionConfig(handover="anchored", velocity_feedforward=False, ramp_fraction=None)
FIXED = MotionConfig()
STUDY: tuple[tuple[str, MotionConfig, object], ...] = (
    ("before: anchored hand-over, blend 0.1 s, cubic, no feedforward", BEFORE, None),
    ("  before, linear interpolation", replace(BEFORE, interp="linear"), None),
    ("  before, no blend", replace(BEFORE, blend_s=0.0), None),
    ("  before, ideal plant (no tracking lag)", replace(BEFORE, plant="ideal"), None),
    ("  before + velocity feedforward", replace(BEFORE, velocity_feedforward=True), None),
    ("  before + continuous hand-over", replace(BEFORE, handover="continuous"), None),
    ("  + feedforward + continuous hand-over", replace(FIXED, ramp_fraction=None), None),
    ("  + plan-clock ramp from rest (onboard fix, old data)", FIXED, None),
    ("  + expert braking at 0.5 a_max (new data)", FIXED, "default"),
    ("  fixed, linear interpolation", replace(FIXED, interp="linear"), "default"),
    ("  fixed, ideal plant", replace(FIXED, plant="ideal"), "default"),
    ("  fixed, 50 Hz", replace(FIXED, rate_hz=50.0), "default"),
    ("  fixed, latency 30 ms", replace(FIXED, latency_s=0.03), "default"),
    ("  fixed, latency 150 ms", replace(FIXED, latency_s=0.15), "default"),
    ("  fixed, sync (execute 4)", replace(FIXED, strategy="sync", execute=4), "default"),
    ("  fixed, wake-ups late by 0-3 ms, sampled at the deadline", replace(FIXED, jitter_s=0.003), "default"),
    ("  fixed, wake-ups late by 0-3 ms, sampled at the wake-up", replace(FIXED, jitter_s=0.003, sample_at="wakeup"),
     "default"),
)


def study(seeds: Sequence[int], duration_s: float = 3.0) -> list[tuple[str, dict[str, float]]]:
    return [(label, expert_episodes(cfg, seeds, accel, duration_s)) for label, cfg, accel in STUDY]


def format_study(rows: list[tuple[str, dict[str, float]]]) -> str:
    lines = [f"{'configuration':<58} {'cycles':>7} {'velocity':>9} {'accel':>7} {'braking':>8} {'reached':>8}"]
    for label, r in rows:
        c = r["cycles"]
        lines.append(f"{label:<58} {c:>7} {r['velocity'] / c:>8.1%} {r['acceleration'] / c:>7.1%} "
                     f"{r['braking'] / c:>8.1%} {r['reached']:>4}/{r['episodes']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edge_vla.onboard.replay", description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--seed-base", type=int, default=1_000_000)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per episode (the sim's 30 actions)")
    args = parser.parse_args(argv)
    rows = study(range(args.seed_base, args.seed_base + args.episodes), args.duration)
    print(f"clamps per control cycle, sim expert from rest, {args.episodes} held-out seeds x {args.duration:g} s, "
          "virtual time (latency 75 ms)")
    print(format_study(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
