"""`edge-vla demo`: the main job end to end on the embedded default (no hardware, no GPU, no downloads).

1. make sim demonstrations          (edge_vla.sim)
2. train the tiny policy            (flow-matching behaviour cloning, PyTorch on the CPU; a short run)
3. evaluate closed loop             (expert, random actions, the short run, and the shipped tiny checkpoint
                                     that the same command trains for longer; Wilson 95% CIs)
4. export a bundle (FP32 and INT8)  (of the shipped checkpoint, or with --deploy trained of the short run:
                                     ONNX graphs, numerics check, TensorRT lint, hashed manifest)
5. evaluate the INT8 bundle through the onnxruntime runtime, and time it
6. run onboard                      (policy -> chunk scheduler -> safety -> firmware emulator on a real pty)
   and drill the watchdog           (stall inference, corrupt the link, kill -9 the host, restart it:
                                     it must stay disarmed; the demo arms in bench mode)
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from edge_vla.cli_flags import DeprecatedAlias
from edge_vla.sim import dataset
from edge_vla.sim.evaluate import evaluate, evaluate_expert, random_policy

log = logging.getLogger(__name__)
BUNDLE_PRECISIONS = ("fp32", "int8")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", dest="out", default="runs/demo",
                        help="where data, checkpoint, bundles and reports go (default %(default)s)")
    parser.add_argument("--out", dest="out", action=DeprecatedAlias, new="-o/--output")
    parser.add_argument("--episodes", type=int, default=300, metavar="N",
                        help="sim expert demonstrations (episodes) to train on (default %(default)s)")
    parser.add_argument("--train-steps", type=int, default=300, metavar="N",
                        help="optimizer steps of the demo's own training run (default %(default)s; the shipped "
                        "checkpoint trained for longer)")
    parser.add_argument("--deploy", choices=("shipped", "trained"), default="shipped",
                        help="what steps 4-6 export and run: the shipped tiny checkpoint (trained by the command "
                        "in its provenance.json) or the checkpoint this demo just trained (default %(default)s)")
    parser.add_argument("--eval-episodes", type=int, default=50, metavar="N",
                        help="held-out sim episodes per policy in the closed-loop evaluations, steps 3 and 5 "
                        "(default %(default)s)")
    parser.add_argument("--onboard-seconds", type=float, default=12.0, metavar="S",
                        help="seconds of onboard closed loop over the firmware emulator in step 6, before the "
                        "watchdog drills (default %(default)g)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run in about a minute, numbers meaningless: 6 episodes, 20 training steps, "
                        "4 evaluation episodes, 4 s onboard (overrides those options)")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse the data and the trained checkpoint a previous demo left in -o (default: "
                        "make both again, replacing them)")


def _step(n: int, title: str) -> float:
    print(f"\n[{n}/6] {title}", flush=True)
    return time.perf_counter()


def main(args: argparse.Namespace) -> int:
    from edge_vla.export.assets import provenance, shipped_checkpoint
    from edge_vla.export.checkpoint import load_checkpoint
    from edge_vla.export.torch_policy import TorchPolicy
    from edge_vla.export.train import TrainConfig, train
    from edge_vla.onboard.drill import format_demo, run_demo
    from edge_vla.runtime.policy import Policy

    if args.quick:
        args.episodes, args.train_steps, args.eval_episodes, args.onboard_seconds = 6, 20, 4, 4.0
    out = Path(args.out)
    shipped = shipped_checkpoint()
    shipped_model, _ = load_checkpoint(shipped)
    cfg = shipped_model.config
    summary: dict = {}
    t_all = time.perf_counter()

    t = _step(1, f"sim demonstrations: {args.episodes} expert episodes")
    data_path = out / "data.npz"
    if not (args.reuse and data_path.is_file()):
        dataset.save(dataset.generate(range(args.episodes), cfg.image_size, cfg.num_cameras), data_path)
    ds = dataset.load(data_path)
    print(f"      {len(ds)} samples -> {data_path} ({time.perf_counter() - t:.1f} s)")

    t = _step(2, f"train the tiny policy ({args.train_steps} steps)")
    ckpt = out / "tiny"
    if args.reuse and (ckpt / "config.json").is_file():
        model, _ = load_checkpoint(ckpt)
    else:
        model = train(cfg, ds, ckpt, TrainConfig(steps=args.train_steps, checkpoint_every=max(args.train_steps, 1)))
    print(f"      checkpoint -> {ckpt} ({time.perf_counter() - t:.1f} s)")
    prov = provenance()
    print(f"      shipped checkpoint {shipped}: {prov['steps']} steps of the same training, reproduced by\n"
          f"        {prov['command']}")

    t = _step(3, f"closed-loop evaluation on {args.eval_episodes} held-out seeds")
    results = [evaluate_expert(args.eval_episodes), evaluate(random_policy(), args.eval_episodes, name="random"),
               evaluate(TorchPolicy(model), args.eval_episodes, name=f"tiny, this run ({args.train_steps} steps)"),
               evaluate(TorchPolicy(shipped_model), args.eval_episodes,
                        name=f"tiny, shipped ({prov['steps']} steps, PyTorch, 10 steps)")]
    for r in results:
        print(f"      {r}")
    summary["evaluation"] = [r.as_dict() for r in results]
    if args.deploy == "shipped":
        model, ckpt = shipped_model, shipped

    t = _step(4, "export bundles (FP32, INT8) with numerics check and TensorRT lint")
    bundles = {}
    for precision, res in export_bundles(model, out, source=str(ckpt), quick=args.quick).items():
        bundles[precision] = res.bundle
        print(f"      {precision}: {res.bundle} in {res.seconds:.1f} s; {res.numerics.summary()}")
        print(f"            TensorRT lint: {res.lint['errors']} error(s), {res.lint['warnings']} warning(s)")

    t = _step(5, "the INT8 bundle through the onnxruntime runtime")
    policy = Policy.load(bundles["int8"])
    r = evaluate(lambda obs: policy.infer(obs).actions, args.eval_episodes, name=f"tiny INT8 bundle of {ckpt} (runtime)")
    print(f"      {r}")
    summary["evaluation"].append(r.as_dict())
    obs = dataset.generate(range(1))  # one real observation for timing
    from edge_vla.runtime.types import Observation

    o = Observation([obs.images[0][0]], str(obs.instructions[0]), obs.states[0])
    totals = []
    for _ in range(30):
        totals.append(policy.infer(o).timings_ms["total"])
    print(f"      latency per chunk (prefix + 10 steps): p50 {np.median(totals):.2f} ms, "
          f"max {np.max(totals):.2f} ms on this CPU")
    summary["runtime_latency_ms_p50"] = float(np.median(totals))

    t = _step(6, f"onboard: {args.onboard_seconds:.0f} s closed loop over the firmware emulator, then watchdog drills (incl. restart-stays-disarmed)")
    onboard = run_demo(bundles["int8"], duration_s=args.onboard_seconds, rate_hz=100.0)
    print("      " + format_demo(onboard).replace("\n", "\n      "))
    summary["onboard"] = onboard
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"\ndone in {time.perf_counter() - t_all:.0f} s; summary -> {out / 'summary.json'}")
    print("\nnext, on the bundles this demo wrote (README.md walks through each):")
    for command in next_commands(out):
        print(f"  {command}")
    return 0


def bundle_paths(out: Path) -> dict[str, Path]:
    """Where the demo writes its bundles, by precision (the README's walkthroughs start from these)."""
    return {precision: Path(out) / f"bundle_{precision}" for precision in BUNDLE_PRECISIONS}


def export_bundles(model, out: Path, source: str, quick: bool = False) -> dict:
    """Export `model` as the demo's FP32 and INT8 bundles under `out`; {precision: ExportResult}."""
    from edge_vla.export.exporter import ExportOptions, export_model

    return {precision: export_model(model, path, ExportOptions(precision=precision, overwrite=True,
                                                               calib_count=16 if quick else 32), source=source)
            for precision, path in bundle_paths(out).items()}


def next_commands(out: Path) -> list[str]:
    """What to try next on the demo's bundles: one command per job, with the paths the demo wrote.

    Each is a command of the README's walkthroughs, which tests/packaging/test_readme.py runs."""
    paths = bundle_paths(out)
    fp32, int8 = paths["fp32"], paths["int8"]
    return [
        f"edge-vla profile {fp32} {int8} --rate-hz 50 --steps 1,2,10 --threads 1",
        f"edge-vla run {int8} --emulate --arm-on-start --rate-hz 100 --duration 10",
        f"python -m edge_vla.onboard.drill {int8}",
        "edge-vla package --keygen keys/robot",
        f"edge-vla package {int8} -o runs/robot-pkg.tar.gz --target x86-cpu --sign keys/robot",
    ]
