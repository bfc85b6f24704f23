"""Robot packages with extras (`edge-vla package --extras telemetry,serve`): resolved into the lock like the base
dependencies, so `--telemetry x.mcap` records MCAP and `edge-vla serve` runs from an offline package. And the
signature refusal at install names the package file, not a staging folder."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from edge_vla.provision import platforms, wheelhouse
from edge_vla.provision.errors import PackageError

REPO = Path(__file__).resolve().parents[2]


def _names(requirements: list[str]) -> set[str]:
    return {wheelhouse.requirement_name(r) for r in requirements}


def test_extras_join_the_robots_requirements(edge_vla_wheel: Path) -> None:
    _, _, requires = wheelhouse.read_wheel_metadata(edge_vla_wheel)
    plat = platforms.resolve("x86-cpu")
    base = _names(wheelhouse.runtime_requirements(requires, plat))
    more = _names(wheelhouse.runtime_requirements(requires, plat, extras=("telemetry", "serve")))
    assert {"mcap", "websockets", "msgpack"} <= more - base  # control: the base set lacks them
    assert "cryptography" in base and "torch" not in more
    with pytest.raises(PackageError, match="unknown extra 'nope'.*telemetry"):
        wheelhouse.runtime_requirements(requires, plat, extras=("nope",))
    with pytest.raises(PackageError, match="workstation"):
        wheelhouse.runtime_requirements(requires, plat, extras=("export",))


def test_an_online_package_with_extras_lists_them(build, bundle: Path, tmp_path: Path) -> None:
    out = build(bundle, tmp_path / "pkg.tar.gz", "x86-cpu", extras=("telemetry", "serve"))
    with tarfile.open(out.path) as tar:
        meta = json.loads(tar.extractfile("package.json").read())
        online = tar.extractfile("requirements.online.txt").read().decode()
    assert meta["extras"] == ["serve", "telemetry"]
    assert {"mcap", "websockets", "msgpack"} <= {Requirement(ln).name for ln in online.splitlines()
                                               if ln and not ln.startswith(("#", "-"))}


def test_the_cli_takes_extras_and_refuses_an_unknown_one_in_one_line(bundle: Path, tmp_path: Path,
                                                                      edge_vla_wheel: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "edge_vla.cli", "package", str(bundle), "-o", str(tmp_path / "p.tgz"),
                           "--target", "x86-cpu", "--online", "--edge-vla-wheel", str(edge_vla_wheel),
                           "--extras", "telemetry,nope"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and "nope" in lines[0], proc.stderr
    assert not (tmp_path / "p.tgz").exists()


@pytest.mark.slow
def test_extras_resolve_offline_into_wheels_for_the_target(tmp_path: Path, edge_vla_wheel: Path) -> None:
    """Real pip against PyPI: the extra's closure (mcap -> lz4, zstandard: binary wheels) for the target's tags."""
    import socket

    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
    except OSError as exc:
        pytest.skip(f"PyPI unreachable ({exc})")
    plat = platforms.resolve("x86-cpu")
    _, _, requires = wheelhouse.read_wheel_metadata(edge_vla_wheel)
    extra_only = sorted(_names(wheelhouse.runtime_requirements(requires, plat, extras=("telemetry",)))
                        - _names(wheelhouse.runtime_requirements(requires, plat)))
    house = wheelhouse.download(extra_only, plat, wheelhouse.Sources(), tmp_path / "w", plat.constraints)
    assert not house.missing and {"mcap", "lz4", "zstandard"} <= {w.name for w in house.wheels}


def test_an_unsigned_package_refused_at_install_is_named_by_its_file(build, bundle: Path, tmp_path: Path, rootfs: Path,
                                                                    keypair) -> None:
    pkg = build(bundle, tmp_path / "unsigned.tar.gz", "x86-cpu").path
    proc = subprocess.run([sys.executable, "-m", "edge_vla.cli", "install", str(pkg), "--rootfs", str(rootfs),
                           "--trusted-key", str(keypair[1])], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert str(pkg) in proc.stderr and "unsigned" in proc.stderr, proc.stderr
    assert "edge-vla-stage" not in proc.stderr and ".staging" not in proc.stderr
