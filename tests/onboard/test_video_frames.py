"""`--camera video:PATH`: what the file holds reaches the policy as the RGB frames it says, or is refused.

A stack the camera misreads (a grayscale [N, H, W] stack taken for one image, 0-255 floats clipped to white,
16-bit values wrapped) would feed the policy pictures of nothing, with no error: the robot would act on them.
Each is refused at start with one line naming the file, what is wrong and what to give instead."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from onboard_helpers import robot_users, service_run_dir

from edge_vla.onboard.cameras import open_camera
from edge_vla.onboard.errors import CameraError
from edge_vla.optional import available

RNG = np.random.default_rng(0)
U8 = RNG.integers(0, 256, size=(3, 12, 20, 3), dtype=np.uint8)

# (what the .npy holds, what the refusal must say)
MISREAD = {
    "grayscale_stack": (U8[..., 0], r"shape \(3, 12, 20\)"),
    "float_0_255": (U8.astype(np.float32), r"float values up to 255"),
    "uint16_wide": (U8.astype(np.uint16) * 256, r"values up to 65280"),
    "negative_ints": (U8.astype(np.int16) - 128, r"values down to -128"),
    "two_channels": (U8[..., :2], r"shape \(3, 12, 20, 2\)"),
    "five_dims": (U8[None], r"shape \(1, 3, 12, 20, 3\)"),
    "flat": (np.arange(10, dtype=np.uint8), r"shape \(10,\)"),
    "empty_image": (np.zeros((3, 0, 0, 3), np.uint8), r"shape \(3, 0, 0, 3\)"),
    "nan": (np.full((2, 4, 4, 3), np.nan, np.float32), r"not finite"),
    "strings": (np.array([["a", "b"], ["c", "d"]]), r"dtype <U1"),
}


@pytest.mark.parametrize("name", MISREAD)
def test_a_stack_the_camera_would_misread_is_refused(tmp_path, name) -> None:
    array, says = MISREAD[name]
    path = tmp_path / f"{name}.npy"
    np.save(path, array)
    with pytest.raises(CameraError, match=rf"{path}.*{says}"):
        open_camera(f"video:{path}", size=16)


def _bad_png(tmp_path: Path) -> Path:
    folder = tmp_path / "frames"
    folder.mkdir()
    import matplotlib.pyplot as plt

    plt.imsave(folder / "000.png", U8[0])
    (folder / "001.png").write_bytes(b"\x89PNG\r\n\x1a\n not the rest of a png")  # a copy that died half-way
    return folder / "001.png"


def test_a_file_that_does_not_load_is_named(tmp_path) -> None:
    not_npy = tmp_path / "notes.npy"
    not_npy.write_text("these are notes\n")
    cut = tmp_path / "cut.npy"
    np.save(cut, U8)
    cut.write_bytes(cut.read_bytes()[:300])
    pickled = tmp_path / "objects.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    for path in (not_npy, cut, pickled):
        with pytest.raises(CameraError, match=rf"cannot read {path}"):
            open_camera(f"video:{path}", size=16)
    if available("matplotlib"):
        bad = _bad_png(tmp_path)
        with pytest.raises(CameraError, match=rf"cannot read {bad}"):
            open_camera(f"video:{bad.parent}", size=16)


# The control: what the format allows is accepted, and each frame arrives as the RGB uint8 image it holds.
@pytest.mark.parametrize(("name", "array", "expect"), [
    ("uint8_stack", U8, U8),
    ("float_0_1", U8.astype(np.float32) / 255.0, U8),
    ("uint16_in_range", U8.astype(np.uint16), U8),
    ("rgba", np.concatenate([U8, np.full((*U8.shape[:3], 1), 255, np.uint8)], axis=3), U8),
    ("one_channel", U8[..., :1], np.repeat(U8[..., :1], 3, axis=3)),
])
def test_control_valid_stacks_arrive_as_their_pixels(tmp_path, name, array, expect) -> None:
    path = tmp_path / f"{name}.npy"
    np.save(path, array)
    cam = open_camera(f"video:{path}", size=0)  # no resize: compare pixels exactly
    got = np.stack([cam.read().images[0] for _ in range(3)])
    assert got.dtype == np.uint8 and np.array_equal(got, expect)


def test_control_one_image_and_a_grayscale_image_in_a_folder(tmp_path) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    np.save(folder / "000.npy", U8[0])  # one HxWx3 image
    np.save(folder / "001.npy", U8[1, :, :, 0])  # one HxW grayscale image
    cam = open_camera(f"video:{folder}", size=0)
    first, second = cam.read().images[0], cam.read().images[0]
    assert np.array_equal(first, U8[0]) and np.array_equal(second, np.repeat(U8[1, :, :, :1], 3, axis=2))


# -- through `edge-vla run`, as the service user: one line and no motion, or a run on the frames ------------------

def _run(bundle: Path, run_dir: Path, frames: Path) -> subprocess.CompletedProcess[str]:
    users = robot_users()
    cmd = users.edge_vla(users.service, "run", str(bundle), "--camera", f"video:{frames}", "--instruction", "reach",
                         "--emulate", "--arm-on-start", "--duration", "1.5", "--control-socket", "none", "--json")
    return subprocess.run(cmd, cwd=run_dir, env=users.environ(), capture_output=True, text=True, timeout=120)


def _readable_copy(bundle: Path, run_dir: Path) -> Path:
    """The bundle where the service user can read it (pytest's temp root is root's, mode 0700)."""
    out = shutil.copytree(bundle, run_dir / "bundle")
    for path in [out, *out.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return out


def test_run_refuses_a_misread_video_with_one_line_and_runs_a_valid_one(tiny_bundle) -> None:
    run_dir = service_run_dir("edge-vla-video-")
    bundle = _readable_copy(tiny_bundle, run_dir)
    size = 32
    good = np.random.default_rng(1).integers(0, 256, size=(4, size, size, 3), dtype=np.uint8)
    bad = run_dir / "gray.npy"
    np.save(bad, good[..., 0])  # [N, H, W]: before the fix, read as one 4 x 32 image and fed to the policy
    proc = _run(bundle, run_dir, bad)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("edge-vla run: error:")]
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-3000:]
    assert str(bad) in errors[0] and "[N, H, W, 3]" in errors[0] and "Traceback" not in proc.stderr
    # The control: the same frames with their channels run to the duration and stop the planned way.
    ok = run_dir / "rgb.npy"
    np.save(ok, good)
    proc = _run(bundle, run_dir, ok)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["trips"] == [] and summary["end"]["kind"] == "duration" and summary["chunks"]["adopted"] > 0


@pytest.mark.parametrize("where", ["given", "in_folder"])
def test_a_fifo_is_refused_at_once_not_waited_on(tmp_path, where) -> None:
    """Opening a FIFO to read waits for a writer that never comes: the run would hang before its first frame."""
    folder = tmp_path / "frames"
    folder.mkdir()
    np.save(folder / "000.npy", U8[0])
    fifo = folder / "001.npy"
    os.mkfifo(fifo)
    spec = f"video:{fifo if where == 'given' else folder}"
    code = ("import sys\nfrom edge_vla.onboard.cameras import open_camera\nfrom edge_vla.onboard.errors import CameraError\n"
            "try:\n    open_camera(sys.argv[1], size=16)\nexcept CameraError as exc:\n    sys.exit(f'refused: {exc}')\n")
    proc = subprocess.run([sys.executable, "-c", code, spec], capture_output=True, text=True, timeout=20,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 1 and f"refused: {fifo} is not a regular file" in proc.stderr, proc.stderr[-2000:]
