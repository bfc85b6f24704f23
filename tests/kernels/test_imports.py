"""The GPU-side stack must import on a machine without pyserial, python-can or cobs (the lent GPU box)."""

from __future__ import annotations

import subprocess
import sys

# What benchmarks/gpu_check.sh and `pytest -m gpu tests/kernels` load, directly or through fixtures.
GPU_SIDE = ("edge_vla.kernels.loader", "edge_vla.kernels.reference", "edge_vla.kernels.build",
            "edge_vla.runtime.trt_backend", "edge_vla.runtime.flow")
FORBIDDEN = ("firmware_bridge", "serial", "can", "cobs")


def test_gpu_side_modules_do_not_pull_the_robot_link() -> None:
    code = (
        "import importlib, sys\n"
        f"for m in {GPU_SIDE!r}: importlib.import_module(m)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"GPU-side imports pulled {out.stdout.strip()}"
