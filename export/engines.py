"""`edge-vla build-engines BUNDLE`: TensorRT engines for a bundle's graphs, built on the target.

Where the `tensorrt` module imports, each graph is built as a strongly typed network (precision comes
from the graph's own types and Q/DQ nodes: the only mode TensorRT 11 has, and supported by 10.3), with
a static optimization profile, a workspace pool limit and a persisted timing cache. Engines, the
timing cache and an index (TensorRT version, GPU, sha256 of each engine) go to BUNDLE/target/.
Where it does not import, the command says so and writes BUNDLE/target/build_engines.sh with the
equivalent trtexec lines.
"""

from __future__ import annotations

import argparse
import logging
import shlex
from pathlib import Path

from edge_vla.bundle import Bundle, sha256_file, write_json_atomic
from edge_vla.errors import EdgeVlaError
from edge_vla.optional import available, require

log = logging.getLogger(__name__)

ENGINE_GRAPHS = ("prefix", "denoise_step")


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
        "# Build TensorRT engines for this bundle on the target (JetPack 6: TensorRT 10.3, JetPack 7: 11.x).\n"
        "# Usage: build_engines.sh [BUNDLE_DIR]   (trtexec ships in /usr/src/tensorrt/bin on Jetson)\n"
        "set -euo pipefail\n"
        'BUNDLE="${1:-$(cd "$(dirname "$0")" && pwd)}"\n'
        'export PATH="$PATH:/usr/src/tensorrt/bin"\n'
        'mkdir -p "$BUNDLE/target/engines"\n'
        f"{body}\n"
        'echo "engines written to $BUNDLE/target/engines; run: edge-vla build-engines $BUNDLE --index-only"\n'
    )


def build_engine(onnx_path: Path, plan_path: Path, cache_path: Path, workspace_mb: int) -> dict:
    """Build one strongly typed engine with the TensorRT Python API (10.3 and 11)."""
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


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle directory")
    parser.add_argument("--workspace-mb", type=int, default=1024, help="TensorRT workspace pool limit")
    parser.add_argument("--index-only", action="store_true",
                        help="engines were built with trtexec (build_engines.sh): only write the index")


def main(args: argparse.Namespace) -> int:
    bundle = Bundle.open(args.bundle)
    target = bundle.target_dir
    engines_dir = target / "engines"
    script = target / "build_engines.sh"
    if not args.index_only and not available("tensorrt"):
        script.parent.mkdir(parents=True, exist_ok=True)
        script.write_text(build_script(bundle.manifest, args.workspace_mb))
        script.chmod(0o755)
        print("TensorRT (the `tensorrt` Python module) is not installed here, so no engines were built.\n"
              f"Wrote {script} with the equivalent trtexec command lines; run it on the target, or install\n"
              "TensorRT (JetPack ships it; on x86: pip install 'edge-vla[tensorrt]') and run this again.")
        return 0
    index = {"graphs": {}, "precision": bundle.precision}
    for name in ENGINE_GRAPHS:
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
    write_json_atomic(engines_dir / "index.json", index)
    print(f"engines and index written to {engines_dir}")
    return 0
