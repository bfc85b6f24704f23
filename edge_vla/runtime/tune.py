"""`edge-vla tune BUNDLE`: pick the fastest backend x precision on this machine, within the bundle's numerics gate.

Run on the target, like engine building (the end of `edge-vla build-engines` runs it): every backend that can run
here is timed on the bundle's graphs, driven the way `Policy.infer` drives it (prefix once, then the bundle's
solver over its default step count; TensorRT's whole-chunk CUDA graph where it has one):
- onnxruntime (always), at the bundle's precision;
- OpenVINO f32, and bf16 where its CPU plugin reports BF16 in OPTIMIZATION_CAPABILITIES (`edge-vla[openvino]`);
- TensorRT, where engines are built in BUNDLE/target/engines and TensorRT imports.
Contenders run in interleaved rounds (order rotated each round, the first call of each block untimed), so load
from other jobs hits all of them alike; the median chunk time decides.

Each is first checked against the bundle's numerics gate, the thresholds the export's numerics check holds the
bundle to (edge_vla.runtime.compare.THRESHOLDS): its normalized action chunks over a few fresh observations
against the bundle's own graphs in plain onnxruntime (CPU, no load-time rewrites), same noise. The gate is the
bundle precision's; BF16 arithmetic on an FP32 bundle is held to the FP16 gate, the one a reduced-precision
export of the same model must pass. A contender outside its gate is recorded with its figures and never chosen.
The incumbent (what `Policy.load` would run untuned: TensorRT where engines are built, else onnxruntime) is
replaced only by a contender at least SWITCH_MARGIN faster: a change of backend has to buy something.

The choice and every figure go, atomically, to STATE/tune/<sha256 of manifest.json>.json in a state directory
the service user can write; never into the bundle (hash-checked, maybe signed) or the release (read-only).
STATE is --state-dir, else $EDGE_VLA_STATE_DIR, else $STATE_DIRECTORY (systemd's StateDirectory=, the service's
/var/lib/edge-vla), else /var/lib/edge-vla where this user can write it, else $XDG_STATE_HOME/edge-vla
(~/.local/state/edge-vla). A record names the machine it was measured on (CPU model, flags, count): another
machine, or another bundle, is never given it. `Policy.load(bundle)` with backend "auto" follows a valid record
and says so in its log; any record it cannot follow (corrupt, oversized, another machine, a choice that failed its
gate, a backend that does not load) gives one warning and the untuned rule. `edge-vla doctor` shows it.
"""

from __future__ import annotations

import argparse
import getpass
import hashlib
import json
import logging
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from edge_vla.bundle import MANIFEST, Bundle, write_json_atomic
from edge_vla.errors import EdgeVlaError
from edge_vla.files import Wording, read_bounded
from edge_vla.runtime.backend import Backend
from edge_vla.runtime.compare import THRESHOLDS, Metrics
from edge_vla.runtime.contract import OBSERVATION_ROLES, Contract, GraphContract

log = logging.getLogger(__name__)

STATE_ENV = "EDGE_VLA_STATE_DIR"
SYSTEM_STATE_DIR = Path("/var/lib/edge-vla")
RECORD_FORMAT = "edge-vla-tune"
RECORD_VERSION = 1
MAX_RECORD_BYTES = 1 << 20  # a record is a few KiB; anything near this is not one
SWITCH_MARGIN = 0.03  # a contender must beat the incumbent by this fraction of its median to replace it
BACKENDS = ("onnxruntime", "openvino", "tensorrt")
GATE_ORDER = ("fp32", "fp16", "int8")  # tightest first
BLOCK = 3  # chunks per contender per round; the first is untimed (it re-wakes that contender's thread pool)
MIN_ROUNDS, MAX_ROUNDS = 3, 20
BUDGET_S = 20.0  # timed seconds aimed at when rounds are not given (a base-size bundle: ~a dozen rounds)
SAMPLES = 3  # fresh observations per numerics check
CPUINFO = Path("/proc/cpuinfo")
# CPU features that change which kernels run (BF16, VNNI/AMX INT8; Arm dot product / i8mm / BF16), for the record.
FLAGS_OF_NOTE = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8",
                 "asimddp", "i8mm", "bf16", "sve")


# --- what is compared ----------------------------------------------------------------------------------

@dataclass
class Candidate:
    """A backend x precision to time: `make` builds it on the bundle (a test may hand in its own)."""

    backend: str
    precision: str  # OpenVINO: its arithmetic (f32, bf16); the others run the bundle's precision
    make: Callable[[], Backend]

    @property
    def label(self) -> str:
        return f"{self.backend} {self.precision}"


def gate_for(bundle_precision: str, precision: str) -> str:
    """The THRESHOLDS key a candidate is held to: the bundle's, or FP16's for BF16 arithmetic if that is looser."""
    if bundle_precision not in GATE_ORDER:
        raise EdgeVlaError(f"bundle precision {bundle_precision!r} has no numerics gate; expected one of {GATE_ORDER}")
    arithmetic = "fp16" if precision in ("bf16", "f16", "fp16") else "fp32"
    return max(bundle_precision, arithmetic, key=GATE_ORDER.index)


def default_candidates(bundle: Bundle, contract: Contract, threads: int | None = None
                       ) -> tuple[list[Candidate], list[str]]:
    """Every backend x precision that can run here, and why the others are left out."""
    from edge_vla.runtime.ort_backend import OrtBackend
    from edge_vla.runtime.ov_backend import bf16_supported, openvino_available
    from edge_vla.runtime.trt_backend import TrtBackend, tensorrt_available

    out = [Candidate("onnxruntime", bundle.precision,
                     lambda: OrtBackend.from_bundle(bundle, contract, threads=threads))]
    skipped = []
    if openvino_available():
        from edge_vla.runtime.ov_backend import OvBackend

        for precision in ("f32", "bf16"):
            if precision == "bf16" and not bf16_supported():
                skipped.append("openvino bf16: this CPU reports no BF16 in OpenVINO's OPTIMIZATION_CAPABILITIES")
                continue
            out.append(Candidate("openvino", precision, lambda p=precision: OvBackend.from_bundle(
                bundle, contract, precision=p, threads=threads)))
    else:
        skipped.append("openvino: does not import here (pip install 'edge-vla[openvino]')")
    engines = bundle.target_dir / "engines"
    if not (engines / "index.json").is_file():
        skipped.append(f"tensorrt: no engines built in {engines} (edge-vla build-engines)")
    elif not tensorrt_available():
        skipped.append(f"tensorrt: engines are built in {engines} but tensorrt or cuda.bindings does not import here")
    else:
        out.append(Candidate("tensorrt", bundle.precision, lambda: TrtBackend.from_bundle(bundle, contract)))
    return out, skipped


# --- the machine, the bundle, where records live ---------------------------------------------------------

def bundle_hash(bundle: Bundle) -> str:
    """sha256 of manifest.json, which holds the sha256 of every file: the bundle's content (as packages name it).
    The bytes Bundle.open parsed and verified, not a second read of the file."""
    data = bundle.manifest_bytes
    if data is None:  # a Bundle built by hand, not by Bundle.open
        data = (bundle.root / MANIFEST).read_bytes()
    return hashlib.sha256(data).hexdigest()


def _read_cpuinfo() -> str:
    try:
        return CPUINFO.read_text(errors="replace")
    except OSError:  # no procfs: the model and flags are then "unknown" on both sides
        return ""


def machine_fingerprint(cpuinfo: str | None = None) -> dict[str, Any]:
    """What a record is valid for: the CPU (model, feature flags, count) and architecture."""
    fields: dict[str, str] = {}
    for line in (_read_cpuinfo() if cpuinfo is None else cpuinfo).splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
    model = fields.get("model name") or fields.get("hardware") or fields.get("cpu part") or platform.processor()
    flags = sorted(set((fields.get("flags") or fields.get("features") or "").split()))
    return {"arch": platform.machine(), "cpu_model": model or "unknown", "cpus": os.cpu_count() or 1,
            "cpu_flags_sha256": hashlib.sha256(" ".join(flags).encode()).hexdigest(),
            "cpu_flags_of_note": [f for f in FLAGS_OF_NOTE if f in flags]}


def _describe(machine: Any) -> str:
    if not isinstance(machine, Mapping):
        return "an unreadable machine description"
    return f"{str(machine.get('cpu_model'))[:60]}, {str(machine.get('cpus'))[:8]} CPUs"


def state_dirs(env: Mapping[str, str] | None = None, system: Path = SYSTEM_STATE_DIR) -> list[Path]:
    """Where records are looked for, in order: $EDGE_VLA_STATE_DIR alone where set, else $STATE_DIRECTORY (its
    first entry), `system`, the user's XDG state directory."""
    env = os.environ if env is None else env
    if env.get(STATE_ENV):
        return [Path(env[STATE_ENV])]
    dirs = [Path(p) for p in env.get("STATE_DIRECTORY", "").split(":") if p][:1]
    dirs.append(system)
    user = _user_state_dir(env)
    if user is not None:
        dirs.append(user)
    return list(dict.fromkeys(dirs))


def _user_state_dir(env: Mapping[str, str]) -> Path | None:
    """$XDG_STATE_HOME/edge-vla, else ~/.local/state/edge-vla; None for a user with no home at all."""
    if env.get("XDG_STATE_HOME"):
        return Path(env["XDG_STATE_HOME"]) / "edge-vla"
    try:
        home = Path(env["HOME"]) if env.get("HOME") else Path.home()
    except (RuntimeError, KeyError):  # no $HOME and no passwd entry for this uid
        return None
    return home / ".local" / "state" / "edge-vla"


def record_path(state_dir: Path, digest: str) -> Path:
    return state_dir / "tune" / f"{digest}.json"


def _probe(state_dir: Path) -> str | None:
    """None when this user can create files in state_dir/tune (made if missing), else why not."""
    d = state_dir / "tune"
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".probe.")
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a uid with no passwd entry (a container, uid 65534 on some systems)
        return f"uid {os.getuid()}"


def writable_state_dir(explicit: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None,
                       system: Path = SYSTEM_STATE_DIR) -> Path:
    """The directory tune writes to: `explicit` or $EDGE_VLA_STATE_DIR as given (an error if not writable), else
    the first of state_dirs() this user can write. Checked by creating a file, before anything is timed."""
    env = os.environ if env is None else env
    if explicit is not None or env.get(STATE_ENV):
        d = Path(explicit if explicit is not None else env[STATE_ENV])
        why = _probe(d)
        if why:
            raise EdgeVlaError(f"cannot write tune records to {d}/tune ({why}) as {_user()}: pass --state-dir or set "
                               f"{STATE_ENV} to a directory this user can write (the service's is its StateDirectory, "
                               f"{SYSTEM_STATE_DIR})")
        return d
    tried = []
    for d in state_dirs(env, system):
        why = _probe(d)
        if why is None:
            return d
        tried.append(f"{d} ({why})")
    raise EdgeVlaError(f"cannot write tune records as {_user()} to any of {', '.join(tried)}: pass --state-dir or set "
                       f"{STATE_ENV} to a directory this user can write")


# --- reading a record (robot side: every byte of it is untrusted) ------------------------------------------

@dataclass(frozen=True)
class Choice:
    backend: str
    precision: str | None  # OpenVINO's; None for the backends that run the bundle's precision
    median_ms: float
    summary: str  # one line: the choice against the others, and when it was measured

    @property
    def label(self) -> str:
        return f"{self.backend} {self.precision}" if self.precision else self.backend


@dataclass(frozen=True)
class Lookup:
    """A record's outcome: a choice to follow; or a problem (one line: why it is ignored); or neither (none)."""

    choice: Choice | None
    path: Path | None
    problem: str | None
    searched: tuple[Path, ...] = ()
    record: dict[str, Any] | None = field(default=None, repr=False)


class _Bad(Exception):
    """Why a record cannot be followed."""


def read_record(bundle: Bundle, cpuinfo: str | None = None, env: Mapping[str, str] | None = None) -> Lookup:
    """This bundle's record on this machine: the first found in state_dirs(), validated."""
    digest = bundle_hash(bundle)
    dirs = tuple(state_dirs(env))
    path = next((record_path(d, digest) for d in dirs if os.path.lexists(record_path(d, digest))), None)
    if path is None:
        return Lookup(None, None, None, dirs)
    try:
        record = _load_json(path)
        choice = _validate(record, digest, machine_fingerprint(cpuinfo))
    except _Bad as exc:
        return Lookup(None, path, f"ignoring the tune record {path}: {exc}", dirs)
    return Lookup(choice, path, None, dirs, record)


# Said after "ignoring the tune record PATH: ". Symlinks are not followed: tune writes regular files, so a link there
# was put by something else.
_RECORD_WORDING = Wording(subject="it")


def _load_json(path: Path) -> Any:
    data = read_bounded(path, MAX_RECORD_BYTES, "tune record", _Bad, follow_symlinks=False,
                        fix="not a record written by edge-vla tune", wording=_RECORD_WORDING)
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: nesting too deep to parse
        text = str(exc).splitlines()[0][:80] if str(exc) else ""
        raise _Bad(f"it is not valid JSON ({type(exc).__name__}: {text})") from exc


def _short(value: Any) -> str:
    return repr(value)[:40]


def _milliseconds(value: Any) -> float | None:
    """A record's time as a finite positive float, else None. JSON numbers are unbounded: an integer of a few
    hundred digits parses, compares below math.inf, and then overflows `float()`, so convert before comparing."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    try:
        ms = float(value)
    except OverflowError:
        return None
    return ms if 0 < ms < math.inf else None


def _validate(record: Any, digest: str, machine: dict[str, Any]) -> Choice:
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise _Bad(f"it is not a tune record (no \"format\": {RECORD_FORMAT!r} object)")
    if record.get("version") != RECORD_VERSION:
        raise _Bad(f"it is a version {_short(record.get('version'))} record; this edge-vla reads version "
                   f"{RECORD_VERSION}")
    shapes = {"bundle": dict, "machine": dict, "choice": dict, "candidates": list}
    wrong = [k for k, t in shapes.items() if not isinstance(record.get(k), t)]
    if wrong:
        raise _Bad(f"it is not a tune record ({', '.join(wrong)} missing or of the wrong type)")
    if record["bundle"].get("hash") != digest:
        raise _Bad(f"it is for another bundle (manifest sha256 {_short(record['bundle'].get('hash'))}; this bundle's "
                   f"is {digest[:16]}...)")
    if record["machine"] != machine:
        # Our own field names only: the record's keys are untrusted text.
        differ = [k.replace("_", " ") for k in machine if record["machine"].get(k) != machine[k]] or ["extra fields"]
        raise _Bad(f"it was measured on another machine ({_describe(record['machine'])}; this is "
                   f"{_describe(machine)}; differing: {', '.join(differ)})")
    backend, precision = record["choice"].get("backend"), record["choice"].get("precision")
    if backend not in BACKENDS:
        raise _Bad(f"its choice names an unknown backend {_short(backend)} (known: {', '.join(BACKENDS)})")
    figures = next((c for c in record["candidates"] if isinstance(c, dict) and c.get("backend") == backend
                    and c.get("precision") == precision), None)
    if figures is None or figures.get("passed") is not True:
        raise _Bad(f"its choice {backend} {_short(precision)} did not pass the numerics gate in its own figures")
    median = _milliseconds(figures.get("median_ms"))
    if median is None:
        raise _Bad(f"its choice has no valid median time ({_short(figures.get('median_ms'))})")
    if backend == "openvino":
        from edge_vla.runtime.ov_backend import PRECISIONS

        if precision not in PRECISIONS:
            raise _Bad(f"its OpenVINO precision {_short(precision)} is none of {', '.join(PRECISIONS)}")
    # The other figures only feed the log line's comparison: one without a usable time is left out of it.
    others = [(c, ms) for c in record["candidates"] if isinstance(c, dict) and c is not figures
              and c.get("passed") is True and (ms := _milliseconds(c.get("median_ms"))) is not None]
    versus = ", ".join(f"{str(c.get('backend'))[:20]} {str(c.get('precision'))[:10]} {ms:.2f} ms" for c, ms in others)
    summary = (f"{median:.2f} ms/chunk" + (f" vs {versus}" if versus else "")
               + f", tuned {str(record.get('tuned_at'))[:32]}")
    return Choice(backend, precision if backend == "openvino" else None, median, summary)


# --- measuring -------------------------------------------------------------------------------------------

class _Trial:
    """One candidate's backend driven as Policy.infer drives it."""

    def __init__(self, backend: Backend, contract: Contract, steps: int, solver: str, whole_chunk: bool = True) -> None:
        """`whole_chunk`: use the backend's one-launch chunk where it has one, as Policy does (False: the
        reference, which steps from the host)."""
        from edge_vla.runtime.sampler import Sampler

        self.backend = backend
        self.sampler = Sampler(backend, contract, solver, steps)
        self.fused = whole_chunk and solver == "euler" and backend.supports_fused_chunk()
        if self.fused:
            try:
                backend.prepare_fused_chunk(steps, self.sampler.dt)
            except EdgeVlaError as exc:
                log.info("%s: no whole-chunk graph (%s); stepping from the host as Policy would", backend.name, exc)
                self.fused = False
        self.times: list[float] = []

    def load(self, feeds: Mapping[str, np.ndarray]) -> None:
        for name, value in feeds.items():
            np.copyto(self.backend.buffer(name), value, casting="same_kind")

    def chunk(self, noise: np.ndarray) -> np.ndarray:
        if self.fused:
            return self.backend.run_fused_chunk(noise)
        self.backend.run_prefix()
        return self.sampler.run(noise)


def _observations(contract: Contract, samples: int, vocab: int, seed: int = 0
                  ) -> list[tuple[dict[str, np.ndarray], np.ndarray]]:
    """(observation inputs by name, noise) per sample: fresh values per role, as build-engines verifies."""
    from edge_vla.export.engines import fresh_feeds

    rng = np.random.default_rng(seed)
    rows = contract.time_rows(contract.num_steps)
    specs = tuple(contract.observation_inputs().values())
    # Observation inputs over both graphs (a step graph may take one the prefix does not), one name per role.
    graph = GraphContract("observation", "prefix", "", tuple(s for s in specs if s.role in OBSERVATION_ROLES), ())
    return [(fresh_feeds(graph, rng, {}, rows, vocab), rng.standard_normal(contract.x_t.shape).astype(np.float32))
            for _ in range(samples)]


def _valid(x: np.ndarray, contract: Contract) -> np.ndarray:
    """The chunk's real action dimensions (π0 pads to 32; the padding is never used)."""
    dims = (contract.preprocessing.get("action") or {}).get("valid_dims")
    return np.array(x[..., : int(dims)] if dims else x, dtype=np.float32)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


@dataclass
class TuneResult:
    path: Path
    record: dict[str, Any]

    def lines(self) -> list[str]:
        r = self.record
        out = [f"{'backend x precision':<22} {'median ms':>10} {'p90 ms':>8} {'rel L2':>9}  gate"]
        for c in r["candidates"]:
            if c.get("error"):
                out.append(f"{c['backend'] + ' ' + c['precision']:<22} {'-':>10} {'-':>8} {'-':>9}  {c['error']}")
                continue
            verdict = "pass" if c["passed"] else "FAIL (never chosen)"
            out.append(f"{c['backend'] + ' ' + c['precision']:<22} {c['median_ms']:>10.2f} {c['p90_ms']:>8.2f} "
                       f"{c['rel_l2']:>9.1e}  {c['gate']} {verdict}")
        out += [f"not timed: {s}" for s in r["skipped"]]
        ch = r["choice"]
        out.append(f"chose {ch['backend']} {ch['precision']}: {ch['why']}")
        out.append(f"recorded in {self.path} (Policy.load with backend auto follows it on this machine)")
        return out


def tune(bundle: Bundle | str | os.PathLike[str], state_dir: str | os.PathLike[str] | None = None,
         threads: int | None = None, rounds: int | None = None, budget_s: float = BUDGET_S, samples: int = SAMPLES,
         candidates: Sequence[Candidate] | None = None, skipped: Sequence[str] = ()) -> TuneResult:
    """Time every candidate (default: default_candidates()) under the numerics gate; record the choice."""
    b = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
    state = writable_state_dir(state_dir)  # before any timing: minutes of work that cannot be recorded are waste
    contract = b.contract
    if candidates is None:
        candidates, found_skipped = default_candidates(b, contract, threads)
        skipped = [*skipped, *found_skipped]
    steps, solver = contract.num_steps, contract.solver
    obs = _observations(contract, samples, int(b.manifest.get("tokenizer", {}).get("vocab_size", 258)))
    reference = _reference_chunks(b, contract, obs, steps, solver, threads)
    trials: dict[int, _Trial] = {}
    figures: list[dict[str, Any]] = []
    try:
        for i, cand in enumerate(candidates):
            gate = gate_for(b.precision, cand.precision)
            fig: dict[str, Any] = {"backend": cand.backend, "precision": cand.precision, "gate": gate,
                                   "gate_rel_l2": THRESHOLDS[gate][0], "gate_cosine": THRESHOLDS[gate][1],
                                   "passed": False, "error": None}
            figures.append(fig)
            try:
                trial = _Trial(cand.make(), contract, steps, solver)
            except Exception as exc:  # a contender that cannot run here is a figure, not a failed tune
                fig["error"] = f"could not load: {_one_line(exc)}"
                log.warning("tune: %s could not load (%s)", cand.label, _one_line(exc))
                continue
            trials[i] = trial
            got = []
            for feeds, noise in obs:
                trial.load(feeds)
                got.append(_valid(trial.chunk(noise), contract))
            m = Metrics.of(np.concatenate(reference), np.concatenate(got))
            fig.update(rel_l2=m.rel_l2, cosine=m.cosine, max_abs=m.max_abs, passed=m.within(gate))
        _time_rounds(trials, obs[0], rounds, budget_s)
        for i, trial in trials.items():
            t = np.asarray(trial.times) * 1e3
            figures[i].update(median_ms=float(np.median(t)), p90_ms=float(np.percentile(t, 90)), chunks=len(t))
    finally:
        for trial in trials.values():
            trial.backend.close()
    choice = _choose(figures, incumbent="tensorrt" if any(f["backend"] == "tensorrt" for f in figures)
                     else "onnxruntime")
    record = {
        "format": RECORD_FORMAT, "version": RECORD_VERSION,
        "bundle": {"hash": bundle_hash(b), "root": str(b.root), "precision": b.precision,
                   "preset": (b.manifest.get("model") or {}).get("preset")},
        "machine": machine_fingerprint(),
        "tuned_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "measured": {"steps": steps, "solver": solver, "threads": threads or os.cpu_count() or 1,
                     "samples": samples, "block": BLOCK, "load_avg": list(os.getloadavg())},
        "choice": choice, "candidates": figures, "skipped": list(skipped),
        "switch_margin": SWITCH_MARGIN,
    }
    path = record_path(state, record["bundle"]["hash"])
    write_json_atomic(path, record)
    log.debug("tune: chose %s %s for %s (%s); recorded in %s", choice["backend"], choice["precision"], b.root,
             choice["why"], path)
    return TuneResult(path, record)


def _reference_chunks(b: Bundle, contract: Contract, obs: list[tuple[dict[str, np.ndarray], np.ndarray]], steps: int,
                      solver: str, threads: int | None) -> list[np.ndarray]:
    """The bundle's graphs in plain onnxruntime on the CPU (no load-time rewrites, the ODE stepped from the host by
    the runtime's Sampler): what the gate compares with."""
    from edge_vla.runtime.ort_backend import OrtBackend

    paths = [b.root / g.file for g in (contract.prefix, contract.step)]
    ref = OrtBackend(*paths, threads=threads, providers=["CPUExecutionProvider"], fuse="none")
    try:
        trial = _Trial(ref, contract, steps, solver, whole_chunk=False)
        out = []
        for feeds, noise in obs:
            trial.load(feeds)
            out.append(_valid(trial.chunk(noise), contract))
        return out
    finally:
        ref.close()


def _time_rounds(trials: Mapping[int, _Trial], sample: tuple[dict[str, np.ndarray], np.ndarray], rounds: int | None,
                 budget_s: float) -> None:
    """Interleaved rounds of BLOCK chunks per trial (first untimed), order rotated each round."""
    feeds, noise = sample
    order = list(trials.values())
    for trial in order:  # warm-up, and a cost estimate for the round count
        trial.load(feeds)
        t0 = time.perf_counter()
        trial.chunk(noise)
        trial.chunk(noise)
        trial.times = [(time.perf_counter() - t0) / 2]
    if rounds is None:
        per_round = sum(t.times[0] for t in order) * BLOCK
        rounds = int(min(MAX_ROUNDS, max(MIN_ROUNDS, budget_s / max(per_round, 1e-6))))
    for trial in order:
        trial.times = []
    for r in range(max(1, rounds)):
        for trial in order[r % len(order):] + order[: r % len(order)]:
            trial.load(feeds)
            for k in range(BLOCK):
                t0 = time.perf_counter()
                trial.chunk(noise)
                if k:
                    trial.times.append(time.perf_counter() - t0)


def _choose(figures: list[dict[str, Any]], incumbent: str) -> dict[str, Any]:
    passed = [f for f in figures if f["passed"] and "median_ms" in f]
    if not passed:
        raise EdgeVlaError("no backend passed the bundle's numerics gate here: " + "; ".join(
            f"{f['backend']} {f['precision']}: " + (f["error"] or f"rel L2 {f.get('rel_l2', float('nan')):.1e}")
            for f in figures) + ". Nothing recorded; the runtime keeps its untuned default")
    best = min(passed, key=lambda f: f["median_ms"])
    held = next((f for f in passed if f["backend"] == incumbent), None)
    if held is not None and best is not held and best["median_ms"] > held["median_ms"] * (1 - SWITCH_MARGIN):
        why = (f"{best['backend']} {best['precision']} ({best['median_ms']:.2f} ms) is within {SWITCH_MARGIN:.0%} of "
               f"{incumbent} ({held['median_ms']:.2f} ms): kept {incumbent}")
        best = held
    else:
        runner_up = min((f for f in passed if f is not best), key=lambda f: f["median_ms"], default=None)
        why = f"fastest within its numerics gate ({best['median_ms']:.2f} ms/chunk" + (
            f", next {runner_up['backend']} {runner_up['precision']} {runner_up['median_ms']:.2f} ms)"
            if runner_up else ", the only one)")
    return {"backend": best["backend"], "precision": best["precision"], "median_ms": best["median_ms"], "why": why}


# --- the command ---------------------------------------------------------------------------------------

def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle directory (or .tar/.tar.gz)")
    parser.add_argument("--state-dir", help=f"where to record the choice (default: ${STATE_ENV}, else systemd's "
                        f"$STATE_DIRECTORY, else {SYSTEM_STATE_DIR} where writable, else ~/.local/state/edge-vla)")
    parser.add_argument("--threads", type=int, help="intra-op threads for every backend (default: every CPU, as "
                        "Policy.load)")
    parser.add_argument("--rounds", type=int, help=f"interleaved timing rounds (default: as many as fit "
                        f"{BUDGET_S:g} s, {MIN_ROUNDS}..{MAX_ROUNDS})")
    parser.add_argument("--samples", type=int, default=SAMPLES,
                        help="fresh observations per numerics check (default %(default)s)")


def main(args: argparse.Namespace) -> int:
    from edge_vla.runtime.policy import checked_threads  # policy imports this module lazily

    if args.rounds is not None and args.rounds < 1:
        raise EdgeVlaError(f"--rounds {args.rounds}: give at least 1")
    if args.samples < 1:
        raise EdgeVlaError(f"--samples {args.samples}: give at least 1")
    checked_threads(args.threads)  # --threads 1000000 would hang the first backend's load
    result = tune(args.bundle, state_dir=args.state_dir, threads=args.threads, rounds=args.rounds,
                  samples=args.samples)
    print("\n".join(result.lines()))
    return 0
