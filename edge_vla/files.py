"""Reading small files from outside (configs, keys, manifests, records) without hanging or filling memory.

`read_bounded` is the one way edge-vla reads such a file whole: opened once, without blocking, checked on the open
file (never by its path again, so nothing put in its place after a check is read instead) to be a regular file of
at most a given size, and read with that bound (a file that grows while read is refused too). A FIFO, a device, a
directory, a link to /dev/zero or a multi-GB file is one line naming what the file is, its path and the limit.

`one_line` folds a message (or an exception's) onto one line, for errors that quote another library's message.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

from edge_vla.errors import EdgeVlaError

_KINDS = ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symlink"),
          (stat.S_ISFIFO, "a fifo"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


def file_kind(mode: int) -> str:
    """What a file of this st_mode is, with its article ("a directory", "a fifo", ...): for messages."""
    return next((name for test, name in _KINDS if test(mode)), f"a file of type {stat.S_IFMT(mode):#o}")


@dataclass(frozen=True)
class Wording:
    """The messages of read_bounded's refusals, as str.format templates over: subject (`subject` formatted), what,
    path, strerror (the open's or read's failure), kind (file_kind), size and limit (bytes), fix ("; " + the
    caller's advice, or ""). STANDARD serves most callers; one whose messages read otherwise gives its own (the
    bundle manifest keeps its "is a fifo, not a regular file" and grouped digits; a tune record is "it", its path
    being said before)."""

    subject: str = "{what} {path}"
    cannot_read: str = "cannot read {subject} ({strerror})"
    symlink: str = "{subject} is a symbolic link, not followed here{fix}"
    not_regular: str = "{subject} is not a regular file ({kind}){fix}"
    too_large: str = "{subject} is {size} bytes, too large (the limit is {limit} bytes){fix}"


STANDARD = Wording()


def read_bounded(path: str | os.PathLike[str], max_bytes: int, what: str,
                 error: Callable[[str], Exception] = EdgeVlaError, *, follow_symlinks: bool = True, fix: str = "",
                 wording: Wording = STANDARD) -> bytes:
    """The bytes of the regular file `path`, of at most `max_bytes`; anything else raises one `error(message)`.

    `what` names the file in messages ("robot config", "trusted key"; "" for the path alone), `fix` says what to
    do (added to the refusals of the file itself; not to a failed open, whose reason speaks for itself).
    O_NONBLOCK: opening a FIFO does not wait for a writer (it is refused as one at once). With
    `follow_symlinks=False` a symlink at `path` itself is refused (O_NOFOLLOW), for files only edge-vla writes;
    otherwise what is read is the link's target, which is checked like any file. A failed open or read is raised
    from its OSError, so a caller can tell a missing file (`__cause__` a FileNotFoundError) from the others."""
    def refuse(template: str, **facts: object) -> Exception:
        subject = wording.subject.format(what=what, path=path).strip()
        return error(template.format(subject=subject, what=what, path=path, limit=max_bytes,
                                     fix=f"; {fix}" if fix else "", **facts))

    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if not follow_symlinks and exc.errno == errno.ELOOP:
            raise refuse(wording.symlink) from exc
        raise refuse(wording.cannot_read, strerror=exc.strerror or exc) from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise refuse(wording.not_regular, kind=file_kind(st.st_mode))
        if st.st_size > max_bytes:  # refused unread: a sparse multi-GB file costs nothing to make
            raise refuse(wording.too_large, size=st.st_size)
        try:
            with open(fd, "rb", closefd=False) as f:
                data = f.read(max_bytes + 1)  # +1: a file that grew past the limit since fstat is refused too
        except OSError as exc:
            raise refuse(wording.cannot_read, strerror=exc.strerror or exc) from exc
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise refuse(wording.too_large, size=max(st.st_size, len(data)))
    return data


def one_line(value: object, limit: int | None = None) -> str:
    """`value` (a message or an exception) as one line: every run of white space, newlines too, one space; cut to
    `limit` characters, ending in "...", where longer. "" for an empty message: a caller that wants a fallback
    (the exception's type name) adds it."""
    text = " ".join(str(value).split())
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."
