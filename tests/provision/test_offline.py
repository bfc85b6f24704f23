"""Offline robot packages, with real pip and real wheels from PyPI (downloaded once per session; pip's
cache makes later sessions cheap): resolve, download, install with no network, run, and refuse tampering.

The install path runs in a network namespace with no interfaces (`unshare --net`) where the machine
allows it, and always with every pip source pointed at a closed local port, so any attempt to reach
an index fails the test.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import parse_wheel_filename
from service_user import as_service_user, why_no_service_user

from edge_vla.errors import BundleError
from edge_vla.optional import _EXTRAS
from edge_vla.provision import install, platforms, wheelhouse
from edge_vla.provision import rootfs as rfs
from edge_vla.provision.errors import PackageError
from edge_vla.provision.lock import canonical_name, parse_lock
from edge_vla.provision.package import build_package
from edge_vla.provision.robot_config import RobotConfig
from edge_vla.provision.tarball import write_tarball

pytestmark = pytest.mark.slow
HERE_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"
HERE_GLIBC = os.confstr("CS_GNU_LIBC_VERSION").split()[-1]  # "glibc 2.36" -> "2.36"
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # what units run with


@pytest.fixture(scope="session")
def pypi() -> None:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
    except OSError as exc:
        pytest.skip(f"PyPI unreachable ({exc}): building a target wheelhouse downloads wheels from pypi.org")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def offline_env() -> dict[str, str]:
    """The environment of a robot with no network, where pip is told to use indexes that do not answer."""
    dead = f"http://127.0.0.1:{_closed_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and "proxy" not in k.lower()}
    env.update(PIP_INDEX_URL=f"{dead}/simple", PIP_EXTRA_INDEX_URL=f"{dead}/extra", PIP_NO_INDEX="1",
               http_proxy=dead, https_proxy=dead, HTTP_PROXY=dead, HTTPS_PROXY=dead, PYTHONDONTWRITEBYTECODE="1")
    env.pop("PYTHONPATH", None)
    # The first-boot unit runs install.sh with systemd's PATH, so the venv is made from the system's
    # python3.X, which the service user can run (a developer's pyenv under /root is not reachable).
    if shutil.which(f"python{HERE_PYTHON}", path=SYSTEMD_PATH):
        env["PATH"] = f"{SYSTEMD_PATH}:{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="session")
def no_network() -> list[str]:
    """A command prefix that runs without any network interface, where the kernel allows it."""
    if shutil.which("unshare") and subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode == 0:
        return ["unshare", "--net"]
    return []


def _run(cmd: list[str], env: dict[str, str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


def _run_as_service(cmd: list[str], env: dict[str, str], cwd: Path, timeout: float = 300,
                    outside: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """A robot-side step the service (or an operator) runs: unprivileged, as edge-vla.service does.
    `outside` (e.g. `unshare --net`) wraps the privilege drop. Without root or setpriv it runs as the
    current user (the test then cannot catch root-only files)."""
    if why_no_service_user() is None:
        return as_service_user(cmd, cwd=cwd, timeout=timeout, env=env, outside=outside or [])
    return _run([*(outside or []), *cmd], env, cwd, timeout)


@pytest.fixture(scope="session")
def x86_package(pypi, tiny_bundle: Path, edge_vla_wheel: Path, keypair, tmp_path_factory) -> Path:
    """A signed x86-cpu package of a real bundle, for this machine's Python and glibc."""
    out = tmp_path_factory.mktemp("x86-pkg") / "robot-pkg.tar.gz"
    return build_package(tiny_bundle, out, "x86-cpu", python=HERE_PYTHON, glibc=HERE_GLIBC, sign_key=keypair[0],
                         edge_vla_wheel=edge_vla_wheel, config=RobotConfig(camera="sim")).path


@pytest.fixture(scope="session")
def orin_wheelhouse(pypi, edge_vla_wheel: Path, tmp_path_factory) -> wheelhouse.Wheelhouse:
    plat = platforms.resolve("orin-nano")
    _, _, requires = wheelhouse.read_wheel_metadata(edge_vla_wheel)
    roots = wheelhouse.runtime_requirements(requires, plat)
    return wheelhouse.download(roots, plat, wheelhouse.Sources(), tmp_path_factory.mktemp("orin-wheels"),
                               plat.constraints)


def _tree(root: Path) -> dict[str, str]:
    """Every path with its content hash or link target: to assert 'nothing changed'."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = ("-> " + os.readlink(p) if p.is_symlink() else
                    hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
    return out


def _members(pkg: Path) -> dict[str, bytes]:
    with tarfile.open(pkg) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def _rezip(wheel: bytes) -> bytes:
    """The same wheel, still valid and installable, but other bytes (so another sha256)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(wheel)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    return out.getvalue()


def _write_package(files: dict[str, bytes], out: Path, *, fix_files: bool, fix_lock: bool = False) -> Path:
    """Rewrite a package after its files changed: optionally recompute package.json's file hashes
    (and the lock and wheel list), leaving the signature as it was."""
    meta = json.loads(files["package.json"])
    if fix_lock:
        for fname, info in meta["wheels"].items():
            digest = hashlib.sha256(files[f"wheels/{fname}"]).hexdigest()
            lock = files["requirements.lock"].decode().replace(info["sha256"], digest)
            files["requirements.lock"] = lock.encode()
            info["sha256"] = digest
    if fix_files:
        meta["files"] = {k: hashlib.sha256(v).hexdigest() for k, v in sorted(files.items())
                         if k not in ("package.json", "package.sig")}
    files["package.json"] = (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()
    return write_tarball(out, files)


# --- x86: install with no network and run ----------------------------------------------------------------

def test_x86_package_installs_offline_and_runs(x86_package: Path, rootfs: Path, tmp_path: Path, keypair,
                                               offline_env, no_network):
    files = _members(x86_package)
    lock = parse_lock(files["requirements.lock"].decode())
    meta = json.loads(files["package.json"])
    names = {e.name for e in lock}
    assert {"edge-vla", "numpy", "onnxruntime", "pyserial", "python-can", "cobs", "cryptography"} <= names
    assert all(len(e.hashes) == 1 for e in lock)
    assert {f"wheels/{f}" for f in meta["wheels"]} == {k for k in files if k.startswith("wheels/")}
    assert {w["name"] for w in meta["wheels"].values()} == names
    assert all(meta["files"][f"wheels/{f}"] == w["sha256"] for f, w in meta["wheels"].items())

    root = rootfs
    install.install_rootfs(x86_package, root, trusted_keys=[keypair[1]])
    rel = root / "opt/edge-vla/current"
    # What edge-vla-firstboot.service runs on the robot, with every index unreachable.
    proc = _run([*no_network, "sh", str(rel / "install.sh"), "--setup-venv"], offline_env, tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for leak in ("/opt/wheels", "/opt/pypi", "127.0.0.1"):  # this machine's pip.conf and the dead indexes
        assert leak not in proc.stdout + proc.stderr
    venv = rel / "venv"
    # From here on, what edge-vla.service (User=edge-vla, WorkingDirectory=current) and operators run:
    # as an unprivileged user, in the release (install.sh above ran as root, as the first-boot unit's "+" does).
    version = _run_as_service([str(venv / "bin/edge-vla"), "--version"], offline_env, rel)
    assert version.returncode == 0 and "0.1.0" in version.stdout, version.stderr
    where = _run_as_service([str(venv / "bin/python"), "-c", "import edge_vla, numpy, onnxruntime, serial, cobs\n"
                             "print('\\n'.join(m.__file__ for m in (edge_vla, numpy, onnxruntime, serial, cobs)))"],
                            offline_env, rel)
    assert where.returncode == 0, where.stderr
    for path in where.stdout.split():  # the locked copies, not the system's (--ignore-installed)
        assert Path(path).resolve().is_relative_to(venv.resolve()), path

    run = _run_as_service([str(venv / "bin/edge-vla"), "run", str(rel / "bundle"), "--emulate", "--duration", "1",
                           "--arm-on-start", "--json"], offline_env, rel, timeout=180, outside=no_network)
    # 0, or 3 when the watchdog tripped (on a loaded 2-core machine a heartbeat can starve): either way
    # the installed runtime loaded the bundle, ran inference and drove the link; 1 would be a crash.
    assert run.returncode in (0, 3), run.stdout[-2000:] + run.stderr[-3000:]
    summary = json.loads(run.stdout[run.stdout.index("{"):])
    assert "control loop ready" in run.stderr and '"chunks"' in run.stdout, run.stdout[-2000:]
    assert "error" not in summary

    # What the CPU target's first-boot unit runs next (ExecStart=-... edge-vla tune, StateDirectory=edge-vla): the
    # service user times the installed backends and records the choice where edge-vla.service will read it.
    state = root / "var/lib/edge-vla"  # inside the rootfs, which the service user can reach (tmp_path is root's)
    state.mkdir(parents=True, exist_ok=True)
    if why_no_service_user() is None:
        os.chown(state, 65534, 65534)
    unit_env = {k: v for k, v in offline_env.items() if k != "EDGE_VLA_STATE_DIR"} | {"STATE_DIRECTORY": str(state)}
    tune = _run_as_service([str(venv / "bin/edge-vla"), "tune", str(rel / "bundle"), "--rounds", "2"], unit_env, rel,
                           timeout=300, outside=no_network)
    assert tune.returncode == 0, tune.stdout[-2000:] + tune.stderr[-3000:]
    records = list((state / "tune").glob("*.json"))
    assert len(records) == 1 and json.loads(records[0].read_text())["choice"]["backend"] == "onnxruntime", records

    doctor = _doctor(venv, rel, unit_env, tmp_path)
    assert doctor["lock"]["status"] == "pass", doctor["lock"]
    assert doctor["tune"]["status"] == "pass", doctor["tune"]

    # A locked wheel gone from the venv: the system's copy (through --system-site-packages) serves it.
    gone = _run([str(venv / "bin/python"), "-m", "pip", "uninstall", "-y", "-q", "cobs"],
                offline_env | {"PIP_CONFIG_FILE": os.devnull}, tmp_path)
    assert gone.returncode == 0, gone.stderr
    check = _doctor(venv, rel, offline_env, tmp_path)["lock"]
    assert check["status"] == "fail", check
    assert "shadowed by a system package" in check["detail"] or "cobs missing" in check["detail"]


def _doctor(venv: Path, target: Path, env: dict[str, str], cwd: Path) -> dict[str, dict]:
    proc = _run_as_service([str(venv / "bin/edge-vla"), "doctor", str(target), "--json"], env, target)
    return {c["name"]: c for c in json.loads(proc.stdout)["checks"]}


# --- tampering ---------------------------------------------------------------------------------------------

def test_tampered_wheels_are_refused_and_the_robot_keeps_its_release(build, bundle: Path, rootfs: Path,
                                                                     tmp_path: Path, keypair):
    # A small (online) package keeps this quick: it ships one wheel, edge-vla's own.
    signed = build(bundle, tmp_path / "p.tar.gz", "x86-cpu", sign_key=keypair[0]).path
    first = install.install_rootfs(signed, rootfs, trusted_keys=[keypair[1]])
    before = _tree(rootfs)
    files = _members(signed)
    files["config/robot.env"] = RobotConfig(rate_hz=10).to_env().encode()  # otherwise a genuinely new release
    wheel = next(k for k in files if k.startswith("wheels/"))
    files[wheel] = _rezip(files[wheel])  # a valid wheel, another sha256

    # Swapped, with package.json's file hashes made to match: the lock and the wheel list still disagree.
    swapped = _write_package(dict(files), tmp_path / "swapped.tar.gz", fix_files=True)
    with pytest.raises(PackageError, match=rf"{wheel.removeprefix('wheels/')} does not match its sha256"):
        install.install_rootfs(swapped, rootfs)
    # Lock, wheel list and file hashes all agree again: only the signature over package.json can tell.
    edited = _write_package(dict(files), tmp_path / "edited.tar.gz", fix_files=True, fix_lock=True)
    assert rfs.open_package(edited, tmp_path / "x").meta["wheels"]  # consistent without keys...
    with pytest.raises(BundleError, match=r"bad signature: package\.json does not match"):
        install.install_rootfs(edited, rootfs, trusted_keys=[keypair[1]])  # ...refused with them
    assert _tree(rootfs) == before and rfs.current_release(rootfs) == first.release


def test_install_sh_refuses_a_swapped_wheel(x86_package: Path, tmp_path: Path, offline_env, no_network):
    unpacked = tmp_path / "pkg"
    with tarfile.open(x86_package) as tar:
        tar.extractall(unpacked, filter="data")
    cobs = next((unpacked / "wheels").glob("cobs-*.whl"))
    cobs.write_bytes(_rezip(cobs.read_bytes()))  # a valid wheel, another sha256
    proc = _run([*no_network, "sh", str(unpacked / "install.sh"), "--setup-venv"], offline_env, tmp_path)
    assert proc.returncode != 0
    assert "DO NOT MATCH THE HASHES" in proc.stderr and cobs.name.split("-")[0] in proc.stderr, proc.stderr[-2000:]
    assert not (unpacked / "venv/bin/edge-vla").exists() and not (unpacked / "venv/.edge-vla-lock.sha256").exists()


# --- Jetson: aarch64 wheels, and what cannot be fetched -----------------------------------------------------

def test_orin_wheelhouse_holds_an_aarch64_wheel_for_every_lock_entry(orin_wheelhouse, edge_vla_wheel: Path):
    plat = platforms.resolve("orin-nano")
    ok = wheelhouse.supported_tags(plat)
    assert orin_wheelhouse.wheels
    for w in orin_wheelhouse.wheels:
        tags = {str(t) for t in parse_wheel_filename(w.path.name)[3]}
        assert tags & {str(t) for t in ok}, (w.path.name, "not installable on aarch64 CPython 3.10 glibc 2.35")
        assert all(t.rsplit("-", 1)[1] == "any" or t.endswith("aarch64") for t in tags), w.path.name
        assert hashlib.sha256(w.path.read_bytes()).hexdigest() == w.sha256
    names = {w.name for w in orin_wheelhouse.wheels}
    _, _, requires = wheelhouse.read_wheel_metadata(edge_vla_wheel)
    roots = {canonical_name(Requirement(r).name) for r in wheelhouse.runtime_requirements(requires, plat)}
    # Everything on PyPI is there (cuda-python for the TensorRT backend too); onnxruntime-gpu is named.
    assert [m.requirement for m in orin_wheelhouse.missing] == ["onnxruntime-gpu>=1.18"]
    assert roots - names == {"onnxruntime-gpu"}
    cuda = next(w for w in orin_wheelhouse.wheels if w.name == "cuda-python")
    assert cuda.version.startswith("12.6.") and cuda.version != "12.6.0"
    assert next(w for w in orin_wheelhouse.wheels if w.name == "numpy").version.startswith("1.")  # NVIDIA's ORT
    # The set is closed under the target's own markers (pip evaluates them for this machine).
    needed, unmet = wheelhouse._closure([w.path for w in orin_wheelhouse.wheels], sorted(roots - {"onnxruntime-gpu"}),
                                        plat)
    assert not unmet and len(needed) == len(orin_wheelhouse.wheels)
    fix = orin_wheelhouse.missing[0].fix
    assert "https://pypi.jetson-ai-lab.io/jp6/cu126" in fix and "--wheels" in fix and "linux_aarch64" in fix


def test_package_step_names_every_wheel_it_cannot_fetch(orin_wheelhouse, bundle: Path, edge_vla_wheel: Path,
                                                        tmp_path: Path):
    # Resolved from the wheelhouse above alone (--no-index --wheels DIR): no network needed here.
    out = tmp_path / "orin.tar.gz"
    with pytest.raises(PackageError) as err:
        build_package(bundle, out, "orin-nano", edge_vla_wheel=edge_vla_wheel, index_url=None,
                      wheels=[orin_wheelhouse.dir], pins={"cobs": "1.2.2"})  # 1.2.2 is an sdist only
    text = str(err.value)
    assert "2 locked requirement(s)" in text and "nothing written" in text
    assert "onnxruntime-gpu>=1.18: no wheel for CPython 3.10 on aarch64" in text
    assert "--index-url https://pypi.jetson-ai-lab.io/jp6/cu126" in text
    assert "cobs==1.2.2: no wheel" in text and "pip saw versions: 1.2.0" in text
    assert "pip wheel --no-deps 'cobs==1.2.2'" in text and "--pin cobs==VERSION" in text
    assert not out.exists()


def test_every_robot_side_import_is_satisfied_by_the_lock(x86_package: Path, edge_vla_wheel: Path, tmp_path: Path):
    files = _members(x86_package)
    provided: set[str] = set()
    for name, data in files.items():
        if name.startswith("wheels/"):
            (tmp_path / Path(name).name).write_bytes(data)
            provided |= wheelhouse.wheel_top_level(tmp_path / Path(name).name)
    assert {"numpy", "onnxruntime", "serial", "can", "cobs", "cryptography", "edge_vla", "firmware_bridge"} <= provided
    hard, lazy = _robot_imports(edge_vla_wheel)
    stdlib = set(sys.stdlib_module_names)
    unmet_hard = sorted(f"{m} ({where})" for m, where in hard.items() if m not in stdlib and m not in provided)
    unmet_lazy = sorted(f"{m} ({where})" for m, where in lazy.items()
                        if m not in stdlib and m not in provided and m not in _EXTRAS)
    assert not unmet_hard, f"imported at module level on the robot but not in the lock: {unmet_hard}"
    assert not unmet_lazy, f"imported lazily but neither locked nor a named extra in optional.py: {unmet_lazy}"


def _robot_imports(wheel: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Top-level modules imported by the robot side of the wheel (all of it but edge_vla/export):
    ({module: file} at module level, unconditionally; {module: file} inside functions or try blocks)."""
    hard: dict[str, str] = {}
    lazy: dict[str, str] = {}
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if not name.endswith(".py") or name.startswith("edge_vla/export/"):
                continue
            tree = ast.parse(zf.read(name), filename=name)
            # A module-level require("x") (edge_vla.optional) gates the module behind x's extra: such a module
            # is only imported by the command that needs the extra, so its imports of x count as lazy.
            required = {n.value.args[0].value for n in tree.body
                        if isinstance(n, ast.Expr) and isinstance(n.value, ast.Call)
                        and getattr(n.value.func, "id", None) == "require" and n.value.args
                        and isinstance(n.value.args[0], ast.Constant)}
            top_level = {id(n) for n in tree.body}
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    mods = [node.module]
                else:
                    continue
                for mod in mods:
                    top = mod.split(".")[0]
                    (hard if id(node) in top_level and top not in required else lazy).setdefault(top, name)
    return hard, lazy


def test_target_markers_not_this_machines_decide_the_closure(orin_wheelhouse, tmp_path: Path):
    """pip evaluates markers for the interpreter running it (pypa/pip#11198); the target's win here.
    cryptography needs typing-extensions only below Python 3.11: the Orin's 3.10 gets it."""
    plat = platforms.resolve("orin-nano")
    crypto = next(w for w in orin_wheelhouse.wheels if w.name == "cryptography")
    house = wheelhouse.download([f"cryptography=={crypto.version}"], plat,
                                wheelhouse.Sources(index_url=None, find_links=(orin_wheelhouse.dir,)), tmp_path / "w")
    names = {w.name for w in house.wheels}
    # Without the re-walk, pip on Python >= 3.11 leaves typing-extensions out.
    assert names == {"cryptography", "cffi", "pycparser", "typing-extensions"}, names
