"""GPU benchmark of the ODE-loop kernels against PyTorch eager, PyTorch CUDA graphs and the bandwidth floor.

    .venv/bin/python benchmarks/bench_kernels.py [--preset tiny|base|all] [--steps 10] [--peak-gbs 3350]

Times are CUDA-event medians after warm-up, on one stream, batch 1. Prints a markdown table with the
device name; exits 0 with the reason when no GPU / CUDA torch is present (nothing is invented).
Needs: a CUDA GPU, cuda-python, torch with CUDA, nvcc or NVRTC.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

PRESETS = {"tiny": dict(H=8, D=2, E=128), "base": dict(H=16, D=2, E=512)}
# Peak DRAM bandwidth (GB/s) by device-name fragment, for the floor; override with --peak-gbs.
PEAK_GBS = {"H100 SXM": 3350.0, "H100 PCIe": 2000.0, "H100": 3350.0, "H200": 4800.0, "A100": 2039.0,
            "Orin": 204.8, "Thor": 273.0, "4090": 1008.0}


def cuda_time_us(fn: Callable[[], None], stream: Any, reps: int, warmup: int = 20, inner: int = 10) -> float:
    """Median over `reps` of the mean time of `inner` back-to-back calls, CUDA events on `stream`."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(reps):
        start.record(stream)
        for _ in range(inner):
            fn()
        end.record(stream)
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / inner)
    return statistics.median(times)


def torch_graph(fn: Callable[[], None], stream: Any) -> Callable[[], None]:
    import torch

    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()  # warm-up allocations outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        fn()
    return graph.replay


def bench_ode(k: Any, preset: str, steps: int, reps: int, peak: float) -> list[tuple]:
    import torch

    from edge_vla.kernels import reference as ref
    from edge_vla.kernels.loader import CapturedGraph

    H, D, E = (PRESETS[preset][key] for key in ("H", "D", "E"))
    dev = torch.device("cuda")
    x = torch.randn(H, D, device=dev)
    v = torch.randn(H, D, device=dev, dtype=torch.float16)
    x_in = torch.empty(H, D, device=dev, dtype=torch.float16)
    temb = torch.empty(E, device=dev, dtype=torch.float16)
    lo, hi = torch.full((D,), -3.0, device=dev), torch.full((D,), 3.0, device=dev)
    dt = 1.0 / steps
    stream = torch.cuda.Stream()
    sh = stream.cuda_stream

    def fused() -> None:
        for i in range(steps):
            k.ode_step(x, v, None, x_in, temb, lo, hi, n=H * D, D=D, E=E, dt=dt, t_next=(i + 1) * dt,
                       mode=ref.MODE_EULER, dtype="fp16", stream=sh)

    def eager() -> None:  # what the N-step loop costs written plainly in PyTorch
        with torch.cuda.stream(stream):
            for i in range(steps):
                x.add_(v.float(), alpha=dt)
                torch.max(torch.min(x, hi), lo, out=x)
                x_in.copy_(x)
                half = E // 2
                f = torch.exp(-np.log(10000.0) * torch.arange(half, device=dev) / half)
                arg = 100.0 * (i + 1) * dt * f
                temb.copy_(torch.cat([torch.cos(arg), torch.sin(arg)]))

    ours_graph = CapturedGraph(sh, lambda s: [k.ode_step(x, v, None, x_in, temb, lo, hi, n=H * D, D=D, E=E,
                                                         dt=dt, t_next=(i + 1) * dt, mode=ref.MODE_EULER,
                                                         dtype="fp16", stream=s) for i in range(steps)])
    rows = []
    # Bytes per step: read x (4), v (2), bounds; write x (4), x_in (2), temb (2 E).
    nbytes = steps * (H * D * (4 + 2 + 4 + 2) + 8 * D + 2 * E)
    floor = nbytes / (peak * 1e3)
    eager_us = cuda_time_us(eager, stream, reps)
    for name, fn in (("torch eager", eager), ("torch CUDA graph", torch_graph(eager, stream)),
                     ("ode_step v2 (fused)", fused), ("ode_step v2 in CUDA graph", ours_graph.launch)):
        us = eager_us if name == "torch eager" else cuda_time_us(fn, stream, reps)
        rows.append((f"{preset} ODE {steps} Euler steps", name, us, nbytes / (us * 1e3), floor, eager_us / us))
    return rows


def bench_adaln(k: Any, preset: str, reps: int, peak: float) -> list[tuple]:
    import torch
    import torch.nn.functional as F

    from edge_vla.kernels import reference as ref

    H, E = PRESETS[preset]["H"], PRESETS[preset]["E"]
    dev = torch.device("cuda")
    stream = torch.cuda.Stream()
    sh = stream.cuda_stream
    rows = []
    for what, N, act in (("qkv", 3 * E, ref.ACT_NONE), ("mlp-up+gelu", 4 * E, ref.ACT_GELU_TANH)):
        x = torch.randn(H, E, device=dev)
        shift, scale = torch.randn(E, device=dev) * 0.1, torch.randn(E, device=dev) * 0.1
        w = (torch.randn(N, E, device=dev) / E**0.5).half()
        b = torch.randn(N, device=dev) * 0.1
        out, y = torch.empty(H, N, device=dev), torch.empty(H, E, device=dev)

        def eager(x=x, shift=shift, scale=scale, w=w, b=b, out=out, act=act) -> None:
            with torch.cuda.stream(stream):
                h = F.layer_norm(x, (x.shape[-1],), eps=1e-6) * (1 + scale) + shift
                r = F.linear(h.half(), w, b.half()).float()
                out.copy_(F.gelu(r, approximate="tanh") if act else r)

        def fused(x=x, shift=shift, scale=scale, w=w, b=b, out=out, N=N, act=act) -> None:
            k.adaln_linear(x, shift, scale, w, b, out, T=H, K=E, N=N, act=act, wdtype="fp16", stream=sh)

        def unfused(x=x, shift=shift, scale=scale, w=w, b=b, out=out, y=y, N=N, act=act) -> None:
            k.adaln_linear_unfused(x, shift, scale, w, b, out, y, T=H, K=E, N=N, act=act, wdtype="fp16",
                                   stream=sh)

        nbytes = 2 * N * E + 4 * (H * E + 2 * E + N + H * N)
        floor = nbytes / (peak * 1e3)
        eager_us = cuda_time_us(eager, stream, reps)
        for name, fn in (("torch eager (fp16 linear)", eager), ("torch CUDA graph", torch_graph(eager, stream)),
                         ("adaln_linear v1 (2 launches)", unfused), ("adaln_linear v2 (fused)", fused)):
            us = eager_us if name.startswith("torch eager") else cuda_time_us(fn, stream, reps)
            rows.append((f"{preset} adaLN+{what} {H}x{E}->{N}", name, us, nbytes / (us * 1e3), floor, eager_us / us))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=[*PRESETS, "all"], default="all")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--peak-gbs", type=float, help="peak DRAM bandwidth for the floor (default: by device name)")
    args = parser.parse_args(argv)

    from edge_vla.kernels import loader

    ok, why = loader.gpu_status()
    try:
        import torch

        if not torch.cuda.is_available():
            ok, why = False, f"torch {torch.__version__} has no CUDA device"
    except ImportError:
        ok, why = False, "torch is not installed (pip install 'edge-vla[export]' with a CUDA build)"
    if not ok:
        print(f"bench_kernels: skipped, {why}")
        return 0

    torch.cuda.init()
    name = torch.cuda.get_device_name()
    peak = args.peak_gbs or next((v for key, v in PEAK_GBS.items() if key in name), None)
    if peak is None:
        print(f"bench_kernels: unknown peak bandwidth for {name!r}; pass --peak-gbs")
        return 2
    kernels = loader.Kernels()
    rows: list[tuple] = []
    for preset in PRESETS if args.preset == "all" else [args.preset]:
        rows += bench_ode(kernels, preset, args.steps, args.reps, peak)
        rows += bench_adaln(kernels, preset, args.reps, peak)
    print(f"device: {name}, peak {peak:.0f} GB/s (floor = bytes moved / peak), torch {torch.__version__}")
    print("| case | implementation | median us | achieved GB/s | floor us | speed-up vs eager |")
    print("|---|---|---:|---:|---:|---:|")
    for case, impl, us, gbs, floor, ratio in rows:
        print(f"| {case} | {impl} | {us:.2f} | {gbs:.1f} | {floor:.3f} | {ratio:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
