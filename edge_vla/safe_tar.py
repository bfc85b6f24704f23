"""Extracting archives edge-vla writes (robot packages, bundle archives) that may come from anyone.

An archive is extracted before the hashes and signatures inside it can be checked, so extraction itself must not
trust it. tarfile's "data" filter is not enough on its own: on a Python before 3.11.13/3.12.11/3.13.4 a chain of
symlinks nested past PATH_MAX defeats its realpath check (CVE-2025-4517) and a later member writes anywhere. edge-vla
writes only regular files and directories with relative paths, so anything else is refused before the data filter:
with no link in the archive there is nothing for a later member to follow.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable

MEMBER_KINDS = {tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hard link", tarfile.CHRTYPE: "character device",
                tarfile.BLKTYPE: "block device", tarfile.FIFOTYPE: "fifo", tarfile.CONTTYPE: "contiguous file"}

Filter = Callable[[tarfile.TarInfo, str], "tarfile.TarInfo | None"]


def plain_members(refuse: Callable[[tarfile.TarInfo, str], Exception]) -> Filter:
    """A tarfile extraction filter: only regular files and directories with relative paths and no '..', then the
    "data" filter (modes normalised). Anything else raises `refuse(member, what it is)`."""

    def check(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
        if not (member.isreg() or member.isdir()):
            raise refuse(member, f"a {MEMBER_KINDS.get(member.type, f'member of type {member.type!r}')}")
        if member.name.startswith("/"):
            raise refuse(member, "the absolute path")
        if ".." in member.name.split("/"):
            raise refuse(member, "a '..' in the path")
        return tarfile.data_filter(member, dest)

    return check
