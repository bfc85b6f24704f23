"""manifest.json is read with a size limit, and only from a regular file, so a hostile bundle cannot make a load
hang or use up the robot's memory before anything in it was checked.

The old reader checked `is_file()`, then read the whole file: a multi-GB (sparse: it costs no disk) manifest was read
into memory, and a FIFO or a link to /dev/zero put in place between the check and the read (here: at the read, by an
audit hook, deterministically) blocked the load forever or read zeros until memory ran out. The hostile cases run
in a child process with a deadline and its memory bounded (RLIMIT_AS, set after its imports), so that the old
behaviour shows as a timeout or a MemoryError instead of hanging the test run or waking the OOM killer. The child
runs as the service user (as Policy.load does on the robot) where this machine can drop to it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from service_user import (
    SERVICE_GID,
    SERVICE_UID,
    needs_service_user,
    open_dir,
    python_as_service_user,
    why_no_service_user,
)

from edge_vla.action_space import sim_action_space
from edge_vla.bundle import MANIFEST, MAX_MANIFEST_BYTES, Bundle, read_manifest_bytes, write_bundle
from edge_vla.config import preset
from edge_vla.errors import BundleError

REPO = Path(__file__).resolve().parents[2]
DEADLINE_S = 30  # the child imports numpy; a refusal then takes microseconds


@pytest.fixture
def where() -> Iterator[Path]:
    """A directory the service user can reach (tmp_path's parents are 0700)."""
    d = open_dir("edge-vla-manifest-")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _bundle(out: Path) -> Path:
    manifest = {
        "model": preset("tiny").to_dict(), "precision": "fp32",
        "graphs": {"prefix": {"file": "graphs/prefix.onnx", "inputs": [], "outputs": []}},
        "normalization": {}, "action_space": sim_action_space().to_dict(), "sampler": {"num_steps": 2},
        "tokenizer": {"kind": "bytes"}, "provenance": {},
    }
    return write_bundle(out, manifest, {"graphs/prefix.onnx": b"placeholder graph bytes\n"})


# Reads BUNDLE's manifest with memory bounded; with SWAP, the file is replaced at its first read-open.
CHILD = r"""
import os, resource, sys
from pathlib import Path
from edge_vla.bundle import MANIFEST, read_manifest_bytes
from edge_vla.errors import BundleError

root, swap = Path(sys.argv[1]), sys.argv[2]
vm_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (vm_kib * 1024 + (1 << 30), resource.getrlimit(resource.RLIMIT_AS)[1]))

def hook(event, args):
    if swap == "none" or hook.done or event != "open" or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    path = os.fsdecode(args[0])
    if os.path.basename(path) != MANIFEST or args[2] & os.O_ACCMODE != os.O_RDONLY:
        return
    hook.done = True
    os.unlink(path)
    if swap == "fifo":
        os.mkfifo(path)
    else:
        os.symlink("/dev/zero", path)

hook.done = False
sys.addaudithook(hook)
try:
    data, manifest = read_manifest_bytes(root)
except BundleError as exc:
    print("REFUSED", exc)
else:
    print("OK", len(data), manifest["format"])
"""


def _read_in_child(root: Path, swap: str = "none") -> str:
    """read_manifest_bytes(root) in a child, as the service user where possible: "OK ..." or "REFUSED <the one-line
    BundleError>". With `swap`, the child replaces manifest.json when it opens it: the service user is then given
    the bundle directory (whoever swaps it can write there)."""
    try:
        if why_no_service_user() is None:
            if swap != "none":
                os.chown(root, SERVICE_UID, SERVICE_GID)
            done = python_as_service_user(CHILD, str(root), swap, timeout=DEADLINE_S)
        else:
            done = subprocess.run([sys.executable, "-c", CHILD, str(root), swap], capture_output=True, text=True,
                                  cwd=REPO, timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"reading {root / MANIFEST} did not return within {DEADLINE_S} s (it blocks)")
    assert done.returncode == 0, f"the read failed with: {done.stderr.strip().splitlines()[-1:]}"
    assert len(done.stdout.splitlines()) == 1, done.stdout
    return done.stdout.strip()


def test_a_multi_gigabyte_manifest_is_refused_by_its_size_before_it_is_read(where: Path) -> None:
    root = _bundle(where / "b")
    with open(root / MANIFEST, "r+b") as f:
        f.truncate(16 << 30)  # sparse: 16 GiB that take no disk
    out = _read_in_child(root)
    assert out.startswith("REFUSED") and "17,179,869,184 bytes" in out and f"{MAX_MANIFEST_BYTES:,}" in out, out
    assert "re-export" in out, out


def test_the_limit_is_where_it_says(tmp_path: Path) -> None:
    """A manifest of exactly MAX_MANIFEST_BYTES reads (valid JSON padded with spaces); one byte more is refused."""
    root = _bundle(tmp_path / "b")
    data = (root / MANIFEST).read_bytes()
    (root / MANIFEST).write_bytes(data + b" " * (MAX_MANIFEST_BYTES - len(data)))
    assert len(read_manifest_bytes(root)[0]) == MAX_MANIFEST_BYTES
    with open(root / MANIFEST, "ab") as f:
        f.write(b" ")
    with pytest.raises(BundleError, match=f"{MAX_MANIFEST_BYTES + 1:,} bytes") as caught:
        read_manifest_bytes(root)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(("kind", "make"), [
    ("fifo", os.mkfifo),
    ("character device", lambda path: os.symlink("/dev/zero", path)),
    ("directory", os.mkdir),
])
def test_a_manifest_that_is_not_a_regular_file_is_refused_at_once(where: Path, kind: str, make) -> None:
    """Old code: "has no manifest.json: not an edge-vla bundle" (wrong: there is one, of the wrong kind)."""
    root = _bundle(where / "b")
    (root / MANIFEST).unlink()
    make(str(root / MANIFEST))
    out = _read_in_child(root)
    assert out.startswith("REFUSED") and f"is a {kind}, not a regular file" in out, out


@pytest.mark.parametrize(("swap", "kind"), [("fifo", "fifo"), ("zero", "character device")])
def test_a_manifest_swapped_at_the_read_is_refused_at_once(where: Path, swap: str, kind: str) -> None:
    """Old code: swapped for a FIFO after is_file(), the read blocked forever (timeout here); for a link to
    /dev/zero, it read zeros until memory ran out (MemoryError here, under the child's memory bound)."""
    root = _bundle(where / "b")
    out = _read_in_child(root, swap)
    assert out.startswith("REFUSED") and f"is a {kind}, not a regular file" in out, out


def test_a_normal_bundle_reads_and_opens(where: Path) -> None:
    """Control: the same child and the same bundle, untouched, read; and Bundle.open verifies it."""
    root = _bundle(where / "b")
    size = (root / MANIFEST).stat().st_size
    assert _read_in_child(root) == f"OK {size} edge-vla-bundle"
    opened = Bundle.open(root)
    assert opened.manifest_bytes == (root / MANIFEST).read_bytes()
    assert json.loads(opened.manifest_bytes) == opened.manifest


@needs_service_user
def test_a_manifest_the_service_user_cannot_read_is_named_in_one_line(where: Path) -> None:
    """Old code: a PermissionError traceback out of Bundle.open."""
    root = _bundle(where / "b")
    (root / MANIFEST).chmod(0o600)
    out = _read_in_child(root)
    assert out.startswith("REFUSED") and "cannot read" in out and "Permission denied" in out, out


def test_a_missing_manifest_still_says_what_it_is(tmp_path: Path) -> None:
    root = _bundle(tmp_path / "b")
    (root / MANIFEST).unlink()
    with pytest.raises(BundleError, match="has no manifest.json: not an edge-vla bundle"):
        read_manifest_bytes(root)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / "model.safetensors").write_bytes(b"")
    with pytest.raises(BundleError, match="is a training checkpoint, not a bundle"):
        read_manifest_bytes(ckpt)
