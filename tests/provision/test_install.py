"""`edge-vla install`: into a temporary L4T rootfs; idempotent, atomic, rollback; --host command list."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from edge_vla.cli import main as cli
from edge_vla.errors import BundleError, EdgeVlaError
from edge_vla.provision import install, plan, rootfs, signing
from edge_vla.provision.errors import PackageError
from edge_vla.provision.package import UsbId
from edge_vla.provision.robot_config import RobotConfig
from edge_vla.provision.tarball import write_tarball


def _tree(root: Path) -> dict[str, str]:
    """Every path with its content hash or link target: to assert 'nothing changed'."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


def _repack(pkg: Path, out: Path, mutate) -> Path:
    """Rebuild a package after `mutate(files)`, with package.json's hashes recomputed, so that only
    the deeper checks (bundle hashes, signature) can catch the change."""
    with tarfile.open(pkg) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    mutate(files)
    meta = json.loads(files.pop("package.json"))
    meta["files"] = {k: hashlib.sha256(v).hexdigest() for k, v in sorted(files.items())}
    meta["bundle"]["hash"] = hashlib.sha256(files["bundle/manifest.json"]).hexdigest()
    files["package.json"] = json.dumps(meta).encode()
    return write_tarball(out, files)


@pytest.fixture
def pkg(build, bundle: Path, tmp_path: Path) -> Path:
    return build(bundle, tmp_path / "robot-pkg.tar.gz", "orin-nano").path


def test_install_into_rootfs_lays_out_the_tree(pkg: Path, rootfs: Path):
    report = install.install_rootfs(pkg, rootfs)
    assert report.changed
    rel = rootfs / "opt/edge-vla/releases" / report.release
    assert os.readlink(rootfs / "opt/edge-vla/current") == f"releases/{report.release}"
    assert (rootfs / "opt/edge-vla/current/bundle/manifest.json").is_file()
    assert (rel / "bundle/target").is_dir() and (rel / "install.sh").stat().st_mode & 0o111
    for unit in ("edge-vla.service", "edge-vla-firstboot.service"):
        assert (rootfs / "etc/systemd/system" / unit).is_file()
        assert os.readlink(rootfs / "etc/systemd/system/multi-user.target.wants" / unit) == \
            f"/etc/systemd/system/{unit}"
    assert (rootfs / "etc/udev/rules.d/99-edge-vla.rules").is_file()
    assert RobotConfig.load(rootfs / "etc/edge-vla/robot.env").link == "serial:///dev/edge-vla-motor"
    passwd = (rootfs / "etc/passwd").read_text()
    assert "edge-vla:x:999:999:" in passwd and passwd.startswith("root:x:0:0:")
    group = (rootfs / "etc/group").read_text()
    assert "dialout:x:20:ubuntu,edge-vla" in group and "edge-vla:x:999:" in group
    assert "edge-vla:!:" in (rootfs / "etc/shadow").read_text()
    assert (rel / "bundle/target").stat().st_uid == (999 if os.geteuid() == 0 else os.geteuid())
    assert not list((rootfs / "opt/edge-vla/releases").glob(".staging-*"))


def test_second_install_is_unchanged(pkg: Path, rootfs: Path, capsys):
    install.install_rootfs(pkg, rootfs)
    # What the robot adds on first start (venv, engines, timing cache) does not count as a change.
    cur = rootfs / "opt/edge-vla/current"
    (cur / "venv/bin").mkdir(parents=True)
    (cur / "venv/bin/edge-vla").write_text("#!/bin/sh\n")
    (cur / "bundle/target/engines").mkdir(parents=True)
    (cur / "bundle/target/timing.cache").write_bytes(b"cache")
    before = _tree(rootfs)
    report = install.install_rootfs(pkg, rootfs)
    assert not report.changed and report.steps == []
    assert _tree(rootfs) == before
    assert cli(["install", str(pkg), "--rootfs", str(rootfs)]) == 0
    assert "unchanged" in capsys.readouterr().out
    assert _tree(rootfs) == before


def test_dry_run_prints_every_file_and_changes_nothing(pkg: Path, rootfs: Path, capsys):
    before = _tree(rootfs)
    assert cli(["install", str(pkg), "--rootfs", str(rootfs), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert _tree(rootfs) == before
    for expected in ("would add release /opt/edge-vla/releases/", "/etc/systemd/system/edge-vla.service",
                     "multi-user.target.wants/edge-vla-firstboot.service", "/etc/udev/rules.d/99-edge-vla.rules",
                     "/etc/edge-vla/robot.env", "/etc/passwd", "switch /opt/edge-vla/current", "nothing changed"):
        assert expected in out, expected


def test_corrupt_bundle_is_refused_before_switching(pkg: Path, rootfs: Path, tmp_path: Path, bundle: Path):
    first = install.install_rootfs(pkg, rootfs)
    before = _tree(rootfs)

    def corrupt(files):
        files["bundle/graphs/prefix.onnx"] = b"flipped bits"
        files["config/robot.env"] = RobotConfig(rate_hz=10).to_env().encode()  # a genuinely new release

    bad = _repack(pkg, tmp_path / "bad.tar.gz", corrupt)
    with pytest.raises(PackageError, match=r"prefix\.onnx does not match its sha256"):
        install.install_rootfs(bad, rootfs)
    assert _tree(rootfs) == before and rootfs.joinpath("opt/edge-vla/current").resolve().name == first.release

    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(pkg.read_bytes()[:200])
    with pytest.raises(PackageError, match="cannot extract"):
        install.install_rootfs(truncated, rootfs)
    assert _tree(rootfs) == before


def test_failure_midway_reverts_every_applied_step(build, bundle_factory, pkg: Path, rootfs: Path, tmp_path: Path, monkeypatch):
    first = install.install_rootfs(pkg, rootfs)
    before = _tree(rootfs)
    newer = build(bundle_factory(tmp_path / "b2", b"new weights"), tmp_path / "p2.tar.gz", "orin-nano",
                          config=RobotConfig(rate_hz=100), usb=UsbId("0483", "5740")).path
    real = plan.write_atomic
    written = []

    def flaky(path: Path, data: bytes, mode: int = 0o644) -> None:
        written.append(path.name)
        if path.name == "robot.env":  # after the release, the unit and the udev rule were replaced
            raise OSError(28, "No space left on device")
        real(path, data, mode)

    monkeypatch.setattr(plan, "write_atomic", flaky)
    with pytest.raises(OSError, match="No space left"):
        install.install_rootfs(newer, rootfs)
    assert written[:3] == ["edge-vla.service", "99-edge-vla.rules", "robot.env"]
    assert _tree(rootfs) == before
    assert rootfs.joinpath("opt/edge-vla/current").resolve().name == first.release
    monkeypatch.setattr(plan, "write_atomic", real)
    assert install.install_rootfs(newer, rootfs).changed  # and a retry goes through


def test_upgrade_then_rollback_and_forward_again(build, bundle_factory, pkg: Path, rootfs: Path, tmp_path: Path, capsys):
    first = install.install_rootfs(pkg, rootfs)
    second_pkg = build(bundle_factory(tmp_path / "b2", b"new weights"), tmp_path / "p2.tar.gz", "orin-nano",
                               config=RobotConfig(rate_hz=100)).path
    second = install.install_rootfs(second_pkg, rootfs)
    assert second.previous == first.release
    releases = rootfs / "opt/edge-vla/releases"
    shared = [w.name for w in (releases / second.release / "wheels").glob("*.whl")]
    assert shared and all(os.path.samefile(releases / first.release / "wheels" / w,  # one copy on disk
                                           releases / second.release / "wheels" / w) for w in shared)
    assert rootfs.joinpath("opt/edge-vla/current").resolve().name == second.release
    assert RobotConfig.load(rootfs / "etc/edge-vla/robot.env").rate_hz == 100  # unedited: replaced

    assert cli(["install", "--rollback", "--rootfs", str(rootfs)]) == 0
    assert rootfs.joinpath("opt/edge-vla/current").resolve().name == first.release
    assert rootfs.joinpath("opt/edge-vla/previous").resolve().name == second.release
    assert RobotConfig.load(rootfs / "etc/edge-vla/robot.env").rate_hz == 50  # the old release's config back
    capsys.readouterr()
    assert install.install_rootfs(second_pkg, rootfs).changed  # forward again: just a switch
    assert rootfs.joinpath("opt/edge-vla/current").resolve().name == second.release


def test_rollback_without_previous_says_so(pkg: Path, rootfs: Path, capsys):
    install.install_rootfs(pkg, rootfs)
    assert cli(["install", "--rollback", "--rootfs", str(rootfs)]) == 1
    assert "no previous release" in capsys.readouterr().err


def test_operator_edits_to_robot_env_are_kept(build, bundle_factory, pkg: Path, rootfs: Path, tmp_path: Path):
    install.install_rootfs(pkg, rootfs)
    cfg = rootfs / "etc/edge-vla/robot.env"
    cfg.write_text(RobotConfig(link="can://can1").to_env())
    newer = build(bundle_factory(tmp_path / "b2", b"v2"), tmp_path / "p2.tar.gz", "orin-nano").path
    report = install.install_rootfs(newer, rootfs)
    assert RobotConfig.load(cfg).link == "can://can1"
    assert (rootfs / "etc/edge-vla/robot.env.new").is_file()
    assert any("edited" in n for n in report.notes)


def test_trusted_keys_refuse_unsigned_and_accept_signed(build, bundle: Path, rootfs: Path, tmp_path: Path, keypair):
    priv, pub = keypair
    unsigned = build(bundle, tmp_path / "u.tar.gz", "orin-nano").path
    with pytest.raises(BundleError, match="unsigned"):
        install.install_rootfs(unsigned, rootfs, trusted_keys=[pub])
    assert not (rootfs / "opt/edge-vla/current").exists()
    signed = build(bundle, tmp_path / "s.tar.gz", "orin-nano", sign_key=priv)
    report = install.install_rootfs(signed.path, rootfs, trusted_keys=[pub])
    assert report.changed
    installed_keys = signing.trusted_keys_from_dir(rootfs / "etc/edge-vla/trusted-keys")
    assert [k.name for k in installed_keys] == [f"{signed.key_id}.pub"]
    current = rootfs / "opt/edge-vla/current/bundle"
    assert signing.verify_bundle_signature(current, installed_keys) == signed.key_id  # what the runtime will do

    def tamper(files):  # a new manifest that matches the new graph, but the old signature
        m = json.loads(files["bundle/manifest.json"])
        files["bundle/graphs/prefix.onnx"] = b"evil"
        m["files"]["graphs/prefix.onnx"] = hashlib.sha256(b"evil").hexdigest()
        files["bundle/manifest.json"] = json.dumps(m).encode()

    evil = _repack(signed.path, tmp_path / "evil.tar.gz", tamper)
    with pytest.raises(EdgeVlaError, match="bad signature"):
        install.install_rootfs(evil, rootfs, trusted_keys=[pub])
    # Once the rootfs trusts a key, an install that names none still requires it (install.sh's case).
    newer_unsigned = build(bundle, tmp_path / "u2.tar.gz", "orin-nano", config=RobotConfig(rate_hz=100)).path
    with pytest.raises(BundleError, match="package .* is unsigned"):
        install.install_rootfs(newer_unsigned, rootfs)
    assert rootfs.joinpath("opt/edge-vla/current").resolve().name == signed.release


def test_old_releases_are_pruned_but_never_current_or_previous(build, bundle_factory, pkg: Path, rootfs: Path, tmp_path: Path):
    ids = [install.install_rootfs(pkg, rootfs).release]
    for i in range(3):
        p = build(bundle_factory(tmp_path / f"b{i}", f"w{i}".encode()), tmp_path / f"p{i}.tar.gz", "orin-nano")
        ids.append(install.install_rootfs(p.path, rootfs, keep=2).release)
    left = {d.name for d in (rootfs / "opt/edge-vla/releases").iterdir()}
    assert left == set(ids[-2:])


def test_not_a_rootfs(pkg: Path, tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(EdgeVlaError, match="not a root filesystem"):
        install.install_rootfs(pkg, tmp_path / "empty")
    assert not list((tmp_path / "empty/opt/edge-vla/releases").glob(".staging-*"))


def test_host_dry_run_prints_the_commands(pkg: Path, capsys, keypair):
    assert cli(["install", str(pkg), "--host", "nvidia@orin.local", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    cmds = [shlex.split(line.removeprefix("would run: ")) for line in lines]
    # The files go to a directory private to the ssh user (made first, mode 0700), never to a path in /tmp that
    # another local user of the robot could create first and swap install.sh in before sudo runs it.
    assert cmds[0] == ["ssh", "nvidia@orin.local", f"umask 077 && mkdir -p {install.REMOTE_STAGE} && chmod 700 "
                                                   f"{install.REMOTE_STAGE}"]
    assert cmds[1][0] in {"rsync", "scp"} and cmds[1][-1].startswith(f"nvidia@orin.local:{install.REMOTE_STAGE}/")
    assert cmds[-1][:2] == ["ssh", "nvidia@orin.local"]
    remote = cmds[-1][2]
    assert remote.startswith("set -e; cd; ") and "tar -xzf" in remote and "sudo EDGE_VLA_PKG=" in remote
    assert "install.sh" in remote and not any("/tmp" in c[-1] for c in cmds if c[0] == "ssh")
    assert not any(":/tmp" in c[-1] for c in cmds if c[0] != "ssh")  # the local package may be anywhere

    cmds = install.host_commands(pkg, "robot", "abc", trusted_keys=[keypair[1]], ssh_options=["-p2222"],
                                 have_rsync=True)
    assert cmds[0][:3] == ["ssh", "-p2222", "robot"]
    assert cmds[1][:6] == ["rsync", "-a", "--partial", "--checksum", "-e", "ssh -p2222"]
    assert cmds[2][-1] == f"robot:{install.REMOTE_STAGE}/abc-key0.pub"
    assert f"--trusted-key {install.REMOTE_STAGE}/abc-key0.pub" in cmds[-1][-1]
    scp = install.host_commands(pkg, "robot", "abc", have_rsync=False)
    assert scp[1][0] == "scp"
    for bad in ("../x", "a/b", ".hidden", ""):  # a release name is a file name in that directory, nothing else
        with pytest.raises(EdgeVlaError, match="release name"):
            install.host_commands(pkg, "robot", bad)
    rb = install.host_commands(pkg, "robot", "", rollback=True)
    assert rb == [["ssh", "robot", "sudo /opt/edge-vla/current/venv/bin/edge-vla install --rollback --rootfs / && "
                                   "sudo systemctl restart edge-vla.service"]]


def test_host_refuses_a_bad_package_before_copying(pkg: Path, tmp_path: Path, capsys):
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"\x1f\x8b garbage")
    assert cli(["install", str(bad), "--host", "robot", "--dry-run"]) == 1
    assert "cannot extract" in capsys.readouterr().err


def test_install_script_is_valid_sh(pkg: Path, tmp_path: Path):
    with tarfile.open(pkg) as tar:
        tar.extract("install.sh", tmp_path, filter="data")
    proc = subprocess.run(["sh", "-n", str(tmp_path / "install.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_verify_package_dir_reports_unexpected_files(pkg: Path, tmp_path: Path):
    staged = rootfs.open_package(pkg, tmp_path / "x")
    (tmp_path / "x/extra.txt").write_text("smuggled")
    with pytest.raises(PackageError, match=r"unexpected file extra\.txt"):
        rootfs.verify_package_dir(staged.dir)


def test_host_commands_run_in_a_shell_put_the_package_in_a_private_dir_and_run_its_installer(pkg: Path, tmp_path: Path,
                                                                                               keypair) -> None:
    """The --host commands run for real against a home directory (ssh and scp stood in for by a local shell and
    cp, sudo by a script that records what it was asked to run): the remote paths resolve, the staging directory
    is private, and install.sh is run with the package and the key it was given."""
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    home.mkdir()
    bin_dir.mkdir()
    sudo = bin_dir / "sudo"
    # Records only: the real install.sh would change this machine. It checks that the script it was given is
    # there, unpacked, at that moment.
    sudo.write_text('#!/bin/sh\n{ pwd; for a in "$@"; do echo "$a"; done; } > "$HOME/sudo.log"\n'
                    'eval "last=\\${$#}"; [ -f "$last" ] && echo present >> "$HOME/sudo.log"\n')
    sudo.chmod(0o755)
    env = {"HOME": str(home), "PATH": f"{bin_dir}:/usr/bin:/bin"}
    cmds = install.host_commands(pkg, "robot", "rel-1", trusted_keys=[keypair[1]], have_rsync=False)
    for cmd in cmds:
        if cmd[0] == "ssh":
            subprocess.run(["sh", "-c", cmd[-1]], cwd=home, env=env, check=True)
        else:  # scp SRC robot:DEST, DEST relative to the home
            dest = home / cmd[-1].split(":", 1)[1]
            shutil.copyfile(cmd[-2], dest)
    stage = home / install.REMOTE_STAGE
    assert stat.S_IMODE(stage.stat().st_mode) == 0o700
    log = (home / "sudo.log").read_text().splitlines()
    assert log[0] == str(home)  # sudo ran from the home, where the relative paths are
    assert log[1] == f"EDGE_VLA_PKG={install.REMOTE_STAGE}/rel-1.tar.gz"
    assert log[2] == f"EDGE_VLA_INSTALL_ARGS=--trusted-key {install.REMOTE_STAGE}/rel-1-key0.pub"
    assert log[3:] == ["sh", f"{install.REMOTE_STAGE}/rel-1/install.sh", "present"]
    assert (stage / "rel-1.tar.gz").read_bytes() == pkg.read_bytes()
    assert not (stage / "rel-1").exists()  # the unpacked copy is removed after the install
