"""`edge-vla evaluate`: closed-loop success of a checkpoint, a bundle, the expert, or random actions; with
--data lerobot:PATH, an open-loop action-error check on a recorded dataset's held-out episodes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edge_vla.sim.evaluate import evaluate, evaluate_expert, random_policy


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", help="checkpoint dir, bundle dir, or one of: expert, random")
    parser.add_argument("--episodes", type=int, default=100, help="held-out seeded episodes")
    parser.add_argument("--steps", type=int, default=None, help="ODE steps (default: the model's)")
    parser.add_argument("--solver", choices=["euler", "heun", "midpoint"], default="euler")
    parser.add_argument("--json", dest="json_out", default=None, help="also write the result as JSON here")
    parser.add_argument("--data", default=None, help="lerobot:PATH: an open-loop check on the dataset's held-out "
                        "episodes instead of closed-loop sim episodes (for robots without a simulator)")
    parser.add_argument("--teacher", default=None, help="with --data: a checkpoint or bundle to compare against, "
                        "run from the same noise")
    parser.add_argument("--samples", type=int, default=256, help="with --data: at most this many held-out chunks")
    parser.add_argument("--seed", type=int, default=0, help="with --data: noise seed")


def main(args: argparse.Namespace) -> int:
    if args.data is not None:
        from .lerobot.open_loop import open_loop

        result = open_loop(args.target, args.data, args.teacher, max_samples=args.samples, seed=args.seed,
                           steps=args.steps, solver=args.solver)
    elif args.target == "expert":
        result = evaluate_expert(args.episodes)
    elif args.target == "random":
        result = evaluate(random_policy(), args.episodes, name="random")
    elif (Path(args.target) / "manifest.json").is_file():
        from edge_vla.runtime.policy import Policy

        policy = Policy.load(args.target, steps=args.steps, solver=args.solver)
        cfg = policy.config
        result = evaluate(lambda obs: policy.infer(obs).actions, args.episodes, image_size=cfg.image_size,
                          num_cameras=cfg.num_cameras, name=f"bundle {args.target} ({policy.precision})")
    else:
        from .checkpoint import load_checkpoint
        from .torch_policy import TorchPolicy

        model, _ = load_checkpoint(args.target)
        cfg = model.config
        result = evaluate(TorchPolicy(model, steps=args.steps, solver=args.solver), args.episodes,
                          image_size=cfg.image_size, num_cameras=cfg.num_cameras, name=f"checkpoint {args.target}")
    print(result)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result.as_dict(), indent=2) + "\n")
    return 0
