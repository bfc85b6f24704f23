"""`edge-vla tune` (issue 28): time each backend x precision on this machine under the bundle's numerics gate,
record the choice in a state directory (not the bundle, not the release), and `Policy.load` follows it.

The speed comparisons use deliberately slowed backends (each step run several times: more work, not a sleep),
so which one is faster never rests on this shared machine's timing noise.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import service_user
from service_user import needs_service_user

from edge_vla.bundle import Bundle, set_readable_modes
from edge_vla.cli import main as cli
from edge_vla.errors import EdgeVlaError
from edge_vla.provision import doctor
from edge_vla.runtime import tune
from edge_vla.runtime.backend import Backend
from edge_vla.runtime.compare import THRESHOLDS
from edge_vla.runtime.ort_backend import OrtBackend
from edge_vla.runtime.ov_backend import OvBackend, bf16_supported
from edge_vla.runtime.policy import Policy


class _Wrapped(Backend):
    """Another backend, with its name, buffers and precision; subclasses change what a step does."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.name = inner.name
        self.precision = getattr(inner, "precision", None)

    def buffer(self, name: str) -> np.ndarray:
        return self.inner.buffer(name)

    def set_time_rows(self, name: str, rows: np.ndarray) -> None:
        self.inner.set_time_rows(name, rows)

    def run_prefix(self) -> None:
        self.inner.run_prefix()

    def run_step(self, slot: int) -> None:
        self.inner.run_step(slot)

    def _release(self) -> None:
        self.inner.close()


class Slowed(_Wrapped):
    """Every step graph run `factor` times: the same result for `factor` times the work."""

    def __init__(self, inner: Backend, factor: int = 4) -> None:
        super().__init__(inner)
        self.factor = factor

    def run_step(self, slot: int) -> None:
        for _ in range(self.factor):
            self.inner.run_step(slot)


class Perturbed(_Wrapped):
    """A fast backend whose velocity is 20% too large: outside every precision's gate."""

    def run_step(self, slot: int) -> None:
        self.inner.run_step(slot)
        self.inner.buffer("velocity")[...] *= 1.2


def _ort(bundle: Bundle) -> OrtBackend:
    return OrtBackend.from_bundle(bundle, bundle.contract, threads=1)


def _ov(bundle: Bundle, precision: str = "f32") -> OvBackend:
    return OvBackend.from_bundle(bundle, bundle.contract, precision=precision, threads=1)


def _candidates(bundle: Bundle, slow: str | None = None, perturb: str | None = None) -> list[tune.Candidate]:
    """onnxruntime and OpenVINO f32 candidates; `slow` / `perturb` name the backend to slow down / perturb."""

    def make(name: str, build: Callable[[], Backend]) -> Callable[[], Backend]:
        def made() -> Backend:
            b = build()
            if name == perturb:
                b = Perturbed(b)
            return Slowed(b) if name == slow else b
        return made

    return [tune.Candidate("onnxruntime", bundle.precision, make("onnxruntime", lambda: _ort(bundle))),
            tune.Candidate("openvino", "f32", make("openvino", lambda: _ov(bundle)))]


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "state"
    monkeypatch.setenv(tune.STATE_ENV, str(d))
    return d


@pytest.fixture(scope="module")
def bundle(tiny_bundle: Path) -> Bundle:
    return Bundle.open(tiny_bundle)


@pytest.fixture(scope="module")
def good_record(bundle: Bundle, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A valid record for the tiny bundle on this machine (choice: OpenVINO f32, onnxruntime slowed)."""
    result = tune.tune(bundle, state_dir=tmp_path_factory.mktemp("good"), candidates=_candidates(bundle, "onnxruntime"),
                       threads=1, rounds=2)
    return result.record


def _record_file(state: Path, bundle: Bundle) -> Path:
    return state / "tune" / f"{tune.bundle_hash(bundle)}.json"


# --- choosing ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("slow", "want"), [("onnxruntime", OvBackend), ("openvino", OrtBackend)])
def test_tune_records_the_faster_and_policy_load_follows_it(bundle: Bundle, state: Path, slow: str, want: type,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    result = tune.tune(bundle, candidates=_candidates(bundle, slow), threads=1, rounds=3)
    path = _record_file(state, bundle)
    assert result.path == path and path.is_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # the service user and doctor read it
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp file left behind
    record = json.loads(path.read_text())
    assert record["bundle"]["hash"] == tune.bundle_hash(bundle)
    figures = {c["backend"]: c for c in record["candidates"]}
    assert figures[slow]["median_ms"] > figures[record["choice"]["backend"]]["median_ms"]
    assert record["choice"]["backend"] != slow and all(c["passed"] for c in figures.values())
    caplog.set_level(logging.INFO, logger="edge_vla")
    with Policy.load(bundle.root) as policy:
        assert type(policy.backend) is want
    said = [r.getMessage() for r in caplog.records if "backend auto" in r.getMessage()]
    assert said and "tune" in said[0] and str(path) in said[0], said


def test_a_backend_outside_the_numerics_gate_is_rejected(bundle: Bundle, state: Path) -> None:
    """The perturbed OpenVINO candidate is the fastest (onnxruntime is slowed) and still not chosen."""
    record = tune.tune(bundle, candidates=_candidates(bundle, slow="onnxruntime", perturb="openvino"), threads=1,
                       rounds=2).record
    figures = {c["backend"]: c for c in record["candidates"]}
    assert figures["openvino"]["passed"] is False
    assert figures["openvino"]["rel_l2"] > THRESHOLDS["fp32"][0]
    assert figures["openvino"]["median_ms"] < figures["onnxruntime"]["median_ms"]  # it was the fastest
    assert record["choice"]["backend"] == "onnxruntime"
    with Policy.load(bundle.root) as policy:
        assert isinstance(policy.backend, OrtBackend)


def test_the_default_candidates_on_this_machine(bundle: Bundle, state: Path) -> None:
    record = tune.tune(bundle, threads=1, rounds=1).record
    labels = {(c["backend"], c["precision"]): c for c in record["candidates"]}
    assert ("onnxruntime", "fp32") in labels and ("openvino", "f32") in labels
    assert (("openvino", "bf16") in labels) == bf16_supported()
    for (_, precision), c in labels.items():
        # the bundle's own gate for full precision; the FP16 export gate for BF16 arithmetic on an FP32 bundle
        gate = "fp16" if precision == "bf16" else "fp32"
        assert c["gate"] == gate and (c["gate_rel_l2"], c["gate_cosine"]) == THRESHOLDS[gate]
        assert c["passed"], c
    assert any("tensorrt" in s for s in record["skipped"])  # no engines here: said, not silently left out
    machine = record["machine"]
    assert machine == tune.machine_fingerprint() and machine["cpu_model"]


def test_the_record_is_replaced_atomically(bundle: Bundle, state: Path, good_record: dict,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    path = _record_file(state, bundle)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(good_record))
    before = path.read_bytes()

    def torn(obj: Any, f: Any, **kw: Any) -> None:  # the disk fills up halfway through the new record
        f.write(json.dumps(obj)[:50])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(json, "dump", torn)
    with pytest.raises(OSError, match="No space left"):
        tune.tune(bundle, candidates=_candidates(bundle, "onnxruntime"), threads=1, rounds=1)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_a_changed_bundle_is_not_given_a_stale_choice(bundle: Bundle, state: Path, good_record: dict, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    _record_file(state, bundle).parent.mkdir(parents=True)
    _record_file(state, bundle).write_text(json.dumps(good_record))
    changed = tmp_path / "changed"
    shutil.copytree(bundle.root, changed)  # the same graphs, another manifest: another bundle
    manifest = json.loads((changed / "manifest.json").read_text())
    manifest["provenance"]["note"] = "re-exported"
    (changed / "manifest.json").write_text(json.dumps(manifest))
    other = Bundle.open(changed)
    assert tune.bundle_hash(other) != tune.bundle_hash(bundle)
    caplog.set_level(logging.INFO, logger="edge_vla")
    with Policy.load(other.root) as policy:
        assert isinstance(policy.backend, OrtBackend)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("not tuned" in r.getMessage() for r in caplog.records)
    with Policy.load(bundle.root) as policy:  # control: the tuned bundle gets its choice
        assert isinstance(policy.backend, OvBackend)


def test_an_explicit_backend_wins_over_the_record(bundle: Bundle, state: Path, good_record: dict) -> None:
    _record_file(state, bundle).parent.mkdir(parents=True)
    _record_file(state, bundle).write_text(json.dumps(good_record))
    with Policy.load(bundle.root, backend="onnxruntime") as policy:
        assert isinstance(policy.backend, OrtBackend)
    with Policy.load(bundle.root) as policy:  # control
        assert isinstance(policy.backend, OvBackend) and policy.backend.precision == "f32"


# --- hostile or stale records ---------------------------------------------------------------------

def _edit(record: dict, path: tuple[str, ...], value: Any) -> dict:
    out = json.loads(json.dumps(record))
    node = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return out


def _hostile(good: dict) -> dict[str, tuple[bytes | str | None, str]]:
    """case -> (file content, or None for a special file; the reason the warning must give)"""
    text = json.dumps(good)
    failed = _edit(good, ("candidates",), [dict(c, passed=False) for c in good["candidates"]])
    return {
        "truncated": (text[: len(text) // 2], "not valid JSON"),
        "deep nesting": ("[" * 200_000 + "]" * 200_000, "not valid JSON"),
        "huge": ('{"pad": "' + "x" * (3 << 20) + '"}', "bytes"),
        "not utf-8": (b"\xff\xfe" + text.encode()[2:], "not valid JSON"),
        "not an object": ("[1, 2, 3]", "not a tune record"),
        "wrong bundle hash": (json.dumps(_edit(good, ("bundle", "hash"), "0" * 64)), "another bundle"),
        "another machine": (json.dumps(_edit(good, ("machine", "cpu_model"), "Some Other CPU")), "another machine"),
        "unknown backend": (json.dumps(_edit(good, ("choice", "backend"), "rm -rf /")), "unknown backend"),
        "a choice that failed the gate": (json.dumps(failed), "did not pass"),
        "wrong types": (json.dumps(_edit(good, ("candidates",), "many")), "not a tune record"),
        "fifo": (None, "not a regular file"),
        "symlink to /dev/zero": (None, "symbolic link"),
    }


HOSTILE = list(_hostile({"bundle": {"hash": ""}, "machine": {}, "choice": {}, "candidates": []}))


def _load_with_deadline(root: Path, deadline_s: float = 60.0) -> Policy:
    """Policy.load in a thread: a record that blocks reading (a FIFO) must not hang the robot's start."""
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(_try_load(root)), daemon=True)
    t.start()
    t.join(deadline_s)
    assert not t.is_alive(), f"Policy.load still blocked after {deadline_s} s"
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


def _try_load(root: Path) -> Policy | BaseException:
    try:
        return Policy.load(root)
    except BaseException as exc:
        return exc


@pytest.mark.parametrize("case", HOSTILE)
def test_a_bad_record_gives_one_warning_and_onnxruntime(case: str, bundle: Bundle, state: Path, good_record: dict,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    content, why = _hostile(good_record)[case]
    path = _record_file(state, bundle)
    path.parent.mkdir(parents=True)
    if case == "fifo":
        os.mkfifo(path)
    elif case.startswith("symlink"):
        path.symlink_to("/dev/zero")
    else:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    caplog.set_level(logging.INFO, logger="edge_vla")
    with _load_with_deadline(bundle.root) as policy:
        assert isinstance(policy.backend, OrtBackend)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert why in warnings[0] and str(path) in warnings[0] and "edge-vla tune" in warnings[0], warnings[0]
    assert "\n" not in warnings[0] and len(warnings[0]) < 600


def test_the_good_record_is_followed(bundle: Bundle, state: Path, good_record: dict) -> None:
    """Control for the hostile cases: the same file, unedited, is used."""
    _record_file(state, bundle).parent.mkdir(parents=True)
    _record_file(state, bundle).write_text(json.dumps(good_record))
    with Policy.load(bundle.root) as policy:
        assert isinstance(policy.backend, OvBackend)


# --- where records live -----------------------------------------------------------------------------

def test_state_dir_defaults(tmp_path: Path) -> None:
    system = tmp_path / "var-lib-edge-vla"
    home = tmp_path / "home"
    env = {"HOME": str(home)}
    assert tune.writable_state_dir(env=env, system=system) == system  # creatable: its parent is writable
    locked = tmp_path / "file"
    locked.write_text("")
    fallback = tune.writable_state_dir(env=env, system=locked / "edge-vla")  # not creatable: under a file
    assert fallback == home / ".local/state/edge-vla"
    assert tune.writable_state_dir(env={**env, "XDG_STATE_HOME": str(tmp_path / "xdg")},
                                   system=locked / "x") == tmp_path / "xdg/edge-vla"
    assert tune.writable_state_dir(env={**env, "STATE_DIRECTORY": f"{tmp_path}/sd:/other"},
                                   system=system) == tmp_path / "sd"  # systemd's StateDirectory=
    assert tune.writable_state_dir(env={**env, tune.STATE_ENV: str(tmp_path / "mine"), "STATE_DIRECTORY": "/x"},
                                   system=system) == tmp_path / "mine"
    assert tune.state_dirs(env={tune.STATE_ENV: str(tmp_path / "mine")}, system=system) == [tmp_path / "mine"]


def test_an_unwritable_state_dir_is_a_clear_error_before_any_timing(bundle: Bundle, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")

    def never() -> Backend:
        raise AssertionError("tune timed a backend although it cannot record the result")

    with pytest.raises(EdgeVlaError) as exc:
        tune.tune(bundle, state_dir=blocker / "state", candidates=[tune.Candidate("onnxruntime", "fp32", never)])
    message = str(exc.value)
    assert "\n" not in message and str(blocker / "state") in message and tune.STATE_ENV in message


@pytest.fixture
def service_tree() -> Iterator[Path]:
    """A directory the service user (uid 65534) can traverse, holding a copy of the bundle it can read."""
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="edge-vla-tune-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _service(python_args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return service_user.run_python_as_service_user(python_args, timeout=300, **env)


_LOAD = """
import logging, sys
from edge_vla.runtime.policy import Policy
logging.basicConfig(level=logging.INFO)
with Policy.load(sys.argv[1]) as p:
    print(type(p.backend).__name__, getattr(p.backend, "precision", "-"))
"""


@needs_service_user
def test_the_service_user_tunes_and_loads_the_choice(tiny_bundle: Path, service_tree: Path) -> None:
    root = service_tree / "bundle"
    shutil.copytree(tiny_bundle, root)
    set_readable_modes(root)
    state = service_tree / "state"
    state.mkdir()
    os.chown(state, 65534, 65534)  # what StateDirectory= gives the service
    tuned = _service(["-m", "edge_vla.cli", "tune", str(root), "--rounds", "1", "--threads", "1"],
                     EDGE_VLA_STATE_DIR=str(state))
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    record = state / "tune" / f"{tune.bundle_hash(Bundle.open(root))}.json"
    assert record.stat().st_uid == 65534 and "chose" in tuned.stdout
    choice = json.loads(record.read_text())["choice"]
    loaded = _service(["-c", _LOAD, str(root)], EDGE_VLA_STATE_DIR=str(state))
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    name = {"onnxruntime": "OrtBackend", "openvino": "OvBackend"}[choice["backend"]]
    assert loaded.stdout.split()[0] == name and "tune" in loaded.stderr


@needs_service_user
def test_the_service_user_cannot_write_a_root_owned_state_dir(tiny_bundle: Path, service_tree: Path) -> None:
    root = service_tree / "bundle"
    shutil.copytree(tiny_bundle, root)
    set_readable_modes(root)
    state = service_tree / "state"
    state.mkdir(mode=0o755)  # root's, as /var/lib/edge-vla would be without StateDirectory=
    out = _service(["-m", "edge_vla.cli", "tune", str(root), "--rounds", "1"],
                   EDGE_VLA_STATE_DIR=str(state))
    assert out.returncode == 1
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edge-vla tune: error: cannot write") and str(state) in err[0], err
    assert not (state / "tune").exists()


# --- build-engines, doctor ---------------------------------------------------------------------------

def _with_fake_engines(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    engines = dst / "target" / "engines"
    engines.mkdir(parents=True)
    for name in ("prefix", "denoise_step"):
        (engines / f"{name}.plan").write_bytes(b"not an engine")
    return dst


def test_build_engines_ends_with_tune(tiny_bundle: Path, tmp_path: Path, state: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    root = _with_fake_engines(tiny_bundle, tmp_path / "bundle")
    assert cli(["build-engines", str(root), "--index-only", "--allow-unverified", "--no-tune"]) == 0
    assert not state.exists()  # control: --no-tune
    assert cli(["build-engines", str(root), "--index-only", "--allow-unverified", "--tune-rounds", "1"]) == 0
    out = capsys.readouterr().out
    record = _record_file(state, Bundle.open(root))
    assert record.is_file() and "tune" in out
    skipped = json.loads(record.read_text())["skipped"]
    assert any("tensorrt" in s and "import" in s for s in skipped), skipped  # engines, but no TensorRT here


def test_a_failed_tune_does_not_undo_the_engines(tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    root = _with_fake_engines(tiny_bundle, tmp_path / "bundle")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(tune.STATE_ENV, str(blocker / "state"))  # cannot be created: a file is in the way
    assert cli(["build-engines", str(root), "--index-only", "--allow-unverified"]) == 0
    assert (root / "target" / "engines" / "index.json").is_file()
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "tune" in r.getMessage()]
    assert len(said) == 1 and "cannot write tune records" in said[0] and f"edge-vla tune {root}" in said[0], said


def test_doctor_shows_the_recorded_choice(bundle: Bundle, state: Path, good_record: dict, tmp_path: Path) -> None:
    exp = doctor.Expectation(source="test", bundle_root=bundle.root)
    proc = tmp_path / "proc"
    proc.mkdir()
    shutil.copy("/proc/cpuinfo", proc / "cpuinfo")
    m = doctor.Machine(proc_root=proc, trusted_keys=tmp_path / "no-keys")
    check = doctor.check_tune(exp, m)
    assert check.status == doctor.WARN and "not tuned" in check.detail and "edge-vla tune" in check.fix
    path = _record_file(state, bundle)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(good_record))
    check = doctor.check_tune(exp, m)
    assert check.status == doctor.PASS and "openvino f32" in check.detail and str(path) in check.detail
    assert "ms" in check.detail
    (proc / "cpuinfo").write_text("model name\t: Another CPU\nflags\t\t: fpu\n")  # the disk moved machines
    check = doctor.check_tune(exp, m)
    assert check.status == doctor.WARN and "another machine" in check.detail
    assert doctor.check_tune(doctor.Expectation(), m) is None
