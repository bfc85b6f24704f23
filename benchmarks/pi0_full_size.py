"""The full 3.3B π0 (random weights) through edge-vla, one step per process (docs/PI0.md, "The full 3.3B
configuration"). Driven by benchmarks/pi0_full_size.sh, which runs each step under /usr/bin/time -v with a
memory watchdog; each step can also be run alone:

    python benchmarks/pi0_full_size.py checkpoint WORK   # random-weight checkpoint dir, 1 GB shards
    edge-vla export WORK/ckpt -o WORK/bundle --external-data --skip-numerics
    python benchmarks/pi0_full_size.py ort WORK          # onnxruntime CPU sessions: load, 2 prefix runs, 5 steps
    python benchmarks/pi0_full_size.py costs WORK        # graph FLOPs/bytes, sizes, node counts (weights not loaded)

Prints one JSON line per measurement (prefixed "RESULT ").
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np


def _mem() -> dict[str, float]:
    """This process's resident memory now and at its peak (GiB); RssFile is mapped weights the kernel can drop."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            fields[key] = round(int(value.split()[0]) / 2**20, 2)
    return fields


def _result(**kw: object) -> None:
    print("RESULT " + json.dumps(kw), flush=True)


def checkpoint(work: Path) -> None:
    import torch

    from edge_vla.export.pi0.testing import full_width_pi0_config, make_checkpoint

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    t0 = time.perf_counter()
    # 27 SigLIP, 18 Gemma-2B, 18 expert layers: π0 at full size, the real 257,152-token vocabulary
    # (PI0_FULL_LAYERS=vision,language,expert and PI0_FULL_VOCAB shrink it for a rehearsal of the script).
    vision, language, expert = (int(n) for n in os.environ.get("PI0_FULL_LAYERS", "27,18,18").split(","))
    cfg = full_width_pi0_config(language, expert, vision)
    cfg["vlm_config"]["text_config"]["vocab_size"] = int(os.environ.get("PI0_FULL_VOCAB", "257152"))
    make_checkpoint(work / "ckpt", cfg, num_cameras=1, max_shard_size="1GB")
    size = sum(p.stat().st_size for p in (work / "ckpt").glob("*.safetensors"))
    _result(step="checkpoint", seconds=round(time.perf_counter() - t0, 1), safetensors_gb=round(size / 1e9, 2),
            layers=[vision, language, expert], vocab=cfg["vlm_config"]["text_config"]["vocab_size"], **_mem())


def _session(path: Path, threads: int, prepack: bool):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    t0 = time.perf_counter()
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess, time.perf_counter() - t0


def _feeds(sess, given: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    g = np.random.default_rng(0)
    out = {}
    for v in sess.get_inputs():
        if v.name in given:
            out[v.name] = given[v.name]
        elif v.type == "tensor(int32)":
            out[v.name] = np.ones(v.shape, np.int32)
        else:
            out[v.name] = g.standard_normal(v.shape).astype(np.float32)
    return out


def ort_latency(work: Path) -> None:
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    prepack = os.environ.get("PI0_FULL_PREPACK", "0") == "1"
    graphs = work / "bundle" / "graphs"
    manifest = json.loads((work / "bundle" / "manifest.json").read_text())
    tok = manifest["tokenizer"]
    tokens = np.zeros((1, tok["max_len"]), np.int32)
    n_img = tok["image_seq_len"] * manifest["preprocessing"]["images"]["cameras"]
    tokens[0, :n_img] = tok["image_token_id"]
    tokens[0, n_img:n_img + 8] = 5
    mask = np.zeros_like(tokens)
    mask[0, :n_img + 8] = 1
    sess, load_s = _session(graphs / "prefix.onnx", threads, prepack)
    _result(step="ort_prefix_session", seconds=round(load_s, 1), prepack=prepack, threads=threads, **_mem())
    feeds = _feeds(sess, {"tokens": tokens, "token_mask": mask})
    names = [o.name for o in sess.get_outputs()]
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        kv = sess.run(None, feeds)
        times.append(time.perf_counter() - t0)
    _result(step="ort_prefix_runs", ms=[round(1e3 * t, 1) for t in times], **_mem())
    del sess
    kv_feeds = dict(zip(names, kv, strict=True))
    sess, load_s = _session(graphs / "denoise_step.onnx", threads, prepack)
    _result(step="ort_step_session", seconds=round(load_s, 1), prepack=prepack, **_mem())
    feeds = _feeds(sess, {**kv_feeds, "token_mask": mask, "t": np.ones(1, np.float32)})
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        v = sess.run(None, feeds)[0]
        times.append(time.perf_counter() - t0)
    assert np.isfinite(v).all() and all(np.isfinite(a).all() for a in kv)
    _result(step="ort_step_runs", ms=[round(1e3 * t, 1) for t in times], **_mem())


def costs(work: Path) -> None:
    import onnx

    from edge_vla.runtime import roofline as rl

    for name in ("prefix", "denoise_step"):
        path = work / "bundle" / "graphs" / f"{name}.onnx"
        model = onnx.load(str(path), load_external_data=False)
        nodes: dict[str, int] = {}
        for n in model.graph.node:
            nodes[n.op_type] = nodes.get(n.op_type, 0) + 1
        cost = rl.graph_cost(path)
        data = path.with_name(path.name + ".data")
        _result(step=f"graph_{name}", onnx_mb=round(path.stat().st_size / 1e6, 2),
                data_gb=round(data.stat().st_size / 1e9, 3), nodes=len(model.graph.node),
                matmuls=nodes.get("MatMul", 0), transposes=nodes.get("Transpose", 0),
                initializers=len(model.graph.initializer), gflop=round(cost.flops / 1e9, 1),
                weight_gb=round(cost.weight_bytes / 1e9, 3))


if __name__ == "__main__":
    step, work = sys.argv[1], Path(sys.argv[2])
    {"checkpoint": checkpoint, "ort": ort_latency, "costs": costs}[step](work)
