"""`edge-vla package`: contents, determinism, the lock per target, units that systemd accepts."""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from edge_vla.cli import main as cli
from edge_vla.errors import BundleError, ConfigError
from edge_vla.provision import platforms, signing
from edge_vla.provision.robot_config import RobotConfig, parse_env

EXPECTED = {
    "bundle/graphs/prefix.onnx", "bundle/manifest.json", "bundle/reports/numerics.json", "config/robot.env",
    "install.sh", "package.json", "requirements.lock", "systemd/edge-vla-firstboot.service",
    "systemd/edge-vla.service", "udev/99-edge-vla.rules", "requirements.online.txt",
    "wheels/edge_vla-0.1.0-py3-none-any.whl",
}


def _members(pkg: Path) -> dict[str, bytes]:
    with tarfile.open(pkg) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def test_package_contents_and_metadata(build, bundle: Path, tmp_path: Path):
    result = build(bundle, tmp_path / "pkg.tar.gz", "agx-orin",
                           config=RobotConfig("can://can0", "sim", 100.0))
    files = _members(result.path)
    assert set(files) == EXPECTED
    meta = json.loads(files["package.json"])
    assert meta["platform"]["jetpack"]["tensorrt"] == "10.3.0"
    assert meta["platform"]["compute_capability"] == "8.7"
    assert meta["config"]["link"] == "can://can0"
    assert set(meta["files"]) == EXPECTED - {"package.json"}
    env = parse_env(files["config/robot.env"].decode())
    assert env == {"EDGE_VLA_LINK": "can://can0", "EDGE_VLA_CAMERA": "sim", "EDGE_VLA_RATE_HZ": "100",
                   "EDGE_VLA_EXTRA_ARGS": "", "EDGE_VLA_FOLLOWING_ERROR": "0.5", "EDGE_VLA_GRIPPER_JOINTS": "",
                   "EDGE_VLA_GRIPPER_EFFORT": "0", "EDGE_VLA_LINK_LOSS_CATEGORY": "0"}
    with tarfile.open(result.path) as tar:
        modes = {m.name: m.mode for m in tar.getmembers()}
        assert all(m.mtime == 0 and m.uid == 0 for m in tar.getmembers())
    assert modes["install.sh"] == 0o755 and modes["package.json"] == 0o644


def test_package_is_deterministic(build, bundle: Path, tmp_path: Path, keypair):
    a = build(bundle, tmp_path / "a.tar.gz", "orin-nano", sign_key=keypair[0])
    b = build(bundle, tmp_path / "b.tar.gz", "orin-nano", sign_key=keypair[0])
    assert a.path.read_bytes() == b.path.read_bytes()
    assert a.release == b.release and a.key_id is not None
    c = build(bundle, tmp_path / "c.tar.gz", "orin-nano", config=RobotConfig(rate_hz=100))
    assert c.release != a.release and c.bundle_hash == a.bundle_hash


def test_service_unit_runs_edge_vla_run_unprivileged_with_watchdog(build, bundle: Path, tmp_path: Path):
    files = _members(build(bundle, tmp_path / "p.tar.gz", "orin-nx", watchdog_sec=1.5).path)
    unit = files["systemd/edge-vla.service"].decode()
    for line in ("Type=notify", "NotifyAccess=all", "User=edge-vla", "SupplementaryGroups=dialout plugdev video", "Restart=on-failure",
                 "WatchdogSec=1.5", "StartLimitBurst=5", "EnvironmentFile=/etc/edge-vla/robot.env",
                 "Requires=edge-vla-firstboot.service", "LimitRTPRIO=95", "LimitMEMLOCK=infinity"):
        assert f"\n{line}\n" in unit, line
    assert "edge-vla run /opt/edge-vla/current/bundle --link ${EDGE_VLA_LINK}" in unit
    # A restarted service comes up disarmed: the unit serves the operator socket and never arms on start.
    for line in ("RuntimeDirectory=edge-vla", "RuntimeDirectoryMode=0750", "Restart=on-failure"):
        assert f"\n{line}\n" in unit, line
    exec_start = next(ln for ln in unit.splitlines() if ln.startswith("ExecStart="))
    settings = [ln for ln in unit.splitlines() if not ln.startswith("#")]
    assert "--arm-on-start" not in exec_start and not any("EDGE_VLA_ALLOW_ARM_ON_START" in ln for ln in settings)
    assert "comes up DISARMED with the firmware's" in unit and "edge-vla arm" in unit
    firstboot = files["systemd/edge-vla-firstboot.service"].decode()
    assert "ExecStart=/opt/edge-vla/current/venv/bin/edge-vla build-engines /opt/edge-vla/current/bundle" in firstboot
    assert "Before=edge-vla.service" in firstboot and "Type=oneshot" in firstboot
    assert "ConditionPathExists=!/opt/edge-vla/current/bundle/target/.firstboot-done" in firstboot
    cpu = _members(build(bundle, tmp_path / "c.tar.gz", "x86-cpu").path)
    cpu_firstboot = cpu["systemd/edge-vla-firstboot.service"].decode().split("[Service]")[1]
    assert "build-engines" not in cpu_firstboot
    # CPU targets time their backends at first boot; a failed tune ("-") must not keep the robot from starting
    assert "\nExecStart=-/opt/edge-vla/current/venv/bin/edge-vla tune /opt/edge-vla/current/bundle\n" in cpu_firstboot
    for text in (firstboot, cpu_firstboot, unit):  # the record is written and read in the same /var/lib/edge-vla
        assert "\nStateDirectory=edge-vla\n" in text


def test_udev_rule_symlink_and_ftdi_latency(build, bundle: Path, tmp_path: Path):
    from edge_vla.provision.package import UsbId

    files = _members(build(bundle, tmp_path / "p.tar.gz", "orin-nano",
                                   usb=UsbId("0483", "5740", "ABC123")).path)
    rules = files["udev/99-edge-vla.rules"].decode()
    assert 'ATTRS{idVendor}=="0483", ATTRS{idProduct}=="5740", ATTRS{serial}=="ABC123"' in rules
    assert 'SYMLINK+="edge-vla-motor"' in rules
    assert 'DRIVER=="ftdi_sio", ATTR{latency_timer}="1"' in rules
    with pytest.raises(ConfigError, match="4 lowercase hex"):
        build(bundle, tmp_path / "q.tar.gz", "orin-nano", usb=UsbId("xyz", "5740"))


@pytest.mark.parametrize("target, ort, cuda_python", [
    ("orin-nano", "onnxruntime-gpu>=1.18", "cuda-python<12.7,>=12.6.1"),
    ("thor", "onnxruntime-gpu>=1.18", "cuda-python<13.1,>=13.0"),
    ("x86-cpu", "onnxruntime>=1.18", None),
    ("x86-cuda", "onnxruntime-gpu>=1.18", "cuda-python<13,>=12.6.1"),
])
def test_lock_roots_come_from_the_wheels_own_requirements(edge_vla_wheel: Path, target: str, ort: str,
                                                          cuda_python: str | None):
    """Not a hand-kept pin table: the edge-vla wheel's Requires-Dist (pyproject.toml) per target."""
    from edge_vla.provision import wheelhouse

    plat = platforms.resolve(target)
    _, _, requires = wheelhouse.read_wheel_metadata(edge_vla_wheel)
    roots = wheelhouse.runtime_requirements(requires, plat)
    assert ort in roots and not any(r.startswith("onnxruntime") and r != ort for r in roots)
    assert {"pyserial>=3.5", "python-can>=4.3", "cobs>=1.2", "cryptography>=41"} <= set(roots)  # runtime + provision
    assert not any(r.startswith(("torch", "onnx>", "tensorrt", "pytest")) for r in roots)  # no workstation extras
    assert (cuda_python in roots) if cuda_python else not any("cuda" in r for r in roots)
    assert ("numpy<2" in plat.constraints) == (plat.jetpack is not None and plat.jetpack.version.startswith("6."))


def test_platform_tags_cover_every_manylinux_up_to_the_targets_glibc():
    from edge_vla.provision import wheelhouse

    orin = wheelhouse.platform_tags(platforms.resolve("orin-nano"))
    assert orin[:2] == ["linux_aarch64", "manylinux_2_35_aarch64"] and "manylinux_2_36_aarch64" not in orin
    assert {f"manylinux_2_{n}_aarch64" for n in range(17, 36)} | {"manylinux2014_aarch64"} <= set(orin)
    x86 = wheelhouse.platform_tags(platforms.resolve("x86-cpu", glibc="2.28"))
    assert {"manylinux_2_28_x86_64", "manylinux_2_5_x86_64", "manylinux1_x86_64", "manylinux2014_x86_64"} <= set(x86)
    assert "manylinux_2_29_x86_64" not in x86
    assert platforms.resolve("thor").glibc == "2.39"
    with pytest.raises(ConfigError, match="MAJOR.MINOR"):
        platforms.resolve("x86-cpu", glibc="2")


def test_jetpack_table_refuses_what_nvidia_does_not_ship():
    assert platforms.resolve("thor").jetpack.cuda == "13.0"
    assert {jp.tensorrt.split(".")[0] for jp in platforms.JETPACKS.values()} == {"10"}
    with pytest.raises(ConfigError, match=r"TensorRT 8\.6.*strongly typed.*6\.2"):
        platforms.resolve("orin-nano", "6.0")
    with pytest.raises(ConfigError, match="Thor only"):
        platforms.resolve("orin-nano", "7.0")
    with pytest.raises(ConfigError, match="not Thor"):
        platforms.resolve("thor", "6.2")
    with pytest.raises(ConfigError, match=r"ships Python 3\.10"):
        platforms.resolve("agx-orin", None, "3.12")
    with pytest.raises(ConfigError, match="Jetson targets only"):
        platforms.resolve("x86-cpu", "6.2")


def test_corrupt_bundle_is_not_packaged(build, bundle: Path, tmp_path: Path):
    (bundle / "graphs/prefix.onnx").write_bytes(b"changed")
    with pytest.raises(BundleError, match="does not match its sha256"):
        build(bundle, tmp_path / "p.tar.gz", "orin-nano")
    assert not (tmp_path / "p.tar.gz").exists()


def test_cli_keygen_sign_and_package(bundle: Path, tmp_path: Path, capsys, edge_vla_wheel: Path):
    key = tmp_path / "keys/robot"
    assert cli(["package", "--keygen", str(key)]) == 0
    out = tmp_path / "robot-pkg.tar.gz"
    assert cli(["package", str(bundle), "-o", str(out), "--target", "orin-nano", "--sign", str(key),
                "--link", "serial:///dev/ttyACM0", "--rate-hz", "100", "--pin", "numpy==1.26.3",
                "--online", "--edge-vla-wheel", str(edge_vla_wheel)]) == 0
    text = capsys.readouterr().out
    assert "signed by" in text and "release" in text and "ONLINE package" in text and "size" in text
    files = _members(out)
    online = files["requirements.online.txt"].decode()
    assert "numpy==1.26.3" in online and "numpy>=1.24" not in online
    assert "--extra-index-url https://pypi.jetson-ai-lab.io/jp6/cu126" in online
    assert files["requirements.lock"].decode().count("==") == 1  # only edge-vla, hash-pinned
    assert "package.sig" in files
    extracted = tmp_path / "x"
    with tarfile.open(out) as tar:
        tar.extractall(extracted, filter="data")
    assert signing.verify_bundle_signature(extracted / "bundle", [key.with_name("robot.pub")])
    assert cli(["package", str(bundle), "--target", "orin-nano", "--jetpack", "7.0", "-o", str(out),
                "--edge-vla-wheel", str(edge_vla_wheel)]) == 1
    assert "Thor only" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
@pytest.mark.parametrize("target", ["orin-nano", "x86-cpu"])
def test_units_pass_systemd_analyze_verify(build, bundle: Path, tmp_path: Path, target: str):
    files = _members(build(bundle, tmp_path / "p.tar.gz", target).path)
    # verify checks that ExecStart binaries exist; the venv only exists on the robot, so point it at a stub.
    stub = tmp_path / "bin/edge-vla"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)
    units = tmp_path / "units"
    units.mkdir()
    for name in ("edge-vla.service", "edge-vla-firstboot.service"):
        text = files[f"systemd/{name}"].decode().replace("/opt/edge-vla/current/venv/bin/edge-vla", str(stub))
        (units / name).write_text(text)
    proc = subprocess.run(["systemd-analyze", "verify", *map(str, sorted(units.iterdir()))],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not (proc.stdout + proc.stderr).strip(), proc.stdout + proc.stderr
