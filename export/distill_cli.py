"""`edge-vla distill`: teacher checkpoint -> small student (knowledge distillation + DAgger), then reflow
so the student needs 1-2 ODE steps. Runs data-parallel unchanged under `torchrun --nproc_per_node N`."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from edge_vla.cli_flags import DeprecatedAlias
from edge_vla.config import PRESETS, VLAConfig, preset
from edge_vla.errors import ConfigError
from edge_vla.sim.splits import meta_split

from .data import is_dataset_list, load_training_data, require_finite
from .distill import DistillConfig, ObsPool, distill
from .envs import dataset_env, longest_instruction, student_config, text_len_for
from .families import load_teacher
from .lerobot.hooks import dataset_text_len, distill_data, is_lerobot_source
from .teacher import Teacher, VLATeacher
from .train_cli import parse_overrides, refuse_existing_checkpoint, rtc_override


def configure(parser: argparse.ArgumentParser) -> None:
    d = DistillConfig()
    parser.add_argument("--teacher", required=True, help="teacher checkpoint directory: from `edge-vla train` (either family), or any transformers "
                        "π0 checkpoint directory")
    parser.add_argument("--teacher-steps", type=int, default=None, help="teacher ODE steps (default: its config's)")
    parser.add_argument("--student-preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one field of the student's preset, as `edge-vla train --set` (repeatable). "
                        "chunk_len, action_dim and state_dim come from the teacher; max_text_len is at least the "
                        "teacher's and the data's longest instruction")
    parser.add_argument("--rtc-max-delay", type=int, default=None, metavar="D",
                        help="train for real-time chunking: up to D leading actions of each chunk are given clean "
                        "(the actions that execute while the policy thinks) and the rest is learned consistent with "
                        "them (action-prefix conditioning, arXiv 2512.05964; docs/rtc.md). Default 0: off. "
                        "Same as --set rtc_max_delay=D")
    parser.add_argument("--student-init", default=None, help="start the student from this checkpoint (same preset)")
    parser.add_argument("-o", "--output", required=True,
                        help="student checkpoint; with --reflow-steps > 0 the pre-reflow student goes to <output>_kd")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a checkpoint already in --output (and <output>_kd); without it one is refused")
    parser.add_argument("--data", default="runs/data/reach.npz",
                        help="observations to label: a sim dataset .npz (DAgger rolls out in its split, e.g. sim:hard), "
                        "A.npz,B.npz,... together (demonstrations and DAgger rounds), or lerobot:PATH (recorded "
                        "states; offline, no DAgger)")
    parser.add_argument("--max-obs", type=int, default=None, help="use at most this many dataset observations")
    parser.add_argument("--train-steps", type=int, default=d.steps, metavar="N",
                        help="knowledge-distillation steps over all rounds (default %(default)s)")
    parser.add_argument("--steps", dest="train_steps", type=int, action=DeprecatedAlias, new="--train-steps",
                        metavar="N", help="deprecated spelling of --train-steps (--steps means ODE steps elsewhere)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--velocity-weight", type=float, default=d.velocity_weight,
                        help="weight of matching the teacher's velocity field (0: actions only)")
    parser.add_argument("--samples-per-obs", type=int, default=d.samples_per_obs)
    parser.add_argument("--goal-weight", type=float, default=d.goal_weight,
                        help="goal-location auxiliary loss for the student where the data knows the named block's "
                             "position (the sim's datasets; 0: off)")
    parser.add_argument("--dagger-rounds", type=int, default=d.dagger_rounds,
                        help="closed-loop collection rounds (teacher first, then more and more student)")
    parser.add_argument("--dagger-episodes", type=int, default=d.dagger_episodes)
    parser.add_argument("--dagger-beta", type=float, default=d.dagger_beta)
    parser.add_argument("--reflow-steps", type=int, default=500, help="step-distillation steps (0: skip)")
    parser.add_argument("--reflow-lr", type=float, default=d.reflow_lr)
    parser.add_argument("--fast-steps", type=int, default=d.fast_steps,
                        help="ODE steps written into the step-distilled student's config")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")


# Sizes the teacher's chunks and inputs fix: the student's cannot differ.
TEACHER_SIZES = ("chunk_len", "action_dim", "state_dim")


def student_preset(name: str, overrides: dict[str, Any], teacher: Teacher) -> VLAConfig:
    """The student's preset with --set overrides; chunk, action and state sizes from the teacher, and at least the
    teacher's instruction length (it labels the same instructions the student reads)."""
    fixed = {key: int(getattr(teacher, key)) for key in TEACHER_SIZES}  # every teacher has these three
    for key, value in overrides.items():
        if key in fixed and value != fixed[key]:
            raise ConfigError(f"--set {key}={value}: the student's {key} comes from the teacher ({fixed[key]}); "
                              "drop the override")
    cfg = preset(name, **(overrides | fixed))
    teacher_text = teacher.model.config.max_text_len if isinstance(teacher, VLATeacher) else 0  # π0: own tokenizer
    return dataclasses.replace(cfg, max_text_len=max(cfg.max_text_len, teacher_text)).validate()


def fit_instructions(student: VLAConfig, needed: int) -> VLAConfig:
    """The student takes the data's longest instruction (`needed` tokens with the end mark): the data decides,
    over the preset's or an asked-for smaller length."""
    if student.max_text_len >= needed:
        return student
    return dataclasses.replace(student, max_text_len=needed).validate()


def check_teacher_text(teacher: Teacher, instructions: Iterable[object], source: str) -> None:
    """An edge-vla teacher must take every instruction it labels (a π0 teacher has its own tokenizer)."""
    if not isinstance(teacher, VLATeacher):
        return
    limit = teacher.model.config.max_text_len
    task, n = longest_instruction(instructions)
    if n + 1 > limit:
        raise ConfigError(f"{source}: instruction {task!r} is {n} bytes but the teacher takes instructions of at most "
                          f"{limit - 1} bytes (max_text_len {limit}); distill a teacher trained on this data "
                          "(`edge-vla train` sizes the instruction from the data's longest one)")


def check_outputs(args: argparse.Namespace) -> None:
    """Before the teacher loads: the students this run writes must not replace checkpoints without --overwrite."""
    if args.overwrite:
        return
    out = Path(args.output)
    for path in (out, out.with_name(out.name + "_kd")) if args.reflow_steps > 0 else (out,):
        refuse_existing_checkpoint(path, "add --overwrite to replace it")


def main(args: argparse.Namespace) -> int:
    check_outputs(args)
    overrides = rtc_override(args, parse_overrides(args.set))
    teacher = load_teacher(args.teacher, steps=args.teacher_steps)
    student_cfg = student_preset(args.student_preset, overrides, teacher)
    data_path = Path(args.data)
    data_meta = None
    split = "base"
    if is_lerobot_source(args.data) and not isinstance(teacher, VLATeacher):
        raise ConfigError("distilling a π0 teacher on recorded (lerobot:) data is not supported yet; use a sim "
                          "dataset (`edge-vla make-data`) or an edge-vla teacher checkpoint")
    if is_lerobot_source(args.data):
        if args.dagger_rounds > 0:
            print("recorded data: DAgger needs the simulator, so the teacher labels the recorded states only "
                  "(--dagger-rounds 0)")
            args.dagger_rounds = 0
        # All episodes' tasks: the student is evaluated on the held-out ones. The teacher need only take the
        # training split's, which distill_data checks.
        student_cfg = fit_instructions(student_cfg, dataset_text_len(args.data))
        ds = distill_data(args.data, teacher.model.config, student_cfg)
        data_meta = ds.meta
    elif not is_dataset_list(args.data) and not data_path.is_file():
        print(f"{data_path} not found; make it with `edge-vla make-data -o {data_path}`")
        return 2
    else:
        ds = load_training_data(args.data)  # one .npz, or A.npz,B.npz,... as `edge-vla train --data` takes
        require_finite(ds, str(data_path))
        check_teacher_text(teacher, ds.instructions, str(data_path))
        student_cfg = fit_instructions(student_cfg, text_len_for(ds.instructions))
        split = meta_split(ds.meta)
        if split != "base":  # DAgger rolls out in the data's split; the student's checkpoint records it
            data_meta = ds.meta
        if ds.goals is not None and "goal_dim" not in overrides:
            # The goal head as `edge-vla train` sizes it, from the data: MetaWorld's name the object's and the goal's
            # positions (6), the sim's one block's (2, the presets' own).
            student_cfg = dataclasses.replace(student_cfg, goal_dim=int(ds.goals.shape[1])).validate()
        if dataset_env(ds.meta) is not None:
            student_cfg = student_config(student_cfg, teacher.model.config, ds.meta)
            data_meta = ds.meta  # the student's bundle then declares MetaWorld's action space and cameras
            if args.dagger_rounds > 0:
                print(f"{dataset_env(ds.meta)}: DAgger rolls out in the sim only, so the teacher labels the dataset's "
                      "observations (--dagger-rounds 0)")
                args.dagger_rounds = 0
    pool = ObsPool.from_dataset(ds, args.max_obs, args.seed)
    init = None
    if args.student_init:
        from .checkpoint import load_checkpoint

        init, _ = load_checkpoint(args.student_init)
    cfg = DistillConfig(
        steps=args.train_steps, batch_size=args.batch_size, lr=args.lr, velocity_weight=args.velocity_weight,
        samples_per_obs=args.samples_per_obs, goal_weight=args.goal_weight, dagger_rounds=args.dagger_rounds,
        dagger_episodes=args.dagger_episodes, dagger_beta=args.dagger_beta, reflow_steps=args.reflow_steps,
        reflow_lr=args.reflow_lr, fast_steps=args.fast_steps, seed=args.seed, threads=args.threads,
        device=args.device, split=split,
    )
    res = distill(teacher, student_cfg, pool, cfg, out=args.output, student_init=init, data_meta=data_meta)
    out = Path(args.output)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, one report is enough
        return 0
    print(f"distilled {args.teacher} -> {args.student_preset} on {res.observations} observations "
          f"({res.targets} teacher targets)")
    if res.fast_student is not None:
        print(f"knowledge-distilled student: {out.with_name(out.name + '_kd')}")
        print(f"step-distilled student ({cfg.fast_steps} steps): {out}")
    else:
        print(f"student: {out}")
    return 0
