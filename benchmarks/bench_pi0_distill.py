"""Sizing the π0-teacher distillation (issue 14 item 7): what the reduced sim π0 costs against the tiny student.

    OMP_NUM_THREADS=1 .venv/bin/pytest benchmarks/bench_pi0_distill.py -s -p no:cacheprovider

Random weights (cost does not depend on them). The teacher is `sim_pi0_config()` (export/pi0/train.py), or
BENCH_PI0_CONFIG: a size name (`wide`) or a JSON file of overrides, as `edge-vla train --family pi0
--pi0-config` takes them; the student is the tiny preset with the teacher's chunk (8). Prints, batch 1:
- parameters and FLOPs per chunk (matmul/conv, FlopCounterMode; eager attention for π0) of the teacher at
  10 steps and the student at 10, 2 and 1 steps, with ratios to the teacher;
- median latency per chunk in PyTorch eager (π0: `sample_actions` with its preprocessing);
then the throughput that sizes a real run, at BENCH_THREADS (default 1) threads:
- π0 training steps/s at batch BENCH_BATCH (default 32), wall, and CPU seconds per step (at 1 thread, its
  inverse is about what an idle core gives when this one is shared);
- teacher labelling: observations/s through the 10-step sampler at batch 256 (distillation's target batch).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from edge_vla.config import preset  # noqa: E402
from edge_vla.export.compare_cli import chunk_flops, latency_ms  # noqa: E402
from edge_vla.export.distill import ObsPool  # noqa: E402
from edge_vla.export.model import VLA, count_parameters, fake_inputs  # noqa: E402
from edge_vla.export.pi0.checkpoint import open_pi0  # noqa: E402
from edge_vla.export.pi0.teacher import Pi0FlowTeacher, Pi0Inputs, pi0_chunk_flops  # noqa: E402
from edge_vla.export.pi0.train import (  # noqa: E402
    TrainData,
    init_checkpoint,
    resolve_config,
    sim_pi0_config,
    text_tokens_needed,
    train_step,
)
from edge_vla.sim import dataset  # noqa: E402

THREADS = int(os.environ.get("BENCH_THREADS", "1"))
BATCH = int(os.environ.get("BENCH_BATCH", "32"))
TRAIN_STEPS = int(os.environ.get("BENCH_TRAIN_STEPS", "10"))


@pytest.mark.slow
def test_pi0_teacher_vs_tiny_student(tmp_path: Path) -> None:
    torch.set_num_threads(THREADS)
    overrides = resolve_config(os.environ.get("BENCH_PI0_CONFIG"))
    cfg = sim_pi0_config(**overrides)
    ds = dataset.generate(range(12))
    model = init_checkpoint(ds, tmp_path / "pi0", cfg)
    src = open_pi0(tmp_path / "pi0")
    teacher = Pi0FlowTeacher(src, model)
    pool = ObsPool.from_dataset(ds)
    one = pool.batch([0])
    student = VLA(preset("tiny", chunk_len=teacher.chunk_len)).eval()
    inp = fake_inputs(student.config)

    print(f"\nπ0 teacher {os.environ.get('BENCH_PI0_CONFIG') or 'reduced'}; batch 1, {THREADS} thread(s)")
    t_flops = pi0_chunk_flops(teacher, one)
    t_ms = latency_ms(lambda: teacher.act(one, torch.zeros(1, teacher.chunk_len, teacher.action_dim)))
    print(f"{'model':<24}{'params':>9}{'MFLOP/chunk':>13}{'x teacher':>11}{'ms eager':>10}{'x teacher':>11}")
    print(f"{'teacher π0 (10 steps)':<24}{count_parameters(model) / 1e6:>8.2f}M{t_flops / 1e6:>13.1f}{1:>11.3f}"
          f"{t_ms:>10.1f}{1:>11.3f}")
    for steps in (10, 2, 1):
        f = chunk_flops(student, steps)
        with torch.inference_mode():
            ms = latency_ms(lambda s=steps: student.sample(inp["images"], inp["tokens"], inp["state"], inp["noise"],
                                                          steps=s))
        print(f"{f'student tiny ({steps} steps)':<24}{count_parameters(student) / 1e6:>8.2f}M{f / 1e6:>13.1f}"
              f"{f / t_flops:>11.3f}{ms:>10.1f}{ms / t_ms:>11.3f}")
        assert f < t_flops

    model.train()
    data = TrainData(ds, Pi0Inputs(src, model, max_text_tokens=text_tokens_needed(src, ds.instructions)),
                     model.config)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4)
    rng = np.random.default_rng(0)
    train_step(model, opt, data.batch(rng.integers(0, len(data), BATCH)), data.valid)  # warm-up
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(TRAIN_STEPS):
        train_step(model, opt, data.batch(rng.integers(0, len(data), BATCH)), data.valid)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    print(f"π0 training, batch {BATCH}, {THREADS} thread(s): {TRAIN_STEPS / wall:.2f} steps/s wall, "
          f"{cpu / TRAIN_STEPS:.3f} CPU-s per step (load {os.getloadavg()[0]:.1f})")

    model.eval()
    labels = pool.batch(range(min(256, len(pool))))
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(len(labels), teacher.chunk_len, teacher.action_dim, generator=g)
    w0 = time.perf_counter()
    teacher.act(labels, noise)
    print(f"teacher labelling (10-step sampler, batch {len(labels)}): {len(labels) / (time.perf_counter() - w0):.0f} "
          "observations/s wall")
