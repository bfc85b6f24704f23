"""Robot computer targets, the JetPack table, and what each target's lock is resolved from.

THE table (one place; `doctor` and `package` both read it). JetPack pins the whole GPU stack: CUDA,
cuDNN and TensorRT come from NVIDIA's apt repository on the board and cannot be pip-installed
there, so the lock covers only the Python side and the table records what the board must already have.

| JetPack | L4T (Jetson Linux) | Ubuntu | glibc | Python | CUDA | cuDNN  | TensorRT | boards            |
|---------|--------------------|--------|-------|--------|------|--------|----------|-------------------|
| 6.1     | 36.4.0             | 22.04  | 2.35  | 3.10   | 12.6 | 9.3.0  | 10.3.0   | Orin              |
| 6.2     | 36.4.3             | 22.04  | 2.35  | 3.10   | 12.6 | 9.3.0  | 10.3.0   | Orin (Super mode) |
| 7.0     | 38.2.0             | 24.04  | 2.39  | 3.12   | 13.0 | 9.12.0 | 10.13.3  | Thor only         |
| 7.1     | 38.4.0             | 24.04  | 2.39  | 3.12   | 13.0 | 9.12.0 | 10.13.3  | Thor only         |

Sources: NVIDIA's JetPack archive pages and release notes (JetPack 6.1/6.2: CUDA 12.6, TensorRT 10.3,
cuDNN 9.3; JetPack 7.x: Jetson Linux 38.x, CUDA 13.0, Ubuntu 24.04, SBSA-aligned); glibc is the
Ubuntu release's. JetPack 6.0 (TensorRT 8.6) is refused: TensorRT 8.6 cannot build the strongly typed
networks `edge-vla build-engines` asks for, nor load engines or timing caches from TensorRT 10.
Check `apt show nvidia-jetpack` on a board.

The lock itself is not kept here: `edge-vla package` resolves it from the edge-vla wheel's own
dependencies (pyproject.toml) for the target's platform tags (wheelhouse.py). This table only says
what differs per target: which onnxruntime distribution, which cuda-python range matches the
target's CUDA (the `cuda.bindings` module the TensorRT backend imports first shipped in 12.6.1;
13.x needs a CUDA 13 driver), and bounds NVIDIA's Jetson builds need.

onnxruntime-gpu for Jetson is not on PyPI (PyPI's aarch64 wheels are CPU-only): it comes from
NVIDIA's Jetson AI Lab index (`ort_index` per row), built against the board's CUDA; fetch the wheel
from there and pass it with `edge-vla package --wheels DIR`. TensorRT's Python bindings come from
apt (`python3-libnvinfer`; on x86, NVIDIA's CUDA apt repository: PyPI's `tensorrt` is an sdist that
downloads the libraries at build time), which is why the robot's venv is made with
--system-site-packages and the lock is installed with --ignore-installed.
"""

from __future__ import annotations

from dataclasses import dataclass

from edge_vla.errors import ConfigError


@dataclass(frozen=True)
class JetPack:
    version: str
    l4t: str
    ubuntu: str
    glibc: str
    python: str
    cuda: str
    cudnn: str
    tensorrt: str
    ort_index: str  # where onnxruntime-gpu for this row comes from
    cuda_python: str  # pip specifier matching this row's CUDA
    thor_only: bool = False


JETPACKS: dict[str, JetPack] = {
    "6.1": JetPack("6.1", "36.4.0", "22.04", "2.35", "3.10", "12.6", "9.3.0", "10.3.0",
                   "https://pypi.jetson-ai-lab.io/jp6/cu126", ">=12.6.1,<12.7"),
    "6.2": JetPack("6.2", "36.4.3", "22.04", "2.35", "3.10", "12.6", "9.3.0", "10.3.0",
                   "https://pypi.jetson-ai-lab.io/jp6/cu126", ">=12.6.1,<12.7"),
    "7.0": JetPack("7.0", "38.2.0", "24.04", "2.39", "3.12", "13.0", "9.12.0", "10.13.3",
                   "https://pypi.jetson-ai-lab.io/sbsa/cu130", ">=13.0,<13.1", thor_only=True),
    "7.1": JetPack("7.1", "38.4.0", "24.04", "2.39", "3.12", "13.0", "9.12.0", "10.13.3",
                   "https://pypi.jetson-ai-lab.io/sbsa/cu130", ">=13.0,<13.1", thor_only=True),
}
# Rows NVIDIA shipped that edge-vla cannot serve, with the reason given to whoever asks for them.
REFUSED_JETPACKS: dict[str, str] = {
    "6.0": "JetPack 6.0 ships TensorRT 8.6, which cannot build the strongly typed networks that "
           "`edge-vla build-engines` asks for (nor load TensorRT 10 engines or timing caches). "
           "Flash JetPack 6.1 or 6.2 (TensorRT 10.3) and package with --jetpack 6.2.",
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
    glibc: str = "2.35"  # default for non-Jetson targets: Ubuntu 22.04 (Jetson: the JetPack row's)

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
# The x86-cuda target's TensorRT (from NVIDIA's apt repository, as on Jetson) and cuda-python range.
X86_CUDA_TENSORRT = "10.3.0"
X86_CUDA_PYTHON = ">=12.6.1,<13"
# NVIDIA's onnxruntime-gpu wheels for JetPack 6 are built against NumPy 1.x.
_JP6_CONSTRAINTS = ("numpy<2",)


@dataclass(frozen=True)
class Platform:
    """A target resolved against its JetPack row (or its plain Python and glibc for x86)."""

    target: Target
    jetpack: JetPack | None
    python: str
    glibc: str

    @property
    def onnxruntime(self) -> str:
        """The onnxruntime distribution for this target (same import name, different builds)."""
        return "onnxruntime-gpu" if self.target.gpu else "onnxruntime"

    @property
    def cuda_python(self) -> str | None:
        if self.jetpack is not None:
            return self.jetpack.cuda_python
        return X86_CUDA_PYTHON if self.target.gpu else None

    @property
    def constraints(self) -> tuple[str, ...]:
        """Bounds for the resolver that the edge-vla wheel's own requirements cannot express."""
        if self.jetpack is not None and self.jetpack.version.startswith("6."):
            return _JP6_CONSTRAINTS
        return ()

    def to_dict(self) -> dict[str, object]:
        jp = self.jetpack
        return {
            "target": self.target.name,
            "description": self.target.description,
            "arch": self.target.arch,
            "python": self.python,
            "glibc": self.glibc,
            "gpu": self.target.gpu,
            "compute_capability": self.target.compute_capability,
            "jetpack": None if jp is None else {
                "version": jp.version, "l4t": jp.l4t, "ubuntu": jp.ubuntu, "cuda": jp.cuda,
                "cudnn": jp.cudnn, "tensorrt": jp.tensorrt, "ort_index": jp.ort_index,
            },
            "tensorrt": jp.tensorrt if jp else (X86_CUDA_TENSORRT if self.target.gpu else None),
            "cuda": jp.cuda if jp else ("12" if self.target.gpu else None),
        }


def resolve(target: str, jetpack: str | None = None, python: str | None = None, glibc: str | None = None) -> Platform:
    """Pick the JetPack row, Python and glibc for `target`, refusing combinations NVIDIA does not ship."""
    if target not in TARGETS:
        raise ConfigError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    t = TARGETS[target]
    if python is not None and not _is_version(python, 2):
        raise ConfigError(f"--python {python!r} must be MAJOR.MINOR, e.g. 3.10")
    if glibc is not None and not _is_version(glibc, 2):
        raise ConfigError(f"--glibc {glibc!r} must be MAJOR.MINOR, e.g. 2.35 (`ldd --version` on the robot)")
    if not t.jetson:
        if jetpack:
            raise ConfigError(f"--jetpack applies to Jetson targets only, not {target}")
        return Platform(t, None, python or t.python, glibc or t.glibc)
    version = jetpack or t.jetpack
    assert version is not None
    if version in REFUSED_JETPACKS:
        raise ConfigError(REFUSED_JETPACKS[version])
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
    if glibc and glibc != row.glibc:
        raise ConfigError(f"JetPack {version} (Ubuntu {row.ubuntu}) has glibc {row.glibc}, not {glibc}; drop --glibc")
    return Platform(t, row, row.python, row.glibc)


def _is_version(text: str, parts: int) -> bool:
    pieces = text.split(".")
    return len(pieces) == parts and all(p.isdigit() for p in pieces)


def parse_pins(specs: list[str] | None) -> dict[str, str]:
    """`--pin name==version` options -> {name: version}."""
    out: dict[str, str] = {}
    for spec in specs or ():
        name, sep, version = spec.partition("==")
        if not sep or not name.strip() or not version.strip():
            raise ConfigError(f"--pin {spec!r} is not NAME==VERSION")
        out[name.strip()] = version.strip()
    return out
