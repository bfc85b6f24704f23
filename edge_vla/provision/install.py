"""`edge-vla install PKG (--rootfs DIR | --host user@robot) [--dry-run] [--rollback]`.

--rootfs DIR   stage into a root filesystem: Linux_for_Tegra/rootfs before flashing (every robot
               flashed from it boots into the policy), or `/` on the robot itself (install.sh does that).
--host U@H     copy the package to a live robot (rsync, or scp without it) and run its install.sh
               there over ssh; that script makes the venv and calls `edge-vla install --rootfs /`.
--dry-run      print every file and command; change nothing (the package is still verified).
--rollback     point `current` back at the previous release.
--allow-downgrade  install a package of an older edge-vla than the current release's (refused otherwise).

Idempotent (same package twice -> "unchanged") and atomic (see rootfs.py and plan.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_vla.errors import ConfigError
from edge_vla.optional import require
from edge_vla.provision import rootfs, signing
from edge_vla.provision.errors import InstallError
from edge_vla.provision.lock import canonical_name
from edge_vla.provision.package import PACKAGE_JSON
from edge_vla.provision.plan import remove_tree

log = logging.getLogger(__name__)

REMOTE_EDGE_VLA = "/opt/edge-vla/current/venv/bin/edge-vla"


@dataclass
class InstallReport:
    changed: bool
    release: str | None
    previous: str | None
    steps: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    pruned: list[str] = field(default_factory=list)


def install_rootfs(pkg: Path, root: Path, *, trusted_keys: Sequence[str | Path] = (), dry_run: bool = False,
                   keep: int = 3, allow_downgrade: bool = False) -> InstallReport:
    """Verify `pkg`, then stage it into `root` and make it current (or only plan it with dry_run).

    Without `trusted_keys`, the keys an earlier install left in the rootfs (/etc/edge-vla/trusted-keys)
    apply: a robot that trusts a key installs only packages signed by it. A package of an older edge-vla
    than the current release's is refused unless `allow_downgrade` (an older signed release still verifies)."""
    root = Path(root)
    if not root.is_dir():
        raise InstallError(f"rootfs {root} is not a directory; pass Linux_for_Tegra/rootfs (or / on the robot)")
    if not trusted_keys:
        trusted_keys = signing.trusted_keys_from_dir(root / rootfs.KEYS_DIR)
    # Not for a dry run: it changes nothing, and may run beside a real install.
    with contextlib.nullcontext() if dry_run else rootfs.install_lock(root):
        return _stage_and_install(Path(pkg), root, trusted_keys, dry_run, keep, allow_downgrade)


def _stage_and_install(pkg: Path, root: Path, trusted_keys: Sequence[str | Path], dry_run: bool,
                       keep: int, allow_downgrade: bool) -> InstallReport:
    # Extract on the rootfs's filesystem so that the staged dir becomes the release by one rename;
    # a dry run extracts to /tmp and leaves the rootfs untouched.
    staging = Path(tempfile.mkdtemp(prefix="edge-vla-dry-run-")) if dry_run else rootfs.staging_dir(root)
    try:
        staged = rootfs.open_package(pkg, staging, trusted_keys)
        downgrade = _check_downgrade(pkg, root, staged, allow_downgrade)
        plan = rootfs.plan_install(root, staged, trusted_keys)
        if downgrade:
            plan.notes.append(downgrade)
        report = InstallReport(not plan.empty, staged.release, rootfs.current_release(root),
                               [s.show for s in plan.steps], plan.notes)
        if not dry_run and not plan.empty:
            plan.run()
            report.pruned = rootfs.prune(root, keep)
            try:
                saved = rootfs.dedupe_wheels(root, staged.release)
            except OSError as exc:  # a space saving only: the release is installed either way
                log.warning("could not share wheels between releases: %s", exc)
            else:
                log.info("shared %.1f MB of wheels with other releases (hard links)", saved / 1e6)
        return report
    finally:
        remove_tree(staging)  # gone already when it became the release


def shipped_version(meta: dict[str, Any]) -> str | None:
    """The version of edge-vla a package (its package.json) runs: its edge-vla wheel's, which verify_package_dir
    matched to the wheel file and the lock; package.json's edge_vla_version where no wheel names it."""
    wheels = meta.get("wheels")
    for info in wheels.values() if isinstance(wheels, dict) else ():
        if isinstance(info, dict) and canonical_name(str(info.get("name", ""))) == "edge-vla":
            return str(info.get("version"))
    version = meta.get("edge_vla_version")
    return str(version) if version is not None else None


def is_downgrade(new: str, current: str) -> bool:
    """True when edge-vla `new` is older than `current`, as PEP 440 orders them (0.10 after 0.9, rc before final).
    Raises packaging's InvalidVersion for a version that is not PEP 440."""
    require("packaging")
    from packaging.version import Version

    return Version(new) < Version(current)


def _check_downgrade(pkg: Path, root: Path, staged: rootfs.StagedPackage, allow: bool) -> str | None:
    """Refuse (InstallError) a package of an older edge-vla than the current release's, unless `allow`; then
    return the note that says it is a downgrade. Release ids are content hashes, so the edge-vla version is the
    only order releases have: two packages of the same edge-vla (e.g. two models) are never a downgrade."""
    current = rootfs.current_release(root)
    if current is None or current == staged.release:
        return None
    try:
        current_meta = json.loads((rootfs.releases_dir(root) / current / PACKAGE_JSON).read_bytes())
    except (OSError, ValueError):  # a damaged current release: installing over it is how it gets fixed
        log.warning("cannot read the current release %s's package.json: not checked for a downgrade", current)
        return None
    old = shipped_version(current_meta) if isinstance(current_meta, dict) else None
    new = shipped_version(staged.meta)
    if old is None:
        return None
    what = f"{pkg} (edge-vla {new}, release {staged.release})"
    require("packaging")
    from packaging.version import InvalidVersion

    try:
        older = new is None or is_downgrade(new, old)
    except InvalidVersion:  # a signed package with an unreadable version: cannot be ordered, treated as older
        older = True
    if older and not allow:
        raise InstallError(f"{what} is older than the current release {current} (edge-vla {old}): refusing to "
                           "downgrade; pass --allow-downgrade to install it anyway, or `edge-vla install --rollback` "
                           "to go back to the previous release")
    return f"downgrading from edge-vla {old} to {new} (--allow-downgrade)" if older else None


def rollback_rootfs(root: Path, *, dry_run: bool = False) -> InstallReport:
    with contextlib.nullcontext() if dry_run else rootfs.install_lock(Path(root)):
        plan = rootfs.plan_rollback(Path(root))
        report = InstallReport(not plan.empty, rootfs.previous_release(root), rootfs.current_release(root),
                               [s.show for s in plan.steps], plan.notes)
        if not dry_run:
            plan.run()
        return report


# Where `install --host` puts the package on the robot: relative to the ssh user's home, private to that user.
REMOTE_STAGE = ".cache/edge-vla/install"
_RELEASE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


def host_commands(pkg: Path, host: str, release: str, *, trusted_keys: Sequence[Path] = (), rollback: bool = False,
                  ssh_options: Sequence[str] = (), have_rsync: bool | None = None,
                  allow_downgrade: bool = False) -> list[list[str]]:
    """The commands that install `pkg` on a live robot (or roll it back); what --dry-run prints."""
    ssh = ["ssh", *ssh_options, host]
    if rollback:
        remote = f"sudo {REMOTE_EDGE_VLA} install --rollback --rootfs / && sudo systemctl restart edge-vla.service"
        return [[*ssh, remote]]
    if not _RELEASE_NAME.fullmatch(release):
        raise InstallError(f"release name {release!r} is not a plain file name (letters, digits, '.', '_', '-'); "
                           "rebuild the package with `edge-vla package`")
    if have_rsync is None:
        have_rsync = shutil.which("rsync") is not None
    # Relative to the ssh user's home (scp, rsync and the remote shell all start there): a directory only that
    # user can write, made first. A predictable path in /tmp could be created first by another local user of the
    # robot, who could then swap install.sh before sudo runs it.
    stem = f"{REMOTE_STAGE}/{release}"
    remote_pkg, remote_dir = f"{stem}.tar.gz", stem
    sources = [str(pkg)]
    install_args = ["--allow-downgrade"] if allow_downgrade else []  # the robot's `edge-vla install` checks it
    for i, key in enumerate(trusted_keys):
        sources.append(str(key))
        install_args += ["--trusted-key", f"{stem}-key{i}.pub"]
    q = shlex.quote
    prepare = [*ssh, f"umask 077 && mkdir -p {q(REMOTE_STAGE)} && chmod 700 {q(REMOTE_STAGE)}"]
    copies = []
    for i, src in enumerate(sources):
        dest = remote_pkg if i == 0 else f"{stem}-key{i - 1}.pub"
        if have_rsync:
            rsh = ["-e", shlex.join(["ssh", *ssh_options])] if ssh_options else []
            copies.append(["rsync", "-a", "--partial", "--checksum", *rsh, src, f"{host}:{dest}"])
        else:
            copies.append(["scp", "-q", *ssh_options, src, f"{host}:{dest}"])
    env = f"EDGE_VLA_PKG={q(remote_pkg)}"
    if install_args:
        env += f" EDGE_VLA_INSTALL_ARGS={q(shlex.join(install_args))}"
    # `cd` (home): the relative paths above are the home's; sudo keeps the working directory.
    remote = (f"set -e; cd; rm -rf {q(remote_dir)}; mkdir -m 700 {q(remote_dir)}; "
              f"tar -xzf {q(remote_pkg)} -C {q(remote_dir)}; sudo {env} sh {q(remote_dir + '/install.sh')}; "
              f"rm -rf {q(remote_dir)}")
    return [prepare, *copies, [*ssh, remote]]


def install_host(pkg: Path, host: str, *, trusted_keys: Sequence[Path] = (), dry_run: bool = False,
                 rollback: bool = False, ssh_options: Sequence[str] = (), allow_downgrade: bool = False
                 ) -> list[list[str]]:
    release = ""
    if not rollback:
        # Verify here first: a bad package never leaves the workstation.
        with tempfile.TemporaryDirectory(prefix="edge-vla-verify-") as tmp:
            staged = rootfs.open_package(pkg, Path(tmp), trusted_keys)
            release = staged.release
    commands = host_commands(pkg, host, release, trusted_keys=trusted_keys, rollback=rollback, ssh_options=ssh_options,
                             allow_downgrade=allow_downgrade)
    if not dry_run:
        for cmd in commands:
            log.info("running %s", shlex.join(cmd))
            try:
                subprocess.run(cmd, check=True)
            except FileNotFoundError as exc:
                raise InstallError(f"{cmd[0]} is not installed on this machine; install openssh-client/rsync") from exc
            except subprocess.CalledProcessError as exc:
                raise InstallError(
                    f"`{shlex.join(cmd)}` failed with exit status {exc.returncode}; the robot keeps its previous "
                    "release (install.sh switches `current` only after verifying). Check ssh access and sudo."
                ) from exc
    return commands


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("package", nargs="?", help="robot package from `edge-vla package` (not needed with --rollback)")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--rootfs", metavar="DIR", help="root filesystem to stage into (Linux_for_Tegra/rootfs, or /)")
    where.add_argument("--host", metavar="USER@ROBOT", help="live robot to install onto over ssh")
    parser.add_argument("--dry-run", action="store_true", help="print every file and command; change nothing")
    parser.add_argument("--rollback", action="store_true", help="switch back to the previous release")
    parser.add_argument("--trusted-key", action="append", default=[], metavar="PUBKEY",
                        help="refuse the bundle unless signed by this Ed25519 public key (repeatable); "
                             "the key is also installed in /etc/edge-vla/trusted-keys")
    parser.add_argument("--allow-downgrade", action="store_true",
                        help="install a package of an older edge-vla than the current release's (refused otherwise)")
    parser.add_argument("--keep", type=int, default=3, help="releases to keep (default %(default)s)")
    parser.add_argument("--ssh-option", action="append", default=[], metavar="OPT",
                        help="extra ssh argument, e.g. --ssh-option=-p2222 (repeatable)")


def _print_report(report: InstallReport, dry_run: bool, where: str) -> None:
    for note in report.notes:
        print(f"warning: {note}")
    if not report.changed:
        print(f"unchanged: release {report.release} is already installed and current in {where}")
        return
    prefix = "would " if dry_run else ""
    for step in report.steps:
        print(f"  {prefix}{step}")
    verb = "dry run: nothing changed" if dry_run else f"release {report.release} is current in {where}"
    print(f"{verb} (previous: {report.previous or 'none'})")
    if report.pruned:
        print(f"  removed old releases: {', '.join(report.pruned)}")


def main(args: argparse.Namespace) -> int:
    if not args.rollback and not args.package:
        raise ConfigError("give the PACKAGE to install (or --rollback)")
    keys = [Path(k) for k in args.trusted_key]
    if args.host and not args.rollback and not keys:
        # The robot checks signatures with its trusted keys too, but only inside the package's own installer,
        # which install.sh has already started as root: the check on this machine is the one that comes first.
        print("warning: no --trusted-key: the package's signatures are not checked on this machine (its hashes are); "
              "the robot checks them only after install.sh has started the package's own installer as root: pass "
              "--trusted-key KEY.pub", file=sys.stderr)
    if args.host:
        commands = install_host(Path(args.package) if args.package else Path(), args.host, trusted_keys=keys,
                                dry_run=args.dry_run, rollback=args.rollback, ssh_options=args.ssh_option,
                                allow_downgrade=args.allow_downgrade)
        for cmd in commands:
            print(("would run: " if args.dry_run else "ran: ") + shlex.join(cmd))
        return 0
    root = Path(args.rootfs)
    if args.rollback:
        report = rollback_rootfs(root, dry_run=args.dry_run)
    else:
        report = install_rootfs(Path(args.package), root, trusted_keys=keys, dry_run=args.dry_run, keep=args.keep,
                                allow_downgrade=args.allow_downgrade)
    _print_report(report, args.dry_run, str(root))
    if not args.dry_run and report.changed and str(root) != "/":
        print("flash the rootfs; on first boot edge-vla-firstboot.service makes the venv and engines, "
              "then edge-vla.service starts")
    return 0
