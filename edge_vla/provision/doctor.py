"""`edge-vla doctor [PKG|BUNDLE]`: check this machine against a robot package (or a bundle).

One line per check, pass / warn / fail, with the fix for anything not passing; exit status 1 when
anything fails. Without an argument it checks the installed release (/opt/edge-vla/current and
/etc/edge-vla/robot.env) if there is one, else only the machine.

Absent optional stacks (TensorRT, CUDA, a GPU) warn rather than fail: the runtime falls back to
onnxruntime, slower. Things the robot cannot run without (onnxruntime, the bundle, the motor
controller link named in the config) fail.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import json
import os
import re
import resource
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edge_vla import __version__
from edge_vla.bundle import MANIFEST, TARGET_DIR, Bundle
from edge_vla.errors import ConfigError, EdgeVlaError
from edge_vla.provision import signing
from edge_vla.provision.lock import LOCK_FILE, LockEntry, parse_lock
from edge_vla.provision.package import PACKAGE_JSON
from edge_vla.provision.robot_config import CONFIG_PATH, FIRMWARE_LINK_KINDS, RobotConfig, link_device, link_kind
from edge_vla.provision.tarball import extract_tarball

PASS, WARN, FAIL = "pass", "warn", "fail"
INSTALLED = Path("/opt/edge-vla/current")
TRUSTED_KEYS = Path("/etc/edge-vla/trusted-keys")
GOOD_CLOCKSOURCES = {"tsc", "arch_sys_counter"}  # x86 invariant TSC; the Arm generic timer
MIN_MEMLOCK = 64 << 20
MIN_FREE_GPU_MIB = 1024


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""


@dataclass
class Expectation:
    """What the machine is checked against; every field optional."""

    source: str = "this machine only"
    platform: dict[str, Any] | None = None
    config: RobotConfig | None = None
    user: str | None = None
    bundle_root: Path | None = None
    edge_vla_version: str | None = None
    signed: bool | None = None
    lock: list[LockEntry] | None = None
    venv: Path | None = None  # the release's venv (package dir/venv), whose installs are compared to the lock
    online: bool = False  # an --online (development) package: its dependencies come unlocked from an index
    installed: bool = False  # the release edge-vla.service runs (/opt/edge-vla/current), not a package file
    install_check: Check | None = None  # whether that release is complete, for the installed release only
    config_check: Check | None = None  # FAIL where the operator's robot.env does not read or validate
    opened: Bundle | EdgeVlaError | None = None  # bundle_root opened once per report (_open_bundle)


@dataclass
class Machine:
    """Where facts come from; tests point these at fake trees and fake commands."""

    sys_root: Path = Path("/sys")
    proc_root: Path = Path("/proc")
    etc_root: Path = Path("/etc")
    trusted_keys: Path = TRUSTED_KEYS
    which: Callable[[str], str | None] = shutil.which
    run: Callable[[list[str]], str | None] = field(default=None)  # type: ignore[assignment]
    import_module: Callable[[str], Any] = importlib.import_module

    def __post_init__(self) -> None:
        if self.run is None:
            self.run = _run


def _run(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None


# --- what to check against --------------------------------------------------------------------------

@contextmanager
def expectation_for(path: str | Path | None) -> Iterator[Expectation]:
    """Read a package (.tar.gz or unpacked), a bundle, or the installed release."""
    if path is None:
        if os.path.lexists(INSTALLED):
            exp = _installed_release()
            if exp.installed and os.path.lexists(CONFIG_PATH):  # the operator's edits win over the package's copy
                exp.config_check = _read_operator_config(exp)
            yield exp
        else:
            yield Expectation()
        return
    path = Path(path)
    if not os.path.lexists(path):
        where = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
        raise EdgeVlaError(f"{path} does not exist{where}; doctor takes a robot package (.tar.gz or unpacked), a "
                           "bundle directory, or nothing (the installed release)")
    if path.is_dir():
        if (path / PACKAGE_JSON).is_file():
            yield _from_package_dir(path, f"package {path}")
        else:
            yield Expectation(source=f"bundle {path}", bundle_root=path)
        return
    with tempfile.TemporaryDirectory(prefix="edge-vla-doctor-") as tmp:
        extract_tarball(path, Path(tmp))
        root = Path(tmp)
        if (root / PACKAGE_JSON).is_file():
            yield _from_package_dir(root, f"package {path}")
        else:
            inner = root if (root / MANIFEST).is_file() else next((p for p in root.iterdir() if p.is_dir()), root)
            yield Expectation(source=f"bundle {path}", bundle_root=inner)


def _read_operator_config(exp: Expectation) -> Check | None:
    """Read the operator's robot.env into `exp`; a FAIL "config" check where it does not read or validate (the
    checks below then use the package's copy), so the rest of the report still comes."""
    try:
        exp.config = RobotConfig.load(CONFIG_PATH).validate()
    except ConfigError as exc:
        return Check("config", FAIL, f"{exc} (the checks below use the package's copy of the config)",
                     f"fix {CONFIG_PATH} (KEY=VALUE lines, UTF-8), then: sudo systemctl restart edge-vla.service")
    return None


def _installed_release() -> Expectation:
    """The installed release, with an "install" check: FAIL, and nothing else read from it, when `current`
    dangles or its package.json does not read (a half-installed or damaged robot: the service cannot start)."""
    link = f"{INSTALLED} -> {os.readlink(INSTALLED)}" if INSTALLED.is_symlink() else str(INSTALLED)
    source = f"installed release {INSTALLED.resolve().name}"
    fix = ("go back to the previous release (sudo edge-vla install --rollback --rootfs /) or install the package "
           "again (sudo EDGE_VLA_PKG=PKG sh install.sh)")
    if not (INSTALLED / PACKAGE_JSON).is_file():
        problem = f"{link}, which holds no {PACKAGE_JSON}: the release is missing or incomplete"
        return Expectation(source=source, install_check=Check("install", FAIL, problem, fix))
    try:
        exp = _from_package_dir(INSTALLED, source)
    except (OSError, ValueError, TypeError, AttributeError, EdgeVlaError) as exc:  # json's errors are ValueErrors
        problem = f"{link}: its {PACKAGE_JSON} or lock does not read ({exc}): the release is damaged"
        return Expectation(source=source, install_check=Check("install", FAIL, problem, fix))
    exp.installed = True
    exp.install_check = Check("install", PASS, link)
    return exp


def _from_package_dir(d: Path, source: str) -> Expectation:
    meta = json.loads((d / PACKAGE_JSON).read_text(encoding="utf-8"))
    cfg = meta.get("config", {})
    return Expectation(
        source=source,
        platform=meta.get("platform"),
        config=RobotConfig.load(d / "config/robot.env") if (d / "config/robot.env").is_file() else None,
        user=cfg.get("user"),
        bundle_root=d / "bundle",
        edge_vla_version=meta.get("edge_vla_version"),
        signed=meta.get("bundle", {}).get("signed"),
        lock=parse_lock((d / LOCK_FILE).read_text(encoding="utf-8")) if (d / LOCK_FILE).is_file() else None,
        venv=d / "venv",
        online=bool(meta.get("online")),
    )


# --- the checks -----------------------------------------------------------------------------------

def check_python(exp: Expectation) -> Check:
    have = f"{sys.version_info.major}.{sys.version_info.minor}"
    want = (exp.platform or {}).get("python")
    if want and want != have:
        return Check("python", WARN, f"Python {have}, package built for {want}",
                     f"run with python{want} (the lock pins wheels for it) or repackage with --python {have}")
    detail = f"Python {have} ({sys.executable})"
    if exp.edge_vla_version and exp.edge_vla_version != __version__:
        return Check("python", WARN, f"{detail}; edge-vla {__version__} here, package made with {exp.edge_vla_version}",
                     "remake the venv from the package: sudo sh /opt/edge-vla/current/install.sh --setup-venv")
    return Check("python", PASS, f"{detail}, edge-vla {__version__}")


def _open_bundle(exp: Expectation, root: Path) -> Bundle | EdgeVlaError:
    """exp.bundle_root (`root`) opened once per report (manifest.json read once, every file hashed against it), or
    why it does not open: every check of the report speaks about the same manifest bytes (a second read could
    return other bytes), and a multi-GB bundle is hashed once, not once per check."""
    if exp.opened is None:
        try:
            exp.opened = Bundle.open(root)
        except EdgeVlaError as exc:
            exp.opened = exc
    return exp.opened


def check_bundle(exp: Expectation, m: Machine) -> Check:
    if exp.bundle_root is None:
        return Check("bundle", PASS, "no bundle given (pass PKG or BUNDLE to check one)")
    bundle = _open_bundle(exp, exp.bundle_root)
    if isinstance(bundle, EdgeVlaError):
        return Check("bundle", FAIL, str(bundle), "re-export or re-package the bundle and install it again")
    detail = f"{bundle.config.preset} {bundle.precision}, {len(bundle.manifest['files'])} files verified"
    try:  # the runtime's own reading: a key another user could write is refused here as it is there
        keys = signing.trusted_keys_from_dir(m.trusted_keys) if m.trusted_keys.is_dir() else []
    except EdgeVlaError as exc:
        return Check("bundle", FAIL, str(exc), f"fix {m.trusted_keys} as the line says; the service refuses it too")
    if keys:
        try:
            # over the bytes the manifest (and every hash checked above) was parsed from, not a second read
            kid = signing.verify_bundle_signature(bundle.root, keys, manifest_bytes=bundle.manifest_bytes)
        except EdgeVlaError as exc:
            return Check("bundle", FAIL, str(exc), f"install a bundle signed by a key in {m.trusted_keys}")
        return Check("bundle", PASS, f"{detail}, signed by trusted key {kid}")
    signed = (bundle.root / "manifest.sig").is_file()
    return Check("bundle", PASS, detail + (", signed (no trusted keys here to check it)" if signed else ", unsigned"))


def _gpu_target(exp: Expectation) -> bool | None:
    return None if exp.platform is None else bool(exp.platform.get("gpu"))


def check_onnxruntime(exp: Expectation, m: Machine) -> Check:
    try:
        ort = m.import_module("onnxruntime")
    except ImportError as exc:
        return Check("onnxruntime", FAIL, f"not importable ({exc})", "remake the venv from the package: sudo sh /opt/edge-vla/current/install.sh --setup-venv")
    providers = list(ort.get_available_providers())
    detail = f"onnxruntime {ort.__version__}: {', '.join(providers)}"
    gpu_eps = {"CUDAExecutionProvider", "TensorrtExecutionProvider"}
    if _gpu_target(exp) and not gpu_eps & set(providers):
        index = ((exp.platform or {}).get("jetpack") or {}).get("ort_index", "PyPI")
        return Check("onnxruntime", WARN, detail + " (no GPU provider: inference runs on the CPU)",
                     f"pip uninstall onnxruntime && pip install onnxruntime-gpu from {index}")
    return Check("onnxruntime", PASS, detail)


def check_int8_range(exp: Expectation, m: Machine) -> Check | None:
    """An INT8 bundle's weight range against this CPU, where onnxruntime runs it (export/quantize.py INT8_RANGES)."""
    if exp.bundle_root is None:
        return None
    bundle = _open_bundle(exp, exp.bundle_root)
    if isinstance(bundle, EdgeVlaError):
        return None  # check_bundle says why
    manifest = bundle.manifest
    if manifest.get("precision") != "int8":
        return None
    weight_range = ((manifest.get("provenance") or {}).get("calibration") or {}).get("weight_range", "reduced")
    if _engines_built(exp):
        return Check("int8", PASS, f"{weight_range}-range weights; TensorRT engines built (TensorRT's own INT8 kernels)")
    from edge_vla.runtime.policy import int8_saturation_risk

    try:
        cpuinfo = (m.proc_root / "cpuinfo").read_text(errors="replace")
    except OSError:
        return Check("int8", WARN, f"{weight_range}-range weights; {m.proc_root / 'cpuinfo'} unreadable: "
                     "cannot tell whether onnxruntime's u8s8 GEMM saturates here", "check procfs is mounted")
    risk = int8_saturation_risk(manifest, cpuinfo)
    if risk:
        return Check("int8", WARN, risk, "edge-vla export CHECKPOINT -o BUNDLE --precision int8 --int8-range reduced, "
                     "then package and install that bundle for this machine")
    return Check("int8", PASS, f"{weight_range}-range weights: no u8s8 saturation with this CPU under onnxruntime")


def check_tune(exp: Expectation, m: Machine) -> Check | None:
    """The backend `edge-vla tune` recorded for this bundle on this machine, which Policy.load follows."""
    if exp.bundle_root is None:
        return None
    bundle = _open_bundle(exp, exp.bundle_root)
    if isinstance(bundle, EdgeVlaError):
        return None  # check_bundle says why
    from edge_vla.runtime.tune import read_record

    try:
        cpuinfo = (m.proc_root / "cpuinfo").read_text(errors="replace")
    except OSError:
        cpuinfo = ""
    lookup = read_record(bundle, cpuinfo)
    untuned = "TensorRT (engines built)" if _engines_built(exp) else "onnxruntime"
    fix = f"run `edge-vla tune {bundle.root}` as the service user (`edge-vla build-engines` ends with it)"
    if lookup.problem:
        return Check("tune", WARN, f"{lookup.problem}; the runtime uses {untuned}", fix)
    if lookup.choice is None:
        return Check("tune", WARN, f"not tuned on this machine (no record in {', '.join(map(str, lookup.searched))}): "
                     f"the runtime uses {untuned} without having timed the other backends", fix)
    return Check("tune", PASS, f"{lookup.choice.label}: {lookup.choice.summary} ({lookup.path})")


def _version_prefix(have: str, want: str, parts: int) -> bool:
    return have.split(".")[:parts] == want.split(".")[:parts]


def _engines_built(exp: Expectation) -> bool:
    return exp.bundle_root is not None and (exp.bundle_root / TARGET_DIR / "engines" / "index.json").is_file()


def check_tensorrt(exp: Expectation, m: Machine) -> Check:
    want = (exp.platform or {}).get("tensorrt")
    if _engines_built(exp):
        # `--backend auto` uses the engines only when both import; otherwise it runs onnxruntime.
        for module, fix in (("tensorrt", "sudo apt install python3-libnvinfer (the venv sees it through "
                                         "--system-site-packages)"),
                            ("cuda.bindings", "cuda-python is in the package's lock: remake the venv with "
                                              "`sudo sh /opt/edge-vla/current/install.sh --setup-venv`")):
            try:
                m.import_module(module)
            except ImportError as exc:
                return Check("tensorrt", FAIL, f"engines built but TensorRT backend unavailable: {module} does not "
                             f"import ({exc}); `--backend auto` runs onnxruntime instead", fix)
    if _gpu_target(exp) is False:
        return Check("tensorrt", PASS, "not needed (CPU target)")
    try:
        trt = m.import_module("tensorrt")
    except ImportError:
        fix = ("sudo apt install python3-libnvinfer (JetPack), and a venv with --system-site-packages"
               if (exp.platform or {}).get("jetpack") else "pip install 'edge-vla[tensorrt]'")
        return Check("tensorrt", WARN, "not importable: engines cannot be built, onnxruntime is used instead", fix)
    have = str(trt.__version__)
    if want and not _version_prefix(have, want, 2):
        return Check("tensorrt", WARN, f"TensorRT {have}, package expects {want}",
                     "engines and timing caches only load in the TensorRT that built them: rebuild with "
                     "`edge-vla build-engines BUNDLE` here, or repackage for this JetPack")
    return Check("tensorrt", PASS, f"TensorRT {have}" + (f" (expected {want})" if want else ""))


# Runs in the release venv's own python. Reports the locked names as that python resolves them, every
# distribution installed inside the venv (not the system's, seen through --system-site-packages: those
# are TensorRT's door and checked as "shadowed" only where they answer for a lock entry), and what this
# interpreter's ensurepip bundles (install.sh's venv bootstrap).
_DISTS_SCRIPT = """
import importlib.metadata as md, json, os, re, sys
prefix = os.path.realpath(sys.prefix) + os.sep

def canon(name):
    return re.sub(r"[-_.]+", "-", name).lower()

def where(d):
    loc = os.path.realpath(str(d.locate_file("")))
    return loc, (loc + os.sep).startswith(prefix)

locked = {}
for name in json.loads(sys.argv[1]):
    try:
        d = md.distribution(name)
    except md.PackageNotFoundError:
        locked[name] = None
        continue
    locked[name] = [d.version, *where(d)]
in_venv = {}
for d in md.distributions():
    name = d.metadata["Name"]
    if name and where(d)[1]:
        in_venv.setdefault(canon(name), d.version)
try:
    import ensurepip
    try:  # private, but the only place that names every bundled project (pip; setuptools up to 3.11)
        bootstrap = {canon(n): p.version for n, p in ensurepip._get_packages().items()}
    except AttributeError:
        bootstrap = {"pip": ensurepip.version()}
except Exception:  # no ensurepip (Debian without python3-venv): the venv's pip came from the system
    bootstrap = {}
print(json.dumps({"locked": locked, "venv": in_venv, "bootstrap": bootstrap}))
"""


def _extra_distributions(lock: list[LockEntry], in_venv: dict[str, str],
                         bootstrap: dict[str, str]) -> tuple[list[str], list[str]]:
    """(installed in the venv but not locked, exempt bootstrap) as "name version" strings.

    The lock is the venv's whole contents, with one exemption: the installer install.sh bootstraps
    the venv with (ensurepip's pip, and setuptools on Python <= 3.11), at exactly the version this
    interpreter bundles. The runtime never imports them. Anything else (wheel, a newer pip,
    setuptools that is not ensurepip's: its .pth file runs at every start) is code nothing verified."""
    locked = {e.name for e in lock}
    extras, exempt = [], []
    for name, version in sorted(in_venv.items()):
        if name in locked:
            continue
        (exempt if bootstrap.get(name) == version else extras).append(f"{name} {version}")
    return extras, exempt


def check_lock(exp: Expectation, m: Machine) -> Check | None:
    """The release venv holds exactly the lock: same versions, none served by system packages, and
    nothing the lock does not list (bar install.sh's own pip bootstrap)."""
    if exp.lock is None:
        return None
    python = exp.venv / "bin/python" if exp.venv is not None else None
    if (python is None or not python.exists()) and exp.installed:
        return Check("lock", FAIL, f"{exp.venv} is missing: edge-vla-firstboot.service has not made this release's "
                                   "venv, so edge-vla.service cannot start",
                     "sudo systemctl start edge-vla-firstboot.service (if it fails, `journalctl -u "
                     "edge-vla-firstboot` says why)")
    if python is None or not python.exists():
        return Check("lock", PASS, f"{len(exp.lock)} locked wheels; no venv here to compare (the robot makes it "
                                   "on first boot; run doctor there)")
    # -I: no current directory on sys.path (a checkout's *.egg-info would answer), no PYTHON* variables.
    out = m.run([str(python), "-I", "-c", _DISTS_SCRIPT, json.dumps([e.name for e in exp.lock])])
    try:
        report = json.loads(out or "")
        found, in_venv, bootstrap = report["locked"], report["venv"], report["bootstrap"]
    except (ValueError, KeyError, TypeError):
        return Check("lock", FAIL, f"{python} could not list its installed distributions",
                     "remake the venv: sudo sh /opt/edge-vla/current/install.sh --setup-venv")
    differ, shadowed = [], []
    for e in exp.lock:
        got = found.get(e.name)
        if got is None:
            differ.append(f"{e.name} missing (lock {e.version})")
        elif not got[2]:
            shadowed.append(f"{e.name} {got[0]} from system {got[1]}")
        elif got[0] != e.version:
            differ.append(f"{e.name} {got[0]} installed, lock {e.version}")
    extras, exempt = _extra_distributions(exp.lock, in_venv, bootstrap)
    if extras and exp.online and not (differ or shadowed):
        return Check("lock", WARN, f"development (--online) package: only edge-vla is locked; from an index, "
                                   f"unverified: {', '.join(extras)}",
                     "install an offline package (`edge-vla package` without --online) on robots")
    if differ or shadowed or extras:
        detail = "; ".join([*(f"differs from the lock: {d}" for d in differ),
                            *(f"lock entry shadowed by a system package (not hash-checked): {s}" for s in shadowed),
                            *([f"installed but not in the lock: {', '.join(extras)}"] if extras else [])])
        return Check("lock", FAIL, detail, "remake the venv from the package's wheels: "
                                           "sudo sh /opt/edge-vla/current/install.sh --setup-venv")
    detail = f"{len(exp.lock)} locked distributions installed in {exp.venv} at the locked versions, nothing else"
    if exempt:
        detail += f" but install.sh's venv bootstrap ({', '.join(exempt)})"
    return Check("lock", PASS, detail)


def _cuda_version(m: Machine) -> str | None:
    if m.which("nvidia-smi"):
        out = m.run(["nvidia-smi"]) or ""
        if found := re.search(r"CUDA Version:\s*([\d.]+)", out):
            return found.group(1)
    for candidate in ("/usr/local/cuda/version.json",):
        p = Path(candidate)
        if p.is_file():
            try:
                return json.loads(p.read_text())["cuda"]["version"]
            except (ValueError, KeyError):
                pass
    if m.which("nvcc"):
        out = m.run(["nvcc", "--version"]) or ""
        if found := re.search(r"release ([\d.]+)", out):
            return found.group(1)
    return None


def check_cuda(exp: Expectation, m: Machine) -> Check:
    if _gpu_target(exp) is False:
        return Check("cuda", PASS, "not needed (CPU target)")
    want = (exp.platform or {}).get("cuda")
    have = _cuda_version(m)
    if have is None:
        return Check("cuda", WARN, "no CUDA found (nvidia-smi, /usr/local/cuda, nvcc)",
                     "install the NVIDIA driver / JetPack (sudo apt install nvidia-jetpack)")
    if want and not _version_prefix(have, want, 1 if "." not in want else 2):
        return Check("cuda", WARN, f"CUDA {have}, package expects {want}",
                     "flash the JetPack the package was made for, or repackage with the matching --jetpack")
    return Check("cuda", PASS, f"CUDA {have}" + (f" (expected {want})" if want else ""))


def _meminfo_available_mib(m: Machine) -> int | None:
    try:
        text = (m.proc_root / "meminfo").read_text()
    except OSError:
        return None
    found = re.search(r"MemAvailable:\s+(\d+) kB", text)
    return int(found.group(1)) // 1024 if found else None


def check_gpu(exp: Expectation, m: Machine) -> Check:
    if _gpu_target(exp) is False:
        return Check("gpu", PASS, "not needed (CPU target)")
    want_cc = (exp.platform or {}).get("compute_capability")
    name = cc = None
    free = None
    if m.which("nvidia-smi"):
        out = m.run(["nvidia-smi", "--query-gpu=name,compute_cap,memory.free", "--format=csv,noheader,nounits"])
        if out and out.strip():
            fields = [f.strip() for f in out.strip().splitlines()[0].split(",")]
            if len(fields) >= 3:
                name, cc = fields[0], fields[1]
                free = int(float(fields[2])) if fields[2].replace(".", "").isdigit() else None
    model = m.proc_root / "device-tree/model"
    if name is None and model.is_file():  # Jetson without nvidia-smi (JetPack 6): unified memory
        name = model.read_text(errors="replace").strip("\x00\n ")
        cc = "8.7" if "Orin" in name else ("11.0" if "Thor" in name else None)
    if name is not None and free is None:
        free = _meminfo_available_mib(m)  # Jetson: the GPU shares system memory
    if name is None:
        return Check("gpu", WARN, "no NVIDIA GPU found (nvidia-smi, /proc/device-tree/model)",
                     "inference will run on the CPU; check the driver with `nvidia-smi` or `tegrastats`")
    detail = f"{name}, compute capability {cc or '?'}, {free if free is not None else '?'} MiB free"
    if want_cc and cc and cc != want_cc:
        return Check("gpu", FAIL, f"{detail}; package targets compute capability {want_cc}",
                     "repackage for this machine's --target")
    if free is not None and free < MIN_FREE_GPU_MIB:
        return Check("gpu", WARN, detail + " (low)", "stop other GPU processes; on Jetson free memory with a smaller model")
    return Check("gpu", PASS, detail)


def check_l4t(exp: Expectation, m: Machine) -> Check | None:
    jp = (exp.platform or {}).get("jetpack")
    if not jp:
        return None
    path = m.etc_root / "nv_tegra_release"
    if not path.is_file():
        return Check("l4t", WARN, f"{path} absent: not a Jetson, or not L4T",
                     f"run on the Jetson flashed with JetPack {jp['version']} (L4T {jp['l4t']})")
    found = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", path.read_text(errors="replace"))
    have = f"{found.group(1)}.{found.group(2)}" if found else "unknown"
    if have != jp["l4t"]:
        return Check("l4t", WARN, f"L4T {have}, package made for JetPack {jp['version']} (L4T {jp['l4t']})",
                     "repackage with the matching --jetpack, or reflash")
    return Check("l4t", PASS, f"L4T {have} = JetPack {jp['version']}")


def _user_groups(user: str) -> set[int] | None:
    import grp
    import pwd

    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        return None
    return {pw.pw_gid} | {g.gr_gid for g in grp.getgrall() if user in g.gr_mem}


def check_link(exp: Expectation, m: Machine) -> Check:
    if exp.config is None:
        return Check("link", PASS, "no robot config given (pass PKG to check the motor controller link)")
    link = exp.config.link
    kind, dev = link_kind(link), link_device(link)
    if kind == "can":
        iface = m.sys_root / "class/net" / dev
        if not iface.exists():
            return Check("link", FAIL, f"CAN interface {dev} absent",
                         "check the CAN transceiver / kernel module (Jetson: sudo modprobe mttcan)")
        state = (iface / "operstate").read_text().strip() if (iface / "operstate").is_file() else "unknown"
        if state == "down":
            return Check("link", FAIL, f"CAN interface {dev} is down",
                         f"sudo ip link set {dev} up type can bitrate 1000000 (match the controller)")
        return Check("link", PASS, f"CAN interface {dev} is {state}")
    path = Path(dev)
    if not path.exists():
        hint = ("the udev rule links the adapter by USB vendor/product id: check `udevadm info -a "
                "/dev/ttyUSB0 | grep -E 'idVendor|idProduct|serial'` against the package's --usb-vid/--usb-pid"
                if "edge-vla-motor" in dev else "plug in the motor controller; see `ls -l /dev/serial/by-id`")
        return Check("link", FAIL, f"serial device {dev} absent", hint)
    st = path.stat()
    if not stat.S_ISCHR(st.st_mode):
        return Check("link", FAIL, f"{dev} is not a character device", "point EDGE_VLA_LINK at the serial adapter")
    real = os.path.realpath(path)
    mode = stat.filemode(st.st_mode)
    detail = f"{dev} -> {real} {mode} gid {st.st_gid}"
    user = exp.user
    if user:
        groups = _user_groups(user)
        if groups is None:
            return Check("link", FAIL, f"{detail}; service user {user} does not exist", "install the package (install.sh)")
        by_group = st.st_gid in groups and st.st_mode & stat.S_IRGRP and st.st_mode & stat.S_IWGRP
        by_other = st.st_mode & stat.S_IROTH and st.st_mode & stat.S_IWOTH
        if not (by_group or by_other):
            return Check("link", FAIL, f"{detail}; {user} cannot open it",
                         f"sudo usermod -aG dialout {user} (the udev rule sets GROUP=dialout MODE=0660)")
        return Check("link", PASS, f"{detail}, usable by {user}")
    if not os.access(path, os.R_OK | os.W_OK):
        return Check("link", FAIL, f"{detail}; this user cannot open it", "sudo usermod -aG dialout $USER, log in again")
    return Check("link", PASS, detail)


# A servo bus's vendor SDK (module, the extra that installs it), and what protects the arm when the host dies.
MOTOR_SDKS = {"dynamixel": ("dynamixel_sdk", "dynamixel"), "feetech": ("scservo_sdk", "feetech")}


def check_motor_bus(exp: Expectation, m: Machine) -> list[Check]:
    """For a servo-bus link: its SDK is importable, and what stops the arm if this computer dies (a Feetech
    STS has no communication watchdog: a WARN on every run of doctor, as the runtime warns at every start)."""
    if exp.config is None:
        return []
    kind = link_kind(exp.config.link)
    if kind in FIRMWARE_LINK_KINDS:
        return []
    checks = []
    module, extra = MOTOR_SDKS.get(kind, (None, kind))
    if module is not None:
        try:
            m.import_module(module)
            checks.append(Check("motor-sdk", PASS, f"{module} importable for {kind}://"))
        except ImportError:
            checks.append(Check("motor-sdk", FAIL, f"{kind}:// needs {module}, which is not importable",
                                f"build the package with `edge-vla package --extras {extra}` (or pip install "
                                f"'edge-vla[{extra}]')"))
    if kind == "feetech":
        checks.append(Check(
            "motor-watchdog", WARN, "feetech:// servos have NO communication watchdog: if this computer dies, hangs or "
            "loses the USB cable, the servos keep holding their last goal under torque (edge-vla turns torque off "
            "on every stop, SIGTERM and exit, but not after kill -9, a kernel panic or an unplug)",
            "wire a hardware E-stop that cuts servo power, or put an MCU running edge-vla's firmware reference "
            "between this computer and the servo bus (serial://); docs/motors.md"))
    elif kind == "dynamixel":
        checks.append(Check("motor-watchdog", PASS, "dynamixel:// arms each servo's Bus Watchdog: if this computer "
                            "dies the servos stop and hold position with torque ON (not torque off); docs/motors.md"))
    return checks


def check_camera(exp: Expectation, m: Machine) -> Check:
    if exp.config is None:
        return Check("camera", PASS, "no robot config given")
    cam = exp.config.camera
    if cam == "sim":
        return Check("camera", PASS, "sim camera")
    if cam.startswith("video:"):
        p = Path(cam.removeprefix("video:"))
        return (Check("camera", PASS, f"{p} present") if p.exists()
                else Check("camera", FAIL, f"{p} absent", "fix EDGE_VLA_CAMERA in /etc/edge-vla/robot.env"))
    try:
        m.import_module("pyrealsense2")
    except ImportError:
        return Check("camera", FAIL, "realsense camera configured but pyrealsense2 is not importable",
                     "pip install 'edge-vla[realsense]' (Jetson: build librealsense with the RSUSB backend)")
    return Check("camera", PASS, "pyrealsense2 importable")


def _limit(value: int) -> str:
    return "unlimited" if value == resource.RLIM_INFINITY else str(value)


def check_rtprio(exp: Expectation) -> Check:
    soft, hard = resource.getrlimit(resource.RLIMIT_RTPRIO)
    if soft == resource.RLIM_INFINITY or soft > 0:
        return Check("rtprio", PASS, f"RLIMIT_RTPRIO {_limit(soft)} (hard {_limit(hard)})")
    return Check("rtprio", WARN, f"RLIMIT_RTPRIO {_limit(soft)}: this shell cannot use SCHED_FIFO",
                 "edge-vla.service sets LimitRTPRIO=95; for manual runs add '@dialout - rtprio 95' to "
                 "/etc/security/limits.d/edge-vla.conf and log in again")


def check_memlock(exp: Expectation) -> Check:
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft == resource.RLIM_INFINITY or soft >= MIN_MEMLOCK:
        return Check("memlock", PASS, f"RLIMIT_MEMLOCK {_limit(soft)} (hard {_limit(hard)})")
    return Check("memlock", WARN, f"RLIMIT_MEMLOCK {soft >> 10} KiB: mlockall would fail, page faults in the loop",
                 "edge-vla.service sets LimitMEMLOCK=infinity; for manual runs add '@dialout - memlock unlimited' "
                 "to /etc/security/limits.d/edge-vla.conf")


def check_clocksource(m: Machine) -> Check:
    path = m.sys_root / "devices/system/clocksource/clocksource0/current_clocksource"
    try:
        source = path.read_text().strip()
    except OSError:
        return Check("clocksource", WARN, f"{path} unreadable", "check the kernel exposes sysfs clocksources")
    if source in GOOD_CLOCKSOURCES:
        return Check("clocksource", PASS, source)
    avail = (path.parent / "available_clocksource")
    options = avail.read_text().split() if avail.is_file() else []
    better = next((s for s in options if s in GOOD_CLOCKSOURCES), None)
    fix = (f"echo {better} | sudo tee {path}" if better else
           "the TSC was probably marked unstable: check `dmesg | grep -i clocksource`")
    return Check("clocksource", WARN, f"{source}: slow or coarse timestamps for the control loop", fix)


def check_governor(exp: Expectation, m: Machine) -> Check:
    files = sorted(glob.glob(str(m.sys_root / "devices/system/cpu/cpu*/cpufreq/scaling_governor")))
    jetson = bool((exp.platform or {}).get("jetpack")) or (m.etc_root / "nv_tegra_release").is_file()
    fix = ("sudo nvpmodel -m 0 && sudo jetson_clocks (max clocks; persists with the jetson_clocks service)"
           if jetson else "sudo cpupower frequency-set -g performance")
    if not files:
        return Check("governor", WARN, "no cpufreq in sysfs (a VM, or no frequency driver): cannot check",
                     "on the robot, make sure clocks are pinned: " + fix)
    governors = {}
    for f in files:
        try:
            governors[Path(f).parent.parent.name] = Path(f).read_text().strip()
        except OSError:
            continue
    kinds = sorted(set(governors.values()))
    if kinds == ["performance"]:
        return Check("governor", PASS, f"performance on {len(governors)} CPUs")
    return Check("governor", WARN, f"{', '.join(kinds)} on {len(governors)} CPUs: frequency scaling adds jitter", fix)


def run_checks(exp: Expectation, machine: Machine | None = None) -> list[Check]:
    m = machine or Machine()
    checks = [
        exp.install_check,
        exp.config_check,
        check_python(exp),
        check_bundle(exp, m),
        check_lock(exp, m),
        check_onnxruntime(exp, m),
        check_int8_range(exp, m),
        check_tune(exp, m),
        check_tensorrt(exp, m),
        check_cuda(exp, m),
        check_gpu(exp, m),
        check_l4t(exp, m),
        check_link(exp, m),
        *check_motor_bus(exp, m),
        check_camera(exp, m),
        check_rtprio(exp),
        check_memlock(exp),
        check_clocksource(m),
        check_governor(exp, m),
    ]
    return [c for c in checks if c is not None]


def format_report(checks: list[Check], source: str) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"edge-vla doctor: {source}"]
    for c in checks:
        lines.append(f"{c.status.upper():<4}  {c.name:<{width}}  {c.detail}")
        if c.fix and c.status != PASS:
            lines.append(f"{'':<4}  {'':<{width}}  fix: {c.fix}")
    n = {s: sum(c.status == s for c in checks) for s in (PASS, WARN, FAIL)}
    lines.append(f"{n[PASS]} pass, {n[WARN]} warn, {n[FAIL]} fail")
    return "\n".join(lines)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", nargs="?", help="robot package (.tar.gz or unpacked) or bundle; "
                                                  "default: the installed release, if any")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def main(args: argparse.Namespace) -> int:
    with expectation_for(args.target) as exp:
        checks = run_checks(exp)
    failed = any(c.status == FAIL for c in checks)
    if args.json:
        print(json.dumps({"source": exp.source, "ok": not failed, "checks": [asdict(c) for c in checks]}, indent=2))
    else:
        print(format_report(checks, exp.source))
    return 1 if failed else 0
