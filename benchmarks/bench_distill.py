"""Cost of a chunk, teacher vs student (issue 8): `pytest benchmarks/bench_distill.py -s`.

Untrained weights (cost does not depend on them): the small teacher at 10 steps against the tiny
student at 10, 2 and 1 steps, batch 1, PyTorch eager with the prefix cached. Prints FLOPs (matmul and
conv, torch's FlopCounterMode) and median latency, each as a ratio to the teacher measured in the same
run. Quality (success, action error) needs trained checkpoints: `edge-vla compare`.
"""

from __future__ import annotations

import platform

import pytest
import torch

from edge_vla.config import preset
from edge_vla.export.compare_cli import chunk_flops, latency_ms
from edge_vla.export.model import VLA, count_parameters, fake_inputs


@pytest.mark.slow
def test_chunk_cost_teacher_vs_student() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    teacher, student = VLA(preset("small")).eval(), VLA(preset("tiny")).eval()
    inp = fake_inputs(teacher.config)

    def run(model: VLA, steps: int) -> None:
        model.sample(inp["images"], inp["tokens"], inp["state"], inp["noise"], steps=steps)

    rows = [("teacher small", teacher, 10), ("student tiny", student, 10), ("student tiny", student, 2),
            ("student tiny", student, 1)]
    base_f = chunk_flops(teacher, 10)
    with torch.inference_mode():
        base_t = latency_ms(lambda: run(teacher, 10), iters=20)
        print(f"\nbatch 1, 1 thread, {platform.processor() or platform.machine()}")
        print(f"{'model':<16}{'steps':>6}{'params':>10}{'MFLOP':>10}{'x teacher':>11}{'ms':>9}{'x teacher':>11}")
        for name, model, steps in rows:
            f = chunk_flops(model, steps)
            t = base_t if model is teacher else latency_ms(lambda m=model, s=steps: run(m, s), iters=20)
            print(f"{name:<16}{steps:>6}{count_parameters(model) / 1e6:>9.2f}M{f / 1e6:>10.1f}{f / base_f:>11.3f}"
                  f"{t:>9.2f}{t / base_t:>11.3f}")
    assert chunk_flops(student, 1) < base_f / 10
