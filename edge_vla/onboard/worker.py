"""The inference worker: latest frame + latest joint state -> policy -> chunk published to the loop.

It runs in the parent process (the control loop has its own), so Python preprocessing here cannot
delay a control deadline. Every chunk is stamped with the time of the observation it came from.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from edge_vla.onboard import shared as sh
from edge_vla.onboard.cameras import CameraSource, resize_nearest
from edge_vla.onboard.histogram import LogHistogram
from edge_vla.runtime.types import ActionChunk, Observation

log = logging.getLogger(__name__)


class ChunkSource(Protocol):
    """Anything that turns an observation into an action chunk: the runtime Policy, the sim expert, ..."""

    def infer(self, obs: Observation) -> ActionChunk: ...


class ExpertSource:
    """The sim's scripted planner as a chunk source (bring-up without a bundle, and timing tests).

    `delay_s` adds compute time, standing in for a policy's latency.
    """

    def __init__(self, scene: object, chunk_len: int = 8, delay_s: float = 0.0) -> None:
        from edge_vla.sim.env import ACTION_PERIOD_S

        self.scene, self.chunk_len, self.delay_s = scene, chunk_len, delay_s
        self.period = ACTION_PERIOD_S

    def infer(self, obs: Observation) -> ActionChunk:
        from edge_vla.sim.expert import expert_chunk

        t0 = time.perf_counter()
        actions = expert_chunk(self.scene, obs.state, self.chunk_len)  # type: ignore[arg-type]
        if self.delay_s:
            time.sleep(self.delay_s)
        return ActionChunk(actions=actions, action_period_s=self.period, obs_timestamp=obs.timestamp,
                           timings_ms={"total": (time.perf_counter() - t0) * 1e3})

    def reset(self) -> None:
        pass


class StallableSource:
    """Wraps a source so a drill can hang inference (a wedged GPU, a deadlocked driver) on demand."""

    def __init__(self, inner: ChunkSource) -> None:
        self.inner = inner
        self._stall_until = 0.0

    def stall(self, seconds: float) -> None:
        self._stall_until = time.monotonic() + seconds

    def infer(self, obs: Observation) -> ActionChunk:
        while time.monotonic() < self._stall_until:
            time.sleep(0.005)
        return self.inner.infer(obs)


@dataclass
class WorkerStats:
    """Chunks, failed inferences by reason, and latency percentiles in fixed memory."""

    MAX_REASONS = 16  # distinct exception types kept by name; more are counted under "other"

    chunks: int = 0
    errors: int = 0
    error_reasons: dict[str, int] = field(default_factory=dict)
    last_error: str = ""
    latency_ms: LogHistogram = field(default_factory=lambda: LogHistogram(lowest=1e-3, highest=1e6))

    def record_latency(self, ms: float) -> None:
        self.latency_ms.record(ms)

    def record_error(self, exc: BaseException) -> None:
        self.errors += 1
        name = type(exc).__name__
        if name not in self.error_reasons and len(self.error_reasons) >= self.MAX_REASONS:
            name = "other"
        self.error_reasons[name] = self.error_reasons.get(name, 0) + 1
        self.last_error = f"{type(exc).__name__}: {exc}"[:500]

    def as_dict(self) -> dict[str, Any]:
        return {"chunks": self.chunks, "errors": self.errors, "error_reasons": dict(self.error_reasons),
                "last_error": self.last_error, "infer_p50_ms": self.latency_ms.percentile(50),
                "infer_p99_ms": self.latency_ms.percentile(99)}


class InferenceWorker:
    """Loop: wait until the control loop runs, observe, infer, publish; beat the heartbeat throughout."""

    def __init__(self, source: ChunkSource, camera: CameraSource, bus: sh.SharedBus, instruction: str,
                 image_size: int | None = None, sync: bool = False, min_interval_s: float = 0.05) -> None:
        self.source, self.camera, self.bus = source, camera, bus
        self.min_interval_s = min_interval_s  # replanning faster than this buys nothing and costs a core
        self._last_start = 0.0
        self.instruction, self.image_size, self.sync = instruction, image_size, sync
        self.stats = WorkerStats()
        self._published = 0

    def _wait_consumed(self, stop: threading.Event) -> None:
        # Synchronous strategy: the next observation is taken only after the loop played the last chunk.
        while not stop.is_set() and self.bus.get("consumed_seq") < self._published:
            if self.bus.get("status") not in (sh.STATUS_RUNNING,):
                return
            self.bus.beat()
            time.sleep(0.002)

    def step(self, stop: threading.Event) -> bool:
        """One observe-infer-publish round; False when there was nothing to do."""
        self.bus.beat()
        status = self.bus.get("status")
        if status not in (sh.STATUS_RUNNING, sh.STATUS_HOMING, sh.STATUS_STOPPED, sh.STATUS_DISARMED, sh.STATUS_ARMING):
            time.sleep(0.005)
            return False
        if self.sync and self._published:
            self._wait_consumed(stop)
        wait = self._last_start + self.min_interval_s - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        self._last_start = time.monotonic()
        self.bus.set("worker_phase", sh.WORKER_CAMERA)
        frame = self.camera.read()
        got = time.monotonic()
        self.bus.set("worker_phase", sh.WORKER_IDLE)
        self.bus.beat()
        state = self.bus.read_state()
        if state is None:
            time.sleep(0.005)
            return False
        self.bus.set("frame_time", frame.timestamp)
        self.bus.set("frame_age", max(0.0, got - frame.timestamp))
        images = [resize_nearest(im, self.image_size) for im in frame.images] if self.image_size else frame.images
        obs = Observation(images=images, instruction=self.instruction, state=state.positions.astype(np.float32),
                          timestamp=min(frame.timestamp, state.time))
        t0 = time.perf_counter()
        self.bus.set("worker_phase", sh.WORKER_INFER)
        try:
            chunk = self.source.infer(obs)
        except Exception as exc:
            self.bus.set("worker_phase", sh.WORKER_IDLE)
            self.bus.beat()
            self.stats.record_error(exc)
            self.bus.set("worker_errors", float(self.stats.errors))
            if self.stats.errors == 1 or self.stats.errors % 100 == 0:  # no log flood at the replanning rate
                log.error("inference failed (%d so far): %s; no chunk published, the watchdog stops the robot "
                          "if this persists", self.stats.errors, self.stats.last_error)
            return False
        self.bus.set("worker_phase", sh.WORKER_IDLE)
        self.stats.record_latency((time.perf_counter() - t0) * 1e3)
        self.bus.beat()
        self._published = self.bus.publish_chunk(chunk.actions, chunk.action_period_s, obs.timestamp, obs.state)
        self.stats.chunks += 1
        return True

    def run(self, stop: threading.Event, alive: callable = lambda: True) -> None:  # type: ignore[valid-type]
        while not stop.is_set() and alive():
            self.step(stop)
