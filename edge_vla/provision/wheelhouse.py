"""Workstation side of an offline package: the edge-vla wheel, the target's lock and its wheelhouse.

How the lock is resolved: by pip itself, `pip download --only-binary=:all:` with the target's platform
tags, Python version, implementation and ABI, starting from the edge-vla wheel's own Requires-Dist
(i.e. pyproject.toml's runtime dependencies, plus the `provision` extra the robot needs to check
signatures). pip-compile and `pip install --dry-run --report` resolve for the running interpreter;
`pip download --platform` resolves against the target's wheels and fetches the very files the
package ships, so the lock and the wheelhouse cannot disagree, and the hashes are computed from the
downloaded bytes rather than taken from index metadata.

pip matches `--platform` tags exactly (it does not expand manylinux_2_35 to the older manylinux
tags), so every manylinux_2_N tag up to the target's glibc is passed. pip also evaluates environment
markers against the *running* interpreter, not the target (pypa/pip#11198), so the downloaded set is
re-walked here with the target's markers: dependencies pip skipped are added and resolved again,
wheels the target does not need are dropped.

pip configuration files and PIP_* variables that choose sources are ignored (PIP_CONFIG_FILE is set
to /dev/null): the wheels come only from --index-url / --extra-index-url / --wheels, recorded in
package.json.
"""

from __future__ import annotations

import email.parser
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename

from edge_vla.bundle import sha256_file
from edge_vla.provision.errors import PackageError
from edge_vla.provision.lock import LockEntry
from edge_vla.provision.platforms import Platform

log = logging.getLogger(__name__)

PYPI = "https://pypi.org/simple"
# Extras of edge-vla every robot installs: `provision` verifies package and bundle signatures.
ROBOT_EXTRAS = ("provision",)
# Extras a robot package may not take (`edge-vla package --extras`), with why.
NOT_ON_ROBOTS = {
    "export": "is for the workstation (torch, onnx): robots run bundles, not checkpoints",
    "pi0-export": "is for the workstation (transformers, torch)",
    "dev": "is for developing edge-vla",
    "bench-peers": "is for the workstation's benchmarks",
    "metaworld": "is the workstation's MuJoCo benchmark",
    "tensorrt": "comes from the target's JetPack (python3-libnvinfer) and the platform's cuda-python pin",
}
_EXTRA_MARKER = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")
# PIP_* variables that configure transport only; every other PIP_* variable is dropped.
_TRANSPORT_ENV = frozenset({"PIP_CERT", "PIP_CLIENT_CERT", "PIP_PROXY", "PIP_DEFAULT_TIMEOUT", "PIP_RETRIES",
                            "PIP_TRUSTED_HOST", "PIP_CACHE_DIR", "PIP_NO_CACHE_DIR"})
_LEGACY_MANYLINUX = {"x86_64": ((17, "manylinux2014"), (12, "manylinux2010"), (5, "manylinux1")),
                     "aarch64": ((17, "manylinux2014"),)}
_SOURCE_IGNORE = shutil.ignore_patterns(".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__",
                                        ".pytest_cache", ".ruff_cache", ".mypy_cache", ".benchmarks", "runs",
                                        "tests", "benchmarks", "*.so", "*.o")
# Wheel zip timestamps: fixed, so the same source gives the same wheel bytes (and package digest).
_SOURCE_DATE_EPOCH = "315532800"


@dataclass(frozen=True)
class Sources:
    """Where wheels may come from at package time (never on the robot)."""

    index_url: str | None = PYPI  # None: no index at all, only find_links
    extra_index_urls: tuple[str, ...] = ()
    find_links: tuple[Path, ...] = ()

    def pip_args(self) -> list[str]:
        args = ["--no-index"] if self.index_url is None else ["--index-url", self.index_url]
        for url in self.extra_index_urls:
            args += ["--extra-index-url", url]
        for d in self.find_links:
            args += ["--find-links", str(Path(d).resolve())]
        return args

    def describe(self) -> list[str]:
        out = [] if self.index_url is None else [self.index_url]
        return out + list(self.extra_index_urls) + [f"--wheels {d}" for d in self.find_links]


@dataclass(frozen=True)
class Missing:
    """A requirement with no wheel for the target in the given sources."""

    requirement: str
    detail: str
    fix: str

    def __str__(self) -> str:
        return f"{self.requirement}: {self.detail}. Fix: {self.fix}"


@dataclass(frozen=True)
class LockedWheel:
    name: str  # canonical
    version: str
    path: Path
    sha256: str
    size: int

    def entry(self) -> LockEntry:
        return LockEntry(self.name, self.version, (self.sha256,))


@dataclass
class Wheelhouse:
    dir: Path
    wheels: list[LockedWheel] = field(default_factory=list)
    missing: list[Missing] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(w.size for w in self.wheels)


# --- the target -----------------------------------------------------------------------------------

def _py(platform: Platform) -> tuple[int, int]:
    major, minor = platform.python.split(".")
    return int(major), int(minor)


def platform_tags(platform: Platform) -> list[str]:
    """Every platform tag a wheel for the target may carry, most specific first.

    linux_<arch> first: such wheels only come from sources the operator named (PyPI refuses them),
    e.g. NVIDIA's Jetson builds or a wheel built on the target, and they should win."""
    arch = platform.target.arch
    major, minor = (int(x) for x in platform.glibc.split("."))
    first = 5 if arch == "x86_64" else 17
    tags = [f"linux_{arch}"] + [f"manylinux_{major}_{m}_{arch}" for m in range(minor, first - 1, -1)]
    tags += [f"{legacy}_{arch}" for floor, legacy in _LEGACY_MANYLINUX.get(arch, ()) if floor <= minor]
    return tags


def supported_tags(platform: Platform) -> set[Tag]:
    """The wheel tags pip on the target accepts (CPython only)."""
    py = _py(platform)
    interp = f"cp{py[0]}{py[1]}"
    plats = platform_tags(platform)
    return set(cpython_tags(py, abis=[interp], platforms=plats)) | set(compatible_tags(py, interp, plats))


def pip_target_args(platform: Platform) -> list[str]:
    py = _py(platform)
    args = ["--only-binary=:all:", "--implementation", "cp", "--python-version", f"{py[0]}.{py[1]}"]
    for abi in (f"cp{py[0]}{py[1]}", "abi3", "none"):
        args += ["--abi", abi]
    for tag in platform_tags(platform):
        args += ["--platform", tag]
    return args


def marker_environment(platform: Platform) -> dict[str, str]:
    """PEP 508 marker values on the target (CPython on Linux)."""
    py = platform.python
    return {
        "implementation_name": "cpython", "implementation_version": f"{py}.0", "os_name": "posix",
        "platform_machine": platform.target.arch, "platform_release": "", "platform_system": "Linux",
        "platform_version": "", "python_full_version": f"{py}.0", "platform_python_implementation": "CPython",
        "python_version": py, "sys_platform": "linux", "extra": "",
    }


def _applies(req: Requirement, env: dict[str, str], extras: Iterable[str] = ("",)) -> bool:
    return req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in extras)


def _bare(req: Requirement) -> str:
    """The requirement without its marker (already evaluated for the target)."""
    extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
    return f"{req.name}{extras}{req.specifier}"


# --- wheels ---------------------------------------------------------------------------------------

def read_wheel_metadata(path: Path) -> tuple[str, str, list[str]]:
    """(name, version, Requires-Dist) from a wheel's METADATA."""
    try:
        with zipfile.ZipFile(path) as zf:
            meta_name = next(n for n in zf.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
            msg = email.parser.Parser().parsestr(zf.read(meta_name).decode("utf-8"))
    except (OSError, zipfile.BadZipFile, StopIteration, UnicodeDecodeError) as exc:
        raise PackageError(f"{path} is not a readable wheel ({exc}); download or build it again") from exc
    return str(msg["Name"]), str(msg["Version"]), list(msg.get_all("Requires-Dist") or [])


def wheel_top_level(path: Path) -> set[str]:
    """The top-level import names a wheel installs (from its file list)."""
    names = set()
    with zipfile.ZipFile(path) as zf:
        for n in zf.namelist():
            top = n.split("/", 1)[0]
            if top.endswith((".dist-info", ".data")):
                continue
            names.add(top.split(".", 1)[0] if "/" not in n else top)
    return {n for n in names if n.isidentifier()}


def _pip_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k in _TRANSPORT_ENV}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _pip(args: Sequence[str], timeout: float = 3600) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "pip", *args]
    log.debug("running %s", " ".join(cmd))
    return subprocess.run(cmd, capture_output=True, text=True, env=_pip_env(), timeout=timeout, check=False)


def source_root() -> Path | None:
    """The checkout this edge-vla runs from (editable install), or None for an installed wheel."""
    import edge_vla

    root = Path(edge_vla.__file__).resolve().parents[1]
    pyproject = root / "pyproject.toml"
    if pyproject.is_file() and re.search(r'^name\s*=\s*"edge-vla"', pyproject.read_text(encoding="utf-8"), re.M):
        return root
    return None


def build_edge_vla_wheel(dest: Path) -> Path:
    """Build the edge-vla wheel from the source this process runs (a clean copy, no stale build/)."""
    root = source_root()
    if root is None:
        raise PackageError("edge-vla is installed from a wheel, not a source checkout: pass that wheel with "
                           "--edge-vla-wheel PATH (or install edge-vla editable from its checkout)")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edge-vla-src-") as tmp:
        src = Path(tmp) / "src"
        shutil.copytree(root, src, ignore=_SOURCE_IGNORE)
        out = Path(tmp) / "out"
        env = _pip_env() | {"SOURCE_DATE_EPOCH": _SOURCE_DATE_EPOCH}
        base = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)]
        # This environment's setuptools first (no network); else an isolated build, which fetches
        # setuptools from PyPI.
        for extra in (["--no-build-isolation", "--no-index"], ["--index-url", PYPI]):
            proc = subprocess.run(base + extra, capture_output=True, text=True, env=env, timeout=900, check=False)
            built = sorted(out.glob("edge_vla-*.whl")) if out.is_dir() else []
            if proc.returncode == 0 and len(built) == 1:
                break
        if proc.returncode != 0 or len(built) != 1:
            raise PackageError(f"building the edge-vla wheel from {root} failed: {_tail(proc.stderr)}. "
                               "Install setuptools and wheel in this environment (`pip install 'edge-vla[dev]'`), "
                               "or pass a built wheel with --edge-vla-wheel PATH")
        final = dest / built[0].name
        shutil.move(str(built[0]), final)
    return final


def check_edge_vla_wheel(path: Path, version: str) -> tuple[str, str, list[str]]:
    name, wheel_version, requires = read_wheel_metadata(path)
    if canonicalize_name(name) != "edge-vla":
        raise PackageError(f"--edge-vla-wheel {path} is {name} {wheel_version}, not edge-vla")
    if wheel_version != version:
        raise PackageError(f"--edge-vla-wheel {path} is edge-vla {wheel_version}, but this is edge-vla {version}: "
                           "package with the edge-vla that built the bundle, or pass the matching wheel")
    return name, wheel_version, requires


def requirement_name(spec: str) -> str:
    return canonicalize_name(Requirement(spec).name)


def declared_extras(requires_dist: Iterable[str]) -> set[str]:
    """The extras a wheel's Requires-Dist names (`...; extra == "serve"`)."""
    return {canonicalize_name(m) for spec in requires_dist for m in _EXTRA_MARKER.findall(spec)}


def check_extras(requires_dist: Sequence[str], extras: Iterable[str]) -> tuple[str, ...]:
    """The requested extras, canonical and sorted; PackageError in one line for an unknown or workstation one."""
    known = declared_extras(requires_dist)
    robot_side = sorted(known - set(NOT_ON_ROBOTS) - set(ROBOT_EXTRAS))
    out = []
    for extra in extras:
        name = canonicalize_name(extra.strip())
        if name in NOT_ON_ROBOTS:
            raise PackageError(f"extra {name!r} {NOT_ON_ROBOTS[name]}; robot packages take: {', '.join(robot_side)}")
        if name not in known:
            raise PackageError(f"unknown extra {extra.strip()!r}; robot packages take: {', '.join(robot_side)}")
        out.append(name)
    return tuple(sorted(set(out)))


def runtime_requirements(requires_dist: Sequence[str], platform: Platform, extras: Iterable[str] = ()) -> list[str]:
    """The robot's top-level requirements: edge-vla's Requires-Dist for the target (+ ROBOT_EXTRAS and the
    requested `extras`, e.g. telemetry, serve), with the target's onnxruntime distribution and, on GPU targets,
    its cuda-python range."""
    requires_dist = list(requires_dist)
    wanted = ("", *ROBOT_EXTRAS, *check_extras(requires_dist, extras))
    env = marker_environment(platform)
    out: list[str] = []
    for spec in requires_dist:
        req = Requirement(spec)
        if not _applies(req, env, wanted):
            continue
        if canonicalize_name(req.name) == "onnxruntime":
            req.name = platform.onnxruntime
        req.marker = None
        if _bare(req) not in out:  # a dependency of two extras is listed once
            out.append(_bare(req))
    if platform.cuda_python:
        out.append(_bare(Requirement(f"cuda-python{platform.cuda_python}")))
    return out


# --- resolving and downloading -----------------------------------------------------------------------

_NO_MATCH = re.compile(r"No matching distribution found for ([A-Za-z0-9][A-Za-z0-9._-]*)")
_SAW = re.compile(r"Could not find a version that satisfies the requirement (\S+) \(from versions: ([^)]*)\)")


def _tail(text: str, lines: int = 8) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def _describe_target(platform: Platform) -> str:
    return (f"CPython {platform.python} on {platform.target.arch} (glibc {platform.glibc}; "
            f"{platform.target.name})")


def _fix(req: str, platform: Platform, sources: Sources) -> str:
    name = canonicalize_name(Requirement(req).name)
    py = platform.python.replace(".", "")
    flags = (f"--only-binary=:all: --implementation cp --python-version {platform.python} --abi cp{py} "
             + " ".join(f"--platform {t}" for t in platform_tags(platform)[:2]))
    jp = platform.jetpack
    if name == "onnxruntime-gpu" and jp is not None:
        return (f"NVIDIA publishes onnxruntime-gpu for JetPack {jp.version} on {jp.ort_index}, not on PyPI. "
                f"On this workstation run `pip download --no-deps {flags} --index-url {jp.ort_index} "
                f"-d jetson-wheels '{req}'` and package again with `--wheels jetson-wheels`")
    return (f"on a machine like the target ({platform.target.arch}, Python {platform.python}) run "
            f"`pip wheel --no-deps '{req}' "
            f"-w extra-wheels` and package again with `--wheels extra-wheels`, or pick a version that has a "
            f"wheel with `--pin {name}==VERSION`, or name an index that has one with --index-url")


def _missing(req: str, stderr: str, platform: Platform, sources: Sources) -> Missing:
    saw = _SAW.search(stderr)
    versions = saw.group(2).strip() if saw else "none"
    where = ", ".join(sources.describe()) or "no sources"
    detail = (f"no wheel for {_describe_target(platform)} in {where} (pip saw versions: {versions or 'none'}; "
              "an sdist cannot be installed on an offline robot)")
    return Missing(req, detail, _fix(req, platform, sources))


def _closure(wheels: list[Path], roots: list[str], platform: Platform) -> tuple[list[Path], list[str]]:
    """Walk the downloaded wheels from `roots` with the target's markers: (needed wheels, unmet requirements)."""
    env = marker_environment(platform)
    meta = {}
    for w in wheels:
        name, version, requires = read_wheel_metadata(w)
        meta[canonicalize_name(name)] = (version, requires, w)
    queue = deque(Requirement(r) for r in roots)
    done: set[tuple[str, frozenset[str]]] = set()
    needed: dict[str, Path] = {}
    unmet: list[str] = []
    while queue:
        req = queue.popleft()
        key = (canonicalize_name(req.name), frozenset(req.extras))
        if key in done:
            continue
        done.add(key)
        if key[0] not in meta:
            unmet.append(_bare(req))
            continue
        version, requires, path = meta[key[0]]
        if not req.specifier.contains(version, prereleases=True):
            raise PackageError(f"pip chose {key[0]} {version} for {platform.target.name}, but the target needs "
                               f"{_bare(req)} (markers differ between this machine and the target); pin it with "
                               f"--pin {key[0]}==VERSION")
        needed[key[0]] = path
        for spec in requires:
            dep = Requirement(spec)
            if _applies(dep, env, ("", *sorted(req.extras))):
                queue.append(dep)
    return sorted(needed.values()), unmet


def download(requirements: Sequence[str], platform: Platform, sources: Sources, dest: Path,
             constraints: Sequence[str] = ()) -> Wheelhouse:
    """Resolve `requirements` for the target and put one wheel per locked distribution in `dest`.

    Requirements with no wheel for the target are returned in `missing` (named with the fix) rather
    than raised, so that one run names all of them; everything else is downloaded."""
    try:
        top = [Requirement(r) for r in requirements]
        cons = [Requirement(c) for c in constraints]
    except InvalidRequirement as exc:
        raise PackageError(f"invalid requirement: {exc}") from exc
    dest.mkdir(parents=True, exist_ok=True)
    wanted = [_bare(r) for r in top]
    missing: list[Missing] = []
    with tempfile.TemporaryDirectory(prefix="edge-vla-resolve-") as tmp:
        cfile = Path(tmp) / "constraints.txt"
        cfile.write_text("".join(f"{c}\n" for c in cons))
        for attempt in range(len(wanted) + 8):
            out = Path(tmp) / f"round{attempt}"
            if not wanted:
                return Wheelhouse(dest, [], missing)
            proc = _pip(["download", "--no-input", "--progress-bar", "off", "--dest", str(out),
                         *pip_target_args(platform), *sources.pip_args(), "-c", str(cfile), *wanted])
            if proc.returncode != 0:
                found = _NO_MATCH.search(proc.stderr)
                by_name = {canonicalize_name(Requirement(w).name): w for w in wanted}
                name = canonicalize_name(found.group(1)) if found else None
                if name is None or name not in by_name:
                    what = f"{found.group(1)} (a dependency of the runtime's requirements)" if found else "the lock"
                    raise PackageError(
                        f"pip could not resolve {what} for {_describe_target(platform)}: {_tail(proc.stderr)}"
                        + (f". Fix: {_fix(found.group(1), platform, sources)}" if found else ""))
                missing.append(_missing(by_name[name], proc.stderr, platform, sources))
                wanted = [w for w in wanted if canonicalize_name(Requirement(w).name) != name]
                continue
            got = sorted(out.glob("*.whl"))
            needed, unmet = _closure(got, wanted, platform)
            if unmet:  # pip skipped them by this machine's markers; the target needs them
                log.debug("adding %s (needed on the target, skipped by pip's host markers)", unmet)
                wanted += unmet
                continue
            wheels = []
            for path in needed:
                final = dest / path.name
                shutil.copyfile(path, final)
                name, version, _ = read_wheel_metadata(final)
                wheels.append(LockedWheel(canonicalize_name(name), version, final, sha256_file(final),
                                          final.stat().st_size))
            _check_tags(wheels, platform)
            return Wheelhouse(dest, sorted(wheels, key=lambda w: w.name), missing)
    raise PackageError(f"resolving the lock for {platform.target.name} did not settle; report this with the "
                       "requirements you package with")


def _check_tags(wheels: Iterable[LockedWheel], platform: Platform) -> None:
    ok = supported_tags(platform)
    for w in wheels:
        _, _, _, tags = parse_wheel_filename(w.path.name)
        if not tags & ok:
            raise PackageError(f"{w.path.name} is not installable on {_describe_target(platform)}; "
                               "remove it from --wheels or pin another version")
