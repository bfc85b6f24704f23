"""`edge-vla compare`: teacher vs student vs step-distilled student vs INT8 student, as one markdown table.

Every row is measured in this run on the same inputs: FLOPs per chunk (matmul/conv, counted by
torch's FlopCounterMode on one batch-1 chunk: prefix once + N velocity steps), median CPU latency per
chunk, action RMSE vs the teacher's 10-step chunks from the same noise on held-out states, and
closed-loop success with a Wilson 95% CI on the same seeded held-out episodes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from edge_vla.runtime.types import Observation
from edge_vla.sim import dataset
from edge_vla.sim.evaluate import EVAL_SEED_BASE, evaluate

from .checkpoint import load_checkpoint
from .distill import ObsPool, action_error
from .model import VLA, count_parameters, fake_inputs
from .teacher import VLATeacher
from .torch_policy import TorchPolicy


@dataclass
class Row:
    name: str
    params: int | None
    flops: int | None
    latency_ms: float | None
    latency_via: str
    rmse: float | None
    success: float | None
    ci: tuple[float, float] | None
    episodes: int


def chunk_flops(model: VLA, steps: int) -> int:
    inp = fake_inputs(model.config)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model.sample(inp["images"], inp["tokens"], inp["state"], inp["noise"], steps=steps)
    return int(fc.get_total_flops())


def latency_ms(fn: Callable[[], object], warmup: int = 3, iters: int = 30) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def heldout_pool(episodes: int, cfg_image_size: int, num_cameras: int, max_obs: int) -> ObsPool:
    """States the expert visits on the held-out evaluation scenes (the same seeds closed loop uses)."""
    ds = dataset.generate(range(EVAL_SEED_BASE, EVAL_SEED_BASE + episodes), cfg_image_size, num_cameras)
    return ObsPool.from_dataset(ds, max_obs)


def torch_row(name: str, model: VLA, steps: int, teacher: VLATeacher, pool: ObsPool, episodes: int,
              obs: Observation) -> Row:
    policy = TorchPolicy(model, steps=steps)
    res = evaluate(policy, episodes, image_size=model.config.image_size, num_cameras=model.config.num_cameras,
                   name=name)
    rmse = action_error(VLATeacher(model, steps=steps), teacher, pool)
    return Row(name, count_parameters(model), chunk_flops(model, steps), latency_ms(lambda: policy(obs)),
               "PyTorch eager (prefix cached)", rmse, res.success_rate, (res.ci_low, res.ci_high), episodes)


def bundle_row(name: str, bundle: str, teacher: VLATeacher, pool: ObsPool, episodes: int, obs: Observation,
               flops: int | None, params: int | None) -> Row:
    """A bundle through the onboard runtime. Its noise is its own, so its RMSE is against the teacher
    from different noise (an upper bound on the same-noise figure)."""
    from edge_vla.runtime.policy import Policy

    policy = Policy.load(bundle)
    cfg = policy.config
    res = evaluate(lambda o: policy.infer(o).actions, episodes, image_size=cfg.image_size,
                   num_cameras=cfg.num_cameras, name=name)
    sq, n = 0.0, 0
    gen = torch.Generator().manual_seed(0)
    for i in range(len(pool)):
        ob = pool.batch([i])
        o = Observation(images=[(ob.images[0, c].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
                                for c in range(ob.images.shape[1])], instruction=ob.instructions[0],
                        state=ob.state[0].numpy())
        ref = teacher.act(ob, torch.randn(1, teacher.chunk_len, teacher.action_dim, generator=gen))[0].numpy()
        d = np.asarray(policy.infer(o).actions) - ref
        sq, n = sq + float((d ** 2).sum()), n + d.size
    return Row(name, params, flops, latency_ms(lambda: policy.infer(obs)), f"edge_vla runtime ({policy.precision})",
               (sq / max(n, 1)) ** 0.5, res.success_rate, (res.ci_low, res.ci_high), episodes)


def fmt_flops(f: int | None) -> str:
    return "-" if f is None else f"{f / 1e6:.1f} M"


def markdown(rows: list[Row], teacher_flops: int) -> str:
    head = ("| model | params | FLOPs / chunk | vs teacher | CPU latency / chunk (p50) | action RMSE vs teacher (rad) "
            "| success (95% CI) |\n|---|---:|---:|---:|---:|---:|---|\n")
    lines = []
    for r in rows:
        ratio = "-" if r.flops is None else f"{r.flops / teacher_flops:.3f}x"
        lat = "-" if r.latency_ms is None else f"{r.latency_ms:.1f} ms"
        rmse = "-" if r.rmse is None else f"{r.rmse:.4f}"
        succ = "pending" if r.success is None or r.ci is None else \
            f"{100 * r.success:.0f}% ({100 * r.ci[0]:.0f}-{100 * r.ci[1]:.0f}%, n={r.episodes})"
        params = "-" if r.params is None else f"{r.params / 1e6:.2f} M"
        lines.append(f"| {r.name} | {params} | {fmt_flops(r.flops)} | {ratio} | {lat} | {rmse} | {succ} |")
    return head + "\n".join(lines) + "\n"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", required=True, help="teacher checkpoint")
    parser.add_argument("--student", required=True, help="knowledge-distilled student checkpoint (<output>_kd)")
    parser.add_argument("--fast-student", default=None, help="step-distilled student checkpoint (<output>)")
    parser.add_argument("--int8-bundle", default=None,
                        help="INT8 student bundle from `edge-vla export CKPT -o BUNDLE --precision int8`")
    parser.add_argument("--episodes", type=int, default=100, help="held-out closed-loop episodes per row")
    parser.add_argument("--error-obs", type=int, default=256, help="held-out states for the action error")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for every row (latency included)")
    parser.add_argument("-o", "--output", default=None, help="write the markdown table here")
    parser.add_argument("--json", dest="json_out", default=None, help="also write the rows as JSON here")


def main(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    teacher_model, _ = load_checkpoint(args.teacher)
    student, _ = load_checkpoint(args.student)
    tsteps = teacher_model.config.num_steps
    teacher = VLATeacher(teacher_model, steps=tsteps)
    cfg = student.config
    pool = heldout_pool(max(8, args.error_obs // 10), cfg.image_size, cfg.num_cameras, args.error_obs)
    obs = dataset.generate(range(EVAL_SEED_BASE, EVAL_SEED_BASE + 1), cfg.image_size, cfg.num_cameras)
    one = Observation(images=list(obs.images[0]), instruction=str(obs.instructions[0]), state=obs.states[0])
    rows = [torch_row(f"teacher {teacher_model.config.preset} ({tsteps} steps)", teacher_model, tsteps, teacher, pool,
                      args.episodes, one)]
    ssteps = cfg.num_steps
    rows.append(torch_row(f"student {cfg.preset} ({ssteps} steps)", student, ssteps, teacher, pool, args.episodes, one))
    rows.append(torch_row(f"student {cfg.preset}, no step distillation (1 step)", student, 1, teacher, pool,
                          args.episodes, one))
    fast = None
    if args.fast_student:
        fast, _ = load_checkpoint(args.fast_student)
        for k in (2, 1):
            rows.append(torch_row(f"student {cfg.preset}, reflow ({k} steps)", fast, k, teacher, pool, args.episodes,
                                  one))
    int8_name = "student INT8 (runtime)"
    if args.int8_bundle:
        ref = fast or student
        rows.append(bundle_row(int8_name, args.int8_bundle, teacher, pool, args.episodes, one,
                               chunk_flops(ref, ref.config.num_steps), count_parameters(ref)))
    else:
        rows.append(Row(int8_name + ": pending (pass --int8-bundle)", None, None, None, "", None, None, None, 0))
    table = markdown(rows, rows[0].flops or 1)
    vias = sorted({r.latency_via for r in rows if r.latency_via})
    note = (f"Latency: {', '.join(vias)}; batch 1, {args.threads} thread(s), median of 30. RMSE vs the teacher's "
            f"{tsteps}-step chunks from the same noise on {len(pool)} held-out states. Success: {args.episodes} "
            f"held-out episodes (seeds {EVAL_SEED_BASE}+).\n")
    print(table + "\n" + note)
    if args.output:
        Path(args.output).write_text(table + "\n" + note)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return 0
