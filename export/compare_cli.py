"""`edge-vla compare`: teacher vs student vs step-distilled student vs INT8 student, as one markdown table.

Every row is measured in this run on the same inputs: FLOPs per chunk (matmul/conv, counted by
torch's FlopCounterMode on one batch-1 chunk: prefix once + N velocity steps), median CPU latency per
chunk, action RMSE vs the teacher's 10-step chunks from the same noise on held-out states, and
closed-loop success with a Wilson 95% CI on the same seeded held-out episodes.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from edge_vla.cli_flags import DeprecatedAlias
from edge_vla.runtime.types import Observation
from edge_vla.sim import dataset
from edge_vla.sim.evaluate import EVAL_SEED_BASE, evaluate

from .checkpoint import load_checkpoint
from .distill import ObsPool, action_error
from .model import VLA, count_parameters, fake_inputs

if TYPE_CHECKING:
    from .pi0.teacher import Pi0Teacher
from .families import load_teacher
from .teacher import ObsBatch, Teacher, VLATeacher
from .torch_policy import TorchPolicy

log = logging.getLogger(__name__)


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


class NoiseFeed:
    """Stands in for the runtime Policy's numpy Generator so that a bundle starts from given noise: the
    INT8 student is then compared with the teacher from the same noise, like every other row."""

    def __init__(self) -> None:
        self.noise: np.ndarray | None = None

    def standard_normal(self, out: np.ndarray, dtype: object = None) -> np.ndarray:
        assert self.noise is not None
        out[...] = self.noise.reshape(out.shape)
        return out


def to_observation(ob: ObsBatch, i: int = 0) -> Observation:
    images = [(ob.images[i, c].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
              for c in range(ob.images.shape[1])]
    return Observation(images=images, instruction=ob.instructions[i], state=ob.state[i].numpy())


def runtime_error(policy: object, teacher: Teacher, pool: ObsPool, seed: int = 0) -> float:
    """RMSE of a runtime Policy vs the teacher, same noise, same states (as distill.action_error)."""
    feed, saved = NoiseFeed(), policy.rng  # type: ignore[attr-defined]
    policy.rng = feed  # type: ignore[attr-defined]
    gen = torch.Generator().manual_seed(seed)
    sq, n = 0.0, 0
    try:
        for i in range(len(pool)):
            ob = pool.batch([i])
            noise = torch.randn(1, teacher.chunk_len, teacher.action_dim, generator=gen)
            feed.noise = noise.numpy()
            d = policy.infer(to_observation(ob)).actions - teacher.act(ob, noise)[0].numpy()  # type: ignore
            sq, n = sq + float((d ** 2).sum()), n + d.size
    finally:
        policy.rng = saved  # type: ignore[attr-defined]
    return (sq / max(n, 1)) ** 0.5


def measure_row(name: str, model: VLA, steps: int, teacher: Teacher, pool: ObsPool, episodes: int,
                obs: Observation, bundle: Path | None = None, quality_via_bundle: bool = False,
                threads: int = 1) -> Row:
    """FLOPs and parameters from the PyTorch model; latency through the runtime when a bundle is given;
    quality through the bundle for quantized rows, else through PyTorch (fp32 bundles match it)."""
    cfg = model.config
    policy = None
    if bundle is not None:
        from edge_vla.runtime.policy import Policy

        policy = Policy.load(bundle, steps=steps, threads=threads)
        lat, via = latency_ms(lambda: policy.infer(obs)), f"edge_vla runtime, onnxruntime CPU {policy.precision}"
    else:
        tp = TorchPolicy(model, steps=steps)
        lat, via = latency_ms(lambda: tp(obs)), "PyTorch eager, prefix cached"
    if quality_via_bundle and policy is not None:
        policy.reset(0)
        res = evaluate(lambda o: policy.infer(o).actions, episodes, image_size=cfg.image_size,
                       num_cameras=cfg.num_cameras, name=name)
        rmse = runtime_error(policy, teacher, pool)
    else:
        res = evaluate(TorchPolicy(model, steps=steps), episodes, image_size=cfg.image_size,
                       num_cameras=cfg.num_cameras, name=name)
        rmse = action_error(VLATeacher(model, steps=steps), teacher, pool)
    log.info("%s, rmse %.4f, %.1f ms", res, rmse, lat)  # str(res) starts with the row name
    return Row(name, count_parameters(model), chunk_flops(model, steps), lat, via, rmse, res.success_rate,
               (res.ci_low, res.ci_high), episodes)


def measure_pi0_teacher_row(name: str, teacher: Pi0Teacher, episodes: int, obs: Observation,
                            bundle: Path | None = None, threads: int = 1) -> Row:
    """The π0 teacher's row: FLOPs and parameters from transformers' model, latency through the runtime when a
    bundle is given (else `sample_actions` eager), success through its own sampler."""
    from .pi0.teacher import Pi0TorchPolicy, pi0_chunk_flops

    tp = Pi0TorchPolicy(teacher)
    if bundle is not None:
        from edge_vla.runtime.policy import Policy

        policy = Policy.load(bundle, steps=teacher.num_steps, threads=threads)
        lat, via = latency_ms(lambda: policy.infer(obs)), f"edge_vla runtime, onnxruntime CPU {policy.precision}"
    else:
        lat, via = latency_ms(lambda: tp(obs)), "transformers eager (sample_actions)"
    res = evaluate(tp, episodes, num_cameras=teacher.num_cameras, name=name)
    log.info("%s, %.1f ms", res, lat)  # str(res) starts with the row name
    flops = pi0_chunk_flops(teacher, ObsBatch.from_observations([obs], teacher.num_cameras))
    return Row(name, count_parameters(teacher.model), flops, lat, via, 0.0, res.success_rate,
               (res.ci_low, res.ci_high), episodes)


def ensure_bundle(ckpt: str, out: Path, precision: str, calib: str | None) -> Path:
    """Export once; later runs reuse the bundle (delete it to re-export)."""
    if (out / "manifest.json").is_file():
        return out
    from .families import for_checkpoint

    return for_checkpoint(ckpt).export_bundle(ckpt, out, precision, calib)


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
    parser.add_argument("--teacher", required=True, help="teacher checkpoint (edge-vla, or a transformers π0 directory)")
    parser.add_argument("--student", required=True, help="knowledge-distilled student checkpoint (<output>_kd)")
    parser.add_argument("--fast-student", default=None, help="step-distilled student checkpoint (<output>)")
    parser.add_argument("--bundles", default=None,
                        help="export (once) fp32 bundles of every checkpoint and an INT8 bundle of the final "
                             "student into this folder; latency then goes through the edge_vla runtime")
    parser.add_argument("--int8-bundle", default=None, help="an existing INT8 student bundle (overrides --bundles)")
    parser.add_argument("--calib", default="runs/data/reach.npz", help="INT8 calibration data for --bundles")
    parser.add_argument("--episodes", type=int, default=100, help="held-out closed-loop episodes per row")
    parser.add_argument("--error-obs", type=int, default=256, help="held-out states for the action error")
    parser.add_argument("--threads", type=int, default=1, help="threads for every row (latency included)")
    parser.add_argument("-o", "--output", default=None, help="write the markdown table here")
    parser.add_argument("--json-out", dest="json_out", default=None, metavar="FILE",
                        help="also write the rows as JSON here")
    parser.add_argument("--json", dest="json_out", metavar="FILE", action=DeprecatedAlias, new="--json-out FILE")


def main(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    teacher = load_teacher(args.teacher)
    student, _ = load_checkpoint(args.student)
    fast = load_checkpoint(args.fast_student)[0] if args.fast_student else None
    tsteps = teacher.num_steps
    cfg = student.config
    pool = heldout_pool(max(8, args.error_obs // 10), cfg.image_size, cfg.num_cameras, args.error_obs)
    first = dataset.generate(range(EVAL_SEED_BASE, EVAL_SEED_BASE + 1), cfg.image_size, cfg.num_cameras)
    one = Observation(images=list(first.images[0]), instruction=str(first.instructions[0]), state=first.states[0])

    bundles: dict[str, Path | None] = {"teacher": None, "student": None, "fast": None, "int8": None}
    if args.bundles:
        root = Path(args.bundles)
        bundles["teacher"] = ensure_bundle(args.teacher, root / "teacher_fp32", "fp32", None)
        bundles["student"] = ensure_bundle(args.student, root / "student_kd_fp32", "fp32", None)
        final = args.fast_student or args.student
        if fast is not None:
            bundles["fast"] = ensure_bundle(final, root / "student_fast_fp32", "fp32", None)
        bundles["int8"] = ensure_bundle(final, root / "student_int8", "int8", args.calib)
    if args.int8_bundle:
        bundles["int8"] = Path(args.int8_bundle)

    def row(name: str, model: VLA, steps: int, bundle: Path | None, via_bundle: bool = False) -> Row:
        return measure_row(name, model, steps, teacher, pool, args.episodes, one, bundle, via_bundle, args.threads)

    p = cfg.preset
    if isinstance(teacher, VLATeacher):
        first = row(f"teacher {teacher.model.config.preset} ({tsteps} steps)", teacher.model, tsteps, bundles["teacher"])
    else:
        first = measure_pi0_teacher_row(f"teacher π0 ({tsteps} steps)", teacher,
                                        args.episodes, one, bundles["teacher"], args.threads)
    rows = [first,
            row(f"student {p} ({cfg.num_steps} steps)", student, cfg.num_steps, bundles["student"]),
            row(f"student {p}, no step distillation (1 step)", student, 1, bundles["student"])]
    if fast is not None:
        rows += [row(f"student {p}, reflow ({k} step{'s' if k > 1 else ''})", fast, k, bundles["fast"])
                 for k in (2, 1)]
    final_model = fast or student
    k = final_model.config.num_steps
    int8_name = f"student {p}{', reflow' if fast is not None else ''} INT8 ({k} step{'s' if k > 1 else ''})"
    if bundles["int8"] is not None:
        rows.append(row(int8_name, final_model, k, bundles["int8"], via_bundle=True))
    else:
        rows.append(Row(int8_name + ": pending (pass --bundles or --int8-bundle)", None, None, None, "", None, None,
                        None, 0))
    table = markdown(rows, rows[0].flops or 1)
    vias = sorted({r.latency_via for r in rows if r.latency_via})
    note = (f"Latency: {'; '.join(vias)}; batch 1, {args.threads} thread(s), median of 30 chunks. "
            f"FLOPs: matmul/conv, one chunk (prefix + N steps), PyTorch FlopCounterMode. RMSE vs the teacher's "
            f"{tsteps}-step chunks from the same noise on {len(pool)} held-out states. Success: the same "
            f"{args.episodes} held-out episodes (seeds {EVAL_SEED_BASE}+) for every row.\n")
    print(table + "\n" + note)
    if args.output:
        Path(args.output).write_text(table + "\n" + note)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return 0
