"""`edge-vla make-data`: write expert demonstrations from the sim."""

from __future__ import annotations

import argparse
import logging

from edge_vla.sim import dataset

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", default="runs/data/reach.npz", help="output .npz file")
    parser.add_argument("--episodes", type=int, default=300, help="number of expert episodes")
    parser.add_argument("--seed", type=int, default=0, help="first episode seed (held-out eval seeds start at 1e6)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--cameras", type=int, default=1)
    parser.add_argument("--noise", type=float, default=0.15, help="std of the executed-action perturbation (rad)")


def main(args: argparse.Namespace) -> int:
    ds = dataset.generate(
        range(args.seed, args.seed + args.episodes), args.image_size, args.cameras, noise=args.noise
    )
    path = dataset.save(ds, args.output)
    print(f"wrote {len(ds)} samples from {args.episodes} episodes to {path}")
    return 0
