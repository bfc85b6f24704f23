"""`edge-vla profile BUNDLE [BUNDLE ...]`: per-stage latency and "will my robot keep up?", with trace, plot,
roofline and the machine's power mode.

Precision is a property of a bundle (fp32 / fp16 / int8 are exported separately), so compare precisions
by passing sibling bundles; `--precision` keeps only the bundles of the listed precisions.

The verdict judges each inference against the latency the onboard loop's chunk strategy tolerates (see
edge_vla.runtime.profile); the control period is the control loop's own budget, reported on its own line.
`--budget-ms` adds a plain gate (p99 within it), which is what `--rate-hz` used to set.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
from pathlib import Path
from typing import Any

from edge_vla.bundle import Bundle, write_json_atomic
from edge_vla.cli_flags import DeprecatedAlias
from edge_vla.errors import ConfigError, EdgeVlaError, MissingDependencyError
from edge_vla.runtime import profile as prof
from edge_vla.runtime import roofline as rl
from edge_vla.runtime.policy import checked_threads
from edge_vla.runtime.solvers import EVALS_PER_STEP
from edge_vla.runtime.trace import write_trace

log = logging.getLogger(__name__)

EXIT_OVER_BUDGET = 3
_TARBALL_SUFFIXES = (".tar.gz", ".tgz", ".tar")


def _int_list(text: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"step counts must be >= 1, got {text!r}")
    return values


def configure(parser: argparse.ArgumentParser) -> None:
    from edge_vla.onboard.scheduler import STRATEGIES

    parser.add_argument("bundles", nargs="+", metavar="BUNDLE",
                        help="bundle(s) to profile (directories or .tar.gz); pass fp32/fp16/int8 siblings to "
                             "compare precisions")
    parser.add_argument("--rate-hz", type=float,
                        help="control rate of `edge-vla run` (default: the bundle's default_rate_hz): the control "
                             "loop's own cycle budget and one term of the chunk verdicts. It no longer sets the "
                             "inference budget: use --budget-ms for that")
    parser.add_argument("--strategy", choices=(*STRATEGIES, prof.RTC),
                        help="the chunk strategy --check judges (default: the one `edge-vla run` uses); every "
                             "strategy's verdict is printed")
    parser.add_argument("--run-args", default="", metavar="'FLAGS'",
                        help="`edge-vla run` flags to judge with, e.g. '--chunk-max-age 1.0 --execute 4' "
                             "(default: run's own defaults)")
    parser.add_argument("--budget-ms", type=float,
                        help="also gate p99 of one inference against this fixed budget (ms)")
    parser.add_argument("--steps", type=_int_list,
                        help="ODE step counts, e.g. 1,2,5,10 (default: 1,2,5 and the bundle's own count)")
    parser.add_argument("--precision", help="keep only bundles of these precisions, e.g. fp32,int8")
    parser.add_argument("--solver", help="ODE solver (default: the bundle's)")
    parser.add_argument("--iterations", type=int, default=200, help="timed runs per configuration")
    parser.add_argument("--warmup", type=int, default=20, help="untimed runs first, per configuration")
    parser.add_argument("--threads", type=int, help="intra-op threads (default: all CPUs)")
    parser.add_argument("--backend", default="auto", choices=("auto", "onnxruntime", "tensorrt", "openvino"))
    parser.add_argument("--ov-precision", choices=("f32", "bf16"),
                        help="--backend openvino only: its arithmetic, f32 (default) or bf16 (where the CPU has it; "
                             "edge-vla tune checks it against the FP16 numerics gate)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--output", dest="out", type=Path,
                        help="where trace.json, latency.png and profile.json go (default: FIRST_BUNDLE/target/profile; "
                             "for a tarball, NAME.profile/ next to it)")
    parser.add_argument("--out", dest="out", type=Path, action=DeprecatedAlias, new="-o/--output")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--no-roofline", action="store_true", help="skip the Jetson roofline estimate")
    parser.add_argument("--check", action="store_true",
                        help=f"exit {EXIT_OVER_BUDGET} when any configuration fails the judged strategy's verdict "
                             "(or --budget-ms where given)")


def _is_tarball(path: str | Path) -> bool:
    p = Path(path)
    return p.is_file() and p.name.endswith(_TARBALL_SUFFIXES)


def default_out(first: str | Path, bundle: Bundle) -> Path:
    """FIRST_BUNDLE/target/profile; for a tarball (extracted into a temporary folder that is deleted on
    exit) NAME.profile/ next to the tarball, so every path printed still exists afterwards."""
    if _is_tarball(first):
        p = Path(first).resolve()
        name = next(p.name[: -len(s)] for s in _TARBALL_SUFFIXES if p.name.endswith(s))
        return p.parent / f"{name}.profile"
    return bundle.target_dir / "profile"


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


def _run_args(text: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError as exc:
        raise ConfigError(f"--run-args {text!r}: {exc}; quote it as one argument, e.g. --run-args '--execute 4'") \
            from exc


def main(args: argparse.Namespace) -> int:
    if args.budget_ms is not None and not args.budget_ms > 0:
        raise ConfigError(f"--budget-ms must be > 0, got {args.budget_ms}")
    checked_threads(args.threads)  # before any output: --threads 1000000 would hang the first load
    run_args = _run_args(args.run_args)
    bundles = [Bundle.open(p) for p in args.bundles]
    if args.precision:
        wanted = {p.strip() for p in args.precision.split(",") if p.strip()}
        bundles = [b for b in bundles if b.precision in wanted]
        if not bundles:
            raise ConfigError(f"no bundle has precision in {sorted(wanted)}; the bundles given are "
                              f"{[str(p) for p in args.bundles]}")
    if args.check and args.rate_hz is not None and args.budget_ms is None:
        print(f"note: --rate-hz no longer sets the budget --check applies (a chunk is needed every few hundred ms, "
              f"not every control period); for the old check pass --budget-ms {1000.0 / args.rate_hz:g}", flush=True)
    # Checked before any inference: a bad --rate-hz or --run-args fails in one line, not after minutes.
    timings = {id(b): prof.onboard_timing(b, args.rate_hz, run_args, args.strategy) for b in bundles}
    out = args.out or default_out(args.bundles[0], bundles[0])
    host = prof.host_info(args.threads)
    print(prof.format_power(host["power"]), flush=True)
    all_results: list[prof.ConfigResult] = []
    reports = []
    _warn_if_busy()
    for bundle in bundles:
        timing, not_judged = timings[id(bundle)]
        steps = args.steps or default_steps(bundle)
        print(f"profiling {bundle.root} ({bundle.precision}) steps={steps}, {args.iterations} runs after "
              f"{args.warmup} warm-up", flush=True)
        print(prof.format_timing(timing) if timing else f"onboard verdicts skipped: {not_judged}")
        results = prof.profile_bundle(bundle, steps, args.iterations, args.warmup, args.threads, args.solver,
                                      args.seed, args.backend, args.ov_precision)
        roof = {"skipped": "--no-roofline"} if args.no_roofline else roofline_for(bundle, steps, args.solver)
        report = prof.bundle_report(bundle, results, timing, args.budget_ms, args.threads, args.warmup, roof,
                                    not_judged, host)
        report["artifacts"] = {"dir": str(out)}
        print(prof.format_control_loop(report["control_loop"]))
        for config in report["configurations"]:
            print()
            print(prof.format_table(config))
        print()
        # the graphs' share of the mean (prefix + ODE, or the fused chunk graph): what the roofline estimates
        measured = {c["steps"]: c["breakdown_ms"]["total"] - c["breakdown_ms"]["preprocess"]
                    - c["breakdown_ms"]["postprocess"] - c["breakdown_ms"]["other"] for c in report["configurations"]}
        print(prof.format_roofline(roof, measured))
        _save_in_bundle(bundle, report, args.bundles)
        reports.append(report)
        all_results += results

    try:
        _write_outputs(out, all_results, reports, args.budget_ms, plot=not args.no_plot,
                       tolerated_ms=_judged_tolerance_ms(timings[id(bundles[0])][0]))
    except OSError as exc:
        raise EdgeVlaError(f"could not write the profile outputs to {out}: {exc}; pass --out DIR somewhere "
                           "writable") from exc
    return _verdict_line(reports, len(all_results), args.check)


def _judged_tolerance_ms(timing: prof.LoopTiming | None) -> float | None:
    if timing is None:
        return None
    tol = prof.tolerances(timing).get(timing.strategy)  # rtc judged on a bundle without a usable rtc block: none
    return None if tol is None else 1e3 * tol.tolerated_s


def _write_outputs(out: Path, results: list[prof.ConfigResult], reports: list[dict[str, Any]],
                   budget_ms: float | None, plot: bool, tolerated_ms: float | None) -> None:
    """trace.json, latency.png and profile.json; each path is printed once it is written."""
    trace = write_trace(out / "trace.json", [(r.label, r.representative()) for r in results])
    print(f"\ntrace (open at ui.perfetto.dev): {trace}")
    if plot:
        try:
            print(f"plot: {prof.plot_latency(results, budget_ms, out / 'latency.png', tolerated_ms)}")
        except MissingDependencyError as exc:
            print(f"plot skipped: {exc}")
    write_json_atomic(out / "profile.json", {"kind": prof.REPORT_KIND, "reports": reports})
    print(f"report: {out / 'profile.json'}")


def _verdict_line(reports: list[dict[str, Any]], count: int, check: bool) -> int:
    configs = [c for r in reports for c in r["configurations"]]
    failed = [c["label"] for c in configs if not c["verdict"]["pass"]]
    strategies = sorted({c["verdict"]["strategy"] for c in configs if c["verdict"].get("strategy")})
    judged = f"judged as {'/'.join(strategies)}" if strategies else "no onboard verdict"
    print(f"verdict ({judged}): {count - len(failed)} of {count} configuration(s) keep up"
          + (f"; FAIL: {', '.join(failed)}" if failed else ""))
    return EXIT_OVER_BUDGET if failed and check else 0


def _warn_if_busy() -> None:
    """Other processes on the CPUs show up as multi-millisecond spikes in p99/max; say so up front."""
    load, cpus = (os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0), os.cpu_count() or 1
    if load > 0.5 * cpus:
        print(f"note: load average {load:.1f} on {cpus} CPU(s): other work competes with the policy, so tail "
              "latencies (p99, max) will include its scheduling delays; try --threads 1", flush=True)


def _save_in_bundle(bundle: Bundle, report: dict[str, Any], args_paths: list[str]) -> None:
    """target/ is not hashed, so the bundle (and its signature) still verifies after this write."""
    if not any(Path(bundle.root).resolve().is_relative_to(Path(a).resolve()) for a in args_paths):
        # an extracted tarball: its target/ is a temp dir that vanishes on exit; the report is in --out only
        return
    try:
        write_json_atomic(bundle.target_dir / "profile.json", report)
    except OSError as exc:
        raise EdgeVlaError(f"could not write {bundle.target_dir / 'profile.json'}: {exc}; "
                           "is the bundle read-only? Use --out elsewhere and copy it.") from exc
    print(f"report: {bundle.target_dir / 'profile.json'}")
