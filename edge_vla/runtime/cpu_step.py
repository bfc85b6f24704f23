"""The Euler loop of a chunk's step-graph evaluations in one C call, on the CPU (issue 28).

onnxruntime runs the tiny step graph as ~65 kernels of a few microseconds each: at M = 8 rows its time is per-kernel
cost, not arithmetic (docs/SPEED.md). cpu_step.c runs the same function, every Euler step of a chunk, in one call:
small-M GEMMs on weights packed once, with LayerNorm, softmax, GELU, the adaLN gates and the residuals around them.
OrtBackend's one-call chunk uses it (prefix graph in onnxruntime, then this loop) where all of these hold, else it
composes the onnxruntime chunk graph as before, after one log line saying why:

- $EDGE_VLA_CPU_STEP is "auto" (the default) or "on", not "off";
- a C compiler builds cpu_step.c (`$CC`, else cc/gcc/clang on PATH; `-O3 -march=native`, retried without
  -march=native) into a writable cache directory: $EDGE_VLA_KERNEL_CACHE, ~/.cache/edge_vla/kernels (the CUDA
  kernels' cache, kernels/build.py), the state directory's kernels/ (tune.state_dirs: $EDGE_VLA_STATE_DIR, systemd's
  $STATE_DIRECTORY, ...), else a private per-user directory in the temp dir. The library's name carries a hash of the
  source, the flags, the compiler and this CPU; it is written atomically with its sha256 beside it, and a cached file
  whose hash does not match (truncated, overwritten) is rebuilt, never loaded;
- the step graph is the FP32 FoldedStep export, read node by node (read_step): anything else (FP16 casts, INT8
  Quantize/DequantizeLinear, another shape or attribute, an extra node, a scalar-t time input, pi0's graphs) is
  refused, and so are step weights over MAX_WEIGHT_BYTES;
- at load, the C chunk and onnxruntime's stepping path, on the same random noise and prefix K/V, agree to rel L2 <=
  GATE_REL_L2 in the chunk's displacement (x_N - x_0), and the C chunk is not the slower of the two (best of a few
  runs each: a build without -march=native on x86 is SSE2-only and ~2x slower than onnxruntime).

The robot has no `onnx` package: the graph is read through edge_vla.runtime.onnx_proto.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shlex
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from edge_vla.atomic import atomic_write
from edge_vla.errors import EdgeVlaError
from edge_vla.runtime import onnx_proto as pb
from edge_vla.runtime.backend import env_switch

log = logging.getLogger(__name__)

CPU_STEP_ENV = "EDGE_VLA_CPU_STEP"
KERNEL_CACHE_ENV = "EDGE_VLA_KERNEL_CACHE"  # shared with kernels/build.py
SOURCE = Path(__file__).with_name("cpu_step.c")
ABI = 1  # cpu_step.c EV_ABI
# The load-time numerics gate (the brief's): the C chunk's displacement against onnxruntime's, rel L2.
GATE_REL_L2 = 1e-5
# Above this many bytes of step weights the GEMMs are memory-bound and onnxruntime's threads win; tiny: ~1.9 MB.
MAX_WEIGHT_BYTES = 32 << 20
_FLAGS = ("-O3", "-std=gnu11", "-ffp-contract=fast", "-fno-math-errno", "-shared", "-fPIC")
_NATIVE = "-march=native"


class StepStructureError(EdgeVlaError):
    """The step graph is not the FP32 FoldedStep structure the C loop computes."""


def cpu_step_enabled(value: bool | str | None = None) -> bool:
    """Whether to try the C loop: `value` if given, else $EDGE_VLA_CPU_STEP, else auto (on)."""
    return env_switch(value, CPU_STEP_ENV, "the C Euler loop where it applies", "onnxruntime runs every step")


# --- building and loading the library ----------------------------------------------------------------------
@dataclass(frozen=True)
class Library:
    path: Path
    cdll: ctypes.CDLL
    panel: int  # the packed weights' column block (NB in cpu_step.c): the vector width times the tile's vectors


def _compiler() -> list[str] | None:
    cc = os.environ.get("CC")
    if cc:
        return shlex.split(cc)
    found = next((p for p in (shutil.which(n) for n in ("cc", "gcc", "clang")) if p), None)
    return [found] if found else None


def _compiler_identity(cc: list[str]) -> str:
    """The resolved executable with its size and mtime: a new compiler gets a new library, without running it."""
    exe = shutil.which(cc[0]) or cc[0]
    try:
        st = os.stat(exe)
        return f"{os.path.realpath(exe)}:{st.st_size}:{st.st_mtime_ns}:{' '.join(cc[1:])}"
    except OSError:
        return " ".join(cc)


def _cpu_identity() -> str:
    """The architecture, model and feature flags -march=native compiles for (tune's machine fingerprint, less the
    CPU count): a cache shared between machines never hands a library built for one CPU to another."""
    from edge_vla.runtime.tune import machine_fingerprint  # late: tune imports the backends

    fp = machine_fingerprint()
    return f"{fp['arch']}\n{fp['cpu_model']}\n{fp['cpu_flags_sha256']}"


def _private(d: Path) -> bool:
    """d is a real directory owned by this user (or root) that no other user can write."""
    try:
        st = os.lstat(d)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid in (os.geteuid(), 0) and not st.st_mode & 0o022


def _writable(d: Path) -> bool:
    try:
        d.mkdir(parents=True, exist_ok=True, mode=0o755)
        fd, probe = tempfile.mkstemp(dir=d, prefix=".probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError:
        return False
    return _private(d)


def cache_dirs() -> list[Path]:
    """Where the library may be cached, in order of preference (see the module docstring)."""
    dirs = []
    if os.environ.get(KERNEL_CACHE_ENV):
        dirs.append(Path(os.environ[KERNEL_CACHE_ENV]))
    home = os.environ.get("HOME")
    if home:
        dirs.append(Path(home) / ".cache" / "edge_vla" / "kernels")
    from edge_vla.runtime.tune import state_dirs  # late: tune imports the backends

    dirs += [d / "kernels" for d in state_dirs()]
    dirs.append(Path(tempfile.gettempdir()) / f"edge-vla-kernels-{os.geteuid()}")
    return list(dict.fromkeys(dirs))


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _intact(so: Path) -> bool:
    """so exists, is this user's (or root's) and writable by no one else, and matches the digest written with it."""
    try:
        st = os.lstat(so)
        want = so.with_name(so.name + ".sha256").read_text().split()[0]
    except (OSError, IndexError):
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_uid not in (os.geteuid(), 0) or st.st_mode & 0o022:
        return False
    return _digest(so) == want


def _compile(cc: list[str], so: Path) -> str | None:
    """Build the library into `so` (atomically, digest beside it); None, or why it failed (one line)."""
    fd, tmp = tempfile.mkstemp(dir=so.parent, prefix=f".{so.name}.", suffix=".so")
    os.close(fd)
    try:
        why = "no output"
        for flags in ((*_FLAGS, _NATIVE), _FLAGS):  # a compiler or target without -march=native: the generic build
            try:
                proc = subprocess.run([*cc, *flags, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True,
                                      timeout=120)
            except (OSError, subprocess.TimeoutExpired) as exc:
                return f"{type(exc).__name__}: {exc}"
            if proc.returncode == 0:
                digest = so.with_name(so.name + ".sha256")
                with atomic_write(digest, "w") as f:
                    f.write(f"{_digest(Path(tmp))}  {so.name}\n")
                for path in (digest, Path(tmp)):  # mkstemp's 0600 otherwise: both are read by whoever loads the cache
                    os.chmod(path, 0o644)
                os.replace(tmp, so)  # the compiler wrote tmp in so's directory: the rename is atomic
                return None
            why = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        return why
    finally:
        Path(tmp).unlink(missing_ok=True)


def _open(so: Path) -> Library | None:
    try:
        cdll = ctypes.CDLL(str(so))
        if cdll.ev_abi() != ABI:
            return None
    except (OSError, AttributeError):
        return None
    cdll.ev_chunk.restype = ctypes.c_int
    cdll.ev_chunk.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32, ctypes.c_float,
                              ctypes.c_void_p, ctypes.c_void_p]
    cdll.ev_work_floats.restype = ctypes.c_int64
    cdll.ev_work_floats.argtypes = [ctypes.c_void_p]
    return Library(so, cdll, int(cdll.ev_panel_width()))


def load_library() -> Library | None:
    """The compiled C loop, built at first use and cached; None (said why, in one log line) where it cannot be."""
    cc = _compiler()
    return _load_library(tuple(cc) if cc else None, tuple(str(d) for d in cache_dirs()), os.environ.get("PATH", ""))


@lru_cache(maxsize=8)
def _load_library(cc: tuple[str, ...] | None, dirs: tuple[str, ...], _path: str) -> Library | None:
    """Memoised per compiler, cache directories and PATH: a process builds and opens the library once."""
    source = SOURCE.read_bytes()
    if cc is None:
        log.info("C Euler loop not used: no C compiler (set CC, or install gcc) to build %s; onnxruntime runs the "
                 "steps", SOURCE.name)
        return None
    key = hashlib.sha256(b"\0".join([source, _compiler_identity(list(cc)).encode(), " ".join(_FLAGS).encode(),
                                     _cpu_identity().encode()])).hexdigest()[:16]
    name = f"libev_cpu_step-{key}.so"
    for d in map(Path, dirs):  # a valid library in any of them, even one this user cannot write (a read-only cache)
        if _private(d) and _intact(d / name):
            lib = _open(d / name)
            if lib is not None:
                log.debug("C Euler loop: %s (panel %d)", lib.path, lib.panel)
                return lib
    target = next((Path(d) for d in dirs if _writable(Path(d))), None)
    if target is None:
        log.info("C Euler loop not used: no private writable cache directory for its library (tried %s; set %s); "
                 "onnxruntime runs the steps", ", ".join(dirs), KERNEL_CACHE_ENV)
        return None
    so = target / name
    rebuilt = so.exists()
    why = _compile(list(cc), so)
    if why is not None:
        log.warning("C Euler loop not used: the C compiler %s failed on %s (%s); onnxruntime runs the steps",
                    " ".join(cc), SOURCE.name, why[:300])
        return None
    lib = _open(so)
    if lib is None:
        log.warning("C Euler loop not used: %s was built but does not load; onnxruntime runs the steps", so)
        return None
    if rebuilt:
        log.info("C Euler loop: rebuilt %s (the cached file did not match its sha256)", so)
    else:
        log.debug("C Euler loop: compiled %s", so)
    return lib


# --- reading the step graph --------------------------------------------------------------------------------
@dataclass
class StepWeights:
    """FoldedStep's weights (float32, [K, N] as the Gemms take them) and where each time-row slice is used."""

    T: int
    D: int
    E: int
    H: int
    F: int
    R: int
    eps: float
    gelu: tuple[float, float]
    w_in: np.ndarray
    b_in: np.ndarray
    pos: np.ndarray
    prefix_emb: np.ndarray | None
    w_out: np.ndarray
    b_out: np.ndarray
    final: tuple[int, int]  # (shift, scale) offsets into the time row
    blocks: list[dict[str, Any]] = field(default_factory=list)
    kv: list[tuple[str, str]] = field(default_factory=list)  # per block: the (K, V) graph inputs it attends to

    @property
    def nbytes(self) -> int:
        arrays = [self.w_in, self.w_out, *(v for b in self.blocks for v in b.values() if isinstance(v, np.ndarray))]
        return sum(a.nbytes for a in arrays)


_BLOCK_WEIGHTS = ("w_qkv", "b_qkv", "w_o", "b_o", "ln_w", "ln_b", "w_q", "b_q", "w_co", "b_co", "w_1", "b_1", "w_2",
                  "b_2")
_BLOCK_OFFSETS = ("shift1", "scale1", "gate1", "shift2", "scale2", "gate2")


class _Reader:
    """Follows FoldedStep's structure from the graph inputs to `velocity`, one node at a time, checking each op,
    attribute and constant; every node but Constant/Identity must be taken exactly once."""

    def __init__(self, model: Any, x_t: str, time: str, velocity: str, mask: str | None) -> None:
        g = model.graph
        self.nodes = list(g.node)
        for n in self.nodes:
            if n.domain not in ("", "ai.onnx"):
                raise StepStructureError(f"node {n.name or n.op_type} is {n.domain}.{n.op_type}, not plain ONNX")
        self.inits = {t.name: t for t in g.initializer}
        self.inputs = {v.name for v in g.input} - set(self.inits)
        self.consumers: dict[str, list[Any]] = {}
        for n in self.nodes:
            for i in dict.fromkeys(n.input):  # Mul(u, u) reads u once
                self.consumers.setdefault(i, []).append(n)
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.taken: set[int] = set()
        self.x_t, self.time, self.velocity, self.mask = x_t, time, velocity, mask
        for name in (x_t, time, *([mask] if mask else [])):
            if name not in self.inputs:
                raise StepStructureError(f"the step graph has no input {name!r}")
        self.split: dict[str, int] = {}  # time-row Split output -> its index
        self.used_slices: set[int] = set()

    # -- primitives --
    def const(self, name: str, what: str) -> np.ndarray:
        """A float32 constant (initializer, Constant node, or Identity of one)."""
        node = self.producer.get(name)
        seen: set[str] = set()
        while node is not None and node.op_type == "Identity" and name not in seen:  # a cycle ends the walk
            seen.add(name)
            self.take(node)
            name = node.input[0]
            node = self.producer.get(name)
        t = self._tensor(name, take=True)
        if t is None:
            src = f"the output of {node.op_type}" if node is not None else "not a constant"
            raise StepStructureError(f"{what} {name!r} is {src}, not a float32 constant")
        if t.data_type != pb.FLOAT:
            raise StepStructureError(f"{what} {name!r} has ONNX data type {t.data_type}, not float32")
        arr = pb.to_array(t)
        if arr is None:
            raise StepStructureError(f"{what} {name!r} is stored externally or in an unsupported field")
        return np.array(arr, dtype=np.float32)

    def _tensor(self, name: str, take: bool) -> Any | None:
        """The TensorProto of an initializer or of a Constant node's value (the node taken if `take`); else None."""
        if name in self.inits:
            return self.inits[name]
        node = self.producer.get(name)
        if node is None or node.op_type != "Constant":
            return None
        if take:
            self.take(node)
        return next((a.t for a in node.attribute if a.name == "value" and a.type == pb.ATTR_TENSOR), None)

    def ints(self, name: str, what: str) -> list[int]:
        t = self._tensor(name, take=True)
        arr = None if t is None else pb.to_array(t)
        if arr is None or arr.dtype != np.int64:
            raise StepStructureError(f"{what}: {name!r} is not an int64 constant")
        return [int(v) for v in arr.ravel()]

    def take(self, node: Any) -> Any:
        self.taken.add(id(node))
        return node

    def attrs(self, node: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for a in node.attribute:
            out[a.name] = list(a.ints) if a.type == pb.ATTR_INTS else a.f if a.type == pb.ATTR_FLOAT else a.i
        return out

    def next_op(self, name: str, op: str, where: Callable[[Any], bool] = lambda n: True) -> Any:
        """The one not-yet-taken `op` node that reads `name` (and satisfies `where`)."""
        found = [n for n in self.consumers.get(name, []) if n.op_type == op and id(n) not in self.taken and where(n)]
        if len(found) != 1:
            seen = sorted({n.op_type for n in self.consumers.get(name, []) if id(n) not in self.taken})
            raise StepStructureError(f"expected one {op} reading {name!r}, found {len(found)} (readers: {seen})")
        return self.take(found[0])

    # -- FoldedStep's pieces --
    def reshape(self, name: str, shape: list[int]) -> str:
        n = self.next_op(name, "Reshape")
        got = self.ints(n.input[1], f"Reshape {n.name}")
        if got != shape or self.attrs(n).get("allowzero", 0):
            raise StepStructureError(f"Reshape {n.name} of {name!r} to {got}, expected {shape}")
        return n.output[0]

    def transpose(self, name: str, perm: list[int]) -> str:
        n = self.next_op(name, "Transpose")
        if self.attrs(n).get("perm") != perm:
            raise StepStructureError(f"Transpose {n.name} has perm {self.attrs(n).get('perm')}, expected {perm}")
        return n.output[0]

    def gemm(self, name: str, k: int, n_out: int | None) -> tuple[str, np.ndarray, np.ndarray]:
        """Gemm(name, W [k, N], b [N]) with alpha = beta = 1 and no transposes; N is checked where known."""
        n = self.next_op(name, "Gemm", lambda g: g.input[0] == name)
        a = self.attrs(n)
        for attr, want in (("alpha", 1.0), ("beta", 1.0), ("transA", 0), ("transB", 0)):
            if a.get(attr, want) != want:
                raise StepStructureError(f"Gemm {n.name} ({n.input[1]}) has {attr}={a[attr]}; the C loop computes "
                                         f"{attr}={want}")
        if len(n.input) != 3:
            raise StepStructureError(f"Gemm {n.name} ({n.input[1]}) has no bias input")
        w = self.const(n.input[1], f"Gemm {n.name} weight")
        b = self.const(n.input[2], f"Gemm {n.name} bias")
        if w.ndim != 2 or w.shape[0] != k or (n_out is not None and w.shape[1] != n_out) or b.shape != (w.shape[1],):
            cols = n_out if n_out is not None else "N"
            raise StepStructureError(f"Gemm weight {n.input[1]} is {list(w.shape)} (bias {list(b.shape)}), expected "
                                     f"[{k}, {cols}]")
        return n.output[0], w, b

    def binary(self, op: str, name: str, other: Callable[[str], bool]) -> tuple[str, str]:
        """op(name, x) or op(x, name) (commutative) with other(x); returns (output, x)."""
        def fits(n: Any) -> bool:
            return len(n.input) == 2 and name in n.input and other(n.input[1] if n.input[0] == name else n.input[0])

        n = self.next_op(name, op, fits)
        return n.output[0], n.input[1] if n.input[0] == name else n.input[0]

    def row_slice(self, name: str, what: str) -> int:
        if name not in self.split:
            raise StepStructureError(f"{what} {name!r} is not a slice of the time input {self.time!r}")
        index = self.split[name]
        if index in self.used_slices:
            raise StepStructureError(f"time-row slice {index} is used twice")
        self.used_slices.add(index)
        return index

    def layer_norm(self, name: str, e: int, from_row: bool) -> tuple[str, float, Any, Any]:
        """LayerNormalization(name) over the last axis; (output, eps, scale, shift) with scale/shift time-row slice
        indices (from_row) or float32 constants [e]."""
        n = self.next_op(name, "LayerNormalization", lambda x: x.input[0] == name)
        a = self.attrs(n)
        if a.get("axis", -1) not in (-1, 1) or len(n.input) != 3 or any(self.consumers.get(o) for o in n.output[1:]):
            raise StepStructureError(f"LayerNormalization {n.name}: not over the last axis with scale and bias")
        eps = float(a.get("epsilon", 1e-5))
        what = f"LayerNormalization {n.name} input"
        if from_row:
            return n.output[0], eps, self.row_slice(n.input[1], what), self.row_slice(n.input[2], what)
        scale, shift = self.const(n.input[1], what), self.const(n.input[2], what)
        if scale.shape != (e,) or shift.shape != (e,):
            raise StepStructureError(f"LayerNormalization {n.name}: scale/bias of shape {list(scale.shape)}")
        return n.output[0], eps, scale, shift

    def softmax(self, name: str, rank: int) -> str:
        n = self.next_op(name, "Softmax")
        if self.attrs(n).get("axis", -1) not in (-1, rank - 1):
            raise StepStructureError(f"Softmax {n.name} is not over the last axis")
        return n.output[0]

    def matmul(self, a: str, b: str | None = None) -> Any:
        return self.next_op(a, "MatMul", lambda n: n.input[0] == a and (b is None or n.input[1] == b))

    def gelu(self, u: str) -> tuple[str, tuple[float, float]]:
        """u * Sigmoid(u * (A + B * (u * u))): export/onnx_graphs.py gelu_tanh_sigmoid."""
        sq = self.next_op(u, "Mul", lambda n: list(n.input) == [u, u]).output[0]
        scaled, b = self.binary("Mul", sq, lambda x: self._scalar(x))
        inner, a = self.binary("Add", scaled, lambda x: self._scalar(x))
        z, _ = self.binary("Mul", inner, lambda x: x == u)
        sig = self.next_op(z, "Sigmoid").output[0]
        out, _ = self.binary("Mul", sig, lambda x: x == u)
        return out, (float(self.const(a, "GELU constant")), float(self.const(b, "GELU constant")))

    def _scalar(self, name: str) -> bool:
        t = self._tensor(name, take=False)
        return t is not None and t.data_type == pb.FLOAT and len(t.dims) == 0

    def time_split(self) -> int:
        n = self.next_op(self.time, "Split")
        if self.attrs(n).get("axis", 0) != 0:
            raise StepStructureError(f"the time input's Split {n.name} is not along axis 0")
        sizes = self.ints(n.input[1], "the time row's Split sizes") if len(n.input) > 1 else self.attrs(n).get("split")
        if not sizes or len(set(sizes)) != 1:
            raise StepStructureError(f"the time input's Split {n.name} has unequal sizes {sizes}")
        self.split = {o: i for i, o in enumerate(n.output)}
        return sizes[0]


def read_step(model_bytes: bytes, x_t: str = "x_t", time: str = "time_cond", velocity: str = "velocity",
              mask: str | None = None) -> StepWeights:
    """The weights of an FP32 FoldedStep graph, checked node by node (StepStructureError: where it differs)."""
    try:
        model = pb.load_model(model_bytes)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise StepStructureError(f"the step graph does not parse ({type(exc).__name__})") from exc
    r = _Reader(model, x_t, time, velocity, mask)
    slice_width = r.time_split()
    xr_node = r.next_op(x_t, "Reshape")
    x_shape = r.ints(xr_node.input[1], "x_t's Reshape")
    if len(x_shape) != 2:
        raise StepStructureError(f"x_t is reshaped to {x_shape}, not [T, D]")
    T, D = x_shape
    h, w_in, b_in = r.gemm(xr_node.output[0], D, None)
    E = w_in.shape[1]
    if slice_width != E:
        raise StepStructureError(f"the time row is cut into slices of {slice_width}, not the expert width {E}")

    def is_pos(x: str) -> bool:
        return x in r.inits or (x in r.producer and r.producer[x].op_type in ("Constant", "Identity"))

    h, pos_name = r.binary("Add", h, is_pos)
    pos = r.const(pos_name, "the action positions")
    if pos.shape != (T, E):
        raise StepStructureError(f"the action positions are {list(pos.shape)}, expected [{T}, {E}]")
    prefix_emb = None
    if mask is not None:
        m = r.reshape(mask, [T, 1])
        me, emb_name = r.binary("Mul", m, is_pos)
        prefix_emb = r.const(emb_name, "the prefix embedding")
        if prefix_emb.shape != (E,):
            raise StepStructureError(f"the prefix embedding is {list(prefix_emb.shape)}, expected [{E}]")
        h, _ = r.binary("Add", me, lambda x: x == h)
    weights = StepWeights(T=T, D=D, E=E, H=0, F=0, R=0, eps=0.0, gelu=(0.0, 0.0), w_in=w_in, b_in=b_in, pos=pos,
                          prefix_emb=prefix_emb, w_out=np.zeros(0), b_out=np.zeros(0), final=(0, 0))
    eps_seen: set[float] = set()
    while True:
        a, eps, scale, shift = r.layer_norm(h, E, from_row=True)
        eps_seen.add(eps)
        gemm = next((n for n in r.consumers.get(a, []) if n.op_type == "Gemm"), None)
        w_shape = r.const(gemm.input[1], "Gemm weight").shape if gemm is not None and len(gemm.input) > 1 else ()
        if len(w_shape) == 2 and w_shape[1] == D and w_shape[1] != 3 * E:  # the final norm and output projection
            out, w_out, b_out = r.gemm(a, E, D)
            v = r.reshape(out, [1, T, D])
            if v != velocity:
                raise StepStructureError(f"the output projection does not end in {velocity!r}")
            weights.w_out, weights.b_out, weights.final = w_out, b_out, (shift * E, scale * E)
            break
        h = _block(r, weights, h, a, (scale, shift), eps_seen)
    if len(eps_seen) != 1:
        raise StepStructureError(f"LayerNormalization epsilons differ: {sorted(eps_seen)}")
    weights.eps = eps_seen.pop()
    L = len(weights.blocks)
    if L == 0 or len(r.split) != 6 * L + 2 or len(r.used_slices) != 6 * L + 2:
        raise StepStructureError(f"{len(r.split)} time-row slices for {L} blocks ({len(r.used_slices)} used)")
    weights.R = len(r.split) * E
    left = [n.op_type for n in r.nodes if id(n) not in r.taken and n.op_type not in ("Constant", "Identity")]
    if left:
        raise StepStructureError(f"nodes the C loop does not compute: {sorted(set(left))}")
    if weights.gelu[0] == 0.0:
        raise StepStructureError("no GELU found")
    return weights


def _block(r: _Reader, w: StepWeights, h: str, a: str, ln1: tuple[int, int], eps_seen: set[float]) -> str:
    """One expert block from its first (already read) LayerNormalization output `a`; returns the block's output."""
    T, E = w.T, w.E
    qkv, w_qkv, b_qkv = r.gemm(a, E, 3 * E)
    resh = r.next_op(qkv, "Reshape")
    shape = r.ints(resh.input[1], "the QKV Reshape")
    if len(shape) != 3 or shape[0] != T or shape[1] % 3 or shape[1] * shape[2] != 3 * E:
        raise StepStructureError(f"QKV Reshape to {shape}, expected [{T}, 3 * heads, head_dim]")
    H, dh = shape[1] // 3, shape[2]
    if w.H and w.H != H:
        raise StepStructureError(f"blocks with {w.H} and {H} heads")
    w.H = H
    heads = r.transpose(resh.output[0], [1, 0, 2])
    split = r.next_op(heads, "Split")
    if r.attrs(split).get("axis", 0) != 0 or r.ints(split.input[1], "the QKV Split") != [H, H, H]:
        raise StepStructureError(f"QKV Split {split.name} is not [{H}, {H}, {H}] along the heads")
    q, k, v = split.output
    kt = r.transpose(k, [0, 2, 1])
    scores = r.matmul(q, kt).output[0]
    att = r.softmax(scores, 3)
    y = r.matmul(att, v).output[0]
    y = r.reshape(r.transpose(y, [1, 0, 2]), [T, E])
    o, w_o, b_o = r.gemm(y, E, E)
    gated, gate1 = r.binary("Mul", o, lambda x: x in r.split)
    h1, _ = r.binary("Add", gated, lambda x: x == h)
    # cross-attention to the prefix K/V inputs
    c, eps, ln_w, ln_b = r.layer_norm(h1, E, from_row=False)
    eps_seen.add(eps)
    qc, w_q, b_q = r.gemm(c, E, E)
    qh = r.transpose(r.reshape(qc, [T, H, dh]), [1, 0, 2])
    mm = r.matmul(qh)
    kt_node = r.producer.get(mm.input[1])
    if kt_node is None or kt_node.op_type != "Transpose" or kt_node.input[0] not in r.inputs:
        raise StepStructureError("cross-attention keys are not a transposed graph input")
    k_name = kt_node.input[0]
    r.transpose(k_name, [0, 1, 3, 2])
    att = r.softmax(mm.output[0], 4)
    mv = r.matmul(att)
    v_name = mv.input[1]
    if v_name not in r.inputs or v_name == k_name:
        raise StepStructureError("cross-attention values are not a graph input")
    y = r.reshape(r.transpose(mv.output[0], [0, 2, 1, 3]), [T, E])
    co, w_co, b_co = r.gemm(y, E, E)
    h2, _ = r.binary("Add", co, lambda x: x == h1)
    # MLP
    a2, eps, scale2, shift2 = r.layer_norm(h2, E, from_row=True)
    eps_seen.add(eps)
    u, w_1, b_1 = r.gemm(a2, E, None)
    F = w_1.shape[1]
    if w.F and w.F != F:
        raise StepStructureError(f"blocks with MLP widths {w.F} and {F}")
    w.F = F
    g, gelu = r.gelu(u)
    if w.gelu[0] and w.gelu != gelu:
        raise StepStructureError("blocks with different GELU constants")
    w.gelu = gelu
    m, w_2, b_2 = r.gemm(g, F, E)
    gated2, gate2 = r.binary("Mul", m, lambda x: x in r.split)
    out, _ = r.binary("Add", gated2, lambda x: x == h2)
    slices = (ln1[1], ln1[0], r.row_slice(gate1, "gate"), shift2, scale2, r.row_slice(gate2, "gate"))
    block: dict[str, Any] = dict(zip(_BLOCK_WEIGHTS, (w_qkv, b_qkv, w_o, b_o, ln_w, ln_b, w_q, b_q, w_co, b_co, w_1,
                                                      b_1, w_2, b_2)))
    block.update({key: index * E for key, index in zip(_BLOCK_OFFSETS, slices, strict=True)})
    w.blocks.append(block)
    w.kv.append((k_name, v_name))
    return out


# --- the packed model and the call -------------------------------------------------------------------------
class _Block(ctypes.Structure):
    _fields_ = [*((n, ctypes.c_void_p) for n in _BLOCK_WEIGHTS), *((n, ctypes.c_int32) for n in _BLOCK_OFFSETS)]


class _Model(ctypes.Structure):
    _fields_ = [*((n, ctypes.c_void_p) for n in ("w_in", "b_in", "pos", "prefix_emb", "w_out", "b_out", "blocks",
                                                  "work")),
                ("work_floats", ctypes.c_int64),
                *((n, ctypes.c_int32) for n in ("abi", "T", "D", "E", "H", "L", "P", "F", "R", "shift", "scale")),
                *((n, ctypes.c_float) for n in ("eps", "gelu_a", "gelu_b"))]


def _aligned(n: int) -> np.ndarray:
    """n float32 zeros at a 64-byte boundary (one cache line; the C loop's vectors)."""
    raw = np.zeros(n + 16, dtype=np.float32)
    start = (-raw.ctypes.data % 64) // 4
    return raw[start: start + n]


def _panels(w: np.ndarray, nb: int) -> np.ndarray:
    """W [K, N] -> panels of nb columns, [ceil(N / nb), K, nb], zero-padded (cpu_step.c's GEMM layout)."""
    k, n = w.shape
    npad = -(-n // nb) * nb
    padded = np.zeros((k, npad), np.float32)
    padded[:, :n] = w
    out = _aligned(padded.size)
    out[:] = padded.reshape(k, npad // nb, nb).transpose(1, 0, 2).ravel()
    return out


def _padded(b: np.ndarray, nb: int) -> np.ndarray:
    out = _aligned(-(-b.size // nb) * nb)
    out[: b.size] = b
    return out


class CpuStep:
    """A chunk's Euler steps in one C call, reading the prefix K/V and the mask from the backend's own buffers."""

    def __init__(self, lib: Library, w: StepWeights, kv: Sequence[np.ndarray], mask: np.ndarray | None,
                 rows: np.ndarray, steps: int, dt: float) -> None:
        L, H, nb = len(w.blocks), w.H, lib.panel
        P = kv[0].shape[2]
        for arr in kv:
            if arr.shape != (1, H, P, w.E // H) or arr.dtype != np.float32 or not arr.flags.c_contiguous:
                raise StepStructureError(f"prefix K/V buffer {arr.dtype}{list(arr.shape)}, expected float32 "
                                         f"[1, {H}, {P}, {w.E // H}]")
        if rows.ndim != 2 or rows.shape[1] != w.R or len(rows) < 2 * steps + 1:
            raise StepStructureError(f"time rows {list(rows.shape)} do not fit {steps} steps of a [{w.R}] row")
        if mask is not None and (w.prefix_emb is None or mask.size != w.T or mask.dtype != np.float32):
            raise StepStructureError("the prefix mask does not fit the graph's prefix embedding")
        self.lib, self.steps, self.dt = lib, steps, np.float32(dt)
        self._keep: list[Any] = []  # every array the C side points into lives as long as this object

        def ptr(a: np.ndarray | None) -> int | None:
            if a is None:
                return None
            self._keep.append(a)
            return a.ctypes.data

        self._blocks = (_Block * L)()
        for cb, b in zip(self._blocks, w.blocks, strict=True):
            for name in _BLOCK_WEIGHTS:
                arr = b[name]
                setattr(cb, name, ptr(_panels(arr, nb) if arr.ndim == 2 else
                                      _padded(arr, nb) if name.startswith("b_") else _padded(arr, 1)))
            for name in _BLOCK_OFFSETS:
                setattr(cb, name, int(b[name]))
        m = _Model(w_in=ptr(_panels(w.w_in, nb)), b_in=ptr(_padded(w.b_in, nb)), pos=ptr(_padded(w.pos.ravel(), 1)),
                   prefix_emb=ptr(None if w.prefix_emb is None else _padded(w.prefix_emb, 1)),
                   w_out=ptr(_panels(w.w_out, nb)), b_out=ptr(_padded(w.b_out, nb)),
                   blocks=ctypes.addressof(self._blocks), work=None, work_floats=0, abi=ABI, T=w.T, D=w.D, E=w.E,
                   H=H, L=L, P=P, F=w.F, R=w.R, shift=w.final[0], scale=w.final[1], eps=w.eps, gelu_a=w.gelu[0],
                   gelu_b=w.gelu[1])
        self.work = _aligned(int(lib.cdll.ev_work_floats(ctypes.byref(m))))
        m.work, m.work_floats = self.work.ctypes.data, self.work.size
        self._model = m
        self._kv = (ctypes.c_void_p * len(kv))(*(ptr(a) for a in kv))
        # Euler reads the time row of slot 2i at step i (flow.py's half grid)
        self.rows = _aligned(steps * w.R).reshape(steps, w.R)
        self.rows[:] = rows[0: 2 * steps: 2]
        self.x = _aligned(w.T * w.D)
        self._args = (ctypes.addressof(m), ctypes.addressof(self._kv), self.rows.ctypes.data, steps, self.dt,
                      ptr(mask), self.x.ctypes.data)

    def run(self, noise: np.ndarray) -> np.ndarray:
        """x_0 = noise; returns x after the chunk's steps (a reused buffer, noise's shape)."""
        np.copyto(self.x, noise.reshape(-1), casting="same_kind")
        rc = self.lib.cdll.ev_chunk(*self._args)
        if rc != 0:
            raise EdgeVlaError(f"the C Euler loop refused its model (code {rc}); set {CPU_STEP_ENV}=off")
        return self.x.reshape(noise.shape)


@dataclass(frozen=True)
class Check:
    """The load-time comparison of the C chunk with onnxruntime's stepping path on the same inputs."""

    rel_l2: float  # of the displacement x_N - x_0
    c_s: float  # the C chunk, best of its timed runs
    ort_s: float  # onnxruntime's steps (and the Sampler's Euler updates), best of its timed runs


def check(step: CpuStep, kv: Sequence[np.ndarray], run_ort_step: Callable[[np.ndarray, int], np.ndarray],
          x_shape: tuple[int, ...], seed: int = 0, runs: int = 2) -> Check:
    """Run the C chunk and onnxruntime's steps on random noise and random prefix K/V written into the backend's
    buffers (restored afterwards); run_ort_step(x, slot) -> velocity. Also times both (best of `runs`): a build that
    is correct but slower than onnxruntime here (e.g. the generic build on x86, SSE2 only) is not worth taking."""
    rng = np.random.default_rng(seed)
    saved = [a.copy() for a in kv]
    clock = time.perf_counter
    try:
        for a in kv:
            a[...] = rng.standard_normal(a.shape, dtype=np.float32)
        noise = rng.standard_normal(x_shape, dtype=np.float32)
        x, scratch, ort_s = noise.copy(), np.empty_like(noise), float("inf")
        for _ in range(runs):
            np.copyto(x, noise)
            t0 = clock()
            for i in range(step.steps):  # the Sampler's Euler arithmetic: v * dt, then x + that
                np.multiply(run_ort_step(x, 2 * i), step.dt, out=scratch)
                x += scratch
            ort_s = min(ort_s, clock() - t0)
        c_s = float("inf")
        for _ in range(runs + 1):
            t0 = clock()
            got = step.run(noise)
            c_s = min(c_s, clock() - t0)
        got = got.copy()
    finally:
        for a, s in zip(kv, saved, strict=True):
            a[...] = s
    ref = x - noise
    err = float(np.linalg.norm((got - noise) - ref) / max(float(np.linalg.norm(ref)), 1e-30))
    return Check(err, c_s, ort_s)


def prepare(step_graph: Path, buffers: Mapping[str, np.ndarray], *, x_t: str, time: str, velocity: str,
            mask: str | None, rows: np.ndarray, steps: int, dt: float,
            run_ort_step: Callable[[np.ndarray, int], np.ndarray]) -> CpuStep | None:
    """The C loop for this step graph and these buffers, checked against onnxruntime; None where it does not apply
    (one log line saying why; never an exception for an optional speed-up)."""
    try:
        weights = read_step(step_graph.read_bytes(), x_t=x_t, time=time, velocity=velocity, mask=mask)
        if weights.nbytes > MAX_WEIGHT_BYTES:
            log.info("C Euler loop not used: %.0f MB of step weights (over %d MB, where onnxruntime's threaded GEMMs "
                     "win)", weights.nbytes / 1e6, MAX_WEIGHT_BYTES >> 20)
            return None
        lib = load_library()
        if lib is None:
            return None
        kv = [buffers[name] for pair in weights.kv for name in pair]
        # The one-call chunk has no action prefix: the RTC mask is zero (as the onnxruntime chunk fixes it).
        mask_arr = None if mask is None else np.zeros(weights.T, np.float32)
        step = CpuStep(lib, weights, kv, mask_arr, rows, steps, dt)
        result = check(step, kv, run_ort_step, buffers[x_t].shape)
    except StepStructureError as exc:
        log.info("C Euler loop not used: %s; onnxruntime runs the steps", exc)
        return None
    except Exception as exc:  # an optional speed-up never stops a load
        log.warning("C Euler loop not used (%s: %s); onnxruntime runs the steps", type(exc).__name__,
                    str(exc).splitlines()[0] if str(exc) else "")
        return None
    if not result.rel_l2 <= GATE_REL_L2:
        log.warning("C Euler loop not used: its chunk differs from onnxruntime's by rel L2 %.1e (gate %.0e); "
                    "onnxruntime runs the steps", result.rel_l2, GATE_REL_L2)
        return None
    if result.c_s > result.ort_s:
        log.info("C Euler loop not used: slower than onnxruntime here (%.2f ms against %.2f ms for %d steps, "
                 "library %s, panel %d)", 1e3 * result.c_s, 1e3 * result.ort_s, steps, lib.path.name, lib.panel)
        return None
    log.info("C Euler loop: %d steps in %.2f ms (onnxruntime: %.2f ms), rel L2 vs onnxruntime %.1e, panel %d", steps,
             1e3 * result.c_s, 1e3 * result.ort_s, result.rel_l2, lib.panel)
    return step
