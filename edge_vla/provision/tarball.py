"""Deterministic, atomically written tarballs, and safe extraction.

Same inputs -> same bytes: members sorted, mtime/uid/gid fixed, modes normalised, gzip header
without time or name. So the package digest identifies its content, and a rebuilt package that did
not change installs as "unchanged".
"""

from __future__ import annotations

import gzip
import io
import tarfile
from collections.abc import Callable, Mapping
from pathlib import Path

from edge_vla.atomic import atomic_write
from edge_vla.provision.errors import PackageError

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


_MEMBER_KINDS = {tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hard link", tarfile.CHRTYPE: "character device",
                 tarfile.BLKTYPE: "block device", tarfile.FIFOTYPE: "fifo", tarfile.CONTTYPE: "contiguous file"}


def _package_filter(archive: Path) -> Callable[[tarfile.TarInfo, str], tarfile.TarInfo | None]:
    """Refuse any member write_tarball never makes, then apply tarfile's "data" filter.

    A package is extracted (as root, into the rootfs) before package.json and the signature inside it can
    be checked, so extraction must not trust the archive. The "data" filter alone is not enough: on a
    Python before 3.11.13/3.12.11/3.13.4 a chain of symlinks nested past PATH_MAX defeats its realpath
    check (CVE-2025-4517) and writes anywhere. With only plain relative files and directories there is
    no link for a later member to follow, so staging cannot be left."""
    def refuse(member: tarfile.TarInfo, what: str) -> PackageError:
        return PackageError(f"package {archive} holds {what} {member.name!r}; an edge-vla package holds only regular "
                            "files and directories with relative paths: refused before anything was installed "
                            "(rebuild it with `edge-vla package`)")

    def check(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
        if not (member.isreg() or member.isdir()):
            raise refuse(member, f"a {_MEMBER_KINDS.get(member.type, f'member of type {member.type!r}')}")
        if member.name.startswith("/"):
            raise refuse(member, "the absolute path")
        if ".." in member.name.split("/"):
            raise refuse(member, "a '..' in the path")
        return tarfile.data_filter(member, dest)

    return check


def extract_tarball(archive: Path, dest: Path) -> None:
    """Extract a package: only regular files and directories, inside `dest` (see _package_filter)."""
    if not archive.is_file():
        raise PackageError(f"package {archive} does not exist; make one with `edge-vla package BUNDLE -o {archive}`")
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter=_package_filter(archive))
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise PackageError(f"cannot extract package {archive}: {exc}; the file is corrupt, copy or rebuild it") from exc
