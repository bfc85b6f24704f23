"""Extracting archives edge-vla writes (robot packages, bundle archives) that may come from anyone.

An archive is extracted before the hashes and signatures inside it can be checked, so extraction itself must not
trust it. tarfile's "data" filter is not enough on its own: on a Python before 3.11.13/3.12.11/3.13.4 a chain of
symlinks nested past PATH_MAX defeats its realpath check (CVE-2025-4517) and a later member writes anywhere. edge-vla
writes only regular files and directories with relative paths, so anything else is refused before the data filter:
with no link in the archive there is nothing for a later member to follow.
"""

from __future__ import annotations

import os
import shutil
import tarfile
from collections.abc import Callable

MEMBER_KINDS = {tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hard link", tarfile.CHRTYPE: "character device",
                tarfile.BLKTYPE: "block device", tarfile.FIFOTYPE: "fifo", tarfile.CONTTYPE: "contiguous file"}

Filter = Callable[[tarfile.TarInfo, str], "tarfile.TarInfo | None"]
FREE_MARGIN = 256 << 20  # left free on the destination's filesystem (a robot's rootfs must keep working)


def free_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes free on the filesystem that holds (or will hold) `path`: that of its nearest existing ancestor."""
    p = os.path.abspath(path)
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    return shutil.disk_usage(p).free


def plain_members(refuse: Callable[[tarfile.TarInfo, str], Exception], dest: str | os.PathLike[str]) -> Filter:
    """A tarfile extraction filter for extracting into `dest`: only regular files and directories with relative
    paths and no '..', then the "data" filter (modes normalised), and no more bytes in all than the filesystem can
    hold with FREE_MARGIN to spare (a few MB of gzip can declare terabytes of zeros, which would fill a robot's
    rootfs before anything was verified). Anything else raises `refuse(member, what it is)`."""
    budget = free_bytes(dest) - FREE_MARGIN
    total = 0

    def check(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
        nonlocal total
        total += member.size if member.isreg() else 0
        if total > budget:
            raise refuse(member, f"more data than the {max(budget, 0) / 2**20:,.0f} MiB its destination's "
                                 f"filesystem can spare ({total / 2**20:,.0f} MiB up to)")
        if not (member.isreg() or member.isdir()):
            raise refuse(member, f"a {MEMBER_KINDS.get(member.type, f'member of type {member.type!r}')}")
        if member.name.startswith("/"):
            raise refuse(member, "the absolute path")
        if ".." in member.name.split("/"):
            raise refuse(member, "a '..' in the path")
        return tarfile.data_filter(member, dest)

    return check
