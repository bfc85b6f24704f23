"""`edge-vla train`: flow-matching behaviour cloning of a preset on sim (or MetaWorld) demonstrations."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from edge_vla.config import PRESETS, VLAConfig, preset
from edge_vla.errors import ConfigError
from edge_vla.sim import dataset
from edge_vla.sim.cli import ENV_HELP
from edge_vla.sim.metaworld import is_metaworld

from .envs import training_config
from .lerobot.hooks import is_lerobot_source, training_data
from .train import TrainConfig, train


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one model-config field of the preset, e.g. --set vision=conv --set keypoints=8 "
                        "(repeatable; fields as in edge_vla/config.py VLAConfig)")
    parser.add_argument("--data", default=None,
                        help="dataset from `edge-vla make-data` (made if missing; default runs/data/reach.npz, with a "
                        "MetaWorld --env runs/data/metaworld.npz), or lerobot:PATH (a LeRobot v3.0/v2.1 dataset; see "
                        "docs/LEROBOT.md). A MetaWorld dataset sets the model's state, action and camera counts")
    parser.add_argument("--env", default="sim", help="the environment to generate --data from when it is missing: "
                        + ENV_HELP)
    parser.add_argument("-o", "--output", default=None, help="checkpoint directory (default runs/<preset>)")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--lr", type=float, default=TrainConfig.lr)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    parser.add_argument("--checkpoint-every", type=int, default=TrainConfig.checkpoint_every)
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --output")
    parser.add_argument("--episodes", type=int, default=300,
                        help="episodes to generate when --data is missing (MetaWorld: per task)")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """KEY=VALUE strings -> typed config overrides (each value parsed as the field's type)."""
    fields = {f.name: f.type for f in dataclasses.fields(VLAConfig)}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or key not in fields or key == "preset":
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE with KEY one of {sorted(set(fields) - {'preset'})}")
        kind = fields[key]
        try:
            if kind in ("bool", bool):
                if raw.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(raw)
                out[key] = raw.lower() in ("true", "1")
            else:
                out[key] = {"int": int, "float": float, "str": str}[str(kind)](raw)
        except (ValueError, KeyError):
            raise ConfigError(f"--set {item!r}: {raw!r} is not a valid {kind} for {key}") from None
    return out


def main(args: argparse.Namespace) -> int:
    cfg = preset(args.preset, **parse_overrides(args.set))
    mw = is_metaworld(args.env)
    data = args.data or ("runs/data/metaworld.npz" if mw else "runs/data/reach.npz")
    data_path = Path(data)
    if is_lerobot_source(data):
        cfg, ds = training_data(data, cfg)
    else:
        if not data_path.exists():
            print(f"{data_path} not found: generating {args.episodes} expert episodes"
                  + (f" per task of {args.env}" if mw else ""))
            if mw:
                from edge_vla.sim import metaworld

                made = metaworld.generate(args.env, range(args.episodes), cfg.image_size, cfg.num_cameras)
            else:
                made = dataset.generate(range(args.episodes), cfg.image_size, cfg.num_cameras)
            dataset.save(made, data_path)
        ds = dataset.load(data_path)
        cfg = training_config(cfg, ds)
    out = Path(args.output or f"runs/{args.preset}")
    tc = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                     threads=args.threads, checkpoint_every=args.checkpoint_every)
    train(cfg, ds, out, tc, resume=args.resume)
    print(f"checkpoint written to {out}")
    return 0
