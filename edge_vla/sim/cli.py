"""`edge-vla make-data`: write expert demonstrations from the sim (or MetaWorld with --env metaworld:TASKS)."""

from __future__ import annotations

import argparse
import logging

from edge_vla.errors import ConfigError
from edge_vla.sim import dataset
from edge_vla.sim.metaworld import is_metaworld
from edge_vla.sim.scene import get_split
from edge_vla.sim.splits import is_sim, sim_env, sim_split

ENV_HELP = ("sim (default: the project's reaching task; = sim:base), sim:hard (its harder split: 5 blocks of 7 "
            "colours, lighting and colour jitter, distractors) or metaworld:TASKS[?cameras=A,B&horizon=N], e.g. "
            "metaworld:reach-v3,push-v3 or metaworld:mt10 (pip install 'edge-vla[metaworld]')")

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--env", default="sim", help=ENV_HELP)
    parser.add_argument("-o", "--output", default=None,
                        help="output .npz file, or directory with --format lerobot (default runs/data/reach.npz / "
                        "runs/data/reach_lerobot; sim:hard: runs/data/reach_hard.npz / runs/data/reach_hard_lerobot)")
    parser.add_argument("--format", choices=["npz", "lerobot"], default="npz",
                        help="lerobot: LeRobot's dataset layout (parquet + mp4), read back with --data lerobot:DIR")
    parser.add_argument("--lerobot-version", choices=["v3.0", "v2.1"], default="v3.0")
    parser.add_argument("--video-codec", choices=["h264-lossless", "h264", "av1"], default="h264-lossless",
                        help="with --format lerobot: how camera frames are encoded")
    parser.add_argument("--episodes", type=int, default=300, metavar="N",
                        help="sim: scene layouts (seeds); each layout gives one demonstration per block, the "
                             "instruction naming that block, so N layouts give N x blocks demonstrations (3 blocks in "
                             "sim:base, 5 in sim:hard). MetaWorld: episodes per task (default %(default)s)")
    parser.add_argument("--seed", type=int, default=None,
                        help="first episode seed (default 0; with --dagger-policy 300000; held-out eval seeds start at "
                        "1e6)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--cameras", type=int, default=1,
                        help="cameras per frame (MetaWorld: corner2, gripperPOV, ... unless the env names them)")
    parser.add_argument("--noise", type=float, default=None,
                        help="std of the executed-action perturbation (sim: rad, default 0.15; MetaWorld: action "
                        "units on the xyz deltas, default 0.1)")
    parser.add_argument("--dagger-policy", default=None, metavar="CKPT_OR_BUNDLE",
                        help="MetaWorld DAgger round: roll out this checkpoint or bundle (as `edge-vla evaluate` runs it) "
                        "on --episodes seeds per task and record every state it visits, labelled with the scripted "
                        "expert's action chunk from that state (edge_vla/sim/metaworld_dagger.py); train on it beside "
                        "the demonstrations with `edge-vla train --data DEMOS.npz,DAGGER.npz`")
    parser.add_argument("--dagger-beta", type=float, default=None, metavar="B",
                        help="with --dagger-policy: probability per chunk that the expert acts instead (default 0: the "
                        "policy alone; 1: the expert alone)")


def main(args: argparse.Namespace) -> int:
    if args.dagger_policy is not None:
        from edge_vla.sim import metaworld_dagger

        return metaworld_dagger.main(args)
    if args.dagger_beta is not None:
        raise ConfigError("--dagger-beta needs --dagger-policy (the policy the expert is mixed with)")
    args.seed = 0 if args.seed is None else args.seed
    if not is_sim(args.env):
        return _metaworld(args)
    split = sim_split(args.env)
    suffix = "" if split == "base" else f"_{split}"
    args.noise = 0.15 if args.noise is None else args.noise
    ds = dataset.generate(
        range(args.seed, args.seed + args.episodes), args.image_size, args.cameras, noise=args.noise, split=split
    )
    if args.format == "lerobot":
        # Workstation side (pyarrow, av); imported only for this format.
        from edge_vla.export.lerobot import write_dataset
        from edge_vla.sim.scene import JOINT_NAMES

        path = write_dataset(ds, args.output or f"runs/data/reach{suffix}_lerobot", version=args.lerobot_version,
                             encoder=args.video_codec, state_names=list(JOINT_NAMES), action_names=list(JOINT_NAMES),
                             overwrite=True)
        blocks = get_split(split).num_blocks
        print(f"wrote {len(ds)} frames from {args.episodes} layout(s) x {blocks} blocks = {args.episodes * blocks} "
              f"demonstrations to {path} (LeRobot {args.lerobot_version}); "
              f"train on it with --data lerobot:{path}")
        return 0
    path = dataset.save(ds, args.output or f"runs/data/reach{suffix}.npz")
    blocks = get_split(split).num_blocks
    print(f"wrote {len(ds)} samples from {args.episodes} layout(s) x {blocks} blocks = {args.episodes * blocks} "
          f"demonstrations of {sim_env(split)} to {path}")
    return 0


def _metaworld(args: argparse.Namespace) -> int:
    if not is_metaworld(args.env):
        raise ConfigError(f"--env {args.env!r}: use {ENV_HELP}")
    if args.format != "npz":
        raise ConfigError("MetaWorld demonstrations are written as .npz (--format npz)")
    from edge_vla.sim import metaworld

    spec = metaworld.MetaWorldSpec.parse(args.env)
    ds = metaworld.generate(spec, range(args.seed, args.seed + args.episodes), args.image_size, args.cameras,
                            noise=0.1 if args.noise is None else args.noise)
    path = dataset.save(ds, args.output or "runs/data/metaworld.npz")
    failed = sum(ds.meta["expert_failures"].values())
    print(f"wrote {len(ds)} samples from {args.episodes} episodes x {len(spec.tasks)} task(s) of {ds.meta['env']} "
          f"to {path} ({failed} episode(s) the expert failed were dropped)")
    return 0
