"""The bundle: a directory (optionally a .tar/.tar.gz) holding a versioned manifest, ONNX graphs and reports.

Layout:
    manifest.json     schema version, model family and config, graph IO specs with roles, precision,
                      normalization, action space, sampler (flow convention, time input),
                      preprocessing, tokenizer, provenance, and the sha256 of every file below
                      (the computation it describes: docs/MANIFEST.md, edge_vla.runtime.contract)
    manifest.sig      optional Ed25519 signature over manifest.json (see edge_vla.provision.signing)
    graphs/*.onnx     the exported graphs
    tables/*.npy      precomputed time-conditioning tables, one per supported step count (optional)
    reports/*.json    numerics check, TensorRT lint
    build_engines.sh  trtexec command lines for building engines on the target
    target/           made on the robot (engines, timing cache, profile reports): not hashed, since the
                      manifest (and its signature) is fixed at export time

Loading verifies the schema and every hash, and fails with a message that says what is wrong.
No pickles anywhere: JSON and ONNX only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from edge_vla.action_space import ActionSpace
from edge_vla.atomic import atomic_write
from edge_vla.config import VLAConfig
from edge_vla.errors import BundleError, ConfigError
from edge_vla.files import Wording, read_bounded
from edge_vla.runtime.contract import Contract
from edge_vla.safe_tar import extract_plain, plain_members

SCHEMA_VERSION = 2  # 2: graph/IO roles, per-layer prefix K/V, flow convention, time input
FORMAT = "edge-vla-bundle"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
TARGET_DIR = "target"
_UNHASHED = {MANIFEST, SIGNATURE}
# Exported manifests are tens of kB (the largest here 33 kB: an INT8 MetaWorld bundle with its dataset provenance;
# pi0 test bundles 9 kB): 16 MiB is a margin of ~500x, yet stops a hostile multi-GB one before it is read.
MAX_MANIFEST_BYTES = 16 << 20
# A bundle is written by whoever exports it and read by the robot's unprivileged service user: its
# modes are set explicitly (tempfile makes 0700 dirs and 0600 files; umask varies), never inherited.
# Nothing in a bundle is secret (the signing key never enters it); shell scripts are executable.
DIR_MODE, FILE_MODE, EXEC_MODE = 0o755, 0o644, 0o755


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _safe_member(rel: str) -> bool:
    parts = Path(rel).parts
    return bool(parts) and not Path(rel).is_absolute() and ".." not in parts and parts[0] != TARGET_DIR


def _hashed_files(root: Path) -> list[str]:
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if (p.is_file() or p.is_symlink()) and rel not in _UNHASHED and not rel.startswith(TARGET_DIR + "/"):
            out.append(rel)
    return out


@dataclass(frozen=True)
class GraphSpec:
    name: str
    file: str
    inputs: list[dict[str, Any]]  # [{"name", "shape", "dtype"}]
    outputs: list[dict[str, Any]]

    def input(self, name: str) -> dict[str, Any]:
        for spec in self.inputs:
            if spec["name"] == name:
                return spec
        raise BundleError(f"graph {self.name!r} has no input {name!r}")


class Bundle:
    """A verified bundle on disk. Use `Bundle.open(path)`."""

    def __init__(self, root: Path, manifest: dict[str, Any], tmp: tempfile.TemporaryDirectory | None = None,
                 manifest_bytes: bytes | None = None):
        self.root = root
        self.manifest = manifest
        # The exact bytes `manifest` was parsed from: a signature is checked over these, never over a second
        # read of manifest.json (which could return other bytes than the ones in use).
        self.manifest_bytes = manifest_bytes
        self._tmp = tmp  # keeps an extracted tarball alive as long as the Bundle

    @classmethod
    def open(cls, path: str | os.PathLike[str], verify: bool = True) -> Bundle:
        path = Path(path)
        tmp = None
        if path.is_file() and (path.suffix in {".tar", ".tgz"} or path.name.endswith(".tar.gz")):
            tmp = tempfile.TemporaryDirectory(prefix="edge-vla-bundle-")
            root = _extract(path, Path(tmp.name))
        elif path.is_dir():
            root = path
        elif not path.exists():
            raise BundleError(f"bundle {path} does not exist; make one with `edge-vla export CHECKPOINT -o {path}`")
        else:
            raise BundleError(f"{path} is neither a bundle directory nor a .tar/.tar.gz bundle")
        manifest_bytes, manifest = read_manifest_bytes(root)
        bundle = cls(root, manifest, tmp, manifest_bytes)
        if verify:
            bundle.verify()
        return bundle

    def verify(self) -> None:
        """Check every listed file's sha256, and that no unlisted file sits among the hashed ones."""
        files: Mapping[str, str] = self.manifest["files"]
        problems = []
        for rel in self.manifest.get("graphs", {}).values():
            if rel.get("file") not in files:
                problems.append(f"graph file {rel.get('file')!r} is not among the hashed files")
        # Only where they have the right types: Contract.from_manifest reports a malformed time_input.
        sampler = self.manifest.get("sampler")
        time_input = sampler.get("time_input") if isinstance(sampler, Mapping) else None
        tables = time_input.get("tables") if isinstance(time_input, Mapping) else None
        for table in tables.values() if isinstance(tables, Mapping) else ():
            if not isinstance(table, str) or table not in files:
                problems.append(f"time table {table!r:.80} is not among the hashed files")
        for rel, digest in files.items():
            p = self.root / rel
            if not _safe_member(rel):
                problems.append(f"file entry {rel!r} points outside the hashed part of the bundle")
            elif p.is_symlink():
                problems.append(f"{rel} is a symbolic link; bundles hold regular files only")
            elif not p.is_file():
                problems.append(f"missing file {rel}")
            elif sha256_file(p) != digest:
                problems.append(f"{rel} does not match its sha256 (tampered with or truncated)")
        extra = sorted(set(_hashed_files(self.root)) - set(files))
        problems += [f"unexpected file {rel} not listed in the manifest" for rel in extra]
        if problems:
            raise BundleError(
                f"bundle {self.root} failed verification: " + "; ".join(problems)
                + ". Re-export it or copy it again; do not edit a bundle by hand."
            )

    # --- typed views of the manifest -------------------------------------------------------------
    @property
    def config(self) -> VLAConfig:
        try:
            return VLAConfig.from_dict(self.manifest["model"])
        except ConfigError as exc:
            raise BundleError(f"bundle {self.root}: {exc}") from exc

    @property
    def action_space(self) -> ActionSpace:
        return ActionSpace.from_dict(self.manifest["action_space"])

    @property
    def family(self) -> str:
        return str(self.manifest.get("family", ""))

    @property
    def contract(self) -> Contract:
        """The computation this bundle describes, validated (graph roles, flow, time input)."""
        return Contract.from_manifest(self.manifest, self.root)

    @property
    def precision(self) -> str:
        return str(self.manifest["precision"])

    def graph(self, name: str) -> GraphSpec:
        graphs = self.manifest["graphs"]
        if name not in graphs:
            raise BundleError(f"bundle {self.root} has no graph {name!r}; it has {sorted(graphs)}")
        g = graphs[name]
        return GraphSpec(name, g["file"], g["inputs"], g["outputs"])

    def path(self, rel: str) -> Path:
        return self.root / rel

    @property
    def target_dir(self) -> Path:
        return self.root / TARGET_DIR


_REQUIRED = ("schema_version", "format", "model", "precision", "graphs", "normalization", "action_space",
             "sampler", "tokenizer", "files", "provenance")


def read_manifest(root: Path) -> dict[str, Any]:
    return read_manifest_bytes(root)[1]


# The manifest keeps its own wording: each refusal says the file is not a bundle manifest, and what to do.
_MANIFEST_WORDING = Wording(
    cannot_read="cannot read {path} ({strerror}); check the bundle's permissions, or copy it again",
    not_regular="{path} is {kind}, not a regular file: not an edge-vla bundle manifest; re-export the bundle, or "
                "copy it again",
    too_large="{path} is {size:,} bytes, more than the {limit:,}-byte limit of a bundle manifest (an exported one is "
              "tens of kB): not an edge-vla bundle manifest; re-export the bundle")


def read_manifest_bytes(root: Path) -> tuple[bytes, dict[str, Any]]:
    """manifest.json's bytes, read once, and the manifest parsed and checked from exactly those bytes.

    Read from one open file (edge_vla.files.read_bounded): only a regular file, of at most MAX_MANIFEST_BYTES, is
    read (checked on what was opened, so nothing put in its place after a check is read instead)."""
    mpath = root / MANIFEST
    try:
        data = read_bounded(mpath, MAX_MANIFEST_BYTES, "bundle manifest", BundleError, wording=_MANIFEST_WORDING)
    except BundleError as exc:
        if isinstance(exc.__cause__, FileNotFoundError):
            _no_manifest(root)
        raise
    return data, parse_manifest(data, mpath)


def _no_manifest(root: Path) -> NoReturn:
    if (root / "config.json").is_file() and (root / "model.safetensors").exists():
        raise BundleError(f"{root} is a training checkpoint, not a bundle: export it first "
                          f"(`edge-vla export {root} -o BUNDLE`), then give BUNDLE")
    raise BundleError(f"{root} has no {MANIFEST}: not an edge-vla bundle, or an incomplete copy")


def parse_manifest(data: bytes, mpath: Path) -> dict[str, Any]:
    """The manifest in `data` (read from `mpath`, named in messages), schema and field types checked."""
    try:
        manifest = json.loads(data.decode("utf-8"))
    # ValueError: also an integer of more than 4300 digits; RecursionError: nesting too deep to parse.
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        text = str(exc).splitlines()[0][:120] if str(exc) else ""
        raise BundleError(f"{mpath} is not valid JSON ({type(exc).__name__}: {text}); the bundle is corrupt, "
                          "re-export it") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{mpath} is not an edge-vla bundle manifest (format != {FORMAT!r})")
    version = manifest.get("schema_version")
    if not isinstance(version, int):
        raise BundleError(f"{mpath} has no integer schema_version")
    if version > SCHEMA_VERSION:
        raise BundleError(
            f"bundle schema {version} is newer than this edge-vla supports ({SCHEMA_VERSION}); "
            "upgrade edge-vla on this machine"
        )
    if version < SCHEMA_VERSION:
        raise BundleError(
            f"bundle schema {version} is older than this edge-vla supports ({SCHEMA_VERSION}): it predates the "
            "manifest-driven contract (graph roles, per-layer prefix K/V, declared flow convention); re-export "
            "it from its checkpoint with `edge-vla export CHECKPOINT -o BUNDLE`"
        )
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        raise BundleError(f"{mpath} lacks required fields {missing}; re-export the bundle")
    wrong = _wrong_types(manifest)
    if wrong:
        raise BundleError(f"{mpath} is malformed: {'; '.join(wrong[:5])}; re-export the bundle")
    return manifest


# The required fields that are objects; everything below "graphs" and "sampler" is checked by Contract.from_manifest.
_OBJECTS = ("model", "graphs", "normalization", "action_space", "sampler", "tokenizer", "files", "provenance")


def _wrong_types(manifest: Mapping[str, Any]) -> list[str]:
    """What in the manifest has the wrong JSON type for the code that reads it (verify, the typed views), so a
    malformed one is refused here in one line instead of an AttributeError deep inside."""
    wrong = [f"{k} must be an object, not {type(manifest[k]).__name__}" for k in _OBJECTS
             if not isinstance(manifest[k], dict)]
    if not isinstance(manifest["precision"], str):
        wrong.append(f"precision must be a string, not {type(manifest['precision']).__name__}")
    if isinstance(manifest["files"], dict):
        wrong += [f"files[{rel!r:.80}] must be a sha256 in hex, not {digest!r:.40}"
                  for rel, digest in manifest["files"].items() if not _is_sha256(digest)]
    if isinstance(manifest["graphs"], dict):
        for name, g in manifest["graphs"].items():
            if not isinstance(g, dict):
                wrong.append(f"graph {name!r:.40} must be an object, not {type(g).__name__}")
            elif not isinstance(g.get("file"), str):
                wrong.append(f"graph {name!r:.40} file must be a bundle-relative path, not {g.get('file')!r:.40}")
    return wrong


def _is_sha256(digest: object) -> bool:
    return isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)


def write_bundle(out: str | os.PathLike[str], manifest: dict[str, Any], files: Mapping[str, Path | bytes],
                 overwrite: bool = False) -> Path:
    """Write a bundle atomically: build it in a temp dir beside `out`, hash everything, then rename.

    `files` maps relative paths inside the bundle to a source file or to bytes. The manifest's
    `files` field is filled in here. An existing bundle is replaced only with overwrite=True, and
    then only after the new one is complete.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise BundleError(f"{out} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for rel, src in files.items():
            if rel in _UNHASHED or Path(rel).is_absolute() or ".." in Path(rel).parts:
                raise BundleError(f"invalid bundle member name {rel!r}")
            dst = staging / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(src, bytes):
                dst.write_bytes(src)
            else:
                shutil.copyfile(src, dst)
        manifest = dict(manifest, schema_version=SCHEMA_VERSION, format=FORMAT)
        manifest["files"] = {rel: sha256_file(staging / rel) for rel in _hashed_files(staging)}
        write_json_atomic(staging / MANIFEST, manifest)
        set_readable_modes(staging)
        _fsync_tree(staging)
        swap_in_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def swap_in_dir(staging: Path, out: Path) -> None:
    """Put a complete directory at `out` by rename; an existing `out` is removed only after the swap."""
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        try:
            os.replace(staging, out)
        except BaseException:
            os.replace(old, out)  # put the previous one back: never leave `out` missing
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out)


def set_readable_modes(root: Path, executable: Callable[[Path], bool] = lambda p: p.suffix == ".sh") -> None:
    """Give `root` and everything below it deliberate modes: directories 0755, files 0644, files that
    `executable(path)` picks 0755. Symbolic links are left alone (they have no mode of their own)."""
    os.chmod(root, DIR_MODE)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            p = Path(dirpath, name)
            if not p.is_symlink():
                os.chmod(p, DIR_MODE)
        for name in filenames:
            p = Path(dirpath, name)
            if not p.is_symlink():
                os.chmod(p, EXEC_MODE if executable(p) else FILE_MODE)


def write_json_atomic(path: Path, data: Any) -> None:
    """Atomic JSON write for files that change after export (target/ reports, engine index); mode 0644
    (tempfile's 0600 would hide them from the service user or an operator running `edge-vla doctor`)."""
    with atomic_write(path, "w", encoding="utf-8") as f:
        os.fchmod(f.fileno(), FILE_MODE)
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def _extract(archive: Path, dest: Path) -> Path:
    def refuse(member: tarfile.TarInfo, what: str) -> BundleError:
        return BundleError(f"bundle archive {archive} holds {what} {member.name!r}; a bundle archive holds only "
                           "regular files and directories with relative paths: refused before anything was read "
                           "(re-export the bundle, or archive the bundle directory with `tar -czf`)")

    try:
        with tarfile.open(archive) as tar:
            extract_plain(tar, dest, plain_members(refuse, dest))  # edge_vla.safe_tar: why not "data" alone
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BundleError(f"cannot extract bundle archive {archive}: {str(exc).splitlines()[0] if str(exc) else exc}"
                          "; the file is corrupt, copy it again") from exc
    entries = [p for p in dest.iterdir()]
    if (dest / MANIFEST).is_file():
        return dest
    if len(entries) == 1 and (entries[0] / MANIFEST).is_file():
        return entries[0]
    raise BundleError(f"archive {archive} holds no {MANIFEST} at its top level")
