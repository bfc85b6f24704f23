"""Fixtures: a small valid bundle, a signing key pair, a package, a fake L4T rootfs."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from service_user import open_dir

from edge_vla.action_space import sim_action_space
from edge_vla.bundle import write_bundle
from edge_vla.config import preset


def make_bundle(out: Path, graph_bytes: bytes = b"not really onnx, but hashed like it\n") -> Path:
    manifest = {
        "model": preset("tiny").to_dict(),
        "precision": "fp32",
        "graphs": {
            "prefix": {"file": "graphs/prefix.onnx", "inputs": [{"name": "image", "shape": [1, 3, 64, 64],
                                                                 "dtype": "float32"}],
                       "outputs": [{"name": "kv", "shape": [1, 8], "dtype": "float32"}]},
        },
        "normalization": {"state_mean": [0.0, 0.0], "state_std": [1.0, 1.0]},
        "action_space": sim_action_space().to_dict(),
        "sampler": {"solver": "euler", "num_steps": 2},
        "tokenizer": {"kind": "bytes"},
        "provenance": {"edge_vla": "0.1.0", "checkpoint_sha256": "0" * 64},
    }
    return write_bundle(out, manifest, {"graphs/prefix.onnx": graph_bytes, "reports/numerics.json": b"{}\n"})


@pytest.fixture
def bundle_factory():
    """make_bundle(out, graph_bytes): another bundle, e.g. a newer release."""
    return make_bundle


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return make_bundle(tmp_path / "bundle")


@pytest.fixture(scope="session")
def keypair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from edge_vla.provision.signing import generate_keypair

    priv, pub, _ = generate_keypair(tmp_path_factory.mktemp("keys") / "robot-signing")
    return priv, pub


def make_rootfs(root: Path) -> Path:
    """The bits of an L4T (Ubuntu) rootfs that installation touches."""
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\nubuntu:x:1000:1000::/home/ubuntu:/bin/bash\n")
    (root / "etc/group").write_text("root:x:0:\ndialout:x:20:ubuntu\nvideo:x:44:ubuntu\nplugdev:x:46:ubuntu\n"
                                    "ubuntu:x:1000:\n")
    (root / "etc/shadow").write_text("root:*:19000:0:99999:7:::\nubuntu:!:19000:0:99999:7:::\n")
    (root / "etc/systemd/system/multi-user.target.wants").mkdir(parents=True)
    (root / "etc/udev/rules.d").mkdir(parents=True)
    return root


@pytest.fixture
def rootfs() -> Iterator[Path]:
    """A fake rootfs the service user can traverse (tmp_path's parents are 0700), so robot-side steps
    in tests can run as that user (service_user.py)."""
    base = open_dir("edge-vla-rootfs-")
    try:
        yield make_rootfs(base / "Linux_for_Tegra" / "rootfs")
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def edge_vla_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The edge-vla wheel built once from this checkout (what every package ships)."""
    from edge_vla.provision.wheelhouse import build_edge_vla_wheel

    return build_edge_vla_wheel(tmp_path_factory.mktemp("edge-vla-wheel"))


@pytest.fixture
def build(edge_vla_wheel: Path):
    """build_package for tests about everything but the dependency wheels: --online (no downloads)
    with the prebuilt edge-vla wheel. tests/provision/test_offline.py covers the offline wheelhouse."""
    import functools

    from edge_vla.provision.package import build_package

    return functools.partial(build_package, edge_vla_wheel=edge_vla_wheel, online=True)
