"""Wires the pieces: control loop in a child process, inference worker in a thread of this process.

    with OnboardRunner(control_config, source, camera_factory, instruction, control_socket=path) as run:
        run.operator.arm()            # arming is an operator act (or ControlConfig.arm_on_start in bench mode)
        run.wait(duration)            # or run.operator.stop(), run.request_stop(), run.control_pid ...
    summary = run.summary

`run.operator` is the operator API (edge_vla.onboard.operator); with `control_socket` the same API is
served on a Unix socket for `edge-vla arm / stop / status`.

With `threads` (a ThreadPlan: `edge-vla run` makes one by default) the control process pins itself to the plan's
loop CPUs (ControlConfig.realtime.cpus) and every thread of this process, inference's, goes to the others; one line
says where each runs.

The parent's SIGINT/SIGTERM handlers (installed by the CLI) call `request_stop()`: the control process
then makes a category-1 stop, disarms and exits; `close()` waits for that, and only kills the child if
it does not exit (the firmware watchdog then stops the motors). If this process dies without a word (SIGKILL: the
OOM killer, `systemctl kill -s KILL`, a crash in a native library) the control process sees it within one cycle,
makes the same stop, disarms and exits, rather than living on as an orphan holding the port. It watches this
process, not the thread that called `start()`, so a runner may be started from a short-lived thread.

If the inference worker ends on an error (a camera unplugged: its read raises, or it gives no usable frame), no
chunk will come again: the worker's thread asks the control process to stop (a worker_dead fault, category 1)
and exit, so `wait()` returns and `worker_failure` says why in one line.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from edge_vla.onboard import shared as sh
from edge_vla.onboard.cameras import CameraSource, error_line
from edge_vla.onboard.control import STOP_EXIT, STOP_WORKER_FAILED, ControlConfig, control_main
from edge_vla.onboard.errors import CameraError, StartupError
from edge_vla.onboard.operator import BusOperator, ControlSocketServer
from edge_vla.onboard.rt import ThreadPlan, name_thread, pin_threads
from edge_vla.onboard.scheduler import RTC
from edge_vla.onboard.worker import ChunkSource, InferenceWorker, require_rtc

log = logging.getLogger(__name__)

CameraFactory = Callable[[sh.SharedBus], CameraSource]


def bus_state_fn(bus: sh.SharedBus) -> Callable[[], tuple[Any, float] | None]:
    def state() -> tuple[Any, float] | None:
        rec = bus.read_state()
        return None if rec is None else (rec.positions, rec.time)

    return state


class OnboardRunner:
    def __init__(self, config: ControlConfig, source: ChunkSource, camera_factory: CameraFactory, instruction: str,
                 image_size: int | None = None, max_chunk_len: int = 64, log_level: int = logging.INFO,
                 control_socket: str | None = None, threads: ThreadPlan | None = None, engine: str = "",
                 camera_label: str | None = None) -> None:
        """`threads`: where the loop and inference run (None: left as they are); `engine`: what computes inference,
        for the start line (e.g. "1 onnxruntime intra-op thread, spinning off"); `camera_label`: how a camera
        failure names the camera (e.g. the --camera spec; default: the camera's own name)."""
        if config.strategy == RTC:  # before anything starts: rtc needs a source that takes a prefix
            require_rtc(source, "this chunk source")
        self.config = config
        self.bus = sh.SharedBus(config.action_space.dim, max_chunk_len)
        self.source = source
        self.camera_factory = camera_factory
        self.instruction = instruction
        self.image_size = image_size
        self.log_level = log_level
        self.summary: dict[str, Any] | None = None
        self.worker: InferenceWorker | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._worker_error: BaseException | None = None
        self.camera_label = camera_label
        self._stop_lock = threading.RLock()  # the worker thread and the main thread (its signal handlers) both ask
        ctx = mp.get_context("spawn")  # no fork: onnxruntime threads and locks do not survive it
        self._recv, send = ctx.Pipe(duplex=False)
        # Our pid: the control process stops the robot and exits when this process dies (a SIGKILL, a crash).
        self.proc = ctx.Process(target=control_main, args=(config, self.bus, send, log_level, os.getpid()),
                                name="edge-vla-control", daemon=False)
        self._send = send
        self.operator = BusOperator(self.bus, alive=self.proc.is_alive)
        self._socket_path = control_socket
        self._server: ControlSocketServer | None = None
        self.threads, self.engine = threads, engine
        self._pinned = False  # this process's threads moved to the inference CPUs (undone by close)

    @property
    def control_pid(self) -> int | None:
        return self.proc.pid

    def start(self, timeout: float = 30.0) -> OnboardRunner:
        self.proc.start()  # before the pinning below: the control process starts from this process's own CPUs
        self._send.close()  # only the child writes
        self._pin_inference()
        deadline = time.monotonic() + timeout
        while self.bus.read_state() is None:
            if not self.proc.is_alive() or time.monotonic() > deadline:
                summary = self._collect(1.0)
                err = (summary or {}).get("error", "no joint state")
                raise StartupError(f"the control loop did not come up on {self.config.link_url}: {err}")
            time.sleep(0.01)
        camera = self.camera_factory(self.bus)
        rtc = self.config.strategy == RTC  # the worker's half of rtc: prefixes from the plan the loop follows
        self.worker = InferenceWorker(self.source, camera, self.bus, self.instruction, self.image_size,
                                      sync=self.config.strategy == "sync",
                                      rtc_control_period_s=1.0 / self.config.rate_hz if rtc else None,
                                      camera_label=self.camera_label)
        self._thread = threading.Thread(target=self._run_worker, name="edge-vla-worker", daemon=True)
        self._thread.start()
        if self._thread.native_id is not None:  # top -H, ps -L and /proc/PID/task/TID/comm show which thread infers
            name_thread(self._thread.native_id, "edge-vla-worker")
        if self._socket_path:
            self._server = ControlSocketServer(self._socket_path, self.operator).start()
        self._log_threads()
        return self

    def _pin_inference(self) -> None:
        """Every thread of this process (the backend's pools were made with the session, before the worker) onto the
        inference CPUs; threads made later inherit them. The kernel refusing (a cpuset that changed) is said once."""
        plan = self.threads
        if plan is None or plan.inference_cpus is None:
            return
        try:
            pin_threads(plan.inference_cpus)
            self._pinned = True
        except OSError as exc:
            log.warning("inference CPUs %s not applied (%s): inference may run on the control loop's CPU",
                        list(plan.inference_cpus), exc)

    def _log_threads(self) -> None:
        if self.threads is None:
            return
        fifo = self.config.realtime.fifo_priority
        sched = f"SCHED_FIFO priority {fifo} requested" if fifo else "SCHED_OTHER"
        tid = self._thread.native_id if self._thread is not None else None
        line = self.threads.line(self.proc.pid, tid, self.engine or "inference", sched)
        log.log(logging.WARNING if self.threads.note else logging.INFO, "%s", line)

    def _run_worker(self) -> None:
        assert self.worker is not None
        try:
            self.worker.run(self._stop, alive=self.proc.is_alive)
        except BaseException as exc:
            if self._stop.is_set():
                # close() ended the run and closed the camera under a worker still inferring (past its 5 s join):
                # its next read failing is the end of the run, not a camera failure (the exit status stays 0)
                log.debug("inference worker ended after close(): %s", error_line(exc))
                return
            self._worker_error = exc
            # Nothing will infer again: the robot stops now (not when its chunk runs out) and the run ends, rather
            # than waiting, stopped, for an operator whose arm could only lead to the next stop.
            self.request_stop(STOP_WORKER_FAILED)
            if isinstance(exc, CameraError):  # a device failing, said in one line; a bug keeps its traceback
                log.error("%s; stopping the robot and ending the run", exc, exc_info=log.isEnabledFor(logging.DEBUG))
            else:
                log.exception("inference worker died; stopping the robot and ending the run")

    @property
    def worker_error(self) -> BaseException | None:
        """The error the inference worker ended on (a CameraError for a camera failure), or None."""
        return self._worker_error

    @property
    def worker_failure(self) -> str | None:
        """Why the inference worker ended, in one line (a camera failure names the camera), or None."""
        exc = self._worker_error
        if exc is None:
            return None
        return str(exc) if isinstance(exc, CameraError) else f"the inference worker failed: {error_line(exc)}"

    def wait_ready(self, timeout: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.is_alive():
            if self.bus.get("ready") > 0:
                return True
            time.sleep(0.01)
        return False

    def wait(self, duration: float | None = None) -> None:
        """Until `duration` passes or the control process exits (its own duration, a stop request)."""
        end = time.monotonic() + duration if duration is not None else float("inf")
        while self.proc.is_alive() and time.monotonic() < end:
            self.proc.join(timeout=0.05)

    def status(self) -> str:
        return sh.STATUS_NAMES[int(self.bus.get("status"))]

    def request_stop(self, why: float = STOP_EXIT) -> None:
        """Ask the control process for a controlled stop and exit; `why` (control.STOP_*) sets the stop's kind. A
        request never lowers an earlier one: a worker failure stays a fault when close() asks again."""
        with self._stop_lock:
            self.bus.set("stop_request", max(self.bus.get("stop_request"), why))

    def rearm(self) -> dict[str, Any]:
        """Deprecated alias of `operator.arm()` (kept for one release)."""
        return self.operator.arm()

    def _collect(self, timeout: float) -> dict[str, Any] | None:
        if self._recv.poll(timeout):
            try:
                return self._recv.recv()
            except EOFError:
                return None
        return None

    def close(self, timeout: float = 10.0) -> dict[str, Any] | None:
        if self._server is not None:
            self._server.close()
            self._server = None
        self.request_stop()
        self.summary = self._collect(timeout) if self.summary is None else self.summary
        self.proc.join(timeout=timeout)
        if self.proc.is_alive():
            log.error("control process did not exit; killing it (the firmware watchdog stops the motors)")
            self.proc.kill()
            self.proc.join()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        if self.worker is not None:
            self.worker.camera.close()
        if self._pinned and self.threads is not None:  # an in-process caller gets its CPUs back
            try:
                pin_threads(self.threads.available)
            except OSError as exc:
                log.debug("could not restore this process's CPUs: %s", exc)
            self._pinned = False
        if self.summary is not None and self.worker is not None:
            self.summary["worker"] = self.worker.stats.as_dict()
            if self._worker_error is not None:
                self.summary["worker"]["error"] = repr(self._worker_error)
        return self.summary

    def __enter__(self) -> OnboardRunner:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
