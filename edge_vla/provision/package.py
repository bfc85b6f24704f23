"""`edge-vla package BUNDLE -o robot-pkg.tar.gz --target T`: a bundle plus everything to run it on a robot.

Package layout (a deterministic .tar.gz; see tarball.py):
    package.json                        format, platform row, bundle hash, config, wheels, sha256 of every file
    package.sig                         with --sign: Ed25519 signature over package.json (so over every wheel)
    bundle/                             the verified bundle (+ manifest.sig with --sign); never its target/
    wheels/*.whl                        the edge-vla wheel and every locked dependency, for the target's tags
    requirements.lock                   name==version --hash=sha256:... for every wheel (lock.py)
    requirements.online.txt             --online packages only: dependencies the robot fetches from an index
    install.sh                          on-robot installer and first-boot venv maker (offline, hash-checked)
    systemd/edge-vla.service            the policy service (Type=notify, watchdog, restart limit)
    systemd/edge-vla-firstboot.service  venv + TensorRT engines (timing cache in bundle/target) before it
    udev/99-edge-vla.rules              /dev/edge-vla-motor symlink, FTDI low latency
    config/robot.env                    -> /etc/edge-vla/robot.env
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_vla import __version__
from edge_vla.bundle import MANIFEST, SIGNATURE, Bundle, sha256_file
from edge_vla.errors import ConfigError
from edge_vla.optional import require
from edge_vla.provision import platforms, signing
from edge_vla.provision.errors import PackageError
from edge_vla.provision.lock import LOCK_FILE, ONLINE_FILE, WHEELS_DIR, LockEntry, canonical_name, lock_text
from edge_vla.provision.render import render_template
from edge_vla.provision.robot_config import RobotConfig
from edge_vla.provision.tarball import write_tarball

log = logging.getLogger(__name__)

PACKAGE_FORMAT = "edge-vla-package"
PACKAGE_VERSION = 2  # 2: wheels, hashed lock and package.sig (1 installed edge-vla by name)
PACKAGE_JSON = "package.json"
PACKAGE_SIG = "package.sig"
SERVICE = "edge-vla.service"
FIRSTBOOT = "edge-vla-firstboot.service"
UDEV_RULES = "99-edge-vla.rules"
DEFAULT_GROUPS = ("dialout", "plugdev", "video")  # serial, USB devices, Jetson GPU nodes
_HEX4 = re.compile(r"^[0-9a-f]{4}$")


@dataclass(frozen=True)
class UsbId:
    """The motor controller's USB serial adapter, for the udev symlink. Default: FTDI FT232R."""

    vid: str = "0403"
    pid: str = "6001"
    serial: str | None = None

    def validate(self) -> UsbId:
        for name, value in (("vendor", self.vid), ("product", self.pid)):
            if not _HEX4.match(value):
                raise ConfigError(f"USB {name} id {value!r} must be 4 lowercase hex digits (see `lsusb`)")
        if self.serial is not None and not re.match(r"^[A-Za-z0-9._-]+$", self.serial):
            raise ConfigError(f"USB serial {self.serial!r} may hold only letters, digits, '.', '_', '-'")
        return self


@dataclass(frozen=True)
class PackageResult:
    path: Path
    digest: str  # sha256 of package.json, which lists the sha256 of every other member
    release: str  # the directory name under /opt/edge-vla/releases
    bundle_hash: str
    key_id: str | None
    size: int = 0  # bytes of the package file
    wheels_size: int = 0  # bytes of the wheels inside (uncompressed)
    wheels: tuple[str, ...] = ()  # file names under wheels/
    online: bool = False


def release_id(bundle_hash: str, package_json: bytes) -> str:
    """Bundle hash first (what an operator recognises), then the package digest, so that the same
    bundle packaged with another config is a distinct release one can roll back to."""
    return f"{bundle_hash[:16]}-{hashlib.sha256(package_json).hexdigest()[:8]}"


def _bundle_files(bundle: Bundle) -> dict[str, bytes | Path]:
    out: dict[str, bytes | Path] = {}
    for rel, digest in sorted(bundle.manifest["files"].items()):
        data = (bundle.root / rel).read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:  # read again after Bundle.open's check: check these bytes
            raise PackageError(f"bundle {bundle.root}: {rel} changed while it was being packaged (it no longer matches "
                               "its sha256 in the manifest); nothing written: package the bundle again once it is "
                               "complete, or re-export it")
        out[f"bundle/{rel}"] = data
    # The bytes Bundle.open checked every file's hash against: what is shipped (and signed) is what was verified,
    # never a second read of manifest.json.
    out[f"bundle/{MANIFEST}"] = bundle.manifest_bytes or (bundle.root / MANIFEST).read_bytes()
    return out


def _digest(data: bytes | Path) -> str:
    return sha256_file(data) if isinstance(data, Path) else hashlib.sha256(data).hexdigest()


def _lock_header(platform: platforms.Platform, sources: list[str], online: bool,
                 extras: Sequence[str] = ()) -> list[str]:
    t, jp = platform.target, platform.jetpack
    head = [
        f"edge-vla {__version__} lock for {t.description} ({t.name}, {t.arch}), CPython {platform.python}, "
        f"glibc {platform.glibc}" + (f", JetPack {jp.version} (L4T {jp.l4t}, CUDA {jp.cuda}, TensorRT {jp.tensorrt})"
                                     if jp else "") + ".",
        "Resolved by `edge-vla package` from edge-vla's own dependencies"
        + (f" with the extras {', '.join(extras)}" if extras else "") + " for this target's wheel tags, from: "
        + (", ".join(sources) or "the wheels given"),
        "Install (install.sh does): pip install --no-index --find-links wheels --require-hashes --no-deps "
        "--only-binary=:all: --ignore-installed -r requirements.lock",
        "The venv holds these distributions and nothing else, bar install.sh's venv bootstrap (ensurepip's pip, "
        "and setuptools on Python <= 3.11, at the versions the interpreter bundles); `edge-vla doctor` fails "
        "on any other.",
    ]
    if online:
        head.append(f"--online package: only edge-vla is locked here; {ONLINE_FILE} comes from an index, unverified")
    if t.gpu:
        head.append("TensorRT's Python bindings come from NVIDIA's apt packages (python3-libnvinfer) through the "
                    "venv's --system-site-packages; `edge-vla doctor` checks them.")
    return head


def _online_requirements(requirements: list[str], platform: platforms.Platform, constraints: list[str],
                         sources: Any) -> str:
    lines = [f"# edge-vla {__version__} --online package for {platform.target.name}: resolved on the robot from "
             "the index below, without hashes. For development only; robots get offline packages."]
    if sources.index_url:
        lines.append(f"--index-url {sources.index_url}")
    lines += [f"--extra-index-url {u}" for u in sources.extra_index_urls]
    if platform.jetpack is not None and platform.jetpack.ort_index not in sources.extra_index_urls:
        lines.append(f"--extra-index-url {platform.jetpack.ort_index}")
    lines += requirements + [c for c in constraints if c not in requirements]
    return "\n".join(lines) + "\n"


def _warn_generic_jetson_ort(platform: platforms.Platform, wheels: Sequence[Any]) -> None:
    """PyPI's aarch64 onnxruntime-gpu (manylinux) is a server-Arm (SBSA) build, not NVIDIA's Jetson build
    (linux_aarch64, from the JetPack row's index): it may lack a working CUDA provider on the board."""
    jp = platform.jetpack
    ort = next((w for w in wheels if w.name == "onnxruntime-gpu"), None)
    if jp is not None and ort is not None and "linux_aarch64" not in ort.path.name.split("-")[-1]:
        log.warning("onnxruntime-gpu %s is PyPI's generic aarch64 build (%s), not NVIDIA's Jetson build for JetPack "
                    "%s: check `edge-vla doctor` lists CUDAExecutionProvider on the board, or ship NVIDIA's wheel "
                    "from %s with --wheels", ort.version, ort.path.name, jp.version, jp.ort_index)


def _wheel_files(platform: platforms.Platform, edge_wheel: Path, tmp: Path, *, pins: dict[str, str],
                 sources: Any, online: bool, extras: Sequence[str] = ()
                 ) -> tuple[dict[str, Path], list[LockEntry], dict[str, Any], str | None]:
    """The wheels to ship, the lock entries, package.json's wheel list, and the --online requirements."""
    require("packaging")  # workstation only: the provision extra
    from edge_vla.provision import wheelhouse

    pins = {canonical_name(n): v for n, v in pins.items()}
    _, _, requires = wheelhouse.check_edge_vla_wheel(edge_wheel, __version__)
    requirements = wheelhouse.runtime_requirements(requires, platform, extras)  # extras resolve like the base
    # A pin replaces its top-level requirement (so a missing pinned version is named as such) and
    # constrains it anywhere else in the closure.
    roots = {wheelhouse.requirement_name(r) for r in requirements}
    requirements = [f"{n}=={pins[n]}" if (n := wheelhouse.requirement_name(r)) in pins else r for r in requirements]
    constraints = [*platform.constraints, *(f"{n}=={v}" for n, v in sorted(pins.items()) if n not in roots)]
    ev = wheelhouse.LockedWheel("edge-vla", __version__, edge_wheel, sha256_file(edge_wheel), edge_wheel.stat().st_size)
    locked = [ev]
    online_text = None
    if online:
        log.warning("--online: the robot will fetch %s from %s at first boot, unpinned and without hash checks; "
                    "use it for development only", ", ".join(requirements),
                    ", ".join(sources.describe()) or "its pip configuration")
        online_text = _online_requirements(requirements, platform, constraints, sources)
    else:
        house = wheelhouse.download(requirements, platform, sources, tmp / WHEELS_DIR, constraints)
        if house.missing:
            raise PackageError(
                f"no wheel for {len(house.missing)} locked requirement(s) of {platform.target.name}; nothing "
                "written (an offline robot cannot install them):\n" + "\n".join(f"  - {m}" for m in house.missing))
        locked += house.wheels
        _warn_generic_jetson_ort(platform, house.wheels)
    files = {f"{WHEELS_DIR}/{w.path.name}": w.path for w in locked}
    listing = {w.path.name: {"name": w.name, "version": w.version, "sha256": w.sha256, "size": w.size}
               for w in locked}
    return files, [w.entry() for w in locked], listing, online_text


def build_package(
    bundle_path: str | Path,
    out: str | Path,
    target: str,
    *,
    config: RobotConfig | None = None,
    user: str = "edge-vla",
    groups: tuple[str, ...] = DEFAULT_GROUPS,
    sign_key: str | Path | None = None,
    jetpack: str | None = None,
    python: str | None = None,
    glibc: str | None = None,
    pins: dict[str, str] | None = None,
    usb: UsbId | None = None,
    watchdog_sec: float = 2.0,
    wheels: str | Path | Sequence[str | Path] | None = None,
    index_url: str | None = "https://pypi.org/simple",
    extra_index_urls: Sequence[str] = (),
    online: bool = False,
    edge_vla_wheel: str | Path | None = None,
    extras: Sequence[str] = (),
) -> PackageResult:
    """Write a robot package. Offline (default): the edge-vla wheel and every dependency's wheel for
    the target, hash-locked; `wheels` adds find-links directories (NVIDIA's Jetson builds, wheels
    built on the target), `index_url=None` resolves from those alone. `online=True` ships only the
    edge-vla wheel and lets the robot fetch the rest (development only). `extras` (e.g. telemetry, serve) join
    the lock and the wheelhouse like the base dependencies."""
    config = (config or RobotConfig()).validate()
    usb = (usb or UsbId()).validate()
    if not re.match(r"^[a-z_][a-z0-9_-]{0,31}$", user):
        raise ConfigError(f"user name {user!r} is not a valid Linux user name")
    if not 0.1 <= watchdog_sec <= 600:
        raise ConfigError(f"watchdog {watchdog_sec} s is outside 0.1..600")
    platform = platforms.resolve(target, jetpack, python, glibc)
    wheel_dirs = [Path(wheels)] if isinstance(wheels, (str, Path)) else [Path(w) for w in wheels or ()]
    for d in wheel_dirs:
        if not d.is_dir() or not any(d.glob("*.whl")):
            raise PackageError(f"--wheels {d} holds no .whl files; put the wheels the package step named there")
    bundle = Bundle.open(bundle_path)  # verifies schema and every hash before we ship it
    files = _bundle_files(bundle)
    manifest_bytes = files[f"bundle/{MANIFEST}"]
    assert isinstance(manifest_bytes, bytes)
    bundle_hash = hashlib.sha256(manifest_bytes).hexdigest()

    key_id: str | None = None
    private = None
    if sign_key is not None:
        private = signing.load_private_key(sign_key)
        files[f"bundle/{SIGNATURE}"] = signing.signature_bytes(manifest_bytes, private)
    elif (bundle.root / SIGNATURE).is_file():
        files[f"bundle/{SIGNATURE}"] = (bundle.root / SIGNATURE).read_bytes()  # already signed upstream
    if f"bundle/{SIGNATURE}" in files:
        key_id = json.loads(files[f"bundle/{SIGNATURE}"])["key_id"]  # type: ignore[arg-type]

    require("packaging")
    from edge_vla.provision.wheelhouse import Sources, build_edge_vla_wheel

    sources = Sources(index_url, tuple(extra_index_urls), tuple(wheel_dirs))
    with tempfile.TemporaryDirectory(prefix="edge-vla-package-") as tmp_name:
        tmp = Path(tmp_name)
        edge_wheel = Path(edge_vla_wheel) if edge_vla_wheel else build_edge_vla_wheel(tmp / "edge-vla")
        from edge_vla.provision.wheelhouse import check_edge_vla_wheel, check_extras

        extras = check_extras(check_edge_vla_wheel(edge_wheel, __version__)[2], extras)
        wheel_files, entries, wheel_list, online_text = _wheel_files(
            platform, edge_wheel, tmp, pins=pins or {}, sources=sources, online=online, extras=extras)
        files.update(wheel_files)
        t = platform.target
        values: dict[str, object] = {
            "target": t.name,
            "target_description": t.description,
            "bundle_hash": bundle_hash[:16],
            "user": user,
            "groups": " ".join(groups),
            "watchdog_sec": f"{watchdog_sec:g}",
            "python": platform.python,
            "edge_vla_version": __version__,
            "usb_vid": usb.vid,
            "usb_pid": usb.pid,
            "usb_serial_match": f', ATTRS{{serial}}=="{usb.serial}"' if usb.serial else "",
            "firstboot_what": "build the TensorRT engines from the bundle's ONNX (timing cache kept in bundle/target), "
            "then time the backends on this machine (edge-vla tune) and record the fastest that passes the numerics gate"
            if t.gpu else "time the CPU backends on this machine (edge-vla tune: onnxruntime, and OpenVINO where "
            "installed) and record the fastest that passes the bundle's numerics gate",
            # Offline packages need no network at first boot (and must not wait for one).
            "firstboot_after": "After=local-fs.target network-online.target\nWants=network-online.target"
            if online else "After=local-fs.target",
            "firstboot_exec": "ExecStart=/opt/edge-vla/current/venv/bin/edge-vla build-engines "
                              "/opt/edge-vla/current/bundle" if t.gpu  # build-engines ends with tune
            # "-": a failed tune must not keep the robot from starting; Policy.load then uses the untuned default
            else "ExecStart=-/opt/edge-vla/current/venv/bin/edge-vla tune /opt/edge-vla/current/bundle",
        }
        files[LOCK_FILE] = lock_text(entries, _lock_header(platform, sources.describe(), online, extras)).encode()
        if online_text is not None:
            files[ONLINE_FILE] = online_text.encode()
        files["install.sh"] = render_template("install.sh", values).encode()
        files[f"systemd/{SERVICE}"] = render_template(SERVICE, values).encode()
        files[f"systemd/{FIRSTBOOT}"] = render_template(FIRSTBOOT, values).encode()
        files[f"udev/{UDEV_RULES}"] = render_template(UDEV_RULES, values).encode()
        files["config/robot.env"] = config.to_env().encode()

        meta: dict[str, Any] = {
            "format": PACKAGE_FORMAT,
            "version": PACKAGE_VERSION,
            "edge_vla_version": __version__,
            "platform": platform.to_dict(),
            "bundle": {
                "hash": bundle_hash,
                "signed": key_id is not None,
                "key_id": key_id,
                "precision": bundle.manifest.get("precision"),
                "preset": bundle.manifest.get("model", {}).get("preset"),
            },
            "config": {
                "link": config.link, "camera": config.camera, "rate_hz": config.rate_hz,
                "extra_args": config.extra_args, "user": user, "groups": list(groups),
                "watchdog_sec": watchdog_sec, "usb": {"vid": usb.vid, "pid": usb.pid, "serial": usb.serial},
            },
            "online": online,
            "extras": list(extras),
            "wheel_sources": sources.describe(),
            "wheels": wheel_list,
            "files": {rel: _digest(data) for rel, data in sorted(files.items())},
        }
        package_json = (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()
        files[PACKAGE_JSON] = package_json
        if private is not None:  # the package signature covers package.json, hence every file and wheel
            files[PACKAGE_SIG] = signing.signature_bytes(package_json, private)
        out = write_tarball(Path(out), files, executable=frozenset({"install.sh"}))
    wheels_size = sum(int(w["size"]) for w in wheel_list.values())
    result = PackageResult(out, hashlib.sha256(package_json).hexdigest(), release_id(bundle_hash, package_json),
                           bundle_hash, key_id, out.stat().st_size, wheels_size, tuple(sorted(wheel_list)), online)
    log.debug("wrote %s (release %s, %d files)", out, result.release, len(files))
    return result


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", nargs="?", help="bundle directory or .tar.gz (from `edge-vla export`)")
    parser.add_argument("-o", "--output", default="robot-pkg.tar.gz", help="package to write (default %(default)s)")
    parser.add_argument("--target", choices=sorted(platforms.TARGETS), help="the robot computer")
    parser.add_argument("--jetpack", choices=sorted(platforms.JETPACKS),
                        help="JetPack on the robot (default: 6.2 for Orin, 7.0 for Thor)")
    parser.add_argument("--python", help="Python on the robot (x86 targets; Jetson: fixed by JetPack)")
    parser.add_argument("--glibc", help="glibc on the robot, `ldd --version` (x86 targets, default 2.35 = Ubuntu "
                                        "22.04; Jetson: fixed by JetPack)")
    parser.add_argument("--sign", metavar="KEY", help="Ed25519 private key (PEM or raw 32-byte seed): signs the "
                                                      "bundle manifest and package.json (every wheel's hash)")
    parser.add_argument("--keygen", metavar="PATH", help="write a new signing key pair PATH and PATH.pub, then exit")
    parser.add_argument("--link", default=RobotConfig.link, help="motor controller link (default %(default)s)")
    parser.add_argument("--camera", default=RobotConfig.camera, help="realsense | video:PATH | sim (default %(default)s)")
    parser.add_argument("--rate-hz", type=float, default=RobotConfig.rate_hz, help="control rate (default %(default)s)")
    parser.add_argument("--extra-args", default="", help="more arguments for `edge-vla run`")
    parser.add_argument("--user", default="edge-vla", help="service user (default %(default)s)")
    parser.add_argument("--watchdog-sec", type=float, default=2.0, help="systemd WatchdogSec (default %(default)s)")
    parser.add_argument("--usb-vid", default=UsbId.vid, help="motor adapter USB vendor id (default %(default)s, FTDI)")
    parser.add_argument("--usb-pid", default=UsbId.pid, help="motor adapter USB product id (default %(default)s)")
    parser.add_argument("--usb-serial", help="adapter serial number, to tell two identical adapters apart")
    wheels = parser.add_argument_group("wheels (the robot installs only these, offline, hash-checked)")
    wheels.add_argument("--pin", action="append", metavar="NAME==VERSION", help="hold a dependency at this version")
    wheels.add_argument("--wheels", action="append", metavar="DIR",
                        help="also take wheels from DIR (e.g. NVIDIA's onnxruntime-gpu for Jetson); repeatable")
    wheels.add_argument("--index-url", default="https://pypi.org/simple",
                        help="package index to download wheels from (default %(default)s; your mirror)")
    wheels.add_argument("--extra-index-url", action="append", default=[], metavar="URL", help="another index")
    wheels.add_argument("--no-index", action="store_true", help="use only --wheels directories (no network)")
    wheels.add_argument("--edge-vla-wheel", metavar="WHL", help="ship this edge-vla wheel instead of building one "
                                                                "from the installed source")
    wheels.add_argument("--extras", default="", metavar="NAME,NAME",
                        help="edge-vla extras the robot needs, locked and shipped like the base dependencies: "
                             "telemetry (MCAP for --telemetry x.mcap), serve (`edge-vla serve`), realsense, pi0, "
                             "dynamixel, plot")
    wheels.add_argument("--online", action="store_true",
                        help="development only: ship no dependency wheels; the robot fetches them from the index "
                             "unpinned and unverified at first boot")


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def main(args: argparse.Namespace) -> int:
    if args.keygen:
        priv, pub, kid = signing.generate_keypair(args.keygen)
        print(f"wrote {priv} (private: keep it off robots) and {pub} (trust it on robots); key id {kid}")
        return 0
    if not args.bundle or not args.target:
        raise ConfigError("give a BUNDLE and --target (or --keygen PATH)")
    result = build_package(
        args.bundle, args.output, args.target,
        config=RobotConfig(args.link, args.camera, args.rate_hz, args.extra_args),
        user=args.user, sign_key=args.sign, jetpack=args.jetpack, python=args.python, glibc=args.glibc,
        pins=platforms.parse_pins(args.pin), usb=UsbId(args.usb_vid.lower(), args.usb_pid.lower(), args.usb_serial),
        watchdog_sec=args.watchdog_sec, wheels=args.wheels, index_url=None if args.no_index else args.index_url,
        extra_index_urls=args.extra_index_url, online=args.online, edge_vla_wheel=args.edge_vla_wheel,
        extras=[e for e in args.extras.split(",") if e.strip()],
    )
    print(f"wrote {result.path}")
    print(f"  release  {result.release}")
    print(f"  bundle   {result.bundle_hash[:16]} ({'signed by ' + result.key_id if result.key_id else 'unsigned'})")
    print(f"  size     {_mb(result.size)} for {args.target} ({len(result.wheels)} wheels, {_mb(result.wheels_size)} "
          "uncompressed)" + (" -- ONLINE package: the robot needs an index at first boot" if result.online else ""))
    print(f"  install  edge-vla install {result.path} --rootfs Linux_for_Tegra/rootfs | --host user@robot")
    return 0
