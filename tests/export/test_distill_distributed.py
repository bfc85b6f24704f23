"""The scale-out path: the unchanged distill() under torchrun, 2 CPU processes, gloo backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edge_vla.export.distributed import DistContext, init_from_env

WORKER = textwrap.dedent('''
    import json, os, sys
    import torch
    from edge_vla.config import preset
    from edge_vla.export.distill import DistillConfig, ObsPool, distill
    from edge_vla.export.distributed import init_from_env
    from edge_vla.export.model import VLA
    from edge_vla.export.teacher import VLATeacher
    from edge_vla.sim import dataset

    out = sys.argv[1]
    micro = dict(image_size=16, patch_size=8, mlp_ratio=2, width=32, depth=1, heads=2,
                 expert_width=32, expert_depth=1, expert_heads=2)
    torch.manual_seed(0)
    teacher = VLA(preset("tiny", **micro))
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.1 * torch.randn_like(p))
    pool = ObsPool.from_dataset(dataset.generate(range(3), image_size=16))
    ctx = init_from_env("cpu")
    cfg = DistillConfig(steps=6, batch_size=8, warmup=1, dagger_rounds=1, dagger_episodes=2, reflow_steps=2,
                        threads=1, device="cpu")
    res = distill(VLATeacher(teacher), preset("tiny", **micro), pool, cfg, out=os.path.join(out, "student"),
                  progress=False, ctx=ctx)
    checksum = sum(float(p.double().sum()) for p in res.fast_student.parameters())
    with open(os.path.join(out, f"rank{ctx.rank}.json"), "w") as f:
        json.dump({"rank": ctx.rank, "world": ctx.world_size, "checksum": checksum,
                   "shard": list(ctx.shard(len(pool))), "pool": len(pool), "observations": res.observations}, f)
    ctx.close()
''')


def test_single_process_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = init_from_env("cpu")
    assert not ctx.enabled and ctx.is_main and list(ctx.shard(5)) == [0, 1, 2, 3, 4]


def test_shards_cover_everything_once() -> None:
    for n in (0, 1, 7, 10):
        parts = [list(DistContext(rank=r, world_size=3).shard(n)) for r in range(3)]
        assert sorted(i for p in parts for i in p) == list(range(n))


def test_torchrun_two_cpu_processes_gloo(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
         str(tmp_path)], env=env, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    # DDP kept the replicas identical; the shards split the observations between the ranks.
    assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], rel=1e-6)
    assert sorted(ranks[0]["shard"] + ranks[1]["shard"]) == list(range(ranks[0]["pool"]))
    assert ranks[0]["observations"] > ranks[0]["pool"]  # both ranks' DAgger states counted
    assert (tmp_path / "student" / "model.safetensors").is_file()  # written once, by rank 0
    assert (tmp_path / "student_kd" / "model.safetensors").is_file()
