"""The inference worker over a camera that fails mid-run: every failure ends the worker with one line naming the
camera and what went wrong, before any chunk is made from it, and leaves the worker "in the camera" for the
control loop's watchdog. Real SharedBus and sim expert; only the camera is a stand-in (a USB device unplugged)."""

from __future__ import annotations

import errno
import os
import threading
import time

import numpy as np
import pytest

from edge_vla.onboard import shared as sh
from edge_vla.onboard.cameras import Frame
from edge_vla.onboard.errors import CameraError
from edge_vla.onboard.worker import ExpertSource, InferenceWorker
from edge_vla.sim.env import ReachEnv

SIZE = 16


class StandInCamera:
    """Good frames, then (from `fail_after` reads on) the failure of `mode`."""

    name = "video:/data/unplugged"

    def __init__(self, mode: str, fail_after: int = 1) -> None:
        self.mode, self.fail_after, self.reads = mode, fail_after, 0

    def read(self):
        self.reads += 1
        if self.reads <= self.fail_after or self.mode == "ok":
            return Frame(images=[np.zeros((SIZE, SIZE, 3), np.uint8)], timestamp=time.monotonic())
        if self.mode == "raise":
            raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))
        if self.mode == "none":
            return None
        if self.mode == "shape":
            return Frame(images=[np.zeros((SIZE * SIZE,), np.uint8)], timestamp=time.monotonic())
        if self.mode == "fewer_images":
            return Frame(images=[], timestamp=time.monotonic())
        if self.mode == "two_images":  # one camera more than it started with
            return Frame(images=[np.zeros((SIZE, SIZE, 3), np.uint8)] * 2, timestamp=time.monotonic())
        if self.mode == "float_image":
            return Frame(images=[np.zeros((SIZE, SIZE, 3), np.float32)], timestamp=time.monotonic())
        if self.mode == "nan_time":
            return Frame(images=[np.zeros((SIZE, SIZE, 3), np.uint8)], timestamp=float("nan"))
        if self.mode == "wall_clock":  # time.time() where time.monotonic() belongs: its age would always read 0
            return Frame(images=[np.zeros((SIZE, SIZE, 3), np.uint8)], timestamp=time.monotonic() + 1e6)
        if self.mode == "not_a_frame":
            return [np.zeros((SIZE, SIZE, 3), np.uint8)]
        raise AssertionError(self.mode)

    def close(self) -> None:
        pass


def _worker(camera: StandInCamera) -> tuple[InferenceWorker, sh.SharedBus]:
    env = ReachEnv(image_size=SIZE)
    env.reset(5)
    bus = sh.SharedBus(len(env.q))
    bus.write_state(np.asarray(env.q), np.zeros(len(env.q)), time.monotonic())
    bus.set("status", sh.STATUS_RUNNING)
    return InferenceWorker(ExpertSource(env.scene), camera, bus, env.scene.instruction, SIZE, min_interval_s=0.0), bus


# (failure, what the one line must say besides the camera's name)
FAILURES = {
    "raise": "OSError: [Errno 19] No such device",
    "none": "no frame (None)",
    "shape": "shape (256,)",
    "fewer_images": "no images",
    "two_images": "2 images, not the 1 it started with",
    "float_image": "shape (16, 16, 3) float32",
    "nan_time": "capture time nan",
    "wall_clock": "in the future",
    "not_a_frame": "a list, not a Frame",
}


@pytest.mark.parametrize("mode", FAILURES)
def test_a_failing_camera_ends_the_worker_with_one_line_naming_it(mode) -> None:
    camera = StandInCamera(mode)
    worker, bus = _worker(camera)
    stop = threading.Event()
    assert worker.step(stop) is True and bus.chunk_seq() == 1  # the first frame was good
    with pytest.raises(CameraError) as got:
        worker.step(stop)
    message = str(got.value)
    assert "\n" not in message and "video:/data/unplugged" in message and FAILURES[mode] in message, message
    assert bus.chunk_seq() == 1, "a chunk was made from a frame the camera did not deliver"
    # Left "in the camera": the control loop's camera check counts the time since as the frame's age.
    assert bus.get("worker_phase") == sh.WORKER_CAMERA
    with pytest.raises(CameraError):  # run() ends too (the runner then ends the run)
        worker.run(stop)


def test_control_a_camera_that_keeps_working_keeps_the_worker_serving() -> None:
    worker, bus = _worker(StandInCamera("ok"))
    stop = threading.Event()
    assert all(worker.step(stop) for _ in range(5))
    assert bus.chunk_seq() == 5 and bus.get("worker_phase") == sh.WORKER_IDLE


class _RaisingWorker:
    """The worker's run(): its camera read fails (closed under it, or unplugged)."""

    def run(self, stop, alive) -> None:
        raise CameraError("camera video:/data/unplugged failed: OSError: [Errno 19] No such device")


def _bare_runner(stop_set: bool):
    """An OnboardRunner with only what _run_worker touches (no control process is started)."""
    from edge_vla.onboard.runner import OnboardRunner

    runner = object.__new__(OnboardRunner)
    runner.bus = sh.SharedBus(2, 8)
    runner._stop, runner._stop_lock, runner._worker_error = threading.Event(), threading.RLock(), None
    runner.worker = _RaisingWorker()
    runner.proc = type("Proc", (), {"is_alive": staticmethod(lambda: True)})()
    if stop_set:
        runner._stop.set()
    return runner


def test_a_worker_failing_after_close_is_the_end_of_the_run_not_a_camera_failure() -> None:
    """close() closes the camera under a worker still inferring past its 5 s join (pi0 on a CPU): the read that then
    fails must not turn a clean end (exit 0) into a camera failure (exit 3). Control: the same failure mid-run is one."""
    after_close = _bare_runner(stop_set=True)
    after_close._run_worker()
    assert after_close.worker_failure is None
    assert after_close.bus.get("stop_request") == 0

    mid_run = _bare_runner(stop_set=False)
    mid_run._run_worker()
    assert mid_run.worker_failure is not None and "No such device" in mid_run.worker_failure
    assert mid_run.bus.get("stop_request") > 0
