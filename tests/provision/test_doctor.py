"""`edge-vla doctor`: a coherent report on this machine, and each check against fake machines."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest

from edge_vla.cli import main as cli
from edge_vla.provision import doctor
from edge_vla.provision.doctor import FAIL, PASS, WARN, Expectation, Machine
from edge_vla.provision.platforms import resolve
from edge_vla.provision.robot_config import RobotConfig


def _fake_machine(tmp_path: Path, *, governor: str | None = "performance", clocksource: str = "tsc",
                  smi: str | None = None, modules: dict | None = None, tegra: str | None = None) -> Machine:
    sys_root, etc, proc = tmp_path / "sys", tmp_path / "etc", tmp_path / "proc"
    cs = sys_root / "devices/system/clocksource/clocksource0"
    cs.mkdir(parents=True)
    (cs / "current_clocksource").write_text(clocksource + "\n")
    (cs / "available_clocksource").write_text("tsc hpet acpi_pm\n")
    if governor:
        for cpu in ("cpu0", "cpu1"):
            d = sys_root / f"devices/system/cpu/{cpu}/cpufreq"
            d.mkdir(parents=True)
            (d / "scaling_governor").write_text(governor + "\n")
    etc.mkdir()
    if tegra:
        (etc / "nv_tegra_release").write_text(tegra)
    proc.mkdir()
    (proc / "meminfo").write_text("MemTotal: 8000000 kB\nMemAvailable: 6000000 kB\n")
    modules = modules or {}

    def import_module(name: str):
        if name in modules:
            return modules[name]
        raise ImportError(f"No module named {name!r}")

    return Machine(sys_root=sys_root, proc_root=proc, etc_root=etc, trusted_keys=tmp_path / "no-keys",
                   which=lambda cmd: "/usr/bin/nvidia-smi" if smi and cmd == "nvidia-smi" else None,
                   run=lambda cmd: smi if "--query-gpu=name,compute_cap,memory.free" in cmd else
                   "| NVIDIA-SMI 560.35  Driver Version: 560.35  CUDA Version: 12.6 |",
                   import_module=import_module)


def _ort(*providers: str):
    return types.SimpleNamespace(__version__="1.20.0", get_available_providers=lambda: list(providers))


def _by_name(checks):
    return {c.name: c for c in checks}


def test_doctor_on_this_machine_prints_a_coherent_report(build, bundle: Path, tmp_path: Path, capsys):
    pkg = build(bundle, tmp_path / "p.tar.gz", "x86-cpu",
                        config=RobotConfig(link="serial:///dev/null", camera="sim")).path
    code = cli(["doctor", str(pkg)])
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == f"edge-vla doctor: package {pkg}"
    names = [line.split()[1] for line in lines[1:-1] if not line.startswith(" ")]
    assert names[:2] == ["python", "bundle"] and {"rtprio", "memlock", "clocksource", "governor", "link"} <= set(names)
    for line in lines[1:-1]:
        assert line.split()[0] in {"PASS", "WARN", "FAIL", "fix:"}
    assert "PASS  bundle" in out and "PASS  tensorrt     not needed (CPU target)" in out
    summary = lines[-1]
    n_fail = int(summary.split(",")[2].split()[0])
    assert code == (1 if n_fail else 0)
    # Every line that does not pass carries a fix.
    status_lines = [i for i, line in enumerate(lines[1:-1], 1) if not line.startswith(" ")]
    for i in status_lines:
        if not lines[i].startswith("PASS"):
            assert lines[i + 1].strip().startswith("fix: "), lines[i]

    assert cli(["doctor", str(pkg), "--json"]) == code
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] == (code == 0) and all(c["status"] in {PASS, WARN, FAIL} for c in doc["checks"])


def test_doctor_without_a_package_checks_the_machine(capsys, monkeypatch, tmp_path: Path):
    monkeypatch.setattr(doctor, "INSTALLED", tmp_path / "nothing-installed")
    assert cli(["doctor"]) == 0  # nothing here can fail without a package
    assert "edge-vla doctor: this machine only" in capsys.readouterr().out


def test_gpu_target_on_a_matching_jetson(tmp_path: Path):
    exp = Expectation(platform=resolve("orin-nano").to_dict())
    m = _fake_machine(tmp_path, smi="Orin (nvgpu), 8.7, 5000", tegra="# R36 (release), REVISION: 4.3, GCID: 1\n",
                      modules={"onnxruntime": _ort("TensorrtExecutionProvider", "CUDAExecutionProvider"),
                               "tensorrt": types.SimpleNamespace(__version__="10.3.0.30")})
    checks = _by_name(doctor.run_checks(exp, m))
    assert {k: c.status for k, c in checks.items() if k in {"onnxruntime", "tensorrt", "cuda", "gpu", "l4t",
                                                            "clocksource", "governor"}} == dict.fromkeys(
        ["onnxruntime", "tensorrt", "cuda", "gpu", "l4t", "clocksource", "governor"], PASS)
    assert "compute capability 8.7, 5000 MiB free" in checks["gpu"].detail


def test_gpu_target_mismatches_warn_or_fail_with_fixes(tmp_path: Path):
    exp = Expectation(platform=resolve("thor").to_dict())
    m = _fake_machine(tmp_path, smi="NVIDIA GeForce RTX 4090, 8.9, 20000", governor="powersave",
                      clocksource="hpet", modules={"onnxruntime": _ort("CPUExecutionProvider"),
                                                   "tensorrt": types.SimpleNamespace(__version__="10.3.0")},
                      tegra="# R36 (release), REVISION: 4.3\n")
    checks = _by_name(doctor.run_checks(exp, m))
    assert checks["gpu"].status == FAIL and "11.0" in checks["gpu"].detail
    assert checks["onnxruntime"].status == WARN and "sbsa/cu130" in checks["onnxruntime"].fix
    assert checks["tensorrt"].status == WARN and "build-engines" in checks["tensorrt"].fix
    assert checks["cuda"].status == WARN and "13.0" in checks["cuda"].detail
    assert checks["l4t"].status == WARN
    assert checks["clocksource"].status == WARN and "echo tsc" in checks["clocksource"].fix
    assert checks["governor"].status == WARN and "jetson_clocks" in checks["governor"].fix
    assert all(c.fix for c in checks.values() if c.status != PASS)


def test_missing_onnxruntime_fails(tmp_path: Path):
    checks = _by_name(doctor.run_checks(Expectation(), _fake_machine(tmp_path)))
    assert checks["onnxruntime"].status == FAIL
    assert checks["gpu"].status == WARN and checks["tensorrt"].status == WARN  # unknown target: warn, not fail


def test_link_checks(tmp_path: Path):
    m = _fake_machine(tmp_path)
    can = tmp_path / "sys/class/net/can0"
    can.mkdir(parents=True)
    (can / "operstate").write_text("down\n")

    def link(url: str, user: str | None = None):
        return doctor.check_link(Expectation(config=RobotConfig(link=url), user=user), m)

    assert link("can://can0").status == FAIL and "ip link set can0 up" in link("can://can0").fix
    (can / "operstate").write_text("up\n")
    assert link("can://can0").status == PASS
    assert link("can://can9").status == FAIL
    missing = link("serial:///dev/edge-vla-motor")
    assert missing.status == FAIL and "idVendor" in missing.fix
    assert link("serial:///dev/null").status == PASS  # crw-rw-rw-
    assert link("serial:///dev/null", user="root").status == PASS
    assert link("serial:///dev/null", user="no-such-user-xyz").status == FAIL
    plain = tmp_path / "plain"
    plain.write_text("")
    assert link(f"serial://{plain}").status == FAIL


def test_servo_bus_links_are_provisionable_and_doctor_says_what_protects_the_arm(tmp_path: Path):
    """A robot config may name a servo bus (the SO-101's Feetech, a Koch's Dynamixel): doctor checks its device
    like a serial port, its SDK, and says in a WARN line that a Feetech bus has no watchdog."""
    import importlib

    real = _fake_machine(tmp_path, modules={"dynamixel_sdk": importlib.import_module("dynamixel_sdk"),
                                            "scservo_sdk": importlib.import_module("scservo_sdk")})
    bare = _fake_machine(tmp_path / "bare")

    def checks(url: str, m: Machine):
        exp = Expectation(config=RobotConfig(link=url, rate_hz=100).validate())
        return _by_name([doctor.check_link(exp, m), *doctor.check_motor_bus(exp, m)])

    feetech = checks("feetech:///dev/null?ids=1-6", real)
    assert feetech["link"].status == PASS and "/dev/null" in feetech["link"].detail
    assert feetech["motor-sdk"].status == PASS
    assert feetech["motor-watchdog"].status == WARN and "NO communication watchdog" in feetech["motor-watchdog"].detail
    assert "E-stop" in feetech["motor-watchdog"].fix
    dxl = checks("dynamixel:///dev/null?ids=1-6&baud=1000000", real)
    assert dxl["motor-watchdog"].status == PASS and "torque ON" in dxl["motor-watchdog"].detail
    # Control: without the SDK the same config fails, naming the extra that installs it.
    missing = checks("feetech:///dev/null?ids=1-6", bare)["motor-sdk"]
    assert missing.status == FAIL and "--extras feetech" in missing.fix
    assert checks("feetech:///dev/ttyUSB77?ids=1-6", real)["link"].status == FAIL  # absent device: as for serial://
    # The firmware link gets no motor lines.
    assert doctor.check_motor_bus(Expectation(config=RobotConfig(link="serial:///dev/null")), real) == []


@pytest.mark.parametrize(("link", "rate", "message"), [
    ("feetech:///dev/ttyUSB0?ids=1-300", 50, "outside 0..253"),  # Feetech STS/SMS ids are 0..253
    ("dynamixel://?ids=1-6", 50, "names no port"),
    ("ethercat://eth0", 50, "feetech:///dev/DEVICE"),
    ("feetech:///dev/ttyUSB0?ids=1-6", 200, "EDGE_VLA_RATE_HZ=100"),
])
def test_bad_servo_bus_configs_are_refused_in_one_line(link: str, rate: float, message: str):
    from edge_vla.errors import ConfigError

    with pytest.raises(ConfigError, match=message) as info:
        RobotConfig(link=link, rate_hz=rate).validate()
    assert "\n" not in str(info.value)


def test_bad_bundle_fails(bundle: Path, tmp_path: Path):
    (bundle / "graphs/prefix.onnx").write_bytes(b"changed")
    check = doctor.check_bundle(Expectation(bundle_root=bundle), _fake_machine(tmp_path))
    assert check.status == FAIL and "sha256" in check.detail


def test_trusted_keys_on_the_machine_are_enforced(bundle: Path, tmp_path: Path, keypair):
    m = _fake_machine(tmp_path)
    m.trusted_keys.mkdir()
    (m.trusted_keys / "k.pub").write_bytes(keypair[1].read_bytes())
    assert doctor.check_bundle(Expectation(bundle_root=bundle), m).status == FAIL  # unsigned
    from edge_vla.provision.signing import sign_bundle

    sign_bundle(bundle, keypair[0])
    assert doctor.check_bundle(Expectation(bundle_root=bundle), m).status == PASS
    # a key others can write: the service refuses to trust it, so doctor says so rather than pass (old: PASS)
    (m.trusted_keys / "k.pub").chmod(0o666)
    check = doctor.check_bundle(Expectation(bundle_root=bundle), m)
    assert check.status == FAIL and "writable by group or others" in check.detail, check


@pytest.mark.parametrize("what", ["bundle-dir", "package-dir"])
def test_expectation_sources(build, bundle: Path, tmp_path: Path, what: str):
    if what == "bundle-dir":
        with doctor.expectation_for(bundle) as exp:
            assert exp.bundle_root == bundle and exp.platform is None
    else:
        pkg = build(bundle, tmp_path / "p.tar.gz", "agx-orin").path
        from edge_vla.provision.rootfs import open_package

        staged = open_package(pkg, tmp_path / "unpacked")
        with doctor.expectation_for(staged.dir) as exp:
            assert exp.platform["target"] == "agx-orin" and exp.user == "edge-vla"
            assert exp.config.link == "serial:///dev/edge-vla-motor"


def test_engines_built_but_tensorrt_backend_unavailable_fails(bundle: Path, tmp_path: Path):
    """What `--backend auto` would silently do (run onnxruntime) is a failure doctor names."""
    engines = bundle / "target/engines"
    engines.mkdir(parents=True)
    (engines / "index.json").write_text("{}\n")
    exp = Expectation(platform=resolve("orin-nano").to_dict(), bundle_root=bundle)
    check = doctor.check_tensorrt(exp, _fake_machine(tmp_path / "m1", modules={"tensorrt": types.SimpleNamespace(
        __version__="10.3.0")}))
    assert check.status == FAIL and "engines built but TensorRT backend unavailable" in check.detail
    assert "cuda.bindings" in check.detail and "--setup-venv" in check.fix
    both = {"tensorrt": types.SimpleNamespace(__version__="10.3.0"), "cuda.bindings": types.SimpleNamespace()}
    assert doctor.check_tensorrt(exp, _fake_machine(tmp_path / "m2", modules=both)).status == PASS
    (engines / "index.json").unlink()  # no engines: TensorRT missing is only slower, a warning
    assert doctor.check_tensorrt(exp, _fake_machine(tmp_path / "m3")).status == WARN


def test_lock_check_without_a_venv_says_where_to_run_it(build, bundle: Path, tmp_path: Path):
    pkg = build(bundle, tmp_path / "p.tar.gz", "x86-cpu").path
    with doctor.expectation_for(pkg) as exp:
        check = doctor.check_lock(exp, Machine())
    assert exp.lock is not None and [e.name for e in exp.lock] == ["edge-vla"]
    assert check.status == PASS and "run doctor there" in check.detail


def test_lock_check_reports_versions_that_differ_from_the_lock():
    """Against this interpreter's own environment (a venv in `make test`), through its real python."""
    import sys

    from edge_vla.provision.lock import LockEntry

    exp = Expectation(lock=[LockEntry("edge-vla", "9.9.9"), LockEntry("numpy", "0.0.1"),
                            LockEntry("not-a-real-distribution", "1.0")], venv=Path(sys.prefix))
    check = doctor.check_lock(exp, Machine())
    assert check.status == FAIL, check
    assert "edge-vla 0.1.0 installed, lock 9.9.9" in check.detail
    assert "not-a-real-distribution missing (lock 1.0)" in check.detail
    assert "numpy" in check.detail and "--setup-venv" in check.fix


def _dist(site: Path, name: str, version: str) -> None:
    """Install a distribution record the way pip does (NAME-VERSION.dist-info/METADATA)."""
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "RECORD").write_text("")


@pytest.fixture(scope="module")
def bare_venv(tmp_path_factory) -> Path:
    """A real venv (no pip), the way install.sh makes the release's: what is in it is what we put there."""
    import subprocess
    import sys

    venv = tmp_path_factory.mktemp("venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    return venv


def _site(venv: Path) -> Path:
    return next(venv.glob("lib/python3.*/site-packages"))


@pytest.fixture
def venv(bare_venv: Path, tmp_path: Path) -> Path:
    """This test's own copy of the bare venv (copying is faster than making one)."""
    import shutil

    copy = tmp_path / "venv"
    shutil.copytree(bare_venv, copy, symlinks=True)
    assert not list(_site(copy).glob("*.dist-info"))
    return copy


def _bootstrap_versions(venv: Path) -> dict[str, str]:
    """What this interpreter's ensurepip bundles (install.sh's venv bootstrap)."""
    import subprocess

    out = subprocess.run([str(venv / "bin/python"), "-I", "-c", "import ensurepip, json; print(json.dumps("
                          "{n: p.version for n, p in ensurepip._get_packages().items()}))"],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def test_lock_check_fails_on_distributions_the_lock_does_not_list(venv: Path):
    from edge_vla.provision.lock import LockEntry

    site = _site(venv)
    _dist(site, "locked-thing", "1.0")
    _dist(site, "smuggled-thing", "6.6.6")
    lock = [LockEntry("locked-thing", "1.0")]
    check = doctor.check_lock(Expectation(lock=lock, venv=venv), Machine())
    assert check.status == FAIL, check
    assert "not in the lock: smuggled-thing 6.6.6" in check.detail and "locked-thing" not in check.detail
    assert "--setup-venv" in check.fix
    # Control: the same venv passes once the lock lists everything in it.
    check = doctor.check_lock(Expectation(lock=[*lock, LockEntry("smuggled-thing", "6.6.6")], venv=venv),
                              Machine())
    assert check.status == PASS, check


def test_lock_check_exempts_only_the_venv_bootstrap_at_its_bundled_version(venv: Path):
    import shutil

    from edge_vla.provision.lock import LockEntry

    site = _site(venv)
    boot = _bootstrap_versions(venv)
    assert "pip" in boot
    for name, version in boot.items():  # what ensurepip put there (pip; setuptools too on Python <= 3.11)
        _dist(site, name, version)
    exp = Expectation(lock=[LockEntry("edge-vla", "0.1.0")], venv=venv)
    _dist(site, "edge-vla", "0.1.0")
    check = doctor.check_lock(exp, Machine())
    assert check.status == PASS and "bootstrap" in check.detail and "pip " + boot["pip"] in check.detail, check
    # wheel is never part of the bootstrap; a pip that is not ensurepip's is not either.
    _dist(site, "wheel", "0.45.1")
    shutil.rmtree(next(site.glob("pip-*.dist-info")))
    _dist(site, "pip", "1.0")
    check = doctor.check_lock(exp, Machine())
    assert check.status == FAIL and "not in the lock: pip 1.0, wheel 0.45.1" in check.detail, check


def test_lock_check_only_warns_about_an_online_packages_unlocked_dependencies(venv: Path):
    from edge_vla.provision.lock import LockEntry

    _dist(_site(venv), "edge-vla", "0.1.0")
    _dist(_site(venv), "numpy", "2.0.0")  # what requirements.online.txt fetched
    exp = Expectation(lock=[LockEntry("edge-vla", "0.1.0")], venv=venv, online=True)
    check = doctor.check_lock(exp, Machine())
    assert check.status == WARN and "unverified: numpy 2.0.0" in check.detail and "--online" in check.fix, check
    exp.online = False  # control: the same venv under an offline package's lock fails
    assert doctor.check_lock(exp, Machine()).status == FAIL


def test_a_misspelt_target_names_what_doctor_takes(tmp_path: Path, capsys):
    """`edge-vla doctor runs/demo/bundle_int9` answered "package ... does not exist; make one with edge-vla package
    BUNDLE -o runs/demo/bundle_int9": advice to write a package over the bundle name that was mistyped."""
    from edge_vla.cli import main as cli

    missing = tmp_path / "bundle_int9"
    assert cli(["doctor", str(missing)]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"{missing} does not exist" in err and "bundle" in err and "edge-vla package" not in err, err
