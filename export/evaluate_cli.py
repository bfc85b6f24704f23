"""`edge-vla evaluate`: closed-loop success of checkpoints, bundles, the expert or random actions.

Several targets run on the same episode seeds and the same noise per episode, and each is compared
with the first pair by pair (`paired_difference`): that is how the compression table is made.
`TARGET@N` evaluates a checkpoint or bundle with N ODE steps. With --data lerobot:PATH, an open-loop
action-error check on a recorded dataset's held-out episodes instead (for robots without a simulator).
With --env metaworld:TASKS (the default for a model trained on MetaWorld), every contender runs --episodes
held-out episodes per task, reported per task and per difficulty group beside the published anchors.
--env sim:hard runs the sim's hard split (the default for a model trained on it); a model trained on the
base split is evaluated on hard only when asked (`--env sim:hard`).
--latency-ms 0,100,200 injects inference latency (edge_vla.sim.latency_eval, docs/rtc.md "Latency model"): every
--strategies chunk strategy at every latency on the same seeds and latency draws, one table per target.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_vla.atomic import atomic_write
from edge_vla.cli_flags import deprecation_line
from edge_vla.errors import ConfigError, EdgeVlaError
from edge_vla.sim.cli import ENV_HELP
from edge_vla.sim.evaluate import (
    EVAL_SEED_BASE,
    EXECUTE,
    ChunkPolicy,
    EvalResult,
    Reseed,
    check_execute,
    evaluate,
    paired_difference,
    random_policy,
)
from edge_vla.sim.expert import expert_chunk
from edge_vla.sim.latency_eval import (
    DEFAULT_STRATEGIES,
    LATENCY_SIGMA,
    NOMINAL_QUANTILE,
    STRATEGIES,
    LatencyGrid,
    SimExpert,
    check_grid,
    evaluate_latency,
    evaluate_latency_metaworld,
    parse_latencies,
    parse_strategies,
    with_zero,
)
from edge_vla.sim.metaworld import MetaWorldSpec, is_metaworld
from edge_vla.sim.splits import is_sim, sim_split

from .envs import resolve_env

log = logging.getLogger(__name__)


OPEN_LOOP_SAMPLES = 256
# The flags of the open-loop check on recorded data (--data), and what each means in the sim instead.
OPEN_LOOP_ONLY = {
    "teacher": ("--teacher", "compares the model with a teacher in the open-loop check on recorded data",
                "in the sim, give the teacher as another TARGET: each target is compared with the first"),
    "samples": ("--samples", "sizes the open-loop check on recorded data", "in the sim, --episodes sets the size"),
    "seed": ("--seed", "seeds the open-loop check's noise on recorded data",
             "in the sim, --seed-base picks the episodes"),
}
# The flags of the closed-loop sim evaluation, which the open-loop check on recorded data (--data) does not read:
# dest -> (flag, what it does, its open-loop counterpart if any). Their defaults are None in the parser, so that
# one given (even at its default value) is seen and refused beside --data rather than dropped; SIM_DEFAULTS fills
# them in after that check.
CLOSED_LOOP_ONLY = {
    "sensitivity": ("--sensitivity", "reruns the sim episodes with another block named", ""),
    "onboard": ("--onboard", "runs the sim episodes through the onboard stack", ""),
    "episodes": ("--episodes", "sets how many sim episodes run", "its size is --samples"),
    "env": ("--env", "picks the environment of closed-loop episodes", ""),
    "execute": ("--execute", "sets how many actions of each chunk a sim episode plays", ""),
    "seed_base": ("--seed-base", "picks the sim episodes", "its noise is seeded by --seed"),
    "latency_ms": ("--latency-ms", "injects inference latency into sim episodes", ""),
    "strategies": ("--strategies", "picks the chunk strategies of a sim latency evaluation", ""),
    "latency_sigma": ("--latency-sigma", "shapes the latency draws of a sim latency evaluation", ""),
}
SIM_EPISODES = 100
SIM_DEFAULTS = {"episodes": SIM_EPISODES, "seed_base": EVAL_SEED_BASE, "execute": EXECUTE}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("targets", nargs="+", metavar="TARGET",
                        help="checkpoint dir (edge-vla or transformers π0), bundle dir, expert or random; TARGET@N runs N "
                             "ODE steps. "
                             "With several, each is compared with the first on the same episodes and noise")
    # --episodes, --seed-base, --execute and --latency-sigma default to None: see CLOSED_LOOP_ONLY.
    parser.add_argument("--episodes", type=int, default=None,
                        help=f"held-out seeded episodes (MetaWorld: per task; default {SIM_EPISODES})")
    parser.add_argument("--env", default=None, help=ENV_HELP + "; default: the environment the first model target "
                        "was trained in")
    parser.add_argument("--seed-base", type=int, default=None, help=f"first episode seed (default {EVAL_SEED_BASE})")
    parser.add_argument("--steps", type=int, default=None, help="ODE steps (default: the model's)")
    parser.add_argument("--solver", choices=["euler", "heun", "midpoint"], default="euler")
    parser.add_argument("--sensitivity", action="store_true",
                        help="also run every episode with another block named (instruction sensitivity)")
    parser.add_argument("--json", nargs="?", const=True, default=None, metavar="FILE",
                        help="print the results as JSON on stdout (the human-readable lines go to stderr). "
                             "Deprecated: --json FILE, now --json-out FILE")
    parser.add_argument("--json-out", default=None, metavar="FILE", help="also write the results as JSON here")
    parser.add_argument("--data", default=None, help="lerobot:PATH: an open-loop check on the dataset's held-out "
                        "episodes instead of closed-loop sim episodes (for robots without a simulator)")
    parser.add_argument("--teacher", default=None, help="with --data: a checkpoint or bundle to compare against, "
                        "run from the same noise")
    # None defaults, so that one given without --data is seen (and refused) rather than ignored.
    parser.add_argument("--samples", type=int, default=None,
                        help=f"with --data: at most this many held-out chunks (default {OPEN_LOOP_SAMPLES})")
    parser.add_argument("--seed", type=int, default=None, help="with --data: seed of the chunks' noise (default 0)")
    parser.add_argument("--execute", type=int, default=None,
                        help=f"actions played from each chunk before the policy replans (default {EXECUTE}; 1 replans "
                             "every action, closest to the onboard loop, which replans as soon as inference is free)")
    parser.add_argument("--onboard", action="store_true",
                        help="run one bundle (or expert) through the onboard stack (control loop at 100 Hz, firmware "
                             "emulator on a pty) and compare with the offline runtime on the same seeds")
    parser.add_argument("--latency-ms", default=None, metavar="MS[,MS...]",
                        help="inject inference latency: evaluate every --strategies chunk strategy at each of these "
                             "nominal latencies (0 is always added: the paired baseline) on the same seeds and latency "
                             "draws (docs/rtc.md, 'Latency model'). Sim actions are 100 ms, MetaWorld's 12.5 ms")
    parser.add_argument("--strategies", default=None, metavar="NAME[,NAME...]",
                        help=f"with --latency-ms: chunk strategies, of {', '.join(STRATEGIES)} (default "
                             f"{','.join(DEFAULT_STRATEGIES)}; rtc needs a policy trained with --rtc-max-delay)")
    parser.add_argument("--latency-sigma", type=float, default=None, metavar="SIGMA",
                        help="with --latency-ms: lognormal spread of the per-inference latency, whose 90th percentile "
                             f"is the nominal latency (default {LATENCY_SIGMA}; 0: every inference takes exactly the "
                             "nominal)")


@dataclass
class Contender:
    name: str
    act: ChunkPolicy
    reseed: Reseed | None
    image_size: int = 64
    num_cameras: int = 1
    dims: tuple[int, int] | None = None  # (state, action) dims of a model

    def run(self, episodes: int, seed_base: int, target_shift: int = 0, split: str = "base",
            execute: int = EXECUTE) -> EvalResult:
        label = self.name + (" (another block named)" if target_shift else "")
        reseed = progress(label, episodes, self.reseed)
        if self.name == "expert":  # it reads the scene, which a learned policy cannot: it gets the env
            from edge_vla.sim.env import ReachEnv

            env = ReachEnv(split=split)

            def act(obs: Any) -> Any:
                assert env.scene is not None
                return expert_chunk(env.scene, obs.state, 8)

            return evaluate(act, episodes, seed_base, name="expert", env=env, target_shift=target_shift,
                            reseed=reseed)
        return evaluate(self.act, episodes, seed_base, image_size=self.image_size, num_cameras=self.num_cameras,
                        execute=execute, name=self.name, target_shift=target_shift, reseed=reseed, split=split)

    def run_metaworld(self, env: str, episodes: int, seed_base: int, execute: int = EXECUTE) -> Any:
        from edge_vla.sim import metaworld

        if self.name == "expert":
            return metaworld.evaluate_expert(env, episodes, seed_base)
        act = self.metaworld_policy(env)
        return metaworld.evaluate(act, env, episodes, seed_base, self.image_size, self.num_cameras, execute=execute,
                                  name=self.name, reseed=self.reseed)

    def metaworld_policy(self, env: str) -> ChunkPolicy:
        from edge_vla.sim import metaworld

        act = metaworld.random_policy() if self.name == "random" else self.act
        if self.dims is not None and self.dims != (4, 4):
            raise ConfigError(f"{self.name} takes a {self.dims[0]}-D state and returns {self.dims[1]}-D actions; "
                              f"MetaWorld's are 4-D (train on `edge-vla make-data --env {env}` data), or evaluate it "
                              "with --env sim")
        return act

    def run_latency(self, args: argparse.Namespace, env: str, split: str, strategies: list[str],
                    latencies: list[float]) -> LatencyGrid:
        """Every strategy at every latency on the same seeds (edge_vla.sim.latency_eval)."""
        tasks = len(MetaWorldSpec.parse(env).tasks) if is_metaworld(env) else 1  # MetaWorld: --episodes per task
        reseed = progress(f"{self.name} (latency grid)",
                          args.episodes * tasks * len(strategies) * len(with_zero(latencies)), self.reseed)
        common = {"strategies": strategies, "latencies_ms": latencies, "episodes": args.episodes,
                  "seed_base": args.seed_base, "execute": args.execute, "name": self.name, "reseed": reseed,
                  "sigma": args.latency_sigma}
        if is_metaworld(env):
            if self.name == "expert":
                raise ConfigError(METAWORLD_EXPERT_HAS_NO_CHUNK)
            return evaluate_latency_metaworld(self.metaworld_policy(env), env, image_size=self.image_size,
                                              num_cameras=self.num_cameras, **common)
        if self.name == "expert":  # it reads the scene, which a learned policy cannot: it gets the env
            from edge_vla.sim.env import ReachEnv

            sim = ReachEnv(split=split)
            return evaluate_latency(SimExpert(sim), env=sim, split=split, **common)
        return evaluate_latency(self.act, image_size=self.image_size, num_cameras=self.num_cameras, split=split,
                                **common)


METAWORLD_EXPERT_HAS_NO_CHUNK = ("MetaWorld's scripted expert acts one step at a time from the full state, so it has no "
                                 "chunk to delay; evaluate a model or random with --latency-ms on MetaWorld")


class BundleAct:
    """A bundle as a chunk policy; one trained for real-time chunking also takes the action prefix (rtc)."""

    def __init__(self, policy: Any) -> None:
        self.policy = policy
        self.rtc_max_delay = int(getattr(policy, "rtc_max_delay", 0) or 0)

    def __call__(self, obs: Any, prefix: Any = None) -> Any:
        if prefix is None:
            return self.policy.infer(obs).actions
        return self.policy.infer(obs, prefix=prefix).actions


def progress(label: str, episodes: int, reseed: Reseed | None) -> Reseed:
    """A per-episode hook (evaluate calls it as each episode starts) that logs about every tenth of the run."""
    every = max(1, round(episodes / 10))
    started = time.monotonic()
    count = 0

    def hook(seed: int) -> None:
        nonlocal count
        count += 1
        if count == 1 or count % every == 0 or count == episodes:
            log.info("%s: episode %d/%d (%.0f s)", label, count, episodes, time.monotonic() - started)
        if reseed is not None:
            reseed(seed)

    return hook


def load_contender(spec: str, steps: int | None, solver: str) -> Contender:
    target, _, at = spec.partition("@")
    if at:
        try:
            steps = int(at)
        except ValueError:
            raise EdgeVlaError(f"{spec!r}: the part after @ must be an ODE step count, e.g. {target}@2") from None
    if target == "expert":
        return Contender("expert", lambda obs: obs, None)
    if target == "random":
        return Contender("random", random_policy(), None)
    path = Path(target)
    if (path / "manifest.json").is_file():
        from edge_vla.runtime.policy import Policy

        policy = Policy.load(path, steps=steps, solver=solver)
        cfg = policy.config
        name = f"bundle {target} ({policy.precision}, {policy.steps} steps)"
        if isinstance(cfg, dict):  # a π0 bundle: the sim's own frames, which the policy resizes as π0 does
            return Contender(name, BundleAct(policy), policy.reset, num_cameras=int(cfg["num_cameras"]))
        return Contender(name, BundleAct(policy), policy.reset, cfg.image_size, cfg.num_cameras,
                         (cfg.state_dim, cfg.action_dim))
    if not path.exists():
        raise EdgeVlaError(f"{target} does not exist; pass a checkpoint dir, a bundle dir, expert or random")
    from .families import for_checkpoint

    ckpt = for_checkpoint(path).torch_policy(target, steps, solver)
    size = {} if ckpt.image_size is None else {"image_size": ckpt.image_size}  # None: it resizes the sim's frames
    return Contender(ckpt.name, ckpt.act, ckpt.reset, num_cameras=ckpt.num_cameras, dims=ckpt.dims, **size)


def main(args: argparse.Namespace) -> int:
    """--json prints the JSON document on stdout (everything else goes to stderr); --json-out FILE writes it."""
    if isinstance(args.json, str):  # the old --json FILE
        log.warning(deprecation_line("--json FILE", "--json-out FILE", "evaluate"))
        args.json_out, args.json = args.json_out or args.json, None
    if not args.json:
        return _main(args)
    with tempfile.TemporaryDirectory(prefix="edge-vla-evaluate-") as tmp:
        keep = args.json_out
        args.json_out = keep or str(Path(tmp) / "results.json")
        with contextlib.redirect_stdout(sys.stderr):
            rc = _main(args)
        if rc == 0:
            sys.stdout.write(Path(args.json_out).read_text())
        args.json_out = keep
    return rc


def _latency_args(args: argparse.Namespace) -> tuple[list[str], list[float]] | None:
    """(strategies, latencies) with --latency-ms, None without; every flag conflict refused in one line."""
    latency = getattr(args, "latency_ms", None)
    if latency is None:
        for flag, dest, what in (("--strategies", "strategies", "chooses the chunk strategies"),
                                 ("--latency-sigma", "latency_sigma", "shapes the latency draws")):
            if getattr(args, dest, None) is not None:
                raise ConfigError(f"{flag} {what} of a latency evaluation; add --latency-ms, e.g. --latency-ms "
                                  f"0,100,200, or drop {flag}")
        return None
    for flag, given in (("--data", args.data is not None), ("--onboard", args.onboard),
                        ("--sensitivity", args.sensitivity)):
        if given:
            raise ConfigError(f"--latency-ms runs closed-loop sim episodes; drop {flag} (or run it separately)")
    if getattr(args, "latency_sigma", None) is None:
        args.latency_sigma = LATENCY_SIGMA
    sigma = args.latency_sigma
    if not 0 <= sigma <= 2:  # nan fails this too
        raise ConfigError(f"--latency-sigma {sigma}: give a spread in 0-2 (0: every inference takes the nominal)")
    return parse_strategies(args.strategies or ",".join(DEFAULT_STRATEGIES)), parse_latencies(latency)


def _check_open_loop_flags(args: argparse.Namespace) -> None:
    """Without --data, a flag of the open-loop check used to be dropped without a word (the sim evaluation ran)."""
    if getattr(args, "data", None) is not None:
        return
    for dest, (flag, what, instead) in OPEN_LOOP_ONLY.items():
        if getattr(args, dest, None) is not None:
            raise ConfigError(f"{flag} {what}; add --data lerobot:PATH, or drop {flag} ({instead})")


def _check_closed_loop_flags(args: argparse.Namespace) -> None:
    """With --data, a flag of the closed-loop sim evaluation used to be dropped without a word (the open-loop check
    ran, read none of them, and exited 0)."""
    if getattr(args, "data", None) is None:
        return
    for dest, (flag, what, counterpart) in CLOSED_LOOP_ONLY.items():
        value = getattr(args, dest, None)
        if value is not None and value is not False:  # False: a store_true flag not given (0 is a given value)
            instead = f" ({counterpart})" if counterpart else ""
            raise ConfigError(f"{flag} {what}; --data runs an open-loop check on recorded data instead{instead}: "
                              f"drop --data to evaluate in the sim, or drop {flag}")


def _fill_sim_defaults(args: argparse.Namespace) -> None:
    """The closed-loop flags' defaults, once `_check_closed_loop_flags` has seen which were given."""
    for dest, default in SIM_DEFAULTS.items():
        if getattr(args, dest, None) is None:
            setattr(args, dest, default)


def _main(args: argparse.Namespace) -> int:
    _check_open_loop_flags(args)  # before anything runs or loads
    _check_closed_loop_flags(args)
    _fill_sim_defaults(args)
    grid = _latency_args(args)
    if args.data is not None:
        return _open_loop(args)
    if args.onboard:
        from edge_vla.onboard.evaluate import OnboardEvalConfig, compare

        if len(args.targets) != 1:
            raise EdgeVlaError("--onboard evaluates one bundle directory (or expert) at a time")
        onboard_env = resolve_env(args.env, args.targets)
        if not is_sim(onboard_env) or sim_split(onboard_env) != "base":
            raise ConfigError(f"--onboard runs the sim's base split only, not {onboard_env!r}; drop --onboard to "
                              "evaluate offline")
        compare(args.targets[0], args.episodes, args.seed_base, OnboardEvalConfig(steps=args.steps), args.json_out)
        return 0
    env = resolve_env(args.env, args.targets)
    if not is_sim(env) and not is_metaworld(env):
        raise ConfigError(f"--env {env!r}: use {ENV_HELP}")
    split = sim_split(env) if is_sim(env) else "base"  # an unknown sim:SPLIT fails here, before loading models
    check_execute(args.execute)  # before any model loads
    contenders = [load_contender(t, args.steps, args.solver) for t in args.targets]
    if grid is not None:
        return _latency(args, env, split, contenders, *grid)
    if is_metaworld(env):
        return _metaworld(args, env, contenders)
    if split != "base":
        print(f"sim split: {split}")
    if args.execute != EXECUTE:
        print(f"replanning every {args.execute} action(s)")
    rows: list[dict] = []
    base: list[EvalResult] = []
    swapped: list[EvalResult] = []
    for c in contenders:
        result = c.run(args.episodes, args.seed_base, split=split, execute=args.execute)
        base.append(result)
        print(result)
        row = {"result": result.as_dict()}
        if args.sensitivity:
            other = c.run(args.episodes, args.seed_base, target_shift=1, split=split, execute=args.execute)
            swapped.append(other)
            print(f"  instruction sensitivity (another block named in the same layout): {_pct(other)}")
            row["instruction_sensitivity"] = other.as_dict()
        rows.append(row)
    pairs = []
    for results, label in ((base, ""), (swapped, " (swapped instruction)")):
        for other in results[1:]:
            diff = paired_difference(other, results[0])
            print(f"paired{label}: {diff}")
            pairs.append(diff.as_dict() | {"swapped_instruction": bool(label)})
    if args.json_out:
        doc = {"env": env, "split": split, "episodes": args.episodes, "seed_base": args.seed_base, "execute": args.execute,
               "contenders": rows, "paired": pairs}
        with atomic_write(Path(args.json_out), "w") as f:
            f.write(json.dumps(doc, indent=2) + "\n")
    return 0


def _metaworld(args: argparse.Namespace, env: str, contenders: list[Contender]) -> int:
    from edge_vla.sim import metaworld

    if args.sensitivity:
        raise ConfigError("--sensitivity swaps the sim's block colour; MetaWorld has one instruction per task")
    results = []
    for c in contenders:
        result = c.run_metaworld(env, args.episodes, args.seed_base, args.execute)
        results.append(result)
        print(metaworld.summary(result))
    print()
    print(metaworld.table(results, env))
    pairs = []
    for other in results[1:]:
        diff = paired_difference(other.overall, results[0].overall)
        print(f"paired: {diff}")
        pairs.append(diff.as_dict())
    if args.json_out:
        doc = {"env": env, "episodes_per_task": args.episodes, "seed_base": args.seed_base,
               "contenders": [r.as_dict() for r in results], "paired": pairs,
               "anchors": metaworld.ANCHORS, "table": metaworld.table(results, env)}
        with atomic_write(Path(args.json_out), "w") as f:
            f.write(json.dumps(doc, indent=2) + "\n")
    return 0


def _latency(args: argparse.Namespace, env: str, split: str, contenders: list[Contender], strategies: list[str],
             latencies: list[float]) -> int:
    for c in contenders:  # every refusal before any episode runs
        if c.name == "expert" and is_metaworld(env):
            raise ConfigError(METAWORLD_EXPERT_HAS_NO_CHUNK)
        if c.name != "expert":  # the sim's expert runs as SimExpert, which takes a prefix
            check_grid(c.act, strategies, with_zero(latencies), c.name)
    grids = []
    for c in contenders:
        grid = c.run_latency(args, env, split, strategies, latencies)
        grids.append(grid)
        print(f"{c.name}: {env}, {args.episodes} episode(s){' per task' if is_metaworld(env) else ''}, action period "
              f"{1000 * grid.action_period_s:g} ms, replanning every {grid.execute} action(s), latency lognormal "
              f"sigma {grid.sigma:g} with the nominal as its 90th percentile")
        print(grid.table())
    if args.json_out:
        doc = {"env": env, "split": split, "episodes": args.episodes, "seed_base": args.seed_base,
               "execute": args.execute, "latency": {"nominal_ms": with_zero(latencies), "strategies": strategies,
                                                    "sigma": args.latency_sigma, "nominal_quantile": NOMINAL_QUANTILE},
               "contenders": [g.as_dict() for g in grids]}
        with atomic_write(Path(args.json_out), "w") as f:
            f.write(json.dumps(doc, indent=2) + "\n")
    return 0


def _pct(r: EvalResult) -> str:
    return f"{100 * r.success_rate:.1f}% (95% CI {100 * r.ci_low:.1f}-{100 * r.ci_high:.1f}%, {r.successes}/{r.episodes})"




def _open_loop(args: argparse.Namespace) -> int:
    from .lerobot.open_loop import open_loop

    if len(args.targets) != 1:
        raise EdgeVlaError("--data takes one checkpoint or bundle; compare against another with --teacher")
    samples = OPEN_LOOP_SAMPLES if args.samples is None else args.samples
    result = open_loop(args.targets[0], args.data, args.teacher, max_samples=samples, seed=args.seed or 0,
                       steps=args.steps, solver=args.solver)
    print(result)
    if args.json_out:
        with atomic_write(Path(args.json_out), "w") as f:
            f.write(json.dumps(result.as_dict(), indent=2) + "\n")
    return 0
