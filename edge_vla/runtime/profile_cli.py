"""`edge-vla profile BUNDLE [BUNDLE ...]`: per-stage latency against a budget, with trace, plot, roofline.

Precision is a property of a bundle (fp32 / fp16 / int8 are exported separately), so compare precisions
by passing sibling bundles; `--precision` keeps only the bundles of the listed precisions.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

from edge_vla.bundle import Bundle, write_json_atomic
from edge_vla.errors import ConfigError, EdgeVlaError, MissingDependencyError
from edge_vla.runtime import profile as prof
from edge_vla.runtime import roofline as rl
from edge_vla.runtime.solvers import EVALS_PER_STEP
from edge_vla.runtime.trace import write_trace

log = logging.getLogger(__name__)

EXIT_OVER_BUDGET = 3


def _int_list(text: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"step counts must be >= 1, got {text!r}")
    return values


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundles", nargs="+", metavar="BUNDLE",
                        help="bundle(s) to profile; pass fp32/fp16/int8 siblings to compare precisions")
    parser.add_argument("--budget-ms", type=float, help="latency budget per chunk (default: 1000 / rate)")
    parser.add_argument("--rate-hz", type=float,
                        help="control rate whose period is the budget (default: the bundle's default_rate_hz)")
    parser.add_argument("--steps", type=_int_list,
                        help="ODE step counts, e.g. 1,2,5,10 (default: 1,2,5 and the bundle's own count)")
    parser.add_argument("--precision", help="keep only bundles of these precisions, e.g. fp32,int8")
    parser.add_argument("--solver", help="ODE solver (default: the bundle's)")
    parser.add_argument("--iterations", type=int, default=200, help="timed runs per configuration")
    parser.add_argument("--warmup", type=int, default=20, help="untimed runs first, per configuration")
    parser.add_argument("--threads", type=int, help="intra-op threads (default: all CPUs)")
    parser.add_argument("--backend", default="auto", choices=("auto", "onnxruntime", "tensorrt"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path,
                        help="where trace.json, latency.png and profile.json go "
                             "(default: FIRST_BUNDLE/target/profile)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--no-roofline", action="store_true", help="skip the Jetson roofline estimate")
    parser.add_argument("--check", action="store_true",
                        help=f"exit {EXIT_OVER_BUDGET} when any configuration misses the budget")


def resolve_budget(budget_ms: float | None, rate_hz: float | None, bundle: Bundle) -> tuple[float, float | None]:
    """--budget-ms wins; else 1000 / --rate-hz; else the bundle's default control rate."""
    if budget_ms is not None:
        if budget_ms <= 0:
            raise ConfigError(f"--budget-ms must be > 0, got {budget_ms}")
        return budget_ms, rate_hz
    rate = rate_hz or bundle.manifest.get("control", {}).get("default_rate_hz")
    if not rate or rate <= 0:
        raise ConfigError("no budget: pass --budget-ms or --rate-hz (the bundle names no default rate)")
    return 1000.0 / rate, float(rate)


def default_steps(bundle: Bundle) -> list[int]:
    contract = bundle.contract
    allowed = set(contract.allowed_steps())  # a time-table bundle allows only the counts it has tables for
    return sorted({n for n in (1, 2, 5, contract.num_steps) if n in allowed})


def roofline_for(bundle: Bundle, steps: list[int], solver: str | None) -> dict[str, Any]:
    try:
        costs = rl.bundle_costs(bundle)
    except MissingDependencyError as exc:  # pragma: no cover - bundle_costs checks availability first
        return {"skipped": str(exc)}
    if costs is None:
        return {"skipped": "onnx is not installed (pip install 'edge-vla[export]') and the manifest holds no "
                           "precomputed graph costs"}
    solver = solver or bundle.manifest["sampler"].get("solver", "euler")
    return rl.roofline_report(costs, steps, EVALS_PER_STEP.get(solver, 1))


def main(args: argparse.Namespace) -> int:
    bundles = [Bundle.open(p) for p in args.bundles]
    if args.precision:
        wanted = {p.strip() for p in args.precision.split(",") if p.strip()}
        bundles = [b for b in bundles if b.precision in wanted]
        if not bundles:
            raise ConfigError(f"no bundle has precision in {sorted(wanted)}; the bundles given are "
                              f"{[str(p) for p in args.bundles]}")
    budget_ms, rate_hz = resolve_budget(args.budget_ms, args.rate_hz, bundles[0])
    out = args.out or bundles[0].target_dir / "profile"
    all_results: list[prof.ConfigResult] = []
    reports = []
    _warn_if_busy()
    for bundle in bundles:
        steps = args.steps or default_steps(bundle)
        print(f"profiling {bundle.root} ({bundle.precision}) steps={steps}, {args.iterations} runs after "
              f"{args.warmup} warm-up, budget {budget_ms:.3f} ms", flush=True)
        results = prof.profile_bundle(bundle, steps, args.iterations, args.warmup, args.threads, args.solver,
                                      args.seed, args.backend)
        roof = {"skipped": "--no-roofline"} if args.no_roofline else roofline_for(bundle, steps, args.solver)
        report = prof.bundle_report(bundle, results, budget_ms, rate_hz, args.threads, args.warmup, roof)
        report["artifacts"] = {"dir": str(out)}
        for config in report["configurations"]:
            print()
            print(prof.format_table(config))
        print()
        measured = {c["steps"]: c["stages"]["prefix"]["p50"] + c["stages"]["ode_total"]["p50"]
                    for c in report["configurations"]}
        print(prof.format_roofline(roof, measured))
        _save_in_bundle(bundle, report, args.bundles)
        reports.append(report)
        all_results += results

    trace = write_trace(out / "trace.json", [(r.label, r.representative()) for r in all_results])
    print(f"\ntrace (open in https://ui.perfetto.dev): {trace}")
    if not args.no_plot:
        try:
            print(f"plot: {prof.plot_latency(all_results, budget_ms, out / 'latency.png')}")
        except MissingDependencyError as exc:
            print(f"plot skipped: {exc}")
    write_json_atomic(out / "profile.json", {"kind": prof.REPORT_KIND, "reports": reports})
    failed = [c["label"] for r in reports for c in r["configurations"] if not c["verdict"]["pass"]]
    print(f"verdict: {len(failed)} of {len(all_results)} configuration(s) over the {budget_ms:.3f} ms budget"
          + (f": {', '.join(failed)}" if failed else ""))
    return EXIT_OVER_BUDGET if failed and args.check else 0


def _warn_if_busy() -> None:
    """Other processes on the CPUs show up as multi-millisecond spikes in p99/max; say so up front."""
    load, cpus = (os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0), os.cpu_count() or 1
    if load > 0.5 * cpus:
        print(f"note: load average {load:.1f} on {cpus} CPU(s): other work competes with the policy, so tail "
              "latencies (p99, max) will include its scheduling delays; try --threads 1", flush=True)


def _save_in_bundle(bundle: Bundle, report: dict[str, Any], args_paths: list[str]) -> None:
    """target/ is not hashed, so the bundle (and its signature) still verifies after this write."""
    if not any(Path(bundle.root).resolve().is_relative_to(Path(a).resolve()) for a in args_paths):
        # an extracted tarball: its target/ is a temp dir that vanishes on exit
        log.warning("%s is a tarball; its profile report is only in --out", bundle.root)
        return
    try:
        write_json_atomic(bundle.target_dir / "profile.json", report)
    except OSError as exc:
        raise EdgeVlaError(f"could not write {bundle.target_dir / 'profile.json'}: {exc}; "
                           "is the bundle read-only? Use --out elsewhere and copy it.") from exc
    print(f"report: {bundle.target_dir / 'profile.json'}")
