"""An install as a list of steps: printed by --dry-run, applied in order, undone in reverse on failure.

Every step is atomic on its own (temp file or temp symlink, then rename) and remembers what it
replaced, so a failure halfway restores the files already changed and the previous `current`
release keeps working.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


DIR_MODE = 0o755  # every directory an install creates: the service user must traverse it


def make_dirs(path: Path, mode: int = DIR_MODE) -> None:
    """Create `path` and any missing parents with exactly `mode` (mkdir's mode is cut by the umask,
    so a root umask of 077 would hide /etc/edge-vla from the service). Existing directories keep theirs."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:  # made meanwhile by another process: leave its mode alone
            continue
        os.chmod(d, mode)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write via a temp file + rename; an existing file keeps its mode and owner (etc/shadow)."""
    make_dirs(path.parent)
    st = path.stat() if path.exists() and not path.is_symlink() else None
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, st.st_mode & 0o7777 if st else mode)
        if st is not None and os.geteuid() == 0:
            os.chown(tmp, st.st_uid, st.st_gid)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def symlink_atomic(link: Path, target: str) -> None:
    """Point `link` at `target` by making a temp symlink and renaming it over (rename is atomic)."""
    make_dirs(link.parent)
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)


@dataclass
class Step:
    """One change. `show` is what --dry-run prints; `apply` makes it; `undo` (set by apply) reverts it."""

    show: str
    apply: Callable[[], Callable[[], None] | None]


@dataclass
class Plan:
    root: Path
    steps: list[Step] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # warnings worth printing (kept config edits, ...)
    cleanup: list[Path] = field(default_factory=list)  # deleted only after every step succeeded

    def display(self, path: Path) -> str:
        """A rootfs path as it will be on the robot (/etc/...), which is what an operator reads."""
        try:
            return "/" + path.relative_to(self.root).as_posix()
        except ValueError:
            return str(path)

    def write(self, path: Path, data: bytes, mode: int = 0o644, why: str = "") -> None:
        """Add a file write unless the file already holds exactly `data`."""
        if path.is_file() and not path.is_symlink() and path.read_bytes() == data:
            return

        def apply() -> Callable[[], None]:
            old = path.read_bytes() if path.is_file() else None
            write_atomic(path, data, mode)
            return (lambda: write_atomic(path, old)) if old is not None else (lambda: path.unlink(missing_ok=True))

        verb = "update" if path.exists() else "create"
        self.steps.append(Step(f"{verb} {self.display(path)} ({len(data)} bytes){' ' + why if why else ''}", apply))

    def symlink(self, link: Path, target: str) -> None:
        if link.is_symlink() and os.readlink(link) == target:
            return

        def apply() -> Callable[[], None]:
            old = os.readlink(link) if link.is_symlink() else None
            symlink_atomic(link, target)
            return (lambda: symlink_atomic(link, old)) if old is not None else (lambda: link.unlink(missing_ok=True))

        self.steps.append(Step(f"link {self.display(link)} -> {target}", apply))

    def add(self, show: str, apply: Callable[[], Callable[[], None] | None]) -> None:
        self.steps.append(Step(show, apply))

    @property
    def empty(self) -> bool:
        return not self.steps

    def run(self) -> None:
        undo: list[Callable[[], None]] = []
        try:
            for step in self.steps:
                log.debug("%s", step.show)
                revert = step.apply()
                if revert is not None:
                    undo.append(revert)
        except BaseException:
            log.error("install step failed; reverting %d applied step(s)", len(undo))
            for revert in reversed(undo):
                try:
                    revert()
                except OSError as exc:  # keep reverting the rest
                    log.error("could not revert a step: %s", exc)
            raise
        for path in self.cleanup:
            remove_tree(path)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
