"""`edge-vla train`: flow-matching behaviour cloning on sim (or MetaWorld) demonstrations, of an edge-vla
preset or (`--family pi0`) of a reduced transformers π0 (export/pi0/train.py)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from edge_vla.cli_flags import DeprecatedAlias
from edge_vla.config import PRESETS, VLAConfig, preset
from edge_vla.errors import ConfigError
from edge_vla.sim import dataset
from edge_vla.sim.cli import ENV_HELP
from edge_vla.sim.metaworld import is_metaworld
from edge_vla.sim.splits import sim_split

from .data import is_dataset_list, load_training_data, require_finite
from .envs import training_config
from .lerobot.hooks import is_lerobot_source, training_data
from .train import TrainConfig, train

# π0 trains with a smaller batch and learning rate by default (deeper, wider prefix per sample).
PI0_DEFAULTS = {"batch_size": 32, "lr": 5e-4}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--family", choices=["edge-vla", "pi0"], default="edge-vla",
                        help="edge-vla: this project's reference VLA (--preset); pi0: a reduced transformers "
                        "PI0ForConditionalGeneration written as a π0 checkpoint directory (docs/PI0.md)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="edge-vla family only")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one model-config field of the preset, e.g. --set vision=conv --set keypoints=8 "
                        "(repeatable; fields as in edge_vla/config.py VLAConfig; edge-vla family only)")
    parser.add_argument("--rtc-max-delay", type=int, default=None, metavar="D",
                        help="train for real-time chunking: up to D leading actions of each chunk are given clean "
                        "(the actions that execute while the policy thinks) and the rest is learned consistent with "
                        "them (action-prefix conditioning, arXiv 2512.05964; docs/rtc.md). Default 0: off. "
                        "Same as --set rtc_max_delay=D")
    parser.add_argument("--pi0-config", default=None,
                        help="pi0 family: a size (reduced: the default, ~2.3M parameters; wide: ~7.2M) or a JSON "
                        "file of PI0Config keyword arguments merged over the reduced default (export/pi0/train.py)")
    parser.add_argument("--data", default=None,
                        help="dataset from `edge-vla make-data` (default runs/data/reach.npz, with a MetaWorld --env "
                        "runs/data/metaworld.npz: the default path is made if missing, any other path must exist), "
                        "several to train on together as A.npz,B.npz (e.g. "
                        "demonstrations and DAgger rounds: same env, cameras and image size), or lerobot:PATH (a "
                        "LeRobot v3.0/v2.1 dataset; see docs/LEROBOT.md; edge-vla family only). A MetaWorld dataset sets the model's state, action "
                        "and camera counts")
    parser.add_argument("--env", default="sim", help="the environment to generate --data from when it is missing: "
                        + ENV_HELP)
    parser.add_argument("-o", "--output", default=None,
                        help="checkpoint directory (default runs/<preset>, or runs/pi0 for --family pi0)")
    parser.add_argument("--train-steps", type=int, default=TrainConfig.steps, metavar="N",
                        help="optimizer steps (default %(default)s); ODE steps are chosen at export/run (--steps)")
    parser.add_argument("--steps", dest="train_steps", type=int, action=DeprecatedAlias, new="--train-steps",
                        metavar="N", help="deprecated spelling of --train-steps (--steps means ODE steps elsewhere)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"default {TrainConfig.batch_size} (pi0: {PI0_DEFAULTS['batch_size']})")
    parser.add_argument("--lr", type=float, default=None, help=f"default {TrainConfig.lr} (pi0: {PI0_DEFAULTS['lr']})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: the free cores)")
    parser.add_argument("--checkpoint-every", type=int, default=TrainConfig.checkpoint_every)
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --output")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a new training over the checkpoint already in --output, replacing it (edge-vla: "
                        "at this run's first checkpoint; pi0: at once); without it, or --resume, an --output that "
                        "holds a checkpoint is refused")
    parser.add_argument("--init", metavar="CKPT", default=None,
                        help="fine-tune: start from this checkpoint's weights and normalization (same preset and "
                        "data shapes; --rtc-max-delay may add real-time chunking to a trained model)")
    parser.add_argument("--episodes", type=int, default=300,
                        help="episodes to generate when --data is missing (MetaWorld: per task)")


def default_sim_data(split: str) -> str:
    """Where `--data` left out points for a sim split (the file `edge-vla make-data` writes by default)."""
    return "runs/data/reach.npz" if split == "base" else f"runs/data/reach_{split}.npz"


def refuse_missing_data(path: Path, default: str, env: str) -> None:
    """Only the default dataset path is generated when missing: a path the user named and got wrong (a typo)
    would otherwise be filled with fresh demonstrations and trained on without anyone noticing."""
    if path == Path(default):
        return
    env_flag = "" if env == "sim" else f" --env {env}"
    raise ConfigError(f"--data {path}: no such dataset; make it first with `edge-vla make-data -o {path}{env_flag} "
                      f"--episodes N`, check the path, or leave --data out to train on {default} (made if missing)")


def rtc_override(args: argparse.Namespace, overrides: dict[str, Any]) -> dict[str, Any]:
    """--rtc-max-delay D as the config override it is (refusing a --set that says otherwise)."""
    if args.rtc_max_delay is None:
        return overrides
    if overrides.get("rtc_max_delay", args.rtc_max_delay) != args.rtc_max_delay:
        raise ConfigError(f"--rtc-max-delay {args.rtc_max_delay} and --set rtc_max_delay="
                          f"{overrides['rtc_max_delay']} disagree; give one")
    return overrides | {"rtc_max_delay": args.rtc_max_delay}


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


# What marks a directory as holding a training's result: its weights (either family; π0's may be sharded, with an
# index) or the training state that --resume continues from.
CHECKPOINT_MARKERS = ("model.safetensors", "model.safetensors.index.json", "train_state.json")


def checkpoint_files(path: Path) -> list[str]:
    """The checkpoint files already in `path` (none for a directory that does not exist)."""
    return [name for name in CHECKPOINT_MARKERS if (path / name).is_file()]


def refuse_existing_checkpoint(out: Path, ways_on: str) -> None:
    """A new training or distillation into a directory that holds a checkpoint would replace it without a word,
    and a mistyped -o (or the default one, a second time) costs the hours the first run took: refuse, naming
    `ways_on` (the flags that say what to do with it)."""
    found = checkpoint_files(out)
    if found:
        raise ConfigError(f"{out} already holds a checkpoint ({', '.join(found)}); {ways_on}, or choose another -o")


def check_output(args: argparse.Namespace, out: Path) -> None:
    """Before any work (data generation included): what -o holds must be what the command means to do with it."""
    if args.resume and args.overwrite:
        raise ConfigError("--resume continues the checkpoint in -o and --overwrite starts a new training over it; "
                          "give one")
    if not args.resume and not args.overwrite:
        refuse_existing_checkpoint(out, "add --resume to continue it, --overwrite to start a new training over it")
    if args.resume and args.family == "pi0" and out.is_dir():
        # a first save stopped between its renames left its state in staging: complete it before looking for it
        from .pi0.train import finish_interrupted_save

        finish_interrupted_save(out)
    if args.resume and args.family == "pi0" and not (out / "train_state.json").is_file():
        # It used to start a fresh model over the weights there. (The edge-vla family checks its run in full in
        # check_resume, once the model the command describes is known.)
        way = ("--overwrite to start a new training over it" if checkpoint_files(out)
               else "drop --resume to start a new training there")
        raise ConfigError(f"--resume: {out} holds no training state (train_state.json) to resume; give the -o of the "
                          f"π0 run to continue, or {way}")


def output_dir(args: argparse.Namespace) -> Path:
    return Path(args.output or ("runs/pi0" if args.family == "pi0" else f"runs/{args.preset}"))


def main(args: argparse.Namespace) -> int:
    check_output(args, output_dir(args))
    pi0 = args.family == "pi0"
    defaults = PI0_DEFAULTS if pi0 else {"batch_size": TrainConfig.batch_size, "lr": TrainConfig.lr}
    tc = TrainConfig(steps=args.train_steps, batch_size=args.batch_size or defaults["batch_size"],
                     lr=args.lr or defaults["lr"], seed=args.seed, threads=args.threads,
                     checkpoint_every=args.checkpoint_every)
    if pi0:
        if args.set:
            raise ConfigError("--set overrides edge-vla presets; for --family pi0 use --pi0-config")
        if args.init:
            raise ConfigError("--init fine-tunes an edge-vla checkpoint; --family pi0 starts from its --pi0-config")
        return _train_pi0(args, tc)
    if args.pi0_config:
        raise ConfigError("--pi0-config needs --family pi0")
    cfg = preset(args.preset, **rtc_override(args, parse_overrides(args.set)))
    mw = is_metaworld(args.env)
    split = "base" if mw else sim_split(args.env)
    default = "runs/data/metaworld.npz" if mw else default_sim_data(split)
    data = args.data or default
    data_path = Path(data)
    if is_lerobot_source(data):
        cfg, ds = training_data(data, cfg)
    else:
        if not data_path.exists() and not is_dataset_list(data):
            refuse_missing_data(data_path, default, args.env)
            print(f"{data_path} not found: generating {args.episodes} expert episodes"
                  + (f" per task of {args.env}" if mw else ""))
            if mw:
                from edge_vla.sim import metaworld

                made = metaworld.generate(args.env, range(args.episodes), cfg.image_size, cfg.num_cameras)
            else:
                made = dataset.generate(range(args.episodes), cfg.image_size, cfg.num_cameras, split=split)
            dataset.save(made, data_path)
        ds = load_training_data(data)
        require_finite(ds, data)
        cfg = training_config(cfg, ds)
    out = output_dir(args)
    init = None
    if args.init and args.resume:
        raise ConfigError("--init starts a new training from a checkpoint; --resume continues one: give one")
    if args.resume:
        check_resume(out, cfg, tc.steps)
    if args.init:
        from .checkpoint import load_checkpoint

        init, _ = load_checkpoint(args.init)
    train(cfg, ds, out, tc, resume=args.resume, init=init)
    print(f"checkpoint written to {out}")
    return 0


def check_resume(out: Path, cfg: VLAConfig, steps: int) -> None:
    """Before any training: --resume must find in `out` a run of the model this command describes, with its
    training state, short of --train-steps. Anything else used to be ignored (another --preset or --set), start a
    fresh model over the checkpoint (no training state), or fail with a traceback (a damaged train_state.json)."""
    from .checkpoint import read_config, read_training_state

    if not (out / "config.json").is_file():
        raise ConfigError(f"--resume: {out} holds no checkpoint to resume; drop --resume to start a new training "
                          "there, or give the -o of the run to continue")
    theirs, _ = read_config(out)
    step = read_training_state(out)["step"]
    if theirs != cfg:
        raise ConfigError(f"--resume: the run in {out} is not the model this command trains (run vs command: "
                          f"{'; '.join(theirs.differences(cfg))}); give the --preset, --set and --data it was trained with, or choose "
                          "another -o")
    if step >= steps:
        raise ConfigError(f"--resume: the run in {out} is already at step {step} of --train-steps {steps}; raise "
                          f"--train-steps above {step} to continue it")


def drop_training_state(out: Path) -> None:
    """--overwrite of a π0 run: π0 writes its step-0 weights straight into -o, and the old run's training state must
    not outlive them (interrupted before the first checkpoint, a --resume would pair the old step and optimizer with
    fresh weights)."""
    from .pi0.train import OPTIMIZER_FILE, PROBE_FILE, STATE_FILE

    for name in (STATE_FILE, OPTIMIZER_FILE, PROBE_FILE):
        (out / name).unlink(missing_ok=True)


def _train_pi0(args: argparse.Namespace, tc: TrainConfig) -> int:
    from .pi0.train import resolve_config, train_pi0

    if is_metaworld(args.env):
        raise ConfigError("--family pi0 trains on the project's sim for now; MetaWorld data is not supported for it")
    split = sim_split(args.env)
    default = default_sim_data(split)
    args.data = args.data or default
    if is_lerobot_source(args.data):
        raise ConfigError("--family pi0 trains on sim datasets (`edge-vla make-data`); lerobot: data is not "
                          "supported for it yet")
    overrides = resolve_config(args.pi0_config)
    data_path = Path(args.data)
    if not data_path.exists():
        refuse_missing_data(data_path, default, args.env)
        print(f"{data_path} not found: generating {args.episodes} expert episodes")
        dataset.save(dataset.generate(range(args.episodes), split=split), data_path)
    if args.overwrite:
        drop_training_state(output_dir(args))
    out = train_pi0(dataset.load(data_path), output_dir(args), tc, overrides, resume=args.resume)
    print(f"π0 checkpoint written to {out} (transformers format + processor + robot.json); export it with "
          f"`edge-vla export {out} -o BUNDLE`, distill it with `edge-vla distill --teacher {out}`")
    return 0
