"""Compile the C firmware reference with gcc on first use and load it with ctypes.

The sources ship inside the wheel (firmware/*.c, *.h); the shared library is built into a cache
directory keyed by a hash of the sources and flags, written to a temporary name and renamed into
place, so concurrent first uses (pytest workers, several emulators) never load a half-written file.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import stat
import subprocess
import tempfile
import threading
from pathlib import Path

from firmware_bridge.errors import FirmwareBuildError

log = logging.getLogger(__name__)

FIRMWARE_DIR = Path(__file__).resolve().parent / "firmware"
LIB_SOURCES = ("fw_codec.c", "fw_core.c")
# No -Werror here: a newer gcc on a robot must not refuse to build; the tests compile with -Werror.
CFLAGS = ("-std=c11", "-O2", "-Wall", "-Wextra", "-fPIC", "-shared")
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None


def cache_dir() -> Path:
    """$EDGE_VLA_CACHE_DIR, else $XDG_CACHE_HOME/edge-vla, else ~/.cache/edge-vla (tempdir if unwritable)."""
    env = os.environ.get("EDGE_VLA_CACHE_DIR")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edge-vla"
    try:
        base.mkdir(parents=True, exist_ok=True)
        return base
    except OSError:
        # A shared temp dir: the compiled firmware is loaded with ctypes, so the folder must be this user's and
        # writable by nobody else (someone who made /tmp/edge-vla-UID first could plant a library).
        fallback = Path(tempfile.gettempdir()) / f"edge-vla-{os.getuid()}"
        fallback.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(fallback)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
            raise FirmwareBuildError(f"the firmware cache {fallback} is not a directory of this user's that only it can "
                              f"write (uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}); remove it or set "
                              "EDGE_VLA_CACHE_DIR") from None
        return fallback


def source_hash() -> str:
    h = hashlib.sha256(" ".join(CFLAGS).encode())
    for path in sorted(FIRMWARE_DIR.glob("*.[ch]")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def find_gcc() -> str:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise FirmwareBuildError(
            "no C compiler found: the firmware reference (used by the emulator and the C/Python agreement "
            "tests) is compiled on first use. Install gcc (Debian/Ubuntu: `apt install gcc`) or set CC."
        )
    return cc


def build_library(out_dir: Path | None = None) -> Path:
    """The path of the compiled shared library, building it if this source hash is not cached yet."""
    out_dir = (out_dir or cache_dir()) / "firmware" / source_hash()
    lib = out_dir / "libfwref.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    cc = find_gcc()
    fd, tmp = tempfile.mkstemp(prefix=".libfwref-", suffix=".so", dir=out_dir)
    os.close(fd)
    cmd = [cc, *CFLAGS, *(str(FIRMWARE_DIR / s) for s in LIB_SOURCES), "-o", tmp]
    log.info("compiling firmware reference: %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        Path(tmp).unlink(missing_ok=True)
        raise FirmwareBuildError(
            f"compiling the firmware reference failed ({' '.join(cmd)}):\n{proc.stderr.strip()}\n"
            "Check that gcc works and that the sources under firmware_bridge/firmware are intact."
        )
    os.replace(tmp, lib)  # atomic: a concurrent builder either sees no file or a complete one
    return lib


def load() -> ctypes.CDLL:
    """The firmware reference library with its function signatures declared (built once per process)."""
    global _lib
    with _lock:
        if _lib is None:
            _lib = _declare(ctypes.CDLL(str(build_library())))
        return _lib


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    c = ctypes
    vp, u8, u16, u32, u64, i32, sz = c.c_void_p, c.c_uint8, c.c_uint16, c.c_uint32, c.c_uint64, c.c_int32, c.c_size_t
    u8p = c.POINTER(c.c_uint8)
    sigs: dict[str, tuple[object, list[object]]] = {
        "fw_crc32c": (u32, [u8p, sz, u32]),
        "fw_frame_encode": (sz, [u8, u8, u16, u8p, sz, u8p, sz]),
        "fw_frame_decode": (c.c_int, [u8p, sz, u8p, u8p, u8p, c.POINTER(u16), c.POINTER(sz)]),
        "fw_sizeof": (sz, []),
        "fw_init": (None, [vp, u8, u32, u32, u32, u8, u32]),
        "fw_set_protocol": (None, [vp, u8, u8]),
        "fw_set_joint": (c.c_int, [vp, u8, c.c_char_p, i32, i32, i32, i32, u32, u32]),
        "fw_rx_bytes": (None, [vp, u8p, sz, u64]),
        "fw_tick": (None, [vp, u64]),
        "fw_inject_fault": (None, [vp, u8, u64]),
        "fw_set_measured": (None, [vp, c.POINTER(i32)]),
        "fw_get_commands": (c.c_int, [vp, c.POINTER(i32)]),
        "fw_tx_take": (sz, [vp, u8p, sz]),
        "fw_pop_event": (c.c_int, [vp, c.POINTER(u64), u8p, u8p, c.POINTER(u16)]),
        "fw_mode": (u8, [vp]),
        "fw_faults": (u16, [vp]),
        "fw_stat": (u32, [vp, c.c_int]),
        "fw_set_safety": (c.c_int, [vp, u8, u8, u8, u8, u16, u16]),
        "fw_set_joint_safety": (c.c_int, [vp, u8, u8, i32, i32, i32, u32, u32]),
        "fw_set_enable": (None, [vp, u8, u64]),
        "fw_status": (u16, [vp]),
        "fw_time_us": (u64, [vp]),
        "fw_seed_sessions": (None, [vp, u64]),
        "fw_session": (u32, [vp]),
    }
    for name, (res, args) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib
