"""`edge-vla build-engines BUNDLE`: TensorRT engines for a bundle's graphs, built and verified on the target.

Where the `tensorrt` module imports, each graph is built as a strongly typed network (precision comes
from the graph's own types and Q/DQ nodes; TensorRT 10.x, JetPack 6: 10.3, JetPack 7: 10.13), with
a static optimization profile, a workspace pool limit and a persisted timing cache. Engines, the
timing cache and an index (TensorRT version, GPU, sha256 of each engine) go to BUNDLE/target/.

Then every engine is run against its ONNX graph through onnxruntime on the same fresh inputs
(`verify`, a Polygraphy-style comparator: observation inputs drawn per role, the step graph fed the
reference prefix's K/V and rows of the bundle's own time schedule) and compared with the bundle's
per-precision thresholds. An engine outside them is refused (exit 1, the index says
"verified": false and the runtime warns loudly), unless --allow-unverified.
Where TensorRT does not import, the command says so and writes BUNDLE/target/build_engines.sh with the
equivalent trtexec lines; `--index-only` after running it records the engines as unverified.
Engines kept, it ends with `edge-vla tune` (edge_vla.runtime.tune; --no-tune skips it): every backend x precision
timed here under the bundle's numerics gate, the fastest recorded for Policy.load in the service's state directory.
"""

from __future__ import annotations

import argparse
import logging
import shlex
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edge_vla.bundle import Bundle, sha256_file, write_json_atomic
from edge_vla.errors import EdgeVlaError
from edge_vla.optional import available, require
from edge_vla.runtime.compare import THRESHOLDS, Metrics
from edge_vla.runtime.contract import Contract, GraphContract, IOSpec

log = logging.getLogger(__name__)


def engine_graphs(contract: Contract) -> tuple[str, str]:
    """The graphs the TensorRT backend runs: the prefix and step graphs (the unrolled chunk is ORT-only)."""
    return contract.prefix.name, contract.step.name


def trtexec_lines(bundle_manifest: dict, workspace_mb: int = 1024, rel_root: str = "$BUNDLE") -> list[str]:
    lines = []
    for name, g in bundle_manifest["graphs"].items():
        shapes = ",".join(f"{i['name']}:{'x'.join(str(d) for d in i['shape'])}" for i in g["inputs"])
        lines.append(" ".join([
            "trtexec",
            f"--onnx={rel_root}/{g['file']}",
            f"--saveEngine={rel_root}/target/engines/{name}.plan",
            "--stronglyTyped",
            f"--memPoolSize=workspace:{workspace_mb}M",
            f"--timingCacheFile={rel_root}/target/timing.cache",
            f"--shapes={shlex.quote(shapes)}",
            "--skipInference",
        ]))
    return lines


def build_script(bundle_manifest: dict, workspace_mb: int = 1024) -> str:
    body = "\n".join(trtexec_lines(bundle_manifest, workspace_mb))
    return (
        "#!/usr/bin/env bash\n"
        "# Build TensorRT engines for this bundle on the target (JetPack 6: TensorRT 10.3, JetPack 7: 10.13).\n"
        "# Usage: build_engines.sh [BUNDLE_DIR]   (trtexec ships in /usr/src/tensorrt/bin on Jetson)\n"
        "set -euo pipefail\n"
        'BUNDLE="${1:-$(cd "$(dirname "$0")" && pwd)}"\n'
        'export PATH="$PATH:/usr/src/tensorrt/bin"\n'
        'mkdir -p "$BUNDLE/target/engines"\n'
        f"{body}\n"
        'echo "engines written to $BUNDLE/target/engines; run: edge-vla build-engines $BUNDLE --index-only"\n'
    )


def build_engine(onnx_path: Path, plan_path: Path, cache_path: Path, workspace_mb: int) -> dict:
    """Build one strongly typed engine with the TensorRT 10.x Python API."""
    trt = require("tensorrt")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EdgeVlaError(f"TensorRT could not parse {onnx_path}: {errors}; run `edge-vla lint` on the bundle")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = tuple(tensor.shape)
        profile.set_shape(tensor.name, shape, shape, shape)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EdgeVlaError(f"TensorRT failed to build an engine for {onnx_path}; see the TensorRT log above")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = plan_path.with_suffix(".plan.tmp")
    tmp.write_bytes(bytes(serialized))
    tmp.replace(plan_path)
    cache_tmp = cache_path.with_suffix(".tmp")
    cache_tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    cache_tmp.replace(cache_path)
    return {"file": str(plan_path.name), "sha256": sha256_file(plan_path)}


def gpu_name() -> str:
    try:
        cudart = require("cuda.bindings.runtime")
        err, props = cudart.cudaGetDeviceProperties(0)
        return props.name.decode(errors="replace").strip("\x00") if int(err) == 0 else "unknown"
    except Exception:
        return "unknown"


# --- verification: engines vs the bundle's ONNX graphs -------------------------------------------------


class GraphRunner(Protocol):
    """Runs one graph on named numpy inputs (Polygraphy's runner idea): onnxruntime, TensorRT, a test double."""

    def run(self, graph: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class OrtGraphRunner:
    def __init__(self, bundle: Bundle, graphs: tuple[str, ...]) -> None:
        from edge_vla.runtime.ort_backend import make_session

        self.sessions = {g: make_session(bundle.root / bundle.graph(g).file, 1, ["CPUExecutionProvider"])[0]
                         for g in graphs}

    def run(self, graph: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        sess = self.sessions[graph]
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(names, dict(feeds)), strict=True))


class TrtGraphRunner:
    """One engine per graph, its own device buffers, synchronous H2D -> execute_async_v3 -> D2H."""

    def __init__(self, plans: Mapping[str, bytes]) -> None:
        from edge_vla.runtime.trt_backend import TrtEngineRunner

        self.runners = {g: TrtEngineRunner(plan, g) for g, plan in plans.items()}

    def run(self, graph: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.runners[graph].run(feeds)

    def close(self) -> None:
        for r in self.runners.values():
            r.close()


@dataclass
class Verification:
    precision: str
    threshold_rel_l2: float
    threshold_cosine: float
    samples: int
    graphs: dict[str, dict[str, Any]]  # graph -> worst Metrics over its outputs, as a dict
    passed: bool

    def summary(self) -> str:
        parts = [f"{g}: rel L2 {m['rel_l2']:.2e}, cosine {m['cosine']:.6f}" for g, m in self.graphs.items()]
        return (f"{self.precision} engines vs ONNX over {self.samples} fresh inputs: " + "; ".join(parts)
                + f" (limits rel L2 <= {self.threshold_rel_l2:g}, cosine >= {self.threshold_cosine:g}): "
                + ("PASS" if self.passed else "FAIL"))


def _fresh(spec: IOSpec, rng: np.random.Generator, vocab: int) -> np.ndarray:
    if spec.role == "images":
        return rng.random(spec.shape).astype(spec.np_dtype)
    if spec.role == "tokens":
        return rng.integers(2, max(vocab, 3), spec.shape).astype(spec.np_dtype)
    if spec.role in ("token_mask", "image_mask"):
        return np.ones(spec.shape, spec.np_dtype)
    return rng.standard_normal(spec.shape).astype(spec.np_dtype)


def fresh_feeds(graph: GraphContract, rng: np.random.Generator, known: Mapping[str, np.ndarray],
                time_rows: np.ndarray, vocab: int) -> dict[str, np.ndarray]:
    """Inputs for `graph` by role: `known` arrays by name (the prefix's outputs, observation inputs the
    prefix was given), a random row of the schedule for the time input, fresh random values otherwise."""
    feeds = {}
    for spec in graph.inputs:
        if spec.name in known:
            feeds[spec.name] = known[spec.name]
        elif spec.role == "prefix":
            raise EdgeVlaError(f"graph {graph.name!r} input {spec.name!r} needs a prefix output of that name")
        elif spec.role in ("time", "time_cond"):
            feeds[spec.name] = time_rows[rng.integers(len(time_rows))]
        else:
            feeds[spec.name] = _fresh(spec, rng, vocab)
    return feeds


def verify(contract: Contract, precision: str, reference: GraphRunner, candidate: GraphRunner, samples: int = 4,
           seed: int = 0, vocab: int = 258) -> Verification:
    """Run both runners on the same fresh inputs; compare every output with the precision's thresholds.

    The step graph is fed the *reference* prefix outputs, so its error is its own, not the prefix's.
    """
    rng = np.random.default_rng(seed)
    rel_max, cos_min = THRESHOLDS[precision]
    rows = contract.time_rows(contract.num_steps)
    worst = {g: Metrics(0.0, 0.0, 1.0) for g in engine_graphs(contract)}
    for _ in range(samples):
        obs = fresh_feeds(contract.prefix, rng, {}, rows, vocab)
        ref_prefix = reference.run(contract.prefix.name, obs)
        got_prefix = candidate.run(contract.prefix.name, obs)
        for name, ref in ref_prefix.items():
            worst[contract.prefix.name] = worst[contract.prefix.name].worst(Metrics.of(ref, got_prefix[name]))
        step_feeds = fresh_feeds(contract.step, rng, {**obs, **ref_prefix}, rows, vocab)
        ref_step = reference.run(contract.step.name, step_feeds)
        got_step = candidate.run(contract.step.name, step_feeds)
        for name, ref in ref_step.items():
            worst[contract.step.name] = worst[contract.step.name].worst(Metrics.of(ref, got_step[name]))
    passed = all(m.within(precision) for m in worst.values())
    return Verification(precision, rel_max, cos_min, samples, {g: asdict(m) for g, m in worst.items()}, passed)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle directory")
    parser.add_argument("--workspace-mb", type=int, default=1024, help="TensorRT workspace pool limit")
    parser.add_argument("--index-only", action="store_true",
                        help="engines were built with trtexec (build_engines.sh): only write the index (and verify "
                        "them where TensorRT imports)")
    parser.add_argument("--allow-unverified", action="store_true",
                        help="keep engines that fail (or could not run) the comparison with the ONNX graphs; they are "
                        "marked unverified and the runtime warns on every load")
    parser.add_argument("--verify-samples", type=int, default=4,
                        help="fresh inputs per graph for the comparison (default %(default)s)")
    parser.add_argument("--script-only", action="store_true",
                        help="only write BUNDLE/target/build_engines.sh (the trtexec command lines) and exit 0: for a "
                             "machine without TensorRT, to run the lines on the target")
    parser.add_argument("--no-tune", action="store_true",
                        help="skip the closing `edge-vla tune` (timing every backend x precision here and recording "
                             "the fastest within the numerics gate for Policy.load)")
    parser.add_argument("--tune-rounds", type=int, default=None,
                        help="interleaved timing rounds for the closing tune (default: as many as fit its budget)")
    parser.epilog = EXIT_STATUSES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


EXIT_STATUSES = """exit status:
  0  engines built and verified (or kept unverified with --allow-unverified), or --script-only: the trtexec
     lines written
  1  no engines: TensorRT does not import here (the trtexec lines are written anyway; pass --script-only when
     they are all you want), an engine failed verification (removed), or a bad bundle (one line on stderr)
  2  command-line usage error"""


def main(args: argparse.Namespace) -> int:
    bundle = Bundle.open(args.bundle)
    target = bundle.target_dir
    engines_dir = target / "engines"
    script = target / "build_engines.sh"
    if args.script_only or (not args.index_only and not available("tensorrt")):
        script.parent.mkdir(parents=True, exist_ok=True)
        script.write_text(build_script(bundle.manifest, args.workspace_mb))
        script.chmod(0o755)
        if args.script_only:
            print(f"wrote {script}: the trtexec command lines for this bundle's graphs; run it on the target, then "
                  f"`edge-vla build-engines {args.bundle} --index-only` there")
            return 0
        raise EdgeVlaError(f"no engines built: TensorRT (the `tensorrt` module) does not import here; wrote the "
                           f"equivalent trtexec lines to {script} (pass --script-only when that is all you want; "
                           "install TensorRT: JetPack ships it, on x86 pip install 'edge-vla[tensorrt]'; on a "
                           f"machine without a GPU, `edge-vla tune {args.bundle}` picks the fastest CPU backend)")
    contract = bundle.contract
    index: dict[str, Any] = {"graphs": {}, "precision": bundle.precision}
    for name in engine_graphs(contract):
        plan = engines_dir / f"{name}.plan"
        if args.index_only:
            if not plan.is_file():
                raise EdgeVlaError(f"{plan} is missing; run {script} first")
            index["graphs"][name] = {"file": plan.name, "sha256": sha256_file(plan)}
        else:
            index["graphs"][name] = build_engine(bundle.root / bundle.graph(name).file, plan,
                                                 target / "timing.cache", args.workspace_mb)
    if available("tensorrt"):
        index["tensorrt_version"] = require("tensorrt").__version__
    index["gpu"] = gpu_name()
    ok = _verify_into(index, bundle, contract, engines_dir, args.verify_samples)
    write_json_atomic(engines_dir / "index.json", index)
    if ok:
        print(f"engines verified and written to {engines_dir}: {index['verification']['summary']}")
        _tune_after_build(bundle, args)
        return 0
    banner = "=" * 78
    print(f"{banner}\nTensorRT engines NOT VERIFIED: {index['verification']['summary']}\n{banner}")
    if args.allow_unverified:
        print(f"kept in {engines_dir} as unverified (--allow-unverified); the runtime warns on every load")
        _tune_after_build(bundle, args)
        return 0
    for name in engine_graphs(contract):
        (engines_dir / f"{name}.plan").unlink(missing_ok=True)
    (engines_dir / "index.json").unlink(missing_ok=True)
    print("engines removed; the robot will use onnxruntime. Rebuild (another precision, --workspace-mb) or pass "
          "--allow-unverified to keep them")
    return 1


def _tune_after_build(bundle: Bundle, args: argparse.Namespace) -> None:
    """`edge-vla tune` over the new engines and the CPU backends. Its failure never undoes the engines: the
    runtime then runs its untuned default (TensorRT where engines are built), and the warning says how to redo it."""
    if args.no_tune:
        return
    from edge_vla.runtime.tune import tune

    print("tune: timing every backend x precision on this machine under the bundle's numerics gate ...")
    try:
        result = tune(bundle, rounds=args.tune_rounds)
    except (EdgeVlaError, OSError) as exc:  # OSError: the record could not be written (a full disk)
        log.warning("tune did not record a choice (%s); Policy.load uses its untuned default. Run `edge-vla tune "
                    "%s` as the service user to redo it", str(exc).splitlines()[0], args.bundle)
        return
    print("\n".join(f"tune: {line}" for line in result.lines()))


def _verify_into(index: dict[str, Any], bundle: Bundle, contract: Contract, engines_dir: Path, samples: int) -> bool:
    if not (available("tensorrt") and available("cuda.bindings")):
        index["verified"] = False
        index["verification"] = {"summary": "not run: TensorRT / cuda-python do not import here"}
        return False
    graphs = engine_graphs(contract)
    candidate = TrtGraphRunner({g: (engines_dir / index["graphs"][g]["file"]).read_bytes() for g in graphs})
    try:
        report = verify(contract, bundle.precision, OrtGraphRunner(bundle, graphs), candidate, samples,
                        vocab=int(bundle.manifest.get("tokenizer", {}).get("vocab_size", 258)))
    finally:
        candidate.close()
    index["verified"] = report.passed
    index["verification"] = asdict(report) | {"summary": report.summary()}
    return report.passed
