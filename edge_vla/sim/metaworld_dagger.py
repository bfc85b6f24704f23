"""DAgger on MetaWorld: roll out a policy, label every state it visits with the scripted expert's action chunk.

`edge-vla make-data --env metaworld:TASKS --dagger-policy CKPT_OR_BUNDLE [--dagger-beta B]` (issue 29).

- Rollout: each chunk, with probability beta, the expert acts instead of the policy (beta 0: the student alone;
  beta 1: the expert alone); the policy's chunk plays its first `execute` actions before the next observation,
  as in `edge-vla evaluate`. Seeds start at DAGGER_SEED_BASE: apart from the demonstrations (0..), calibration
  (500 000) and held-out evaluation (1 000 000, refused).
- Labels: for every visited state, the actions the expert would take over the next `chunk_len` steps *from that
  state*. The expert runs forward on a scratch MjData given the live one's full integration state (mj_getState /
  mj_setState: qpos, qvel, act, time, ctrl, mocap, warm start, ...) while the env's own MjData is set aside, and MetaWorld's Python-side
  fields (path length, the previous-observation half of the 39-D observation, the reward's latches such as
  pickCompleted) are saved before and put back after: the env then continues bit for bit as if nothing had been
  labelled (tests/sim/test_metaworld_dagger.py checks this against a twin env).
- Output: the Dataset format `metaworld.generate` writes, meta `dagger: true` with the policy (path, sha256),
  beta, seeds, and the success rate during collection. Every episode is kept, failed ones included: the states a
  failing student reaches are the ones DAgger is for.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from edge_vla.bundle import sha256_file
from edge_vla.errors import ConfigError, EdgeVlaError
from edge_vla.optional import require
from edge_vla.sim.dataset import DATASET_CHUNK, Dataset
from edge_vla.sim.evaluate import EVAL_SEED_BASE, EXECUTE, ChunkPolicy, Reseed, check_execute
from edge_vla.sim.metaworld import MetaWorldEnv, MetaWorldSpec, dataset_meta, is_metaworld, recorded_dataset

log = logging.getLogger(__name__)

DAGGER_SEED_BASE = 300_000  # demonstrations use 0.., calibration 500 000.., held-out evaluation 1 000 000..
# MetaWorld's Python-side state is these plain values and arrays on the env; the rest (model, data, spaces,
# renderer, task config) does not change when the env steps.
_PLAIN = (bool, int, float, str, type(None), np.generic)


# --- expert labels from any state -------------------------------------------------------------------------------
def _python_state(sim: Any) -> dict[str, Any]:
    """The env's Python-side fields that a step may change: plain values as they are, arrays copied, and the
    random generator's state (a step does not draw from it today; cheap insurance if one does)."""
    saved: dict[str, Any] = {}
    for name, value in vars(sim).items():
        if isinstance(value, np.ndarray):
            saved[name] = value.copy()
        elif isinstance(value, _PLAIN):
            saved[name] = value
        elif isinstance(value, np.random.Generator):
            saved[name] = (value, value.bit_generator.state)
    return saved


def _restore_python_state(sim: Any, saved: dict[str, Any]) -> None:
    """Put the saved fields back and drop any plain field the expert's steps created (a latch set the first time a
    reward branch runs)."""
    for name in [n for n, v in vars(sim).items() if n not in saved and isinstance(v, (np.ndarray, *_PLAIN))]:
        delattr(sim, name)
    for name, value in saved.items():
        if isinstance(value, tuple):  # a generator: the same object, its state rewound
            value[0].bit_generator.state = value[1]
            setattr(sim, name, value[0])
        else:
            setattr(sim, name, value.copy() if isinstance(value, np.ndarray) else value)


class ExpertLabeller:
    """The scripted expert's next `chunk_len` actions from the env's current state, the env left untouched."""

    def __init__(self, env: MetaWorldEnv) -> None:
        self.env = env
        self._mujoco = require("mujoco")
        model = env.env.model
        self._scratch = self._mujoco.MjData(model)  # reused: no allocation per label
        # Everything mj_step reads: qpos, qvel, act, time, ctrl, mocap, applied forces, warm start, equality flags.
        self._what = self._mujoco.mjtState.mjSTATE_INTEGRATION
        self._state = np.empty(self._mujoco.mj_stateSize(model, self._what))

    def chunk(self, chunk_len: int = DATASET_CHUNK) -> np.ndarray:
        sim = self.env.env
        live = sim.data
        saved = _python_state(sim)
        sim.data = self._workspace(live)
        try:
            return self._roll(sim, chunk_len)
        finally:
            sim.data = live
            _restore_python_state(sim, saved)

    def _workspace(self, live: Any) -> Any:
        """A scratch MjData holding the live one's full integration state (the expert steps this one, never the
        env's; each step recomputes the derived fields from that state, so they need no copy)."""
        model = self.env.env.model
        self._mujoco.mj_getState(model, live, self._state, self._what)
        self._mujoco.mj_setState(model, self._scratch, self._state, self._what)
        return self._scratch

    def _roll(self, sim: Any, chunk_len: int) -> np.ndarray:
        raw = self.env.raw
        assert raw is not None, "reset the env first"
        actions: list[np.ndarray] = []
        while True:
            a = self.env.expert_action(raw)  # the copy's observation, not the env's own
            actions.append(a)
            if len(actions) == chunk_len or sim.curr_path_length >= sim.max_path_length:
                break
            raw = sim.step(a)[0]
        actions += [actions[-1]] * (chunk_len - len(actions))  # at MetaWorld's own path limit: hold the last
        return np.stack(actions)


# --- rollouts -------------------------------------------------------------------------------------------------
@dataclass
class _Episode:
    images: list[np.ndarray]
    states: list[np.ndarray]
    positions: list[np.ndarray]
    labels: list[np.ndarray]
    success: bool
    expert_chunks: int
    chunks: int


def _episode(env: MetaWorldEnv, labeller: ExpertLabeller, policy: ChunkPolicy, seed: int, rng: np.random.Generator,
             beta: float, execute: int, chunk_len: int) -> _Episode:
    env.reset(seed)
    ep = _Episode([], [], [], [], False, 0, 0)
    done = False
    while not done:
        ep.chunks += 1
        by_expert = beta > 0 and rng.random() < beta  # one draw per chunk (none for a student-only round)
        images = env.render()
        plan = None if by_expert else np.asarray(policy(_obs(env, images)))
        ep.expert_chunks += by_expert
        for k in range(execute if plan is None else min(execute, len(plan))):
            if k:
                images = env.render()
            label = labeller.chunk(chunk_len)
            ep.images.append(np.stack(images))
            ep.states.append(env.state)
            ep.positions.append(env.positions)
            ep.labels.append(label)
            # The expert acts closed loop (its label's first action, from this very state); the policy open loop.
            _, done = env.step(label[0] if plan is None else plan[k])
            if done:
                break
    ep.success = env.success
    return ep


def _obs(env: MetaWorldEnv, images: list[np.ndarray]) -> Any:
    from edge_vla.runtime.types import Observation

    return Observation(images=images, instruction=env.instruction, state=env.state)


def collect(policy: ChunkPolicy, spec: MetaWorldSpec | str, seeds: range, image_size: int = 64,
            num_cameras: int = 1, beta: float = 0.0, execute: int = EXECUTE, chunk_len: int = DATASET_CHUNK,
            reseed: Reseed | None = None, policy_info: dict[str, Any] | None = None) -> Dataset:
    """One DAgger round: `policy` (mixed with the expert per chunk with probability `beta`) on every (task, seed),
    every visited state recorded with the expert's chunk from it. `reseed(seed)` restarts the policy's noise
    per episode, so a round is reproducible."""
    if not is_metaworld(spec) and not isinstance(spec, MetaWorldSpec):
        raise ConfigError(f"{spec!r}: DAgger rolls out a policy in MetaWorld; use e.g. metaworld:mt10")
    spec = MetaWorldSpec.parse(spec) if isinstance(spec, str) else spec
    check_beta(beta)
    check_execute(execute)
    cams = spec.camera_names(num_cameras)
    images: list[np.ndarray] = []
    states: list[np.ndarray] = []
    positions: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    instructions: list[str] = []
    episodes: list[int] = []
    successes: dict[str, list[int]] = {}
    expert_chunks = chunks = 0
    for ti, task in enumerate(spec.tasks):
        t0, wins, before = time.perf_counter(), 0, len(states)
        with MetaWorldEnv(task, cams, image_size, spec.horizon) as env:
            labeller = ExpertLabeller(env)
            for k, seed in enumerate(seeds):
                if reseed is not None:
                    reseed(seed)
                rng = np.random.default_rng([30_000_000 + seed, zlib.crc32(task.encode())])
                ep = _episode(env, labeller, policy, seed, rng, beta, execute, chunk_len)
                wins += ep.success
                expert_chunks, chunks = expert_chunks + ep.expert_chunks, chunks + ep.chunks
                images += ep.images
                states += ep.states
                positions += ep.positions
                labels += ep.labels
                instructions += [env.instruction] * len(ep.states)
                episodes += [k * len(spec.tasks) + ti] * len(ep.states)  # interleaved, as generate() numbers them
        successes[task] = [wins, len(seeds)]
        log.info("%s: %d DAgger frames from %d episodes (%d succeeded) in %.1f s", task, len(states) - before,
                 len(seeds), wins, time.perf_counter() - t0)
    if not states:
        raise EdgeVlaError(f"no episodes to record: {len(seeds)} seed(s)")
    won = sum(w for w, _ in successes.values())
    meta = dataset_meta(spec, cams, image_size, seeds, noise=0.0, frame_every=1) | {
        "dagger": True, "beta": beta, "execute": execute, "policy": policy_info or {"path": "(in-process)"},
        "policy_success": {"overall": [won, len(seeds) * len(spec.tasks)], "tasks": successes},
        "expert_chunks": [expert_chunks, chunks],
        "labels": f"the scripted expert's next {chunk_len} actions from each visited state (the env snapshotted, "
                  "the expert run forward on a copy, the env restored exactly)",
    }
    return recorded_dataset(images, instructions, states, positions, labels, episodes, meta)


def check_beta(beta: float) -> float:
    if not (isinstance(beta, (int, float)) and 0.0 <= beta <= 1.0):  # NaN fails the comparison too
        raise ConfigError(f"--dagger-beta {beta}: give the probability per chunk that the expert acts, between 0 and 1 "
                          "(0: the policy alone)")
    return float(beta)


# --- the command line (edge-vla make-data --dagger-policy) -----------------------------------------------------
def check_seeds(seeds: range) -> range:
    """DAgger seeds are layouts of the training range: never negative, never the held-out evaluation's."""
    if seeds.start < 0:
        raise ConfigError(f"--seed {seeds.start}: episode seeds are whole numbers from 0 (DAgger's default: "
                          f"{DAGGER_SEED_BASE})")
    if seeds.stop > EVAL_SEED_BASE:
        raise ConfigError(f"--seed {seeds.start} with --episodes {len(seeds)} reaches seed {seeds.stop - 1}, into the "
                          f"held-out evaluation seeds ({EVAL_SEED_BASE}..); start DAgger rounds at e.g. "
                          f"{DAGGER_SEED_BASE} (the default)")
    return seeds


def policy_identity(target: str) -> dict[str, Any]:
    """Path and sha256 of the policy's weights (a checkpoint's model.safetensors, a bundle's manifest.json, which
    pins every graph file's sha256), and a checkpoint's training step."""
    path = Path(target)
    if not path.is_dir():
        return {"path": target}
    info: dict[str, Any] = {"path": str(path.resolve())}
    for name, kind in (("manifest.json", "bundle"), ("model.safetensors", "checkpoint")):
        if (path / name).is_file():
            info |= {"kind": kind, "file": name, "sha256": sha256_file(path / name)}
            break
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        info["step"] = int(json.loads((path / "train_state.json").read_text())["step"])
    return info


@dataclass
class LoadedPolicy:
    act: ChunkPolicy
    reseed: Reseed | None
    image_size: int
    num_cameras: int
    env: str | None  # the environment it was trained in, if it says


def load_policy(target: str, env: str) -> LoadedPolicy:
    """A checkpoint or bundle as `edge-vla evaluate` loads it (or `random`), each error prefixed with the flag."""
    if target == "expert":
        raise ConfigError("--dagger-policy expert: the expert is the labeller; to record it, give any policy with "
                          "--dagger-beta 1 (or use make-data without --dagger-policy for demonstrations)")
    from edge_vla.export.envs import target_env
    from edge_vla.export.evaluate_cli import load_contender

    try:
        c = load_contender(target, None, "euler")
        act = c.metaworld_policy(env)  # `random` gets MetaWorld's 4-D one; a model's state/action dims are checked
    except EdgeVlaError as exc:
        raise EdgeVlaError(f"--dagger-policy {target}: {exc}") from exc
    trained = None if target == "random" else target_env(target)
    return LoadedPolicy(act, c.reseed, c.image_size, c.num_cameras, trained if is_metaworld(trained) else None)


def resolve_spec(env: str, policy: LoadedPolicy, num_cameras: int, image_size: int) -> MetaWorldSpec:
    """--env with the policy's cameras filled in; the policy must see the cameras, count and size it learned on."""
    spec = MetaWorldSpec.parse(env)
    if num_cameras != policy.num_cameras:
        raise ConfigError(f"--cameras {num_cameras}: the policy takes {policy.num_cameras} camera(s); pass "
                          f"--cameras {policy.num_cameras}")
    if image_size != policy.image_size:
        raise ConfigError(f"--image-size {image_size}: the policy sees {policy.image_size} px images; pass "
                          f"--image-size {policy.image_size}")
    trained = MetaWorldSpec.parse(policy.env).cameras if policy.env else None
    if spec.cameras is None:
        return replace(spec, cameras=trained or spec.camera_names(num_cameras))
    if trained and spec.cameras != trained:
        raise ConfigError(f"--env {env!r} names cameras {','.join(spec.cameras)} but the policy was trained on "
                          f"{','.join(trained)}: DAgger shows the policy its own cameras (drop ?cameras= or name "
                          f"{','.join(trained)})")
    spec.camera_names(num_cameras)  # the count agrees
    return spec


def main(args: Any) -> int:
    """`edge-vla make-data --dagger-policy ...` (edge_vla.sim.cli hands over here); checks before any env is built."""
    from edge_vla.sim import dataset

    if not is_metaworld(args.env):
        raise ConfigError(f"--dagger-policy rolls out a policy in MetaWorld, not in {args.env!r}; give --env "
                          "metaworld:TASKS (e.g. metaworld:mt10)")
    beta = check_beta(args.dagger_beta if args.dagger_beta is not None else 0.0)
    if args.format != "npz":
        raise ConfigError("DAgger data is written as .npz (--format npz)")
    if args.noise is not None:
        raise ConfigError("--noise perturbs demonstrations; a DAgger round executes the policy's own actions (drop "
                          "--noise)")
    if args.episodes < 1:
        raise ConfigError(f"--episodes {args.episodes}: give at least 1 episode per task")
    start = DAGGER_SEED_BASE if args.seed is None else args.seed
    seeds = check_seeds(range(start, start + args.episodes))
    MetaWorldSpec.parse(args.env)  # a bad spec fails before the policy loads
    policy = load_policy(args.dagger_policy, args.env)
    spec = resolve_spec(args.env, policy, args.cameras, args.image_size)
    t0 = time.perf_counter()
    ds = collect(policy.act, spec, seeds, policy.image_size, policy.num_cameras, beta, reseed=policy.reseed,
                 policy_info=policy_identity(args.dagger_policy))
    seconds = time.perf_counter() - t0
    path = dataset.save(ds, args.output or "runs/data/metaworld_dagger.npz")
    won, total = ds.meta["policy_success"]["overall"]
    print(f"wrote {len(ds)} DAgger samples from {args.episodes} episode(s) x {len(spec.tasks)} task(s) of "
          f"{ds.meta['env']} to {path} (policy {args.dagger_policy}, beta {beta:g}: {won}/{total} episodes succeeded; "
          f"{seconds / max(total, 1):.1f} s per episode); train on it beside the demonstrations with "
          f"--data DEMOS.npz,{path}")
    return 0
