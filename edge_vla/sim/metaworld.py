"""MetaWorld v3 behind the sim's interfaces (the `metaworld` extra): `--env metaworld:TASKS`.

- Spec: `metaworld:reach-v3,push-v3` or `metaworld:mt10`; options after `?`: `cameras=corner2,gripperPOV`
  (MetaWorld's names; `gripperPOV` plays the wrist camera's role) and `horizon=N` (steps per episode).
- Observation: the cameras at the model's image size, the task's one-sentence instruction, and
  state = obs[:4] (hand xyz and gripper opening), never the object or goal fields.
- Action: the env's 4-D vector, 3 end-effector deltas (x 1 cm per step) and a gripper command, each in
  [-1, 1]; `action_space()` declares it (kind `delta_ee_pose`, roles ee, ee, ee, gripper).
- Success: `info["success"]`, the env's own criterion, at any step within the horizon.
- Episodes are seeded: a seed draws the object and goal positions from the env's seeded generator, so
  training (seeds from 0), calibration (500 000) and held-out evaluation (1 000 000) draw disjoint layouts.
- Rendering happens only when an observation is asked for: a policy asks once per chunk, the scripted
  expert never (it reads the full state). Shadows, anti-aliasing, reflections and the skybox are off
  before the first render: ~4x faster on Mesa's CPU renderer at 64 px (shadows alone cost 3x).

One instruction per task makes language a task identifier here, not grounding within a task.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import parse_qs

import numpy as np

from edge_vla.action_space import ActionSpace
from edge_vla.errors import ConfigError, EdgeVlaError
from edge_vla.optional import require
from edge_vla.runtime.types import Observation
from edge_vla.sim.dataset import DATASET_CHUNK, FORMAT_VERSION, Dataset
from edge_vla.sim.evaluate import (
    EVAL_SEED_BASE,
    EXECUTE,
    ChunkPolicy,
    EvalResult,
    Reseed,
    check_execute,
    wilson_interval,
)

log = logging.getLogger(__name__)

PREFIX = "metaworld:"
# task -> (difficulty, instruction). Difficulty: the easy / medium / hard / very hard split of Seo et al. (2022)
# that LeRobot and the VLA papers (TinyVLA, SmolVLA) report MetaWorld by. Instructions are unique and at most
# MAX_INSTRUCTION bytes (the byte tokenizer's budget, see export.envs.training_config).
TASKS: dict[str, tuple[str, str]] = {
    "assembly-v3": ("hard", "put the nut on the peg"),
    "basketball-v3": ("medium", "dunk the ball in the basket"),
    "bin-picking-v3": ("medium", "move the puck to the other bin"),
    "box-close-v3": ("medium", "put the lid on the box"),
    "button-press-topdown-v3": ("easy", "press the button from above"),
    "button-press-topdown-wall-v3": ("easy", "press the button over the wall"),
    "button-press-v3": ("easy", "press the button"),
    "button-press-wall-v3": ("easy", "press the button past the wall"),
    "coffee-button-v3": ("easy", "press the coffee machine button"),
    "coffee-pull-v3": ("medium", "pull the mug from the machine"),
    "coffee-push-v3": ("medium", "push the mug under the machine"),
    "dial-turn-v3": ("easy", "turn the dial"),
    "disassemble-v3": ("very hard", "take the nut off the peg"),
    "door-close-v3": ("easy", "close the door"),
    "door-lock-v3": ("easy", "lock the door"),
    "door-open-v3": ("easy", "open the door"),
    "door-unlock-v3": ("easy", "unlock the door"),
    "drawer-close-v3": ("easy", "close the drawer"),
    "drawer-open-v3": ("easy", "open the drawer"),
    "faucet-close-v3": ("easy", "turn the faucet clockwise"),
    "faucet-open-v3": ("easy", "turn the faucet anticlockwise"),
    "hammer-v3": ("medium", "hammer the nail in"),
    "hand-insert-v3": ("hard", "put the gripper in the hole"),
    "handle-press-side-v3": ("easy", "press the handle from the side"),
    "handle-press-v3": ("easy", "press the handle down"),
    "handle-pull-side-v3": ("easy", "pull the handle from the side"),
    "handle-pull-v3": ("easy", "pull the handle up"),
    "lever-pull-v3": ("easy", "pull the lever down"),
    "peg-insert-side-v3": ("medium", "insert the peg from the side"),
    "peg-unplug-side-v3": ("easy", "unplug the peg sideways"),
    "pick-out-of-hole-v3": ("hard", "lift the puck out of the hole"),
    "pick-place-v3": ("hard", "pick and place the puck"),
    "pick-place-wall-v3": ("very hard", "place the puck past the wall"),
    "plate-slide-back-side-v3": ("easy", "slide the plate out sideways"),
    "plate-slide-back-v3": ("easy", "slide the plate out"),
    "plate-slide-side-v3": ("easy", "slide the plate in sideways"),
    "plate-slide-v3": ("easy", "slide the plate in"),
    "push-back-v3": ("hard", "push the puck back to the goal"),
    "push-v3": ("hard", "push the puck to the goal"),
    "push-wall-v3": ("medium", "push the puck past the wall"),
    "reach-v3": ("easy", "reach the goal"),
    "reach-wall-v3": ("easy", "reach the goal over the wall"),
    "shelf-place-v3": ("very hard", "put the puck on the shelf"),
    "soccer-v3": ("medium", "kick the ball into the goal"),
    "stick-pull-v3": ("very hard", "pull the box with the stick"),
    "stick-push-v3": ("very hard", "push the box with the stick"),
    "sweep-into-v3": ("medium", "sweep the puck into the hole"),
    "sweep-v3": ("medium", "sweep the puck off the table"),
    "window-close-v3": ("easy", "close the window"),
    "window-open-v3": ("easy", "open the window"),
}
MT10 = ("reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-open-v3", "drawer-close-v3",
        "button-press-topdown-v3", "peg-insert-side-v3", "window-open-v3", "window-close-v3")
MAX_INSTRUCTION = 31
SUITES = {"mt10": MT10, "mt50": tuple(TASKS)}
DIFFICULTIES = ("easy", "medium", "hard", "very hard")
# Published success per difficulty group (%), SmolVLA paper (arXiv 2506.01844) Table 2, which takes the TinyVLA
# and Diffusion Policy rows from the TinyVLA paper: anchors, not like-for-like (larger images with shadows,
# 50 demonstrations per task, 10 trials per task).
ANCHORS: dict[str, dict[str, float]] = {
    "TinyVLA": {"easy": 77.6, "medium": 21.5, "hard": 11.4, "very hard": 15.8},
    "Diffusion Policy": {"easy": 23.1, "medium": 10.7, "hard": 1.9, "very hard": 6.1},
    "SmolVLA (0.45B)": {"easy": 82.5, "medium": 41.8, "hard": 45.0, "very hard": 60.0},
    "pi0 (3.3B)": {"easy": 71.8, "medium": 48.2, "hard": 41.7, "very hard": 30.0},
}

CAMERAS = ("corner", "corner2", "corner3", "topview", "behindGripper", "gripperPOV", "front")
WRIST_CAMERA = "gripperPOV"
DEFAULT_CAMERAS = ("corner2", "gripperPOV", "corner", "topview", "corner3", "behindGripper")  # by count
# These two are mounted upside down; LeRobot flips corner2 the same way, and moves it to a view of the whole
# table (from arXiv 2206.14244): frames then match a LeRobot MetaWorld dataset's camera.
_FLIPPED = {"corner", "corner2"}
_CORNER2_POS = (0.75, 0.075, 0.7)
# Not in MetaWorld's model: a fixed camera facing the robot across the table, framing the reachable workspace
# (objects and goals at y 0.4-0.9 m) the way a cell's scene camera is mounted. At 64 px corner2's whole-table view
# leaves a goal marker 1-2 px; here it is 2-4 px. MuJoCo free-camera terms: lookat (m), distance (m), degrees.
_FREE_CAMERAS = {"front": {"lookat": (0.0, 0.7, 0.12), "distance": 0.95, "azimuth": -120.0, "elevation": -35.0}}

STATE_NAMES = ("hand_x", "hand_y", "hand_z", "gripper_opening")
ACTION_NAMES = ("dx", "dy", "dz", "gripper")
ACTION_PERIOD_S = 0.0125  # one env step: frame_skip 5 x MuJoCo timestep 2.5 ms (80 Hz)
DEFAULT_HORIZON = 200  # the env allows 500; the experts finish MT10 tasks in 40-120 steps
MAX_PATH_LENGTH = 500  # MetaWorld's own episode limit
TRAIN_SEED_BASE = 0
CALIB_SEED_BASE = 500_000


def action_space() -> ActionSpace:
    """MetaWorld's action: end-effector deltas and a gripper command, each clipped to [-1, 1] by the env.
    Velocity/acceleration limits allow a full swing every step: the env applies no other rate limit."""
    ones = np.ones(4, dtype=np.float32)
    return ActionSpace(
        names=ACTION_NAMES, units="MetaWorld action in [-1, 1]: x 1 cm per step (dx, dy, dz); gripper -1 open, +1 close",
        lower=-ones, upper=ones.copy(), max_velocity=ones * (2.0 / ACTION_PERIOD_S),
        max_acceleration=ones * (2.0 / ACTION_PERIOD_S**2), action_period_s=ACTION_PERIOD_S,
        kind="delta_ee_pose", roles=("ee", "ee", "ee", "gripper"),
    ).validate()


def is_metaworld(spec: Any) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


@dataclass(frozen=True)
class MetaWorldSpec:
    """Which tasks, cameras and horizon: `metaworld:reach-v3,push-v3?cameras=corner2,gripperPOV&horizon=200`."""

    tasks: tuple[str, ...]
    cameras: tuple[str, ...] | None = None  # None: the first N of DEFAULT_CAMERAS for an N-camera model
    horizon: int = DEFAULT_HORIZON

    @classmethod
    def parse(cls, spec: str) -> MetaWorldSpec:
        if not is_metaworld(spec):
            raise ConfigError(f"{spec!r} is not a MetaWorld environment; use e.g. metaworld:reach-v3,push-v3 "
                              "or metaworld:mt10")
        body, _, query = spec[len(PREFIX):].partition("?")
        tasks: list[str] = []
        for name in (t.strip() for t in body.split(",") if t.strip()):
            tasks += SUITES.get(name.lower(), (name if name.endswith("-v3") else f"{name}-v3",))
        unknown = [t for t in tasks if t not in TASKS]
        if not tasks or unknown:
            raise ConfigError(f"{spec!r}: unknown MetaWorld task(s) {unknown or ['(none)']}; use v3 names such as "
                              f"reach-v3, or mt10 / mt50 (all tasks: {', '.join(TASKS)})")
        opts = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
        extra = sorted(set(opts) - {"cameras", "horizon"})
        if extra:
            raise ConfigError(f"{spec!r}: unknown option(s) {extra}; MetaWorld takes cameras=... and horizon=N")
        cameras = None
        if "cameras" in opts:
            cameras = tuple(c.strip() for c in opts["cameras"].split(",") if c.strip())
            bad = [c for c in cameras if c not in CAMERAS]
            if not cameras or bad:
                raise ConfigError(f"{spec!r}: unknown camera(s) {bad or ['(none)']}; MetaWorld has {', '.join(CAMERAS)} "
                                  f"({WRIST_CAMERA} is the wrist view)")
        try:
            horizon = int(opts.get("horizon", DEFAULT_HORIZON))
        except ValueError:
            raise ConfigError(f"{spec!r}: horizon must be a whole number of steps") from None
        if not 1 <= horizon <= MAX_PATH_LENGTH:
            raise ConfigError(f"{spec!r}: horizon {horizon} is outside 1..{MAX_PATH_LENGTH} (MetaWorld's own limit)")
        return cls(tuple(dict.fromkeys(tasks)), cameras, horizon)

    def camera_names(self, num_cameras: int) -> tuple[str, ...]:
        if self.cameras is None:
            if num_cameras > len(DEFAULT_CAMERAS):
                raise ConfigError(f"MetaWorld has {len(CAMERAS)} cameras, a model asks for {num_cameras}")
            return DEFAULT_CAMERAS[:num_cameras]
        if len(self.cameras) != num_cameras:
            raise ConfigError(f"the environment names {len(self.cameras)} camera(s) {list(self.cameras)} but the model "
                              f"takes {num_cameras}; name {num_cameras} with ?cameras=... or drop the option")
        return self.cameras

    def with_cameras(self, num_cameras: int) -> MetaWorldSpec:
        return replace(self, cameras=self.camera_names(num_cameras))

    def __str__(self) -> str:
        tasks = "mt10" if self.tasks == MT10 else ("mt50" if self.tasks == SUITES["mt50"] else ",".join(self.tasks))
        opts = [f"cameras={','.join(self.cameras)}"] if self.cameras else []
        opts += [f"horizon={self.horizon}"] if self.horizon != DEFAULT_HORIZON else []
        return PREFIX + tasks + ("?" + "&".join(opts) if opts else "")


def instruction(task: str) -> str:
    return TASKS[task][1]


def camera_entries(cameras: Iterable[str], image_size: int) -> list[dict[str, Any]]:
    """The bundle manifest's `cameras` for these MetaWorld cameras (gripperPOV has the wrist role)."""
    return [{"name": c, "role": "wrist" if c == WRIST_CAMERA else "scene", "image_size": image_size}
            for c in cameras]


def _modules() -> tuple[Any, Any, Any]:
    # Headless: MuJoCo renders through EGL (Mesa's CPU renderer where there is no GPU); MUJOCO_GL=osmesa
    # (apt-get install libosmesa6) also works. Must be set before mujoco is first imported.
    os.environ.setdefault("MUJOCO_GL", "egl")
    # The experts' gains exceed the action range by design and the env clips; we clip too, so not worth a warning.
    warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high", category=UserWarning)
    return require("metaworld"), require("mujoco"), require("metaworld.policies")


class MetaWorldEnv:
    """One MetaWorld task, built once (~1 s) and reset per seed; renders only in `observation()`."""

    def __init__(self, task: str, cameras: tuple[str, ...] = ("corner2",), image_size: int = 64,
                 horizon: int = DEFAULT_HORIZON) -> None:
        if task not in TASKS:
            raise ConfigError(f"unknown MetaWorld task {task!r}; use v3 names such as reach-v3")
        bad = [c for c in cameras if c not in CAMERAS]
        if bad:
            raise ConfigError(f"unknown MetaWorld camera(s) {bad}; use {', '.join(CAMERAS)}")
        metaworld, self._mujoco, policies = _modules()
        self.task, self.cameras, self.image_size, self.horizon = task, tuple(cameras), image_size, horizon
        self.instruction = instruction(task)
        bench = metaworld.MT1(task, seed=0)
        env = bench.train_classes[task]()
        env.set_task(bench.train_tasks[0])  # the MT benchmarks' setting: goal in the full obs (the expert reads it)
        env._freeze_rand_vec = False  # a new object and goal draw on every reset ...
        env.seeded_rand_vec = True  # ... from the env's own generator, seeded per episode (not numpy's global one)
        quality = env.model.vis.quality
        quality.shadowsize = 0  # before the first render: shadows triple the CPU renderer's cost
        quality.offsamples = 0  # no multisampling: another ~3x at 64 px
        cam = self._mujoco.mj_name2id(env.model, self._mujoco.mjtObj.mjOBJ_CAMERA, "corner2")
        env.model.cam_pos[cam] = _CORNER2_POS
        self.env = env
        self.expert = policies.ENV_POLICY_MAP[task]()
        self._renderer: Any = None
        self._free_cameras = {name: self._free_camera(**view) for name, view in _FREE_CAMERAS.items()}
        self.raw: np.ndarray | None = None
        self.t = 0
        self.success = False

    def reset(self, seed: int) -> None:
        self.env.seed(int(seed))
        self.raw, _ = self.env.reset()
        self.t, self.success = 0, False

    @property
    def state(self) -> np.ndarray:
        assert self.raw is not None, "call reset() first"
        return self.raw[:4].astype(np.float32)  # hand xyz, gripper opening: never the object or goal fields

    @property
    def positions(self) -> np.ndarray:
        """The object's and the goal's xyz (metres): privileged simulator fields, recorded only as an auxiliary
        training target (the goal head), never given to the policy."""
        assert self.raw is not None, "call reset() first"
        return np.concatenate([self.raw[4:7], self.raw[36:39]]).astype(np.float32)

    def expert_action(self, raw: np.ndarray | None = None) -> np.ndarray:
        """The task's scripted expert (it reads the full observation, object and goal included) at the env's current
        observation, or at `raw` (a 39-D observation from a copy of the env: DAgger's labeller)."""
        raw = self.raw if raw is None else raw
        assert raw is not None, "call reset() first"
        return np.clip(np.asarray(self.expert.get_action(raw), dtype=np.float32), -1.0, 1.0)

    def observation(self) -> Observation:
        return Observation(images=self.render(), instruction=self.instruction, state=self.state)

    def render(self) -> list[np.ndarray]:
        if self._renderer is None:
            self._renderer = self._make_renderer()
        mj, r = self._mujoco, self._renderer
        images = []
        for cam in self.cameras:
            r.update_scene(self.env.data, camera=self._free_cameras.get(cam, cam))
            r.scene.flags[mj.mjtRndFlag.mjRND_REFLECTION] = 0
            r.scene.flags[mj.mjtRndFlag.mjRND_SKYBOX] = 0
            img = r.render()
            images.append(np.ascontiguousarray(np.flip(img, (0, 1)) if cam in _FLIPPED else img.copy()))
        return images

    def _free_camera(self, lookat: tuple[float, float, float], distance: float, azimuth: float,
                     elevation: float) -> Any:
        cam = self._mujoco.MjvCamera()
        cam.type = self._mujoco.mjtCamera.mjCAMERA_FREE
        cam.lookat[:] = lookat
        cam.distance, cam.azimuth, cam.elevation = distance, azimuth, elevation
        return cam

    def _make_renderer(self) -> Any:
        try:
            return self._mujoco.Renderer(self.env.model, self.image_size, self.image_size)
        except Exception as exc:  # GL setup fails in many ways (no libEGL, no display, wrong MUJOCO_GL)
            raise EdgeVlaError(f"MuJoCo cannot render (MUJOCO_GL={os.environ.get('MUJOCO_GL')!r}: {exc}); on a headless "
                               "machine set MUJOCO_GL=egl (Mesa's libEGL) or MUJOCO_GL=osmesa (apt-get install "
                               "libosmesa6) before anything imports mujoco") from exc

    def step(self, action: np.ndarray) -> tuple[bool, bool]:
        """One env step (no rendering). Returns (success so far, done)."""
        assert self.raw is not None, "call reset() first"
        a = np.asarray(action, dtype=np.float32).reshape(-1)
        if a.shape != (4,) or not np.all(np.isfinite(a)):
            raise ValueError(f"a MetaWorld action is 4 finite numbers (dx, dy, dz, gripper), got {action!r}")
        self.raw, _, _, truncated, info = self.env.step(np.clip(a, -1.0, 1.0))
        self.t += 1
        self.success = self.success or bool(info["success"])
        return self.success, self.success or self.t >= self.horizon or bool(truncated)

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
        self.env.close()

    def __enter__(self) -> MetaWorldEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- demonstrations -------------------------------------------------------------------------------------
def generate(spec: MetaWorldSpec | str, seeds: range, image_size: int = 64, num_cameras: int = 1,
             noise: float = 0.1, chunk_len: int = DATASET_CHUNK, frame_every: int = 1) -> Dataset:
    """Expert demonstrations, one episode per (task, seed), as the sim's Dataset (same .npz format).

    The executed actions are perturbed (DART-style: Gaussian noise on the xyz deltas in half the steps) so
    the data covers recoveries; each sample's label is the expert's clean actions from that step on along
    the executed trajectory. Episodes the expert fails within the horizon are dropped (and counted).
    `frame_every` renders and records every n-th step only (calibration sets need few frames)."""
    spec = MetaWorldSpec.parse(spec) if isinstance(spec, str) else spec
    cams = spec.camera_names(num_cameras)
    images: list[np.ndarray] = []
    states: list[np.ndarray] = []
    positions: list[np.ndarray] = []
    actions: list[np.ndarray] = []
    instr: list[str] = []
    episodes: list[int] = []
    failed: dict[str, int] = {}
    for ti, task in enumerate(spec.tasks):
        t0, before = time.perf_counter(), len(states)
        with MetaWorldEnv(task, cams, image_size, spec.horizon) as env:
            for k, seed in enumerate(seeds):
                rng = np.random.default_rng([20_000_000 + seed, zlib.crc32(task.encode())])
                ep = _demo(env, seed, rng, noise, chunk_len, frame_every)
                if ep is None:
                    failed[task] = failed.get(task, 0) + 1
                    continue
                for imgs, state, where, label in ep:
                    images.append(np.stack(imgs))
                    instr.append(env.instruction)
                    states.append(state)
                    positions.append(where)
                    actions.append(label)
                    episodes.append(k * len(spec.tasks) + ti)  # interleaved: a tail split holds every task
        log.info("%s: %d frames from %d demonstrations (%d failed) in %.1f s", task, len(states) - before,
                 len(seeds) - failed.get(task, 0), failed.get(task, 0), time.perf_counter() - t0)
    if not states:
        raise EdgeVlaError(f"the MetaWorld experts solved none of the {len(seeds)} episodes per task of {spec}; "
                           "raise horizon= or lower --noise")
    meta = dataset_meta(spec, cams, image_size, seeds, noise, frame_every) | {"expert_failures": failed}
    return recorded_dataset(images, instr, states, positions, actions, episodes, meta)


def dataset_meta(spec: MetaWorldSpec, cams: tuple[str, ...], image_size: int, seeds: range, noise: float,
                 frame_every: int) -> dict[str, Any]:
    """The meta every MetaWorld dataset carries (demonstrations and DAgger rounds alike): what datasets trained
    together must agree on (export/data.py SAME_META) is written in one place."""
    return {
        "format_version": FORMAT_VERSION, "task": "metaworld", "env": str(replace(spec, cameras=cams)),
        "tasks": list(spec.tasks), "cameras": list(cams), "image_size": image_size, "num_cameras": len(cams),
        "seeds": [seeds.start, seeds.stop], "noise": noise, "horizon": spec.horizon, "frame_every": frame_every,
        "action_period_s": ACTION_PERIOD_S, "action_space": action_space().to_dict(), "state_names": list(STATE_NAMES),
    }


def recorded_dataset(images: list[np.ndarray], instructions: list[str], states: list[np.ndarray],
                     positions: list[np.ndarray], labels: list[np.ndarray], episodes: list[int],
                     meta: dict[str, Any]) -> Dataset:
    """Per-frame records -> the Dataset (.npz format): frames stacked, float32 states/labels/goals, int32 episodes."""
    return Dataset(
        images=np.stack(images), instructions=np.array(instructions), states=np.stack(states).astype(np.float32),
        actions=np.stack(labels).astype(np.float32), episodes=np.array(episodes, dtype=np.int32),
        goals=np.stack(positions).astype(np.float32), meta=meta,
    )


def _demo(env: MetaWorldEnv, seed: int, rng: np.random.Generator, noise: float, chunk_len: int,
          frame_every: int) -> list[tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]] | None:
    env.reset(seed)
    frames: list[tuple[int, list[np.ndarray], np.ndarray, np.ndarray]] = []
    clean: list[np.ndarray] = []
    done = success = False
    while not done:
        a = env.expert_action()
        if env.t % frame_every == 0:
            frames.append((env.t, env.render(), env.state, env.positions))
        clean.append(a)
        executed = a.copy()
        if noise > 0 and rng.random() < 0.5:
            executed[:3] += rng.normal(0.0, noise, size=3).astype(np.float32)
        success, done = env.step(np.clip(executed, -1.0, 1.0))
    if not success:
        return None
    # Labels past the last recorded step: the expert keeps acting (unperturbed) for one more chunk.
    while len(clean) < env.t + chunk_len - 1 and env.env.curr_path_length < MAX_PATH_LENGTH:
        a = env.expert_action()
        clean.append(a)
        env.step(a)
    padded = np.stack(clean + [clean[-1]] * chunk_len)
    return [(imgs, state, where, padded[t:t + chunk_len]) for t, imgs, state, where in frames]


# --- closed-loop evaluation -----------------------------------------------------------------------------
@dataclass(frozen=True)
class SuiteResult:
    """Success per task, per difficulty group and overall; `overall.outcomes` runs task by task, in seed order,
    so two contenders on the same spec, episodes and seeds pair up (`sim.evaluate.paired_difference`)."""

    overall: EvalResult
    tasks: dict[str, EvalResult] = field(default_factory=dict)

    def groups(self) -> dict[str, EvalResult]:
        out = {}
        for group in DIFFICULTIES:
            members = [r for t, r in self.tasks.items() if TASKS[t][0] == group]
            if members:
                out[group] = _pool(f"{self.overall.name} [{group}]", members, self.overall.seed_base)
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"overall": self.overall.as_dict(), "tasks": {t: r.as_dict() for t, r in self.tasks.items()},
                "groups": {g: r.as_dict() for g, r in self.groups().items()}}


def _pool(name: str, results: list[EvalResult], seed_base: int) -> EvalResult:
    outcomes = tuple(o for r in results for o in r.outcomes)
    n, k = len(outcomes), sum(outcomes)
    lo, hi = wilson_interval(k, n)
    steps = sum(r.mean_steps * r.episodes for r in results) / max(n, 1)
    return EvalResult(name, n, k, lo, hi, steps, seed_base, 0, outcomes)


def evaluate(policy: ChunkPolicy | None, spec: MetaWorldSpec | str, episodes: int = 20,
             seed_base: int = EVAL_SEED_BASE, image_size: int = 64, num_cameras: int = 1, execute: int = EXECUTE,
             name: str = "policy", reseed: Reseed | None = None) -> SuiteResult:
    """`episodes` held-out seeded episodes per task. Each chunk's first `execute` actions run before the next
    observation is rendered; `policy=None` runs the scripted expert (one action per step, nothing rendered)."""
    check_execute(execute)
    spec = MetaWorldSpec.parse(spec) if isinstance(spec, str) else spec
    cams = spec.camera_names(num_cameras)
    per_task: dict[str, EvalResult] = {}
    for task in spec.tasks:
        t0 = time.perf_counter()
        outcomes, steps = [], []
        with MetaWorldEnv(task, cams, image_size, spec.horizon) as env:
            for i in range(episodes):
                seed = seed_base + i
                env.reset(seed)
                if reseed is not None:
                    reseed(seed)
                done = False
                while not done:
                    chunk = env.expert_action()[None] if policy is None else np.asarray(policy(env.observation()))
                    for a in chunk[:execute]:
                        _, done = env.step(a)
                        if done:
                            break
                outcomes.append(int(env.success))
                steps.append(env.t)
        k = sum(outcomes)
        lo, hi = wilson_interval(k, episodes)
        per_task[task] = EvalResult(f"{name} [{task}]", episodes, k, lo, hi, float(np.mean(steps)) if steps else 0.0,
                                    seed_base, 0, tuple(outcomes))
        log.info("%s in %.1f s", per_task[task], time.perf_counter() - t0)
    return SuiteResult(_pool(name, list(per_task.values()), seed_base), per_task)


def evaluate_expert(spec: MetaWorldSpec | str, episodes: int = 20, seed_base: int = EVAL_SEED_BASE) -> SuiteResult:
    return evaluate(None, spec, episodes, seed_base, name="expert")


def random_policy(seed: int = 0, chunk_len: int = 8) -> ChunkPolicy:
    rng = np.random.default_rng(seed)
    return lambda obs: rng.uniform(-1.0, 1.0, size=(chunk_len, 4)).astype(np.float32)


def weighted_anchor(tasks: Iterable[str], anchor: dict[str, float]) -> float:
    """An anchor's per-difficulty success averaged over these tasks (each task weighs the same): the figure
    to compare a run on a subset (e.g. MT10: 7 easy, 1 medium, 2 hard) with, not the 50-task average."""
    groups = [TASKS[t][0] for t in tasks]
    return sum(anchor[g] for g in groups) / max(len(groups), 1)


def table(results: list[SuiteResult], spec: MetaWorldSpec | str) -> str:
    """Markdown: one row per task and per difficulty group, one column per contender; anchors beside."""
    spec = MetaWorldSpec.parse(spec) if isinstance(spec, str) else spec
    names = [r.overall.name for r in results]
    head = "| task | difficulty | " + " | ".join(names) + " |\n|---|---|" + "---:|" * len(names) + "\n"

    def cell(r: EvalResult | None) -> str:
        return "-" if r is None else f"{100 * r.success_rate:.0f}% ({r.successes}/{r.episodes})"

    lines = [f"| {t} | {TASKS[t][0]} | " + " | ".join(cell(r.tasks.get(t)) for r in results) + " |"
             for t in spec.tasks]
    groups = [r.groups() for r in results]
    for g in DIFFICULTIES:
        if g in groups[0]:
            lines.append(f"| **{g}** | | " + " | ".join(cell(gr.get(g)) for gr in groups) + " |")
    lines.append("| **all (task mean)** | | " + " | ".join(
        f"{100 * r.overall.success_rate:.1f}% (95% CI {100 * r.overall.ci_low:.0f}-{100 * r.overall.ci_high:.0f})"
        for r in results) + " |")
    counts = {g: sum(TASKS[t][0] == g for t in spec.tasks) for g in DIFFICULTIES}
    mix = ", ".join(f"{n} {g}" for g, n in counts.items() if n)
    anchors = "\n".join(f"- {name}: " + " / ".join(f"{a[g]:.1f}" for g in DIFFICULTIES)
                        + f" (easy / medium / hard / very hard); weighted for these tasks ({mix}): "
                        f"{weighted_anchor(spec.tasks, a):.1f}%" for name, a in ANCHORS.items())
    return head + "\n".join(lines) + "\n\nPublished anchors (not like-for-like):\n" + anchors + "\n"


def summary(r: SuiteResult) -> str:
    groups = ", ".join(f"{g} {100 * x.success_rate:.0f}%" for g, x in r.groups().items())
    return f"{r.overall} [{groups}]"


def episodes_for(count: int, tasks: int, frames_per_episode: int = 12) -> int:
    """Episodes per task that give about `count` recorded frames (calibration sets)."""
    return max(1, math.ceil(count / max(1, tasks * frames_per_episode)))
