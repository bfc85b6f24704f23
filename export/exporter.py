"""checkpoint -> ONNX graphs -> (FP16 | INT8) -> numerics check -> TensorRT lint -> bundle."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch

import edge_vla
from edge_vla.action_space import ActionSpace, sim_action_space
from edge_vla.bundle import sha256_file, write_bundle
from edge_vla.errors import EdgeVlaError
from edge_vla.runtime.contract import REFERENCE_FAMILY, Contract
from edge_vla.runtime.flow import REFERENCE_FLOW, SOLVERS
from edge_vla.tokenizer import EOS_ID, PAD_ID, VOCAB_SIZE

from . import calibration, numerics, quantize, trt_lint
from .checkpoint import WEIGHTS, load_checkpoint
from .engines import build_script
from .envs import export_options
from .lerobot.hooks import is_lerobot_source
from .model import VLA, count_parameters
from .onnx_graphs import GRAPH_ROLES, OPSET, PREFIX_MASK, TIME_INPUT, StepTime, export_graphs, io_specs, with_roles

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
NUMERICS_SEED = 700_000
# Step counts that get a time-conditioning table by default (plus the model's own num_steps): the
# distilled 1-2 step students, the usual 4-10, and room above. Each table is (2N + 1) rows.
DEFAULT_TABLE_STEPS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20)


@dataclass
class ExportOptions:
    precision: str = "fp32"
    steps: int | None = None
    unrolled: bool = False
    calib: str | None = None
    calib_count: int = 32
    numerics_count: int = 8
    # With precision int8: which graphs to quantize (the rest stay FP32). On CPUs the 16-row
    # denoise-step GEMMs gain nothing from INT8 while its Q/DQ nodes cost time, so ("prefix",)
    # is often the faster bundle; on TensorRT, quantize both.
    int8_graphs: tuple[str, ...] = ("prefix", "denoise_step", "chunk")
    # With precision int8: the weights' range, "full" (8-bit) or "reduced" (7-bit). A property of the machine
    # that will run the graph, not of this one: quantize.INT8_RANGES says which needs "reduced".
    int8_range: str = quantize.DEFAULT_INT8_RANGE
    allow_lint_errors: bool = False
    overwrite: bool = False
    action_space: ActionSpace | None = None
    # The step graph's time input: "table" (a row of a precomputed time-conditioning table, one table
    # per step count in table_steps; default DEFAULT_TABLE_STEPS + num_steps) or "scalar" (t, any step
    # count). The table is the default: it drops the time MLP and every adaLN GEMM from each step
    # (measured one run, shared 2-core box, 1 thread, 10-step loop: 1.14x faster on tiny, 1.18x on base).
    time_input: str = "table"
    table_steps: tuple[int, ...] | None = None
    # The manifest's `cameras` entries (default: main, wrist, cam2, ...); MetaWorld checkpoints name theirs.
    cameras: tuple[dict[str, Any], ...] | None = None
    # Where the numerics check's fresh observations come from: None = the sim (or the --calib LeRobot dataset),
    # or an environment such as metaworld:reach-v3 (filled in from a MetaWorld checkpoint's dataset).
    observations: str | None = None


@dataclass
class ExportResult:
    bundle: Path
    numerics: numerics.NumericsReport
    lint: dict
    seconds: float
    sizes: dict[str, int]


def export_checkpoint(checkpoint: str | Path, out: str | Path, opts: ExportOptions) -> ExportResult:
    model, meta = load_checkpoint(checkpoint)
    return export_model(model, out, opts, source_hash=sha256_file(Path(checkpoint) / WEIGHTS),
                        source=str(checkpoint), meta=meta)


def export_model(model: VLA, out: str | Path, opts: ExportOptions, source_hash: str = "untrained",
                 source: str = "in-memory", meta: dict | None = None) -> ExportResult:
    if opts.precision not in PRECISIONS:
        raise EdgeVlaError(f"unknown precision {opts.precision!r}; choose one of {PRECISIONS}")
    if Path(out).exists() and not opts.overwrite:  # before the export work, not after it (write_bundle checks too)
        raise EdgeVlaError(f"{out} already exists; pass --overwrite to replace it")
    t0 = time.perf_counter()
    meta = meta or {}
    opts = export_options(opts, meta)
    if opts.steps:
        model.config = dataclasses.replace(model.config, num_steps=opts.steps).validate()
    if opts.time_input not in TIME_INPUT:
        raise EdgeVlaError(f"unknown time input {opts.time_input!r}; choose one of {sorted(TIME_INPUT)}")
    if opts.int8_range not in quantize.INT8_RANGES:
        raise EdgeVlaError(f"unknown --int8-range {opts.int8_range!r}; choose one of {', '.join(quantize.INT8_RANGES)}")
    cfg = model.config
    # Inputs first: a bad calibration source must not cost an ONNX export and then fail.
    if opts.precision == "int8" or is_lerobot_source(opts.calib):
        calibration.check_source(opts.calib, cfg, opts.calib_count)
    with tempfile.TemporaryDirectory(prefix="edge-vla-export-") as tmp:
        work = Path(tmp)
        fp32 = {g.name: g.path for g in export_graphs(model, work / "fp32", cfg.num_steps if opts.unrolled else None,
                                                      opts.time_input)}
        graphs, calib_desc = _apply_precision(model, fp32, work, opts)
        tables = _write_time_tables(model, work, opts)
        manifest = _manifest(model, graphs, opts, calib_desc, source_hash, source, meta, tables)
        contract = Contract.from_manifest(manifest, work)
        # Real frames (or the model's own environment), not the sim, for models trained on them.
        recorded = opts.observations or (opts.calib if is_lerobot_source(opts.calib) else None)
        numerics_obs = calibration.load_observations(cfg, recorded, opts.numerics_count, seed=NUMERICS_SEED)
        report = numerics.check(model, opts.precision, contract, graphs, numerics_obs)
        # DEBUG: the callers (`edge-vla export`, the demo) print the summary from the result; at INFO it was said twice.
        log.debug("numerics %s", report.summary())
        manifest["numerics"] = {"passed": report.passed, "actions": report.actions}
        lint = enforce_gates(report, graphs, opts.allow_lint_errors)
        files: dict[str, Path | bytes] = {f"graphs/{name}.onnx": path for name, path in graphs.items()}
        files.update({rel: work / rel for rel in tables.values()})
        files["reports/numerics.json"] = _json_bytes(report.as_dict())
        files["reports/lint.json"] = _json_bytes(lint)
        files["build_engines.sh"] = build_script(manifest).encode()
        bundle = write_bundle(out, manifest, files, overwrite=opts.overwrite)
        (bundle / "build_engines.sh").chmod(0o755)
        sizes = {name: path.stat().st_size for name, path in graphs.items()}
    return ExportResult(bundle, report, lint, time.perf_counter() - t0, sizes)


def _apply_precision(model: VLA, fp32: dict[str, Path], work: Path, opts: ExportOptions) -> tuple[dict[str, Path], dict]:
    if opts.precision == "fp32":
        return fp32, {}
    out_dir = work / opts.precision
    out_dir.mkdir()
    if opts.precision == "fp16":
        return {name: quantize.to_fp16(path, out_dir / path.name) for name, path in fp32.items()}, {}
    cfg = model.config
    obs = calibration.load_observations(cfg, opts.calib, opts.calib_count)
    prefix_feeds = calibration.prefix_feeds(obs)
    step_feeds = calibration.step_feeds(model, obs, cfg.num_steps, limit=max(64, 2 * opts.calib_count),
                                        step_time=StepTime(model, opts.time_input))
    feeds = {"prefix": prefix_feeds, "denoise_step": step_feeds}
    if "chunk" in fp32:
        g = np.random.default_rng(0)
        feeds["chunk"] = [f | {"noise": g.standard_normal((1, cfg.chunk_len, cfg.action_dim)).astype(np.float32)}
                          for f in prefix_feeds]
    unknown = set(opts.int8_graphs) - {"prefix", "denoise_step", "chunk"}
    if unknown:
        raise EdgeVlaError(f"unknown graph(s) {sorted(unknown)} in int8_graphs; choose from prefix, denoise_step, chunk")
    graphs = {name: quantize.to_int8(path, out_dir / path.name, feeds[name], weight_range=opts.int8_range)
              if name in opts.int8_graphs else path for name, path in fp32.items()}
    desc = {"source": opts.calib or "sim (seeds from 500000)", "observations": len(prefix_feeds),
            "graphs": [name for name in fp32 if name in opts.int8_graphs],
            "step_samples": len(step_feeds), "method": "minmax", "format": "QDQ symmetric, per-channel weights",
            **_weight_range_desc(opts.int8_range)}
    return graphs, desc


def _weight_range_desc(weight_range: str) -> dict:
    """The manifest's record of the INT8 weight range (Policy.load and `edge-vla doctor` read weight_range)."""
    return {"weight_range": weight_range, "weight_bits": quantize.INT8_RANGES[weight_range],
            "weight_range_note": quantize.INT8_RANGE_NOTES[weight_range]}


def _table_steps(model: VLA, opts: ExportOptions) -> list[int]:
    steps = sorted(set(opts.table_steps or DEFAULT_TABLE_STEPS) | {model.config.num_steps})
    if any(not isinstance(n, int) or n < 1 for n in steps):
        raise EdgeVlaError(f"table step counts must be positive integers, got {steps}")
    return steps


def _write_time_tables(model: VLA, work: Path, opts: ExportOptions) -> dict[int, str]:
    """One [2N + 1, R] float32 table per supported step count N (docs/MANIFEST.md); {} for a scalar t."""
    if opts.time_input != "table":
        return {}
    step_time = StepTime(model, "table")
    out = {}
    (work / "tables").mkdir(exist_ok=True)
    for n in _table_steps(model, opts):
        rel = f"tables/time_cond_{n}.npy"
        np.save(work / rel, step_time.table(n).reshape(2 * n + 1, *step_time.example().shape),
                allow_pickle=False)
        out[n] = rel
    return out


def _manifest(model: VLA, graphs: dict[str, Path], opts: ExportOptions, calib: dict, source_hash: str,
              source: str, meta: dict, tables: dict[int, str]) -> dict:
    cfg = model.config
    step_distilled = bool(meta.get("step_distilled")) or meta.get("stage") == "reflow"
    gspecs = {}
    for name, path in graphs.items():
        ins, outs = io_specs(onnx.load(str(path), load_external_data=False))
        quantized = opts.precision != "int8" or name in opts.int8_graphs
        gspecs[name] = {"role": GRAPH_ROLES[name], "file": f"graphs/{name}.onnx", "inputs": with_roles(name, ins),
                        "outputs": with_roles(name, outs), "precision": opts.precision if quantized else "fp32"}
        if name == "chunk":
            gspecs[name]["steps"] = cfg.num_steps
    space = opts.action_space or sim_action_space()
    time_input: dict = {"kind": opts.time_input, "input": TIME_INPUT[opts.time_input]}
    min_steps, max_steps = 1, 64
    if tables:
        time_input["tables"] = {str(n): rel for n, rel in sorted(tables.items())}
        min_steps, max_steps = min(tables), max(tables)
    return {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "family": REFERENCE_FAMILY,
        "model": cfg.to_dict(),
        "parameters": count_parameters(model),
        "precision": opts.precision,
        "graphs": gspecs,
        "normalization": {
            "state": {"mean": model.state_mean.tolist(), "std": model.state_std.tolist()},
            "action": {"mean": model.action_mean.tolist(), "std": model.action_std.tolist()},
            "images": {"layout": "camera-major RGB, float [0, 1], NCHW", "in_graph": "(x - 0.5) / 0.25"},
        },
        "action_space": space.to_dict(),
        "control": {"action_period_s": space.action_period_s, "chunk_len": cfg.chunk_len,
                    "execute_horizon": max(1, cfg.chunk_len // 2), "default_rate_hz": 50},
        "cameras": list(opts.cameras) if opts.cameras else
        [{"name": ["main", "wrist"][i] if i < 2 else f"cam{i}", "image_size": cfg.image_size}
         for i in range(cfg.num_cameras)],
        "sampler": {
            "flow": "x_t = (1 - t) * noise + t * action; integrate t from 0 to 1 with x <- x + dt * v",
            "time": {"start": REFERENCE_FLOW.start, "end": REFERENCE_FLOW.end},
            "solvers": list(SOLVERS), "solver": "euler",
            "num_steps": cfg.num_steps, "min_steps": min_steps, "max_steps": max_steps,
            "recommended_min_steps": 1 if step_distilled else cfg.num_steps,
            "time_input": time_input,
            "unrolled_graph_steps": cfg.num_steps if "chunk" in graphs else None,
        },
        # Real-time chunking (trained): the step graph's prefix_mask marks up to max_delay frozen leading actions;
        # the runtime holds them in x (velocity zeroed there). The unrolled chunk graph takes no prefix. Absent
        # (not null) without RTC: readers test for the key.
        **({"rtc": {"max_delay": cfg.rtc_max_delay, "mask_input": PREFIX_MASK, "chunk_graph": False,
                    "method": "action-prefix conditioning (trained; arXiv 2512.05964)"}}
           if cfg.rtc_max_delay > 0 else {}),
        "preprocessing": {
            "kind": REFERENCE_FAMILY,
            "images": {"cameras": cfg.num_cameras, "height": cfg.image_size, "width": cfg.image_size,
                       "layout": "NCHW, camera-major [1, C, 3, H, W]", "resize": "none", "scale": 1.0 / 255.0,
                       "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]},
            "state": {"dim": cfg.state_dim, "pad_to": cfg.state_dim, "normalize": "graph"},
            "action": {"dim": cfg.action_dim, "valid_dims": cfg.action_dim, "normalize": "mean_std"},
        },
        "tokenizer": {"kind": "bytes", "max_len": cfg.max_text_len, "pad_id": PAD_ID, "eos_id": EOS_ID,
                      "vocab_size": VOCAB_SIZE, "normalize": "lower-case, collapse whitespace"},
        "provenance": {
            "edge_vla": edge_vla.__version__, "source_checkpoint": source, "source_sha256": source_hash,
            "torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "opset": OPSET, "calibration": calib, "host": platform.node(), "training": meta.get("train"),
            "dataset": meta.get("dataset"),
        },
    }


def _json_bytes(data: dict) -> bytes:
    import json

    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def enforce_gates(report: Any, graphs: dict[str, Path], allow_lint_errors: bool) -> dict:
    """The two gates every export passes before anything is written: numerics, then the TensorRT lint
    (errors refuse unless allowed). report None: the caller skipped the numerics check on purpose (the
    full-size π0, docs/PI0.md). Returns the lint report for the bundle."""
    findings = trt_lint.lint_files(graphs)
    lint = trt_lint.report(findings)
    if report is not None and not report.passed:
        raise EdgeVlaError(f"numerics check failed, no bundle written: {report.summary()}")
    if lint["errors"] and not allow_lint_errors:
        raise EdgeVlaError("TensorRT lint found errors, no bundle written (pass --allow-lint-errors to "
                           "export anyway):\n" + trt_lint.format_findings(findings))
    return lint
