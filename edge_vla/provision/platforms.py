"""Robot computer targets, the JetPack table, and the requirements lock written for each target.

THE table (one place; `doctor` and `package` both read it). JetPack pins the whole GPU stack: CUDA,
cuDNN and TensorRT come from NVIDIA's apt repository on the board and cannot be pip-installed
there, so the lock pins only the Python side and the table records what the board must already have.

| JetPack | L4T (Jetson Linux) | Ubuntu | Python | CUDA | cuDNN  | TensorRT | boards            |
|---------|--------------------|--------|--------|------|--------|----------|-------------------|
| 6.0     | 36.3.0             | 22.04  | 3.10   | 12.2 | 8.9.4  | 8.6.2    | Orin              |
| 6.1     | 36.4.0             | 22.04  | 3.10   | 12.6 | 9.3.0  | 10.3.0   | Orin              |
| 6.2     | 36.4.3             | 22.04  | 3.10   | 12.6 | 9.3.0  | 10.3.0   | Orin (Super mode) |
| 7.0     | 38.2.0             | 24.04  | 3.12   | 13.0 | 9.12.0 | 10.13.3  | Thor only         |
| 7.1     | 38.4.0             | 24.04  | 3.12   | 13.0 | 9.12.0 | 10.13.3  | Thor only         |

Sources: NVIDIA's JetPack archive pages and release notes (JetPack 6.1/6.2: CUDA 12.6, TensorRT 10.3,
cuDNN 9.3; JetPack 7.x: Jetson Linux 38.x, CUDA 13.0, Ubuntu 24.04, SBSA-aligned). JetPack 6.0 still
shipped TensorRT 8.6, which cannot load engines or timing caches from TensorRT 10: build engines on
the board (the first-boot unit does) and prefer 6.1+. Check `apt show nvidia-jetpack` on a board.

onnxruntime-gpu for Jetson is not on PyPI (PyPI's aarch64 wheels are CPU-only): it comes from
NVIDIA's Jetson AI Lab index (`ORT_INDEX` per row) or the Jetson Zoo, and is built against the
board's CUDA; for CUDA 13 (JetPack 7) build it from source if the index has no wheel for your
Python. TensorRT's Python bindings come from apt (`python3-libnvinfer`), which is why the robot's
venv is made with --system-site-packages.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from edge_vla.errors import ConfigError


@dataclass(frozen=True)
class JetPack:
    version: str
    l4t: str
    ubuntu: str
    python: str
    cuda: str
    cudnn: str
    tensorrt: str
    ort_index: str  # where onnxruntime-gpu for this row comes from
    thor_only: bool = False


JETPACKS: dict[str, JetPack] = {
    "6.0": JetPack("6.0", "36.3.0", "22.04", "3.10", "12.2", "8.9.4", "8.6.2",
                   "https://pypi.jetson-ai-lab.io/jp6/cu122"),
    "6.1": JetPack("6.1", "36.4.0", "22.04", "3.10", "12.6", "9.3.0", "10.3.0",
                   "https://pypi.jetson-ai-lab.io/jp6/cu126"),
    "6.2": JetPack("6.2", "36.4.3", "22.04", "3.10", "12.6", "9.3.0", "10.3.0",
                   "https://pypi.jetson-ai-lab.io/jp6/cu126"),
    "7.0": JetPack("7.0", "38.2.0", "24.04", "3.12", "13.0", "9.12.0", "10.13.3",
                   "https://pypi.jetson-ai-lab.io/sbsa/cu130", thor_only=True),
    "7.1": JetPack("7.1", "38.4.0", "24.04", "3.12", "13.0", "9.12.0", "10.13.3",
                   "https://pypi.jetson-ai-lab.io/sbsa/cu130", thor_only=True),
}


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    arch: str  # uname -m
    jetpack: str | None  # default JetPack row for Jetson targets
    python: str  # default Python for non-Jetson targets (Jetson: the JetPack row's)
    compute_capability: str | None  # expected GPU, None for CPU-only
    gpu: bool

    @property
    def jetson(self) -> bool:
        return self.jetpack is not None


TARGETS: dict[str, Target] = {
    "orin-nano": Target("orin-nano", "Jetson Orin Nano", "aarch64", "6.2", "3.10", "8.7", True),
    "orin-nx": Target("orin-nx", "Jetson Orin NX", "aarch64", "6.2", "3.10", "8.7", True),
    "agx-orin": Target("agx-orin", "Jetson AGX Orin", "aarch64", "6.2", "3.10", "8.7", True),
    "thor": Target("thor", "Jetson AGX Thor", "aarch64", "7.0", "3.12", "11.0", True),
    "x86-cpu": Target("x86-cpu", "x86-64 computer, CPU only", "x86_64", None, "3.10", None, False),
    "x86-cuda": Target("x86-cuda", "x86-64 computer with an NVIDIA GPU", "x86_64", None, "3.10", None, True),
}

# Python-side pins. NumPy stays 1.26 on Jetson because NVIDIA's onnxruntime-gpu wheels for JetPack
# 6 are built against NumPy 1.x; 1.26.4 has wheels for 3.10-3.12 on both architectures.
_COMMON_PINS: dict[str, str] = {
    "numpy": "1.26.4",
    "pyserial": "3.5",
    "python-can": "4.4.2",
    "cobs": "1.2.2",
}
# The onnxruntime distribution and version per accelerator. On Jetson the version is the one the
# JetPack row's index carries; verify it there and override with `--pin` if it moved.
_ORT_PINS: dict[str, tuple[str, str]] = {
    "x86-cpu": ("onnxruntime", "1.20.1"),
    "x86-cuda": ("onnxruntime-gpu", "1.20.2"),
    "jp6": ("onnxruntime-gpu", "1.20.0"),
    "jp7": ("onnxruntime-gpu", "1.23.0"),
}
_X86_CUDA_EXTRA: dict[str, str] = {"tensorrt": "10.3.0", "cuda-python": "12.6.0"}


@dataclass(frozen=True)
class Platform:
    """A target resolved against its JetPack row (or its plain Python for x86)."""

    target: Target
    jetpack: JetPack | None
    python: str

    def to_dict(self) -> dict[str, object]:
        jp = self.jetpack
        return {
            "target": self.target.name,
            "description": self.target.description,
            "arch": self.target.arch,
            "python": self.python,
            "gpu": self.target.gpu,
            "compute_capability": self.target.compute_capability,
            "jetpack": None if jp is None else {
                "version": jp.version, "l4t": jp.l4t, "ubuntu": jp.ubuntu, "cuda": jp.cuda,
                "cudnn": jp.cudnn, "tensorrt": jp.tensorrt, "ort_index": jp.ort_index,
            },
            "tensorrt": jp.tensorrt if jp else (_X86_CUDA_EXTRA["tensorrt"] if self.target.gpu else None),
            "cuda": jp.cuda if jp else ("12" if self.target.gpu else None),
        }


def resolve(target: str, jetpack: str | None = None, python: str | None = None) -> Platform:
    """Pick the JetPack row and Python for `target`, refusing combinations NVIDIA does not ship."""
    if target not in TARGETS:
        raise ConfigError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    t = TARGETS[target]
    if not t.jetson:
        if jetpack:
            raise ConfigError(f"--jetpack applies to Jetson targets only, not {target}")
        return Platform(t, None, python or t.python)
    version = jetpack or t.jetpack
    assert version is not None
    if version not in JETPACKS:
        raise ConfigError(f"unknown JetPack {version!r}; this edge-vla knows {', '.join(JETPACKS)}")
    row = JETPACKS[version]
    if row.thor_only != (target == "thor"):
        which = "Thor only" if row.thor_only else "Orin, not Thor"
        raise ConfigError(f"JetPack {version} supports {which}; pick another --jetpack for {target}")
    if python and python != row.python:
        raise ConfigError(
            f"JetPack {version} ships Python {row.python}, not {python}: the apt TensorRT bindings "
            f"exist for the system Python only. Drop --python or pick another JetPack."
        )
    return Platform(t, row, row.python)


def requirements_lock(platform: Platform, edge_vla_version: str, overrides: Mapping[str, str] = ()) -> str:
    """The pip requirements for the robot's venv, exact versions only.

    edge-vla itself is installed afterwards with --no-deps, because on GPU targets the lock names
    onnxruntime-gpu, and pip would otherwise pull the CPU `onnxruntime` as well (same import name).
    """
    t, jp = platform.target, platform.jetpack
    pins = dict(_COMMON_PINS)
    if jp is None:
        name, version = _ORT_PINS[t.name]
        pins[name] = version
        if t.gpu:
            pins.update(_X86_CUDA_EXTRA)
    else:
        name, version = _ORT_PINS["jp7" if jp.version.startswith("7") else "jp6"]
        pins[name] = version
    for spec_name, spec_version in dict(overrides).items():
        pins[spec_name] = spec_version
    lines = [
        f"# edge-vla {edge_vla_version} requirements lock for {t.description} ({t.name}, {t.arch}),",
        f"# Python {platform.python}" + (
            f", JetPack {jp.version} (L4T {jp.l4t}, CUDA {jp.cuda}, cuDNN {jp.cudnn}, TensorRT {jp.tensorrt})."
            if jp else "."),
        "# Install: pip install -r requirements.lock && pip install --no-deps edge-vla==" + edge_vla_version,
    ]
    if jp is not None:
        lines += [
            f"# onnxruntime-gpu for JetPack {jp.version} is not on PyPI; it comes from the index below.",
            "# TensorRT's Python bindings come from apt (python3-libnvinfer): use a venv with",
            "# --system-site-packages. CUDA/cuDNN/TensorRT themselves come with JetPack.",
            f"--extra-index-url {jp.ort_index}",
        ]
    lines += [f"{name}=={pins[name]}" for name in sorted(pins)]
    return "\n".join(lines) + "\n"


def parse_pins(specs: list[str] | None) -> dict[str, str]:
    """`--pin name==version` options -> {name: version}."""
    out: dict[str, str] = {}
    for spec in specs or ():
        name, sep, version = spec.partition("==")
        if not sep or not name.strip() or not version.strip():
            raise ConfigError(f"--pin {spec!r} is not NAME==VERSION")
        out[name.strip()] = version.strip()
    return out
