"""The C Euler loop (issue 28): a tiny FP32 bundle's whole chunk of step-graph evaluations in one C call.

OrtBackend's one-call chunk runs the prefix graph in onnxruntime and then, where edge_vla.runtime.cpu_step can read
the step graph (export/onnx_graphs.py FoldedStep, FP32), every Euler step in C (compiled at first use into a
content-hashed cache). Anything else (no compiler, a failed build, FP16/INT8 graphs, a graph that differs from the
structure it knows, a numerics check it fails at load) is one log line and the onnxruntime chunk. These tests run the
real compiler, real bundles exported from a randomised tiny model, real subprocesses and the service user.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import service_user
from service_user import needs_service_user

from edge_vla.bundle import set_readable_modes
from edge_vla.errors import BundleError
from edge_vla.runtime import cpu_step
from edge_vla.runtime import onnx_proto as pb
from edge_vla.runtime.ort_backend import CHUNK_ENV, OrtBackend
from edge_vla.runtime.policy import Policy
from edge_vla.sim.env import ReachEnv

CPU_ENV = "EDGE_VLA_CPU_STEP"
CACHE_ENV = "EDGE_VLA_KERNEL_CACHE"
# The brief's gate: the C chunk against onnxruntime's stepping path, rel L2 of the actions.
REL_L2 = 1e-5


@pytest.fixture(scope="module")
def kernel_cache(tmp_path_factory) -> Path:
    """One compiled library for the module's in-process tests (a fresh cache per test would compile each time)."""
    return tmp_path_factory.mktemp("kernel-cache")


@pytest.fixture(autouse=True)
def _isolated_cache(kernel_cache, monkeypatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(kernel_cache))
    monkeypatch.delenv(CPU_ENV, raising=False)
    monkeypatch.delenv(CHUNK_ENV, raising=False)
    monkeypatch.delenv("CC", raising=False)


@pytest.fixture(scope="module")
def obs():
    return ReachEnv().reset(7)


@pytest.fixture(scope="module")
def rtc_bundle(tmp_path_factory) -> Path:
    """An RTC bundle (prefix_mask input) whose widths are not multiples of a vector: E = 48, 2 heads of 24, P = 29."""
    from edge_vla.config import VLAConfig
    from edge_vla.export.exporter import ExportOptions, export_model
    from edge_vla.export.model import untrained_with_live_outputs

    cfg = VLAConfig(preset="tiny", image_size=16, patch_size=8, width=32, depth=1, heads=2, expert_width=48,
                    expert_depth=2, expert_heads=2, max_text_len=24, chunk_len=8, action_dim=2, state_dim=2,
                    rtc_max_delay=3, num_steps=10).validate()
    out = tmp_path_factory.mktemp("rtc") / "bundle"
    return export_model(untrained_with_live_outputs(cfg, seed=1), out,
                        ExportOptions(calib_count=4, numerics_count=2)).bundle


def _rel_l2(ref: np.ndarray, got: np.ndarray) -> float:
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def _infer(bundle: Path, observations: list, monkeypatch, *, cpu: str = "auto", chunk: str = "auto",
           steps: int = 10) -> tuple[list[np.ndarray], str | None]:
    """Actions for each observation (the noise stream restarted before each), and the chunk path that ran."""
    monkeypatch.setenv(CPU_ENV, cpu)
    monkeypatch.setenv(CHUNK_ENV, chunk)
    with Policy.load(bundle, steps=steps, seed=11, threads=1, backend="onnxruntime") as policy:
        out = []
        for o in observations:
            policy.reset()
            out.append(policy.infer(o).actions.copy())
        return out, getattr(policy.backend, "chunk_path", None)


# --- the C path runs, and computes what onnxruntime computes ---------------------------------------------------
@pytest.mark.parametrize("fixture", ["tiny_bundle", "rtc_bundle"])
def test_the_c_chunk_matches_the_onnxruntime_stepping_path(request, monkeypatch, fixture):
    bundle = request.getfixturevalue(fixture)
    env = ReachEnv(image_size=16) if fixture == "rtc_bundle" else ReachEnv()
    observations = [env.reset(3), env.reset(4)]
    stepped, path = _infer(bundle, observations, monkeypatch, chunk="off")
    assert path is None  # control: no one-call chunk at all
    fused, path = _infer(bundle, observations, monkeypatch)
    assert path == "cpu_step"
    for ref, got in zip(stepped, fused, strict=True):
        assert _rel_l2(ref, got) <= REL_L2
    # another observation changes the chunk (the C loop reads the prefix's K/V, not stale ones)
    assert _rel_l2(fused[0], fused[1]) > 1e-3


def test_the_chunk_moves_away_from_the_noise_and_follows_the_observation(tiny_bundle, obs, monkeypatch):
    paths = (tiny_bundle / "graphs/prefix.onnx", tiny_bundle / "graphs/denoise_step.onnx")
    from edge_vla.bundle import Bundle
    from edge_vla.runtime.observation import make_encoder
    from edge_vla.runtime.sampler import Sampler

    b = Bundle.open(tiny_bundle)
    contract = b.contract
    with OrtBackend(*paths, threads=1, providers=["CPUExecutionProvider"]) as backend:
        sampler = Sampler(backend, contract, "euler", 10)
        backend.prepare_fused_chunk(10, sampler.dt)
        assert backend.chunk_path == "cpu_step" and backend.chunk is None  # no onnxruntime chunk graph composed
        encoder = make_encoder(b, contract)
        inputs = {role: backend.buffer(spec.name) for role, spec in contract.observation_inputs().items()}
        noise = np.random.default_rng(5).standard_normal(contract.x_t.shape).astype(np.float32)

        def both(o) -> tuple[np.ndarray, np.ndarray]:
            encoder.encode(o, inputs)
            got = backend.run_fused_chunk(noise).copy()
            backend.run_prefix()
            ref = sampler.run(noise).copy()
            return got, ref

        got, ref = both(obs)
        moved = ref - noise
        assert np.linalg.norm(moved) / np.linalg.norm(noise) > 0.1  # the steps do real work
        assert _rel_l2(moved, got - noise) <= REL_L2  # the displacement itself, not just noise + a small change
        other_image = dataclasses.replace(obs, images=[ReachEnv().reset(99).images[0]])
        other_text = dataclasses.replace(obs, instruction="reach the green block")
        for o in (other_image, other_text):
            got2, ref2 = both(o)
            assert _rel_l2(ref2, got2) <= REL_L2
            assert _rel_l2(got, got2) > 1e-3, "the C chunk did not follow the observation"


# --- and falls back, in one line, wherever it cannot ------------------------------------------------------------
def _cpu_step_records(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == cpu_step.__name__ and r.levelno >= logging.INFO]


def _falls_back(bundle: Path, obs, monkeypatch, caplog, says: str) -> np.ndarray:
    """Loads and infers with the C loop on auto: the onnxruntime chunk ran, after exactly one one-line log record of
    cpu_step's saying `says`. Returns the actions."""
    with caplog.at_level(logging.INFO, logger=cpu_step.__name__):
        got, path = _infer(bundle, [obs], monkeypatch)
    assert path == "onnxruntime"
    records = _cpu_step_records(caplog)
    assert len(records) == 1 and says in records[0] and "\n" not in records[0], records
    return got[0]


@pytest.mark.parametrize("how", ["CC is /bin/false", "no cc on PATH"])
def test_no_working_compiler_is_one_log_line_and_the_onnxruntime_chunk(tiny_bundle, obs, monkeypatch, caplog,
                                                                       tmp_path, how):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "empty-cache"))  # nothing built yet
    if how == "CC is /bin/false":
        monkeypatch.setenv("CC", "/bin/false")
    else:
        empty = tmp_path / "bin"
        empty.mkdir()
        monkeypatch.setenv("PATH", str(empty))
    ref, _ = _infer(tiny_bundle, [obs], monkeypatch, chunk="off")
    got = _falls_back(tiny_bundle, obs, monkeypatch, caplog, "compiler")
    assert _rel_l2(ref[0], got) <= 1e-6  # the onnxruntime chunk: the stepping path's arithmetic


def test_the_switch_turns_it_off_and_rejects_nonsense(tiny_bundle, obs, monkeypatch):
    monkeypatch.setenv(CPU_ENV, "off")
    with Policy.load(tiny_bundle, steps=10, threads=1, backend="onnxruntime") as policy:
        assert policy.backend.chunk_path == "onnxruntime" and policy.backend.chunk is not None
    monkeypatch.setenv(CPU_ENV, "sometimes")
    with pytest.raises(BundleError, match=f"{CPU_ENV}.*'sometimes'.*auto.*off"):
        Policy.load(tiny_bundle, steps=10, threads=1, backend="onnxruntime")


def test_an_fp16_bundle_keeps_the_onnxruntime_chunk(tiny_bundle_fp16, obs, monkeypatch, caplog):
    _falls_back(tiny_bundle_fp16, obs, monkeypatch, caplog, "Cast")


def _step_model(bundle: Path):
    return pb.load_model((bundle / "graphs/denoise_step.onnx").read_bytes())


def _initializer(model, name: str):
    return next(t for t in model.graph.initializer if t.name == name)


def test_the_reader_refuses_a_gemm_of_another_shape(tiny_bundle):
    cpu_step.read_step(_step_model(tiny_bundle).SerializeToString())  # control: the bundle's own graph reads
    model = _step_model(tiny_bundle)
    w = _initializer(model, "folded.blocks.0.w_o")
    w.ClearField("dims")
    w.dims.extend([64, 256])  # same bytes, another shape
    with pytest.raises(cpu_step.StepStructureError, match=r"folded\.blocks\.0\.w_o.*\[64, 256\]"):
        cpu_step.read_step(model.SerializeToString())


def test_an_int8_qdq_gemm_is_refused(tiny_bundle):
    """The INT8 export's form: a Gemm whose weight comes out of DequantizeLinear (int8 weight, scale, zero point)."""
    model = _step_model(tiny_bundle)
    w = _initializer(model, "folded.blocks.1.w_2")
    weight = pb.to_array(w)
    scale = np.float32(np.abs(weight).max() / 127)
    q = np.clip(np.round(weight / scale), -127, 127).astype(np.int8)
    w.CopyFrom(pb.TensorProto(name=w.name + "_q", dims=list(q.shape), data_type=3, raw_data=q.tobytes()))
    model.graph.initializer.append(pb.from_array(np.array(scale, np.float32), "w2_scale"))
    model.graph.initializer.append(pb.TensorProto(name="w2_zp", dims=[], data_type=3, raw_data=b"\x00"))
    model.graph.node.insert(0, pb.make_node("DequantizeLinear", [w.name, "w2_scale", "w2_zp"],
                                            ["folded.blocks.1.w_2"]))
    with pytest.raises(cpu_step.StepStructureError, match="DequantizeLinear"):
        cpu_step.read_step(model.SerializeToString())


def test_a_transposed_gemm_the_reader_must_not_take_falls_back_without_a_crash(tiny_bundle, obs, tmp_path, caplog):
    """transB = 1 on a square Gemm: a valid graph onnxruntime runs, and not FoldedStep's function."""
    model = _step_model(tiny_bundle)
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm" and "folded.blocks.0.w_o" in n.input)
    gemm.attribute.add(name="transB", i=1, type=pb.ATTR_INT)
    step = tmp_path / "denoise_step.onnx"
    step.write_bytes(model.SerializeToString())
    with caplog.at_level(logging.INFO, logger=cpu_step.__name__), \
            OrtBackend(tiny_bundle / "graphs/prefix.onnx", step, threads=1,
                       providers=["CPUExecutionProvider"]) as backend:
        rows = np.load(tiny_bundle / "tables/time_cond_10.npy")
        backend.set_time_rows("time_cond", rows)
        backend.prepare_fused_chunk(10, 0.1)
        assert backend.chunk_path == "onnxruntime"
        x = backend.run_fused_chunk(np.ones((1, 8, 2), np.float32))
        assert np.all(np.isfinite(x))
    records = _cpu_step_records(caplog)
    assert len(records) == 1 and "transB" in records[0], records


def test_the_load_time_numerics_check_refuses_a_wrong_c_chunk(tiny_bundle, obs, monkeypatch, caplog):
    """A reader that gets one weight slightly wrong passes every structural check; the numerics check must not."""
    real = cpu_step.read_step

    def off_by_a_little(*args, **kwargs):
        weights = real(*args, **kwargs)
        weights.blocks[0]["w_q"] = weights.blocks[0]["w_q"] * np.float32(1.001)
        return weights

    monkeypatch.setattr(cpu_step, "read_step", off_by_a_little)
    ref, _ = _infer(tiny_bundle, [obs], monkeypatch, chunk="off")
    got = _falls_back(tiny_bundle, obs, monkeypatch, caplog, "rel L2")
    assert _rel_l2(ref[0], got) <= 1e-6


def test_a_c_loop_slower_than_onnxruntime_here_is_not_taken(tiny_bundle, obs, monkeypatch, caplog):
    """Correct but slow (the generic x86 build is SSE2-only: ~2x slower than onnxruntime's steps): the load-time timing
    refuses it. Here the real C loop does 30 times the work per chunk (more work, not a sleep)."""
    real = cpu_step.CpuStep.run

    def thirty_times(self, noise):
        for _ in range(30):
            out = real(self, noise)
        return out

    monkeypatch.setattr(cpu_step.CpuStep, "run", thirty_times)
    _falls_back(tiny_bundle, obs, monkeypatch, caplog, "slower than onnxruntime")


# --- the compiled library's cache -------------------------------------------------------------------------------
_LOAD_LIBRARY = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from edge_vla.runtime import cpu_step
lib = cpu_step.load_library()
print(lib.path if lib else "none")
print(lib.cdll.ev_abi() if lib else -1)
"""


def _python(code: str, env: dict[str, str], *args: str, prefix: list[str] = ()) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")} | env
    return subprocess.run([*prefix, sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                          env=full, cwd="/")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_cached_library_is_rebuilt_not_loaded(tmp_path, damage):
    # Every cache directory the loader looks in is this test's: a library in the real ~/.cache or temp dir would be
    # found (and then damaged) instead.
    for d in ("home", "tmp"):
        (tmp_path / d).mkdir()
    env = {CACHE_ENV: str(tmp_path / "cache"), "HOME": str(tmp_path / "home"), "TMPDIR": str(tmp_path / "tmp")}
    first = _python(_LOAD_LIBRARY, env)
    assert first.returncode == 0, first.stderr[-2000:]
    so = Path(first.stdout.split()[0])
    assert so.parent == tmp_path / "cache", first.stdout
    good = so.read_bytes()
    if damage == "truncated":
        so.write_bytes(good[: len(good) // 2])
    else:
        so.write_bytes(np.random.default_rng(0).integers(0, 256, len(good), dtype=np.uint8).tobytes())
    second = _python(_LOAD_LIBRARY, env)
    assert second.returncode == 0, second.stderr[-2000:]  # a dlopen of the damaged file would crash or fail here
    assert second.stdout.split() == first.stdout.split(), (first.stdout, second.stdout, second.stderr[-2000:])
    assert so.read_bytes() == good, second.stderr[-2000:]  # rebuilt from source, same compiler, same bytes
    assert "rebuil" in second.stderr, second.stderr[-2000:]
    third = _python(_LOAD_LIBRARY, env)  # control: an intact cache is used as it is
    assert "rebuil" not in third.stderr and "compil" not in third.stderr.lower(), third.stderr[-2000:]


_SERVICE_INFER = """
import json, logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from edge_vla.runtime.policy import Policy
from edge_vla.sim.env import ReachEnv
with Policy.load(sys.argv[1], steps=10, seed=11, threads=1, backend="onnxruntime") as p:
    a = p.infer(ReachEnv().reset(7)).actions
    print(json.dumps({"path": p.backend.chunk_path, "actions": a.tolist()}))
"""


@pytest.fixture
def service_tree(tiny_bundle) -> Iterator[Path]:
    """A 0755 directory on the root filesystem holding a copy of the bundle uid 65534 can read."""
    d = Path(tempfile.mkdtemp(prefix="edge-vla-cpu-step-"))
    os.chmod(d, 0o755)
    shutil.copytree(tiny_bundle, d / "bundle")
    set_readable_modes(d / "bundle")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _as_service_user(tree: Path, **env: str) -> tuple[dict, str]:
    base = {k: v for k, v in os.environ.items() if k != CACHE_ENV}
    out = service_user.run_python_as_service_user(["-c", _SERVICE_INFER, str(tree / "bundle")], base=base,
                                                  **({CPU_ENV: "auto", CHUNK_ENV: "auto"} | env))
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


@needs_service_user
def test_the_service_user_builds_into_its_state_dir_or_a_private_temp_dir_or_falls_back(service_tree, obs,
                                                                                        monkeypatch):
    """HOME is not writable (/nonexistent); the cache goes to the state directory (systemd's StateDirectory=), else a
    per-user directory in the temp dir; where that name is taken by a directory others can write, onnxruntime runs."""
    ref, _ = _infer(service_tree / "bundle", [obs], monkeypatch, chunk="off")
    state = service_tree / "state"
    state.mkdir()
    os.chown(state, 65534, 65534)
    locked = service_tree / "locked"  # root's 0755: the service user reads it, cannot write it
    locked.mkdir(mode=0o755)
    tmp = service_tree / "tmp"  # a sticky world-writable temp dir, like /tmp
    tmp.mkdir()
    tmp.chmod(0o1777)
    # A temp dir of its own, empty: with an unwritable TMPDIR Python's tempfile falls back to /tmp, where another
    # service-user test may already have cached the library (then nothing would be built into the state dir).
    own_tmp = service_tree / "own-tmp"
    own_tmp.mkdir()
    os.chown(own_tmp, 65534, 65534)
    built, _ = _as_service_user(service_tree, EDGE_VLA_STATE_DIR=str(state), TMPDIR=str(own_tmp))
    assert built["path"] == "cpu_step"
    libs = list((state / "kernels").glob("*.so"))
    assert len(libs) == 1 and libs[0].stat().st_uid == 65534 and not libs[0].stat().st_mode & 0o022
    in_tmp, _ = _as_service_user(service_tree, EDGE_VLA_STATE_DIR=str(locked), TMPDIR=str(tmp))
    assert in_tmp["path"] == "cpu_step"
    private = tmp / "edge-vla-kernels-65534"
    assert private.stat().st_uid == 65534 and len(list(private.glob("*.so"))) == 1
    shutil.rmtree(private)
    private.mkdir()
    private.chmod(0o777)  # squatted: anyone could swap the library in it
    fallback, err = _as_service_user(service_tree, EDGE_VLA_STATE_DIR=str(locked), TMPDIR=str(tmp))
    assert fallback["path"] == "onnxruntime"
    lines = [line for line in err.splitlines() if "cpu_step" in line]
    assert len(lines) == 1 and "cache" in lines[0], err[-2000:]
    assert not list(private.iterdir())  # nothing built into it
    for got in (built, in_tmp, fallback):
        assert _rel_l2(ref[0], np.asarray(got["actions"], np.float32)) <= REL_L2


def test_the_profile_says_which_code_ran_the_steps(tiny_bundle, monkeypatch):
    """`edge-vla profile` names the C loop beside the backend, and not when it is off (control)."""
    from edge_vla.bundle import Bundle
    from edge_vla.runtime.profile import profile_bundle

    for switch, expected in (("auto", "onnxruntime + C Euler loop"), ("off", "onnxruntime")):
        monkeypatch.setenv("EDGE_VLA_CPU_STEP", switch)
        (result,) = profile_bundle(Bundle.open(tiny_bundle), [10], iterations=3, warmup=1, threads=1,
                                   backend="onnxruntime")
        assert result.backend == expected
