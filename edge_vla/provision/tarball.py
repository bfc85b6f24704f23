"""Deterministic, atomically written tarballs, and safe extraction.

Same inputs -> same bytes: members sorted, mtime/uid/gid fixed, modes normalised, gzip header
without time or name. So the package digest identifies its content, and a rebuilt package that did
not change installs as "unchanged".
"""

from __future__ import annotations

import gzip
import io
import tarfile
from collections.abc import Mapping
from pathlib import Path

from edge_vla.atomic import atomic_write
from edge_vla.provision.errors import PackageError
from edge_vla.safe_tar import Filter, extract_plain, plain_members

FIXED_MTIME = 0


def _info(name: str, size: int, mode: int, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = mode
    info.type = kind
    info.mtime = FIXED_MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def write_tarball(out: Path, files: Mapping[str, bytes | Path], executable: frozenset[str] = frozenset()) -> Path:
    """Write `files` ({relative path: bytes, or a file to stream (wheels)}) as a .tar.gz at `out`, atomically."""
    dirs = sorted({str(Path(rel).parents[i]) for rel in files for i in range(len(Path(rel).parts) - 1)})
    # Exit order (tar, gzip, then the atomic file) writes the gzip trailer before the fsync and rename.
    with (atomic_write(out) as raw,
          gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=FIXED_MTIME, compresslevel=6) as gz,
          tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar):
        for d in dirs:
            tar.addfile(_info(d, 0, 0o755, tarfile.DIRTYPE))
        for rel in sorted(files):
            data = files[rel]
            mode = 0o755 if rel in executable else 0o644
            if isinstance(data, Path):
                with open(data, "rb") as f:
                    tar.addfile(_info(rel, data.stat().st_size, mode), f)
            else:
                tar.addfile(_info(rel, len(data), mode), io.BytesIO(data))
    return out


def _package_filter(archive: Path, dest: Path) -> Filter:
    """Only what write_tarball makes (edge_vla.safe_tar): a package is extracted as root, into the rootfs, before
    package.json and the signature inside it can be checked."""
    def refuse(member: tarfile.TarInfo, what: str) -> PackageError:
        return PackageError(f"package {archive} holds {what} {member.name!r}; an edge-vla package holds only regular "
                            "files and directories with relative paths: refused before anything was installed "
                            "(rebuild it with `edge-vla package`)")

    return plain_members(refuse, dest)


def extract_tarball(archive: Path, dest: Path) -> None:
    """Extract a package: only regular files and directories, inside `dest` (see _package_filter)."""
    if not archive.is_file():
        raise PackageError(f"package {archive} does not exist; make one with `edge-vla package BUNDLE -o {archive}`")
    try:
        with tarfile.open(archive) as tar:
            extract_plain(tar, dest, _package_filter(archive, dest))
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise PackageError(f"cannot extract package {archive}: {exc}; the file is corrupt, copy or rebuild it") from exc
