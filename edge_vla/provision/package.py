"""`edge-vla package BUNDLE -o robot-pkg.tar.gz --target T`: a bundle plus everything to run it on a robot.

Package layout (a deterministic .tar.gz; see tarball.py):
    package.json                        format, platform row, bundle hash/signature, config, sha256 of every file
    bundle/                             the verified bundle (+ manifest.sig with --sign); never its target/
    requirements.lock                   exact pins for the target's Python (platforms.py)
    install.sh                          on-robot installer and first-boot venv maker
    systemd/edge-vla.service            the policy service (Type=notify, watchdog, restart limit)
    systemd/edge-vla-firstboot.service  venv + TensorRT engines (timing cache in bundle/target) before it
    udev/99-edge-vla.rules              /dev/edge-vla-motor symlink, FTDI low latency
    config/robot.env                    -> /etc/edge-vla/robot.env
    wheels/*.whl                        optional (--wheels DIR), for robots without network
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_vla import __version__
from edge_vla.bundle import MANIFEST, SIGNATURE, Bundle
from edge_vla.errors import ConfigError
from edge_vla.provision import platforms, signing
from edge_vla.provision.errors import PackageError
from edge_vla.provision.render import render_template
from edge_vla.provision.robot_config import RobotConfig
from edge_vla.provision.tarball import write_tarball

log = logging.getLogger(__name__)

PACKAGE_FORMAT = "edge-vla-package"
PACKAGE_VERSION = 1
PACKAGE_JSON = "package.json"
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


def release_id(bundle_hash: str, package_json: bytes) -> str:
    """Bundle hash first (what an operator recognises), then the package digest, so that the same
    bundle packaged with another config is a distinct release one can roll back to."""
    return f"{bundle_hash[:16]}-{hashlib.sha256(package_json).hexdigest()[:8]}"


def _bundle_files(bundle: Bundle) -> dict[str, bytes]:
    out = {}
    for rel in sorted(bundle.manifest["files"]):
        out[f"bundle/{rel}"] = (bundle.root / rel).read_bytes()
    out[f"bundle/{MANIFEST}"] = (bundle.root / MANIFEST).read_bytes()
    return out


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
    pins: dict[str, str] | None = None,
    usb: UsbId | None = None,
    watchdog_sec: float = 2.0,
    wheels: str | Path | None = None,
) -> PackageResult:
    config = (config or RobotConfig()).validate()
    usb = (usb or UsbId()).validate()
    if not re.match(r"^[a-z_][a-z0-9_-]{0,31}$", user):
        raise ConfigError(f"user name {user!r} is not a valid Linux user name")
    if not 0.1 <= watchdog_sec <= 600:
        raise ConfigError(f"watchdog {watchdog_sec} s is outside 0.1..600")
    platform = platforms.resolve(target, jetpack, python)
    bundle = Bundle.open(bundle_path)  # verifies schema and every hash before we ship it
    files = _bundle_files(bundle)
    manifest_bytes = files[f"bundle/{MANIFEST}"]
    bundle_hash = hashlib.sha256(manifest_bytes).hexdigest()

    key_id: str | None = None
    if sign_key is not None:
        private = signing.load_private_key(sign_key)
        files[f"bundle/{SIGNATURE}"] = signing.signature_bytes(manifest_bytes, private)
    elif (bundle.root / SIGNATURE).is_file():
        files[f"bundle/{SIGNATURE}"] = (bundle.root / SIGNATURE).read_bytes()  # already signed upstream
    if f"bundle/{SIGNATURE}" in files:
        key_id = json.loads(files[f"bundle/{SIGNATURE}"])["key_id"]

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
        "firstboot_what": "build the TensorRT engines from the bundle's ONNX (timing cache kept in bundle/target)"
        if t.gpu else "nothing else (CPU target: no engines to build)",
        "firstboot_exec": "ExecStart=/opt/edge-vla/current/venv/bin/edge-vla build-engines /opt/edge-vla/current/bundle"
        if t.gpu else "ExecStart=/bin/true",
    }
    files["requirements.lock"] = platforms.requirements_lock(platform, __version__, pins or {}).encode()
    files["install.sh"] = render_template("install.sh", values).encode()
    files[f"systemd/{SERVICE}"] = render_template(SERVICE, values).encode()
    files[f"systemd/{FIRSTBOOT}"] = render_template(FIRSTBOOT, values).encode()
    files[f"udev/{UDEV_RULES}"] = render_template(UDEV_RULES, values).encode()
    files["config/robot.env"] = config.to_env().encode()
    if wheels is not None:
        wheel_dir = Path(wheels)
        found = sorted(wheel_dir.glob("*.whl"))
        if not found:
            raise PackageError(f"--wheels {wheel_dir} holds no .whl files; fill it with `pip download -r requirements.lock`")
        files.update({f"wheels/{w.name}": w.read_bytes() for w in found})

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
        "files": {rel: hashlib.sha256(data).hexdigest() for rel, data in sorted(files.items())},
    }
    package_json = (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()
    files[PACKAGE_JSON] = package_json
    out = write_tarball(Path(out), files, executable=frozenset({"install.sh"}))
    result = PackageResult(out, hashlib.sha256(package_json).hexdigest(), release_id(bundle_hash, package_json),
                           bundle_hash, key_id)
    log.debug("wrote %s (release %s, %d files)", out, result.release, len(files))
    return result


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", nargs="?", help="bundle directory or .tar.gz (from `edge-vla export`)")
    parser.add_argument("-o", "--output", default="robot-pkg.tar.gz", help="package to write (default %(default)s)")
    parser.add_argument("--target", choices=sorted(platforms.TARGETS), help="the robot computer")
    parser.add_argument("--jetpack", choices=sorted(platforms.JETPACKS),
                        help="JetPack on the robot (default: 6.2 for Orin, 7.0 for Thor)")
    parser.add_argument("--python", help="Python on the robot (x86 targets; Jetson: fixed by JetPack)")
    parser.add_argument("--sign", metavar="KEY", help="Ed25519 private key (PEM or raw 32-byte seed) to sign the manifest")
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
    parser.add_argument("--pin", action="append", metavar="NAME==VERSION", help="override a pin in the lock")
    parser.add_argument("--wheels", metavar="DIR", help="ship these wheels for offline install")


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
        user=args.user, sign_key=args.sign, jetpack=args.jetpack, python=args.python,
        pins=platforms.parse_pins(args.pin), usb=UsbId(args.usb_vid.lower(), args.usb_pid.lower(), args.usb_serial),
        watchdog_sec=args.watchdog_sec, wheels=args.wheels,
    )
    print(f"wrote {result.path}")
    print(f"  release  {result.release}")
    print(f"  bundle   {result.bundle_hash[:16]} ({'signed by ' + result.key_id if result.key_id else 'unsigned'})")
    print(f"  install  edge-vla install {result.path} --rootfs Linux_for_Tegra/rootfs | --host user@robot")
    return 0
