"""Releases in a root filesystem: verify a package, stage it, switch `current`, roll back.

On the robot (paths relative to the rootfs; `/` on a live robot):
    /opt/edge-vla/releases/<bundle-hash16>-<package-digest8>/   one unpacked package per release
    /opt/edge-vla/current  -> releases/<id>                      what the service runs
    /opt/edge-vla/previous -> releases/<id>                      what --rollback goes back to
    /opt/edge-vla/releases/<id>/venv/                            made on first start from the release's
                                                                  lock, so a rollback rolls back the code too
    /etc/systemd/system/edge-vla{,-firstboot}.service (+ multi-user.target.wants links, made by hand:
                                                                  a rootfs has no running systemctl)
    /etc/udev/rules.d/99-edge-vla.rules, /etc/edge-vla/robot.env, /etc/edge-vla/trusted-keys/

A package is verified completely (every file hash, the bundle, the signature) before anything in
the rootfs changes, and `current` moves last, by renaming a temp symlink over it.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import logging
import os
import re
import stat
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_vla.bundle import (
    DIR_MODE,
    EXEC_MODE,
    FILE_MODE,
    TARGET_DIR,
    Bundle,
    set_readable_modes,
    sha256_file,
)
from edge_vla.errors import BundleError
from edge_vla.provision import signing
from edge_vla.provision.accounts import plan_accounts
from edge_vla.provision.errors import InstallError, PackageError
from edge_vla.provision.lock import WHEELS_DIR, verify_wheelhouse
from edge_vla.provision.package import (
    FIRSTBOOT,
    PACKAGE_FORMAT,
    PACKAGE_JSON,
    PACKAGE_SIG,
    PACKAGE_VERSION,
    SERVICE,
    UDEV_RULES,
    release_id,
)
from edge_vla.provision.plan import Plan, make_dirs, remove_tree, symlink_atomic
from edge_vla.provision.tarball import extract_tarball

log = logging.getLogger(__name__)

OPT = Path("opt/edge-vla")
UNIT_DIR = Path("etc/systemd/system")
WANTS = UNIT_DIR / "multi-user.target.wants"
UDEV_DIR = Path("etc/udev/rules.d")
CONFIG = Path("etc/edge-vla/robot.env")
KEYS_DIR = Path("etc/edge-vla/trusted-keys")
INSTALL_LOCK = OPT / ".install.lock"  # held by the one install or rollback running on a rootfs
# Made on the robot after install (engines, timing cache, the release's venv): never compared.
_RUNTIME_FILES = ("bundle/" + TARGET_DIR + "/", "venv/")
_RUNTIME_DIRS = frozenset(f.rstrip("/") for f in _RUNTIME_FILES)


def _executable(path: Path) -> bool:
    """install.sh (and a bundle's build_engines.sh): the shell scripts a package ships."""
    return path.suffix == ".sh"


def set_release_modes(release_dir: Path) -> None:
    """What the service user (edge-vla.service, WorkingDirectory=/opt/edge-vla/current) needs: every
    directory 0755, every file 0644, scripts 0755. Set explicitly, because the staging directory comes
    from mkdtemp (0700) and root's umask varies. A release holds nothing secret: the signing key never
    enters a package, robot.env holds no credentials, and /etc/shadow is written elsewhere (0640)."""
    set_readable_modes(release_dir, _executable)


def _mode_problems(release_dir: Path) -> list[str]:
    """Files or directories of a release (not what the robot made in it) whose mode is not set_release_modes'."""
    problems = []
    if stat.S_IMODE(release_dir.lstat().st_mode) != DIR_MODE:
        problems.append(".")
    for p in release_dir.rglob("*"):
        rel = p.relative_to(release_dir).as_posix()
        if p.is_symlink() or rel in _RUNTIME_DIRS or rel.startswith(_RUNTIME_FILES):
            continue
        want = DIR_MODE if p.is_dir() else EXEC_MODE if _executable(p) else FILE_MODE
        if stat.S_IMODE(p.lstat().st_mode) != want:
            problems.append(rel)
    return problems


@dataclass(frozen=True)
class StagedPackage:
    dir: Path
    meta: dict[str, Any]
    release: str


def releases_dir(root: Path) -> Path:
    return root / OPT / "releases"


def _link_target(link: Path) -> str | None:
    return os.readlink(link) if link.is_symlink() else None


def current_release(root: Path) -> str | None:
    t = _link_target(root / OPT / "current")
    return Path(t).name if t else None


def previous_release(root: Path) -> str | None:
    t = _link_target(root / OPT / "previous")
    return Path(t).name if t else None


def verify_package_dir(d: Path, trusted_keys: Sequence[str | Path] = ()) -> StagedPackage:
    """Check package.json, every listed file's sha256, the bundle, and (with trusted keys) its signature."""
    meta_path = d / PACKAGE_JSON
    try:
        meta_bytes = meta_path.read_bytes()
        meta = json.loads(meta_bytes)
    except (OSError, ValueError) as exc:
        raise PackageError(f"{d} has no readable {PACKAGE_JSON} ({exc}): not an edge-vla package") from exc
    if not isinstance(meta, dict) or meta.get("format") != PACKAGE_FORMAT:
        raise PackageError(f"{meta_path} is not an edge-vla package description")
    if meta.get("version") != PACKAGE_VERSION:
        raise PackageError(f"package format version {meta.get('version')!r}; this edge-vla installs {PACKAGE_VERSION}: "
                           "rebuild the package with this edge-vla's `edge-vla package`")
    listed: dict[str, str] = meta.get("files", {})
    problems = []
    for rel, digest in sorted(listed.items()):
        p = d / rel
        if not p.is_file():
            problems.append(f"missing {rel}")
        elif sha256_file(p) != digest:
            problems.append(f"{rel} does not match its sha256")
    for p in sorted(d.rglob("*")):
        rel = p.relative_to(d).as_posix()
        if p.is_file() and rel not in (PACKAGE_JSON, PACKAGE_SIG) and rel not in listed \
                and not rel.startswith(_RUNTIME_FILES):
            problems.append(f"unexpected file {rel}")
    if problems:
        raise PackageError(f"package {d} failed verification: {'; '.join(problems)}. Rebuild or copy it again.")
    try:
        bundle = Bundle.open(d / "bundle")
    except BundleError as exc:
        raise PackageError(f"the package's bundle is not installable: {exc}") from exc
    # Every check below is over the bytes already read and parsed, never a second read of the file.
    manifest_bytes = bundle.manifest_bytes
    assert manifest_bytes is not None  # Bundle.open keeps them
    bundle_hash = hashlib.sha256(manifest_bytes).hexdigest()
    if bundle_hash != meta["bundle"]["hash"]:
        raise PackageError(f"{PACKAGE_JSON} names bundle {meta['bundle']['hash'][:16]} but holds {bundle_hash[:16]}")
    verify_wheelhouse(d, meta)  # the lock, wheels/ and package.json's wheel list agree hash by hash
    if trusted_keys:
        # package.sig covers package.json, which lists every file's (and so every wheel's) sha256.
        signing.verify_signed_file(d, PACKAGE_JSON, PACKAGE_SIG, trusted_keys, "package",
                                   "rebuild it with `edge-vla package BUNDLE --sign KEY`", meta_bytes)
        signing.verify_bundle_signature(d / "bundle", trusted_keys, manifest_bytes)
    return StagedPackage(d, meta, release_id(bundle_hash, meta_bytes))


def dedupe_wheels(root: Path, release: str) -> int:
    """Hard-link the release's wheels to identical ones (same name, same sha256 in package.json) in
    other releases, so that keeping 3 releases costs one copy of a shared wheel. Returns bytes saved."""
    rel_dir = releases_dir(root)
    mine = _wheel_list(rel_dir / release)
    saved = 0
    for other in sorted(d for d in rel_dir.iterdir() if d.is_dir() and d.name != release and not d.name.startswith(".")):
        for fname, digest in _wheel_list(other).items():
            src, dst = other / WHEELS_DIR / fname, rel_dir / release / WHEELS_DIR / fname
            if mine.get(fname) != digest or not src.is_file() or not dst.is_file() or os.path.samefile(src, dst):
                continue
            if sha256_file(src) != digest:  # a damaged copy elsewhere is never linked in
                continue
            tmp = dst.with_name(f".{fname}.link-{os.getpid()}")
            os.link(src, tmp)
            os.replace(tmp, dst)
            saved += dst.stat().st_size
    return saved


def _wheel_list(release_dir: Path) -> dict[str, str]:
    try:
        meta = json.loads((release_dir / PACKAGE_JSON).read_text(encoding="utf-8"))
        return {f: str(w["sha256"]) for f, w in meta.get("wheels", {}).items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def open_package(archive: Path, into: Path, trusted_keys: Sequence[str | Path] = ()) -> StagedPackage:
    extract_tarball(archive, into)
    try:
        return verify_package_dir(into, trusted_keys)
    except (PackageError, BundleError) as exc:  # name the file the user gave, not the staging folder
        raise type(exc)(str(exc).replace(str(into), str(archive))) from None


def _same_release(existing: Path, staged: StagedPackage) -> bool:
    """True when `existing` holds exactly the staged package (ignoring bundle/target)."""
    try:
        if (existing / PACKAGE_JSON).read_bytes() != (staged.dir / PACKAGE_JSON).read_bytes():
            return False
        verify_package_dir(existing)
        unreadable = _mode_problems(existing)
    except (OSError, PackageError, BundleError):
        return False
    if unreadable:  # e.g. installed by an edge-vla that left it 0700: the service cannot read it
        log.warning("release %s has modes the service user cannot use (%s); replacing it", existing.name,
                    ", ".join(unreadable[:5]))
        return False
    return True


def _check_l4t(root: Path, meta: dict[str, Any], plan: Plan) -> None:
    jp = meta["platform"].get("jetpack")
    release_file = root / "etc/nv_tegra_release"
    if jp is None or not release_file.is_file():
        if jp is not None and root != Path("/"):
            plan.notes.append(f"{plan.display(release_file)} not found: cannot check the rootfs is L4T {jp['l4t']}")
        return
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", release_file.read_text(errors="replace"))
    found = f"{m.group(1)}.{m.group(2)}" if m else "unknown"
    if found != jp["l4t"]:
        plan.notes.append(f"rootfs is L4T {found} but the package targets JetPack {jp['version']} "
                          f"(L4T {jp['l4t']}); repackage with the matching --jetpack")


def _chown_dir(path: Path, uid: int, gid: int) -> None:
    if os.geteuid() == 0:
        os.chown(path, uid, gid)
    else:
        log.warning("not root: %s stays owned by you; the first-boot unit chowns it on the robot", path)


def _plan_system_files(plan: Plan, root: Path, release_dir: Path, final_dir: Path, meta: dict[str, Any],
                       trusted_keys: Sequence[str | Path]) -> None:
    """Units, wants links, udev rules, config, accounts, trusted keys: what every release installs.

    Reads from `release_dir` (the staging dir for a new release) now; `final_dir` is where the
    release will live when the steps run."""
    cfg = meta["config"]
    changes, account = plan_accounts(root, cfg["user"], cfg["groups"])
    for path, data in changes.items():
        plan.write(path, data, 0o640 if "shadow" in path.name else 0o644, why=f"(user {cfg['user']})")
    for unit in (SERVICE, FIRSTBOOT):
        plan.write(root / UNIT_DIR / unit, (release_dir / "systemd" / unit).read_bytes())
        plan.symlink(root / WANTS / unit, f"/{UNIT_DIR / unit}")  # what `systemctl enable` makes
    plan.write(root / UDEV_DIR / UDEV_RULES, (release_dir / "udev" / UDEV_RULES).read_bytes())

    # robot.env is edited by operators: replace it only if it still holds what the current release
    # installed (dpkg's conffile rule); otherwise keep it and put the new one beside it.
    new_cfg = (release_dir / "config/robot.env").read_bytes()
    cfg_path = root / CONFIG
    cur = current_release(root)
    shipped = releases_dir(root) / cur / "config/robot.env" if cur else None
    if cfg_path.is_file() and cfg_path.read_bytes() != new_cfg and not (
            shipped and shipped.is_file() and shipped.read_bytes() == cfg_path.read_bytes()):
        plan.write(cfg_path.with_name("robot.env.new"), new_cfg, why="(kept your edited robot.env)")
        plan.notes.append(f"{plan.display(cfg_path)} was edited on this machine and is kept; "
                          f"the package's version is in {plan.display(cfg_path.with_name('robot.env.new'))}")
    else:
        plan.write(cfg_path, new_cfg)

    for spec in trusted_keys:
        raw = signing.load_public_key(spec)
        plan.write(root / KEYS_DIR / f"{signing.key_id(raw)}.pub", b"ed25519:" + base64.b64encode(raw) + b"\n")

    target = final_dir / "bundle" / TARGET_DIR
    if account is not None and not target.is_dir():
        def make_target() -> None:
            make_dirs(target)
            _chown_dir(target, account.uid, account.gid)

        plan.add(f"create {plan.display(target)} (owner uid {account.uid}: engines, timing cache)", make_target)


def _plan_switch(plan: Plan, root: Path, new: str) -> None:
    current, previous = root / OPT / "current", root / OPT / "previous"
    old_current, old_previous = _link_target(current), _link_target(previous)
    want = f"releases/{new}"
    if old_current == want:
        return

    def switch() -> Any:
        if old_current is not None:
            symlink_atomic(previous, old_current)
        symlink_atomic(current, want)  # the moment the new release becomes live

        def undo() -> None:
            for link, old in ((current, old_current), (previous, old_previous)):
                if old is None:
                    link.unlink(missing_ok=True)
                else:
                    symlink_atomic(link, old)
        return undo

    plan.add(f"switch /{OPT}/current -> {want}" + (f" (previous: {old_current})" if old_current else ""), switch)


def plan_install(root: Path, staged: StagedPackage, trusted_keys: Sequence[str | Path] = ()) -> Plan:
    plan = Plan(root)
    _check_l4t(root, staged.meta, plan)
    final = releases_dir(root) / staged.release
    if not _same_release(final, staged):
        existed = final.exists()

        def add_release() -> Any:
            make_dirs(final.parent)
            set_release_modes(staged.dir)  # before the rename: the release appears readable, never 0700
            trash = None
            if final.exists():  # a partial or corrupted earlier copy
                trash = final.with_name(f".trash-{final.name}-{os.getpid()}")
                os.replace(final, trash)
            os.replace(staged.dir, final)

            def undo() -> None:
                os.replace(final, staged.dir)
                if trash is not None:
                    os.replace(trash, final)
            if trash is not None:  # only deleted once the whole install has succeeded
                plan.notes.append(f"replaced a damaged copy of release {staged.release}")
                plan.cleanup.append(trash)
            return undo

        n = len(staged.meta["files"]) + 1
        plan.add(f"{'replace damaged' if existed else 'add'} release /{OPT}/releases/{staged.release} ({n} files)",
                 add_release)
        _plan_system_files(plan, root, staged.dir, final, staged.meta, trusted_keys)
    else:
        _plan_system_files(plan, root, final, final, staged.meta, trusted_keys)
    _plan_switch(plan, root, staged.release)
    return plan


def plan_rollback(root: Path) -> Plan:
    prev = previous_release(root)
    cur = current_release(root)
    if prev is None:
        raise InstallError(f"no previous release under {root / OPT} to roll back to (only {cur or 'nothing'} installed)")
    prev_dir = releases_dir(root) / prev
    try:
        staged = verify_package_dir(prev_dir)
    except (PackageError, BundleError) as exc:
        raise InstallError(f"cannot roll back to {prev}: it no longer verifies ({exc}); install a package instead") from exc
    plan = Plan(root)
    _plan_system_files(plan, root, prev_dir, prev_dir, staged.meta, ())
    _plan_switch(plan, root, prev)
    return plan


def prune(root: Path, keep: int) -> list[str]:
    """Delete all but the `keep` newest releases, never `current` or `previous`. Returns what went."""
    rel = releases_dir(root)
    if not rel.is_dir():
        return []
    protected = {current_release(root), previous_release(root)}
    dirs = sorted((d for d in rel.iterdir() if d.is_dir() and not d.name.startswith(".")),
                  key=lambda d: d.stat().st_ctime, reverse=True)
    removed = []
    for d in dirs[max(keep, 0):]:
        if d.name not in protected:
            remove_tree(d)
            removed.append(d.name)
    for leftover in rel.glob(".staging-*"):  # from an install killed mid-way
        remove_tree(leftover)
    return removed


@contextmanager
def install_lock(root: Path) -> Iterator[None]:
    """Hold the rootfs's install lock, or refuse at once: one install or rollback at a time.

    Two at once would each plan from the state before the other and switch `current` in turn, and the
    one finishing first prunes `.staging-*`, the other's staged release among them. flock: the kernel
    drops the lock when its holder dies, so a killed install leaves no stale lock behind."""
    path = root / INSTALL_LOCK
    make_dirs(path.parent)
    try:  # O_NOFOLLOW: root never opens (or creates) a file through a link planted in the rootfs
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise InstallError(f"cannot open the install lock {path}: {exc.strerror}; it must be a regular file "
                           "(remove what is there)") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InstallError(f"another edge-vla install is running on {root} (it holds {path}); nothing was "
                               "changed: wait for it to finish, then run this one again") from None
        yield
    finally:
        os.close(fd)  # releases the lock


def staging_dir(root: Path) -> Path:
    """A fresh directory on the same filesystem as releases/, so that staging -> release is a rename."""
    rel = releases_dir(root)
    make_dirs(rel)  # /opt/edge-vla/releases: 0755 down from the first directory this makes
    return Path(tempfile.mkdtemp(prefix=".staging-", dir=rel))
