"""The package's requirements.lock and wheelhouse, as the robot reads them (stdlib only).

A lock line is `name==version` followed by `--hash=sha256:<hex>` options (pip's hash-checking
format, continued over lines with a backslash). An offline package ships one wheel per line in
wheels/, whose sha256 is the line's hash; package.json lists the same wheels with their hashes and
sizes, and the package signature covers package.json, so the signature covers the code the robot runs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_vla.bundle import sha256_file
from edge_vla.provision.errors import PackageError

LOCK_FILE = "requirements.lock"
ONLINE_FILE = "requirements.online.txt"  # --online packages only: resolved from an index on the robot
WHEELS_DIR = "wheels"
_LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)$")


def canonical_name(name: str) -> str:
    """PEP 503 normalised project name: `Python_Can` and `python-can` are one distribution."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class LockEntry:
    name: str  # canonical
    version: str
    hashes: tuple[str, ...] = field(default=())  # sha256 hex digests

    def line(self) -> str:
        hashes = "".join(f" \\\n    --hash=sha256:{h}" for h in self.hashes)
        return f"{self.name}=={self.version}{hashes}"


def parse_lock(text: str) -> list[LockEntry]:
    """The pinned entries of a lock; options lines (--index-url, ...) and comments are skipped."""
    joined = re.sub(r"\\\n", " ", text)
    entries = []
    for raw in joined.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        spec, *opts = line.split()
        m = _LINE.match(spec)
        if m is None:
            raise PackageError(f"{LOCK_FILE}: {spec!r} is not pinned as NAME==VERSION; repackage with `edge-vla package`")
        hashes = tuple(o.removeprefix("--hash=sha256:") for o in opts if o.startswith("--hash=sha256:"))
        entries.append(LockEntry(canonical_name(m.group(1)), m.group(2), hashes))
    return entries


def wheel_name_version(filename: str) -> tuple[str, str]:
    """`python_can-4.6.1-py3-none-any.whl` -> ("python-can", "4.6.1") (the wheel file name spec)."""
    parts = filename.removesuffix(".whl").split("-")
    if len(parts) not in (5, 6) or not filename.endswith(".whl"):
        raise PackageError(f"{filename} is not a wheel file name (name-version[-build]-python-abi-platform.whl)")
    return canonical_name(parts[0]), parts[1]


def verify_wheelhouse(pkg_dir: Path, meta: Mapping[str, Any]) -> list[LockEntry]:
    """Check that the lock, the wheels/ directory and package.json's wheel list agree, hash by hash.

    Raises PackageError naming every disagreement. Returns the lock entries. (An --online package's
    lock holds only the edge-vla wheel; its requirements.online.txt is resolved from an index.)
    """
    lock_path = pkg_dir / LOCK_FILE
    try:
        entries = parse_lock(lock_path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PackageError(f"package {pkg_dir} has no readable {LOCK_FILE} ({exc}); rebuild it") from exc
    listed: dict[str, Mapping[str, Any]] = meta.get("wheels", {})
    problems: list[str] = []
    wheel_dir = pkg_dir / WHEELS_DIR
    present = {p.name: p for p in wheel_dir.glob("*.whl")} if wheel_dir.is_dir() else {}
    by_name: dict[str, str] = {}
    for fname, info in sorted(listed.items()):
        name, version = wheel_name_version(fname)
        by_name[name] = fname
        if fname not in present:
            problems.append(f"wheel {fname} listed in package.json is missing")
        elif sha256_file(present[fname]) != info.get("sha256"):
            problems.append(f"wheel {fname} does not match its sha256 in package.json")
        if (name, version) != (canonical_name(str(info.get("name", ""))), info.get("version")):
            problems.append(f"package.json names {fname} as {info.get('name')}=={info.get('version')}")
    for fname in sorted(set(present) - set(listed)):
        problems.append(f"wheel {fname} is not listed in package.json")
    for e in entries:
        fname = by_name.get(e.name)
        if fname is None:
            problems.append(f"lock entry {e.name}=={e.version} has no wheel in {WHEELS_DIR}/")
            continue
        info = listed[fname]
        if info.get("version") != e.version:
            problems.append(f"lock pins {e.name}=={e.version} but ships {fname}")
        if info.get("sha256") not in e.hashes:
            problems.append(f"lock hash for {e.name}=={e.version} is not the sha256 of {fname}")
    locked = {e.name for e in entries}
    for name, fname in sorted(by_name.items()):
        if name not in locked:
            problems.append(f"wheel {fname} is shipped but not in {LOCK_FILE}")
    if problems:
        raise PackageError(f"package {pkg_dir}: wheelhouse failed verification: {'; '.join(problems)}. "
                           "Do not install it; rebuild it with `edge-vla package`.")
    return entries


def lock_text(entries: Iterable[LockEntry], header: Iterable[str]) -> str:
    lines = [f"# {h}" if h else "#" for h in header]
    lines += [e.line() for e in sorted(entries, key=lambda e: e.name)]
    return "\n".join(lines) + "\n"
