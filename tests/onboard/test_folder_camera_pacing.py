"""`--camera video:PATH` replays a recording as a camera would: one frame per 1/fps on every pass of the loop, not
only the first, with capture times that keep increasing across the loop's wrap. A policy fed a recording faster
than its rate sees a different world (and the worker's frame-age check sees frames that are never old)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from edge_vla.onboard.cameras import FolderCamera
from edge_vla.onboard.errors import CameraError

FPS = 20.0
PERIOD = 1.0 / FPS
FRAMES = 3
SLACK = 0.2 * PERIOD  # time.sleep wakes no earlier than asked; this covers the clock's rounding only


@pytest.fixture
def stack(tmp_path):
    path = tmp_path / "rec.npy"
    # frame i is filled with the value i, so each read says which frame it was
    np.save(path, np.stack([np.full((4, 4, 3), i, np.uint8) for i in range(FRAMES)]))
    return path


def _read(cam: FolderCamera, n: int) -> tuple[list[int], list[float]]:
    frames = [cam.read() for _ in range(n)]
    return [int(f.images[0][0, 0, 0]) for f in frames], [f.timestamp for f in frames]


def test_every_pass_of_a_looping_recording_is_paced_at_fps(stack) -> None:
    # Lower bounds only (a loaded box may deliver late, never early): frame k comes no sooner than k periods after
    # the camera opened, whichever pass it is in.
    opened = time.monotonic()
    cam = FolderCamera(stack, fps=FPS)
    ids, stamps = _read(cam, 3 * FRAMES)
    assert ids == [0, 1, 2] * 3  # in order, looping
    assert (np.diff(stamps) > 0).all(), f"capture times went back or stood still across the loop: {stamps}"
    due = opened + np.arange(len(stamps)) * PERIOD
    early = np.asarray(stamps) - due
    # The control: the first pass is paced (the old camera got that right) ...
    assert (early[:FRAMES] >= -SLACK).all(), early
    # ... and so is every later one, from the wrap on (the old camera returned the second and third passes as fast
    # as they were asked for: frame 8 came 0.3 s before its time).
    assert (early[FRAMES:] >= -SLACK).all(), early


def test_a_reader_that_falls_behind_gets_no_burst_of_frames_afterwards(stack) -> None:
    """A late reader skips the missed slots (a camera does not store them up): the frames after the late one are
    paced again, not handed over back to back to catch up."""
    cam = FolderCamera(stack, fps=FPS)
    cam.read()
    time.sleep(4 * PERIOD)  # the reader is busy elsewhere (a slow inference) for four frame periods
    _, stamps = _read(cam, 4)
    since_late = np.asarray(stamps) - stamps[0]
    assert (since_late[1:] >= np.arange(1, 4) * PERIOD - SLACK).all(), f"a burst after a late read: {since_late}"


def test_control_a_recording_that_does_not_loop_ends_with_one_line(stack) -> None:
    cam = FolderCamera(stack, fps=1000.0, loop=False)
    ids, _ = _read(cam, FRAMES)
    assert ids == [0, 1, 2]
    with pytest.raises(CameraError, match=f"ended after {FRAMES} frames"):
        cam.read()
