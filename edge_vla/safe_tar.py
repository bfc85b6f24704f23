"""Extracting archives edge-vla writes (robot packages, bundle archives) that may come from anyone.

An archive is extracted before the hashes and signatures inside it can be checked, so extraction itself must not
trust it. tarfile's "data" filter is not enough on its own: on a Python before 3.11.13/3.12.11/3.13.4 a chain of
symlinks nested past PATH_MAX defeats its realpath check (CVE-2025-4517) and a later member writes anywhere. edge-vla
writes only regular files and directories with relative paths, so anything else is refused before the data filter:
with no link in the archive there is nothing for a later member to follow.

On a Python whose tarfile predates PEP 706 (no `filter=`, no `tarfile.data_filter`: before 3.8.17, 3.9.17, 3.10.12,
3.11.4; Debian 12's 3.11.2 is one) the same member checks run, and edge-vla makes the data filter's changes itself
(`_as_data`), so extraction works there and is no less safe.
"""

from __future__ import annotations

import copy
import os
import shutil
import tarfile
from collections.abc import Callable, Iterator

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
        if not has_data_filter():
            return _as_data(member, dest, refuse)
        return tarfile.data_filter(member, dest)

    return check


def has_data_filter() -> bool:
    """Whether this Python's tarfile has PEP 706's extraction filters (the test PEP 706 itself recommends)."""
    return hasattr(tarfile, "data_filter")


def extract_plain(tar: tarfile.TarFile, dest: str | os.PathLike[str], check: Filter) -> None:
    """Extract `tar` into `dest` through `check` (a plain_members filter), also on a tarfile without `filter=`."""
    if has_data_filter():
        tar.extractall(dest, filter=check)
        return
    # numeric_owner: as root, an old tarfile sets each file's owner, by the archive's user *name* unless told to use
    # the numbers, which _as_data has set to this process's own (the data filter's "owned by whoever extracts").
    tar.extractall(dest, members=_checked(tar, os.fspath(dest), check), numeric_owner=True)


def _checked(tar: tarfile.TarFile, dest: str, check: Filter) -> Iterator[tarfile.TarInfo]:
    """The members of `tar` as `check` passes them, one at a time (a refusal stops extraction there, as with
    `filter=`)."""
    for member in tar:
        kept = check(member, dest)
        if kept is not None:
            yield kept


def _as_data(member: tarfile.TarInfo, dest: str, refuse: Callable[[tarfile.TarInfo, str], Exception]) \
        -> tarfile.TarInfo:
    """What tarfile.data_filter makes of a regular file or directory, for a tarfile without it: no path that
    resolves outside `dest` (through a link already there), no setuid/setgid/sticky bit, no group/other write, no
    execute bit without the owner's, owner read/write on files, and no owner from the archive."""
    root = os.path.realpath(dest)
    if os.path.commonpath([root, os.path.realpath(os.path.join(root, member.name))]) != root:
        raise refuse(member, "a path that leads outside the destination (through a link already there)")
    kept = copy.copy(member)  # the archive's own list stays as it was read
    mode = member.mode & 0o755
    if member.isreg():
        kept.mode = (mode if mode & 0o100 else mode & ~0o111) | 0o600
    else:  # the data filter leaves a directory as mkdir made it; an old tarfile chmods it, so to a safe mode
        kept.mode = mode | 0o700
    kept.uid, kept.gid, kept.uname, kept.gname = os.geteuid(), os.getegid(), "", ""
    return kept
