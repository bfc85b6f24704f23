"""Run robot-side steps the way the robot runs them: as an unprivileged service user, not as root.

edge-vla.service runs as its own system user. Tests drop to uid/gid 65534 (nobody/nogroup, present on every
Debian/Ubuntu machine) with util-linux's setpriv instead of creating a user on the machine.

That user must reach what it runs, and a test machine is not a robot: the venv's interpreter may live under
/root (pyenv), the checkout under a private directory (`mktemp -d` makes 0700 ones; so, often, is a home). So
`service_python()` finds, once per session, how it can run this checkout: the venv's own python where it can;
else a venv made from the system's python with this venv's packages (what the robot has: tests/provision); else
that venv over a mirror of the checkout and the packages in hard links, in a world-traversable temp directory.
Where none works it raises with the cause: a safety test is never skipped for it.

pytest's tmp_path lives under a 0700 directory too, so `open_dir()` makes a directory whose parents are all
world-traversable.
"""

from __future__ import annotations

import atexit
import errno
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

SERVICE_UID = SERVICE_GID = 65534
REPO = Path(__file__).resolve().parents[1]
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # what systemd units run with
# What every robot-side step imports: the probe that an interpreter and import path serve the service user.
PROBE = ("import importlib.util, edge_vla.cli, firmware_bridge, numpy, serial, onnxruntime\n"
         "assert importlib.util.find_spec('edge_vla.export'), 'no edge_vla.export: no editable install finder'")
# Variables a system user's process does not have (pytest's, coverage's, systemd's for the test runner itself).
FOREIGN_ENV = ("PYTEST", "COV_", "NOTIFY_SOCKET", "INVOCATION_ID", "WATCHDOG_")


def why_no_service_user() -> str | None:
    """None when tests can drop to the service user here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "needs root to drop privileges to uid 65534 (setpriv --reuid)"
    if shutil.which("setpriv") is None:
        return "setpriv (util-linux) is not installed"
    return None


# A test that needs the service user: skipped, with the reason, where this machine cannot drop to it.
needs_service_user = pytest.mark.skipif(why_no_service_user() is not None, reason=str(why_no_service_user()))


def drop(uid: int = SERVICE_UID, gid: int = SERVICE_GID, groups: Sequence[int] = ()) -> list[str]:
    """The setpriv prefix that runs a command as `uid`/`gid` with exactly `groups` (none: no root capabilities)."""
    extra = ["--groups", ",".join(map(str, groups))] if groups else ["--clear-groups"]
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", *extra]


def system_environ(base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """`base` (default: this process's environment) as a system user's process has it: no HOME of root's (nothing
    may depend on reading or writing /root), no pytest or systemd variables, no bytecode written."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith(FOREIGN_ENV)}
    env.update(HOME="/nonexistent", PYTHONDONTWRITEBYTECODE="1")
    env.update(extra)
    return env


@dataclass(frozen=True)
class ServicePython:
    """An interpreter the service user can exec from an unprivileged process (the service spawns its control
    process and the emulator with sys.executable), with this venv's packages, and where it finds the checkout
    (`repo`: on its PYTHONPATH, and the working directory for paths relative to the root)."""

    python: str
    repo: Path

    def environ(self, base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
        return system_environ(base, PYTHONPATH=str(self.repo), **extra)

    def path(self, inside: Path) -> Path:
        """Where the service user finds `inside`, a path in this checkout (a test script, a fixture file)."""
        return self.repo / Path(inside).resolve().relative_to(REPO)


def _site_dirs() -> list[str]:
    paths = sysconfig.get_paths()
    return list(dict.fromkeys([paths["purelib"], paths["platlib"]]))


def _system_pythons() -> list[str]:
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    return [str(p) for d in SYSTEM_PATH.split(":") if (p := Path(d) / version).is_file()][:1]


def _probe(python: str, pythonpath: Sequence[str], code: str = PROBE) -> str | None:
    """None if the service user runs `code` with `python` and `pythonpath`, else why not (its stderr's tail).
    Exec'd from an already unprivileged shell, as the service's own children are: `setpriv` keeps root's
    capabilities until its execve, so `setpriv ... python` alone can start an interpreter whose children fail."""
    env = system_environ(PYTHONPATH=os.pathsep.join(pythonpath))
    cmd = [*drop(), "/bin/sh", "-c", 'exec "$0" -c "$1"', python, code]
    out = subprocess.run(cmd, cwd="/", env=env, capture_output=True, text=True, timeout=120)
    return None if out.returncode == 0 else f"{python}: {(out.stderr.strip().splitlines() or ['?'])[-1]}"


def _link(src: str, dst: str) -> None:
    """A hard link (cheap, and the same bytes), or a copy where the two paths are on different filesystems."""
    try:
        os.link(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        shutil.copy2(src, dst)


def _link_tree(src: Path, dst: Path, skip: Sequence[Path] = ()) -> None:
    """`dst` mirrors `src` (a file or a directory) in links, without the paths in `skip`."""
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        shutil.copytree(src, dst, symlinks=True, copy_function=_link,
                        ignore=lambda d, names: {n for n in names if Path(d, n) in skip})
        # copytree gives each directory its source's mode, and the source may be the 0700 clone itself: the
        # mirror's directories (new ones, unlike its files) must let others in.
        for directory, _, _ in os.walk(dst):
            os.chmod(directory, os.stat(directory).st_mode | 0o055)
    else:
        _link(str(src), str(dst))


def _write_readable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o644)


def make_venv(where: Path, base_python: str, site_dirs: Sequence[str]) -> str:
    """A venv at `where` made from `base_python` whose packages are those in `site_dirs`, their .pth files run
    (an editable install's finder among them) as in the venv they come from. Returns its interpreter."""
    # umask 022 whatever the test's (a test of release modes runs under 077): the service user must enter it.
    subprocess.run([base_python, "-m", "venv", "--without-pip", str(where)], check=True, capture_output=True,
                   umask=0o022)
    site = where / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    _write_readable(site / "edge_vla_test_packages.pth", "".join(f"import site; site.addsitedir({d!r})\n"
                                                                 for d in site_dirs))
    return str(where / "bin" / "python")


def link_checkout(repo: Path, site_dirs: Sequence[str], root: Path) -> tuple[Path, list[str]]:
    """The checkout (without .git and this venv) and the site dirs mirrored in links under `root`. An editable
    install's finder and .pth files name paths in the checkout: rewritten (new files, never the linked originals)
    to name the mirror."""
    linked = root / "repo"
    _link_tree(repo, linked, skip=[repo / ".git", Path(sys.prefix).resolve()])
    sites = []
    for i, d in enumerate(site_dirs):
        site = root / f"site-packages-{i}"
        _link_tree(Path(d), site)
        for f in [*site.glob("*.pth"), *site.glob("__editable__*.py")]:
            text = f.read_text()
            if str(repo) in text:
                f.unlink()  # a hard link to the venv's own file: replace it, do not write through it
                _write_readable(f, text.replace(f"{repo}/", f"{linked}/").replace(f"'{repo}'", f"'{linked}'"))
        sites.append(str(site))
    return linked, sites


_FOUND: list[ServicePython | str] = []  # the one answer for the session: staging twice would cost a copy twice


def service_python() -> ServicePython:
    """How the service user runs this checkout here; raises RuntimeError saying why where nothing works.
    Needs root and setpriv (check `why_no_service_user()` first)."""
    if not _FOUND:
        _FOUND.append(_find_service_python())
    found = _FOUND[0]
    if isinstance(found, str):
        raise RuntimeError(found)
    return found


def _find_service_python(repo: Path = REPO, site_dirs: Sequence[str] | None = None,
                         venv_python: str = sys.executable) -> ServicePython | str:
    """How the service user runs `repo` with the packages in `site_dirs` (this venv's), or why it cannot."""
    site = list(site_dirs) if site_dirs is not None else _site_dirs()
    # The test venv's own python, where the service user can run it (a CI venv made from /usr/bin/python3).
    tried = [_probe(venv_python, [str(repo)])]
    if tried[-1] is None:
        return ServicePython(venv_python, repo)
    bases = [p for p in [*_system_pythons(), sys._base_executable] if _probe(p, [], "import encodings") is None]
    if not bases:
        return (f"uid {SERVICE_UID} can execute no python {sys.version_info.major}.{sys.version_info.minor} here "
                f"(tried {', '.join([*_system_pythons(), sys._base_executable])}); install the system's python3")
    root = open_dir("edge-vla-service-python-")
    atexit.register(shutil.rmtree, root, True)
    # Its interpreter out of reach (a pyenv under /root): a venv from one it can run, with this venv's packages.
    python = make_venv(root / "venv", bases[0], site)
    tried.append(_probe(python, [str(repo)]))
    if tried[-1] is None:
        return ServicePython(python, repo)
    # The checkout or the packages out of reach too (a clone under a 0700 `mktemp -d`): a linked mirror of both.
    linked, sites = link_checkout(repo, site, root)
    python = make_venv(root / "linked-venv", bases[0], sites)
    tried.append(_probe(python, [str(linked)]))
    if tried[-1] is None:
        return ServicePython(python, linked)
    return (f"uid {SERVICE_UID} cannot import this checkout ({repo}) and its packages ({'; '.join(map(str, tried))}); "
            "are its files readable by others (not a clone made under umask 077)?")


def as_service_user(cmd: Sequence[str], *, cwd: Path | None = None, timeout: float = 120,
                    env: dict[str, str] | None = None, outside: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    """Run `cmd` as uid/gid 65534 with no supplementary groups (and so no root capabilities).
    `outside` runs around the privilege drop, as root (e.g. `unshare --net`, which needs root)."""
    return subprocess.run([*outside, *drop(), *cmd], cwd=cwd or "/", capture_output=True, text=True,
                          timeout=timeout, env=system_environ(env))


def run_python_as_service_user(python_args: Sequence[str], *, timeout: float = 120,
                               base: Mapping[str, str] | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    """`python PYTHON_ARGS` as the service user, with this checkout and its packages importable; its environment
    is `base` (default: this process's) as a system user has it, plus `env`."""
    sp = service_python()
    return as_service_user([sp.python, *python_args], timeout=timeout, env=sp.environ(base, **env))


def python_as_service_user(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`python -c code args...` as the service user, nothing from the working directory on its path (-P)."""
    return run_python_as_service_user(["-P", "-c", code, *args], timeout=timeout)


def open_dir(prefix: str) -> Path:
    """A fresh directory under the system temp dir, mode 0755, whose parents the service user can traverse."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(d, 0o755)  # explicit: mkdtemp makes 0700
    for parent in d.parents:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            raise RuntimeError(f"{parent} is not traversable by other users (mode {oct(mode & 0o7777)}); "
                               "set TMPDIR to a world-traversable directory")
    return d
