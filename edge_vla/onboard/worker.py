"""The inference worker: latest frame + latest joint state -> policy -> chunk published to the loop.

It runs in the parent process (the control loop has its own), so Python preprocessing here cannot
delay a control deadline. Every chunk is stamped with the time of the observation it came from.

Under the rtc strategy each inference also gets the prefix: the actions of the plan the loop follows
(published on the bus by the control loop) that will execute before the chunk can take over, d of them
from the action under way, d from a p95 of the recent latencies (`RtcPlanner`). The chunk goes back to
the loop with where its prefix came from, so the loop can place it on that plan's timeline.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from edge_vla.errors import ConfigError
from edge_vla.onboard import shared as sh
from edge_vla.onboard.cameras import CameraSource, Frame, camera_name, error_line, frame_problem, resize_nearest
from edge_vla.onboard.errors import CameraError
from edge_vla.onboard.histogram import LogHistogram
from edge_vla.onboard.scheduler import RTC, LatencyTracker, PrefixPlan, rtc_prefix
from edge_vla.runtime.types import ActionChunk, Observation

log = logging.getLogger(__name__)

# Test hook, not a user option: milliseconds of sleep added to every inference (inside its timing), so tests
# and the emulator evaluation can run a bundle as a slow policy would. `expert_delay_s` does this for the expert.
TEST_INFER_DELAY_ENV = "EDGE_VLA_TEST_INFER_DELAY_MS"


class ChunkSource(Protocol):
    """Anything that turns an observation into an action chunk: the runtime Policy, the sim expert, ...

    A source that takes an rtc prefix also accepts `infer(obs, prefix=...)` and says how long a prefix may be
    in `rtc_max_delay` (> 0); the worker passes one only to such a source, under the rtc strategy."""

    def infer(self, obs: Observation) -> ActionChunk: ...


def source_rtc_max_delay(source: object) -> int:
    """The longest action prefix `source` takes (0: none: it was not trained for real-time chunking)."""
    delay = getattr(source, "rtc_max_delay", 0)
    return int(delay) if isinstance(delay, (int, np.integer)) and not isinstance(delay, bool) and delay > 0 else 0


def not_rtc_error(what: str) -> ConfigError:
    """The one-line refusal of --strategy rtc for `what` (a bundle, a chunk source)."""
    return ConfigError(f"--strategy {RTC}: {what} was not trained for real-time chunking (its manifest has no rtc "
                       "block): train with --rtc-max-delay and export it again, or choose another --strategy")


def require_rtc(source: object, what: str) -> int:
    """rtc_max_delay of `source`, or the one-line refusal naming `what`."""
    delay = source_rtc_max_delay(source)
    if delay <= 0:
        raise not_rtc_error(what)
    return delay


class ExpertSource:
    """The sim's scripted planner as a chunk source (bring-up without a bundle, and timing tests).

    `delay_s` adds compute time, standing in for a policy's latency. It takes an rtc prefix as an RTC-trained
    policy would: the prefix unchanged, then its plan from the prefix's last target (its plans from consecutive
    states agree, so this is what a prefix-consistent policy does; `SimExpert` in the latency evaluation too).
    """

    def __init__(self, scene: object, chunk_len: int = 8, delay_s: float = 0.0) -> None:
        from edge_vla.sim.env import ACTION_PERIOD_S

        self.scene, self.chunk_len, self.delay_s = scene, chunk_len, delay_s
        self.period = ACTION_PERIOD_S
        self.rtc_max_delay = chunk_len - 1

    def infer(self, obs: Observation, prefix: np.ndarray | None = None) -> ActionChunk:
        from edge_vla.sim.expert import expert_chunk

        t0 = time.perf_counter()
        if prefix is None or len(prefix) == 0:
            actions = expert_chunk(self.scene, obs.state, self.chunk_len)  # type: ignore[arg-type]
        else:
            given = np.asarray(prefix, np.float32)[: self.rtc_max_delay]
            rest = expert_chunk(self.scene, given[-1], self.chunk_len - len(given))  # type: ignore[arg-type]
            actions = np.concatenate([given, rest])
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

    @property
    def rtc_max_delay(self) -> int:
        return source_rtc_max_delay(self.inner)

    def stall(self, seconds: float) -> None:
        self._stall_until = time.monotonic() + seconds

    def infer(self, obs: Observation, prefix: np.ndarray | None = None) -> ActionChunk:
        while time.monotonic() < self._stall_until:
            time.sleep(0.005)
        if prefix is None:
            return self.inner.infer(obs)
        return self.inner.infer(obs, prefix=prefix)  # type: ignore[call-arg]


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

    rtc: dict[str, Any] | None = None  # under rtc: prefix lengths, chunks without one, the latency estimate

    def as_dict(self) -> dict[str, Any]:
        out = {"chunks": self.chunks, "errors": self.errors, "error_reasons": dict(self.error_reasons),
               "last_error": self.last_error, "infer_p50_ms": self.latency_ms.percentile(50),
               "infer_p99_ms": self.latency_ms.percentile(99)}
        if self.rtc is not None:
            out["rtc"] = {**self.rtc, "prefix_lengths": dict(self.rtc["prefix_lengths"])}
        return out


class RtcPlanner:
    """The worker's half of rtc: remembers the chunks it published and turns the plan position the loop publishes
    into the prefix for the next inference.

    The latency it tracks runs from reading that plan position to publishing the chunk, and its headroom is one
    control period: the loop adopts a published chunk at its next cycle. The other part of the headroom is the
    action already under way when the inference starts: the prefix begins with it, so its elapsed part (known
    exactly from the plan position, 0..1 action) is added to the delay rather than a flat extra action."""

    KEEP = 8  # published chunks remembered: the loop's plan is the newest it adopted, one or two back

    def __init__(self, max_delay: int, control_period_s: float, window: int = 20, percentile: float = 95.0) -> None:
        self.max_delay = max_delay
        self.tracker = LatencyTracker(window, percentile, headroom_s=control_period_s)
        self._chunks: OrderedDict[int, tuple[np.ndarray, float]] = OrderedDict()
        self.stats: dict[str, Any] = {"max_delay": max_delay, "prefix_lengths": {}, "without_prefix": 0,
                                      "latency_estimate_ms": None}

    def remember(self, seq: int, actions: np.ndarray, period_s: float) -> None:
        self._chunks[seq] = (np.array(actions, np.float32, copy=True), float(period_s))
        while len(self._chunks) > self.KEEP:
            self._chunks.popitem(last=False)

    def prefix(self, plan: sh.PlanRecord | None, now: float) -> PrefixPlan | None:
        """The prefix for an inference starting at `now`, from the plan the loop published."""
        if plan is None or plan.seq not in self._chunks:
            return None
        actions, period = self._chunks[plan.seq]
        # The loop published the position at its last cycle: move it on to now (at most one control period).
        position = plan.position + max(0.0, now - plan.time) / period
        return rtc_prefix(actions, plan.seq, position, self.tracker, period, self.max_delay)

    def record(self, plan: PrefixPlan | None, latency_s: float) -> None:
        self.tracker.record(latency_s)
        est = self.tracker.estimate()
        self.stats["latency_estimate_ms"] = None if est is None else round(est * 1e3, 3)
        if plan is None:
            self.stats["without_prefix"] += 1
        else:
            key = str(len(plan.actions))
            self.stats["prefix_lengths"][key] = self.stats["prefix_lengths"].get(key, 0) + 1


class InferenceWorker:
    """Loop: wait until the control loop runs, observe, infer, publish; beat the heartbeat throughout."""

    def __init__(self, source: ChunkSource, camera: CameraSource, bus: sh.SharedBus, instruction: str,
                 image_size: int | None = None, sync: bool = False, min_interval_s: float = 0.05,
                 rtc_control_period_s: float | None = None, camera_label: str | None = None) -> None:
        """`rtc_control_period_s`: run the rtc strategy's half (prefixes) for a loop at that control period.
        `camera_label`: how a camera failure names the camera (default: its `name`, the --camera spec)."""
        self.source, self.camera, self.bus = source, camera, bus
        self.camera_label = camera_label or camera_name(camera)
        self._images: int | None = None  # images per frame, from the first good frame: a camera keeps its count
        self.min_interval_s = min_interval_s  # replanning faster than this buys nothing and costs a core
        self._last_start = 0.0
        self.instruction, self.image_size, self.sync = instruction, image_size, sync
        self.stats = WorkerStats()
        self._published = 0
        self.rtc: RtcPlanner | None = None
        if rtc_control_period_s is not None:
            self.rtc = RtcPlanner(require_rtc(source, "this chunk source"), rtc_control_period_s)
            self.stats.rtc = self.rtc.stats
        self._test_delay_s = _test_delay_s()
        self._refused_prefix = 0

    def _wait_consumed(self, stop: threading.Event) -> None:
        # Synchronous strategy: the next observation is taken only after the loop played the last chunk.
        while not stop.is_set() and self.bus.get("consumed_seq") < self._published:
            if self.bus.get("status") not in (sh.STATUS_RUNNING,):
                return
            self.bus.beat()
            time.sleep(0.002)

    # The loop reads a published chunk at its next cycle; past this, the worker stops waiting for it (a loop that
    # is homing, disarmed or stopped reads none) and plans from whatever the loop follows.
    SEEN_WAIT_S = 0.1

    def _wait_seen(self, stop: threading.Event) -> None:
        """rtc: the next prefix must come from the chunk just published, which takes over from the plan now
        executing. So wait (at most a control cycle, normally) until the loop has read it and published the
        plan it follows with it; a prefix taken earlier would continue the plan that chunk replaces."""
        deadline = time.monotonic() + self.SEEN_WAIT_S
        while not stop.is_set() and time.monotonic() < deadline:
            plan = self.bus.read_plan()
            if plan is None or plan.seq < 0 or plan.seen >= self._published:
                return
            time.sleep(0.001)

    def step(self, stop: threading.Event) -> bool:
        """One observe-infer-publish round; False when there was nothing to do."""
        self.bus.beat()
        status = self.bus.get("status")
        if status not in (sh.STATUS_RUNNING, sh.STATUS_HOMING, sh.STATUS_STOPPED, sh.STATUS_DISARMED, sh.STATUS_ARMING):
            time.sleep(0.005)
            return False
        if self.sync and self._published:
            self._wait_consumed(stop)
        if self.rtc is not None and self._published:
            self._wait_seen(stop)
        wait = self._last_start + self.min_interval_s - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        self._last_start = time.monotonic()
        self.bus.set("worker_phase", sh.WORKER_CAMERA)
        frame = self._read_frame()
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
        # rtc: the plan is read after the observation, and the latency that sets the next prefix runs from here.
        t_plan = time.monotonic()
        plan = self.rtc.prefix(self.bus.read_plan(), t_plan) if self.rtc is not None else None
        t0 = time.perf_counter()
        self.bus.set("worker_phase", sh.WORKER_INFER)
        try:
            if plan is None:
                chunk = self.source.infer(obs)
            else:
                chunk = self.source.infer(obs, prefix=plan.actions)  # type: ignore[call-arg]
            if self._test_delay_s:
                time.sleep(self._test_delay_s)
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
        plan = self._kept(plan, chunk.actions)
        meta = None if plan is None else (plan.base_seq, plan.index, len(plan.actions))
        self._published = self.bus.publish_chunk(chunk.actions, chunk.action_period_s, obs.timestamp, obs.state,
                                                 prefix=meta)
        if self.rtc is not None:
            self.rtc.remember(self._published, chunk.actions, chunk.action_period_s)
            self.rtc.record(plan, time.monotonic() - t_plan)
        self.stats.chunks += 1
        return True

    def _read_frame(self) -> Frame:
        """The camera's next frame. A read that raises, or gives no usable frame, ends the worker with a CameraError
        naming the camera (an unplugged USB camera does both): a camera driver does its own waiting and retrying
        (RealSense's frame timeout), so what reaches here is not a frame to drive on. `worker_phase` stays at
        WORKER_CAMERA, so the control loop's camera check sees a camera that gives nothing from here on."""
        try:
            frame = self.camera.read()
        except Exception as exc:
            raise CameraError(f"camera {self.camera_label} failed: {error_line(exc)}") from exc
        why = frame_problem(frame, self._images)
        if why is not None:
            raise CameraError(f"camera {self.camera_label} returned {why}")
        self._images = len(frame.images)
        return frame

    def _kept(self, plan: PrefixPlan | None, actions: np.ndarray) -> PrefixPlan | None:
        """The prefix, if the chunk starts with it; else None: the loop must not hand over to it as a continuation."""
        if plan is None:
            return None
        d = len(plan.actions)
        if len(actions) > d and np.allclose(np.asarray(actions)[:d], plan.actions, rtol=0.0, atol=1e-6):
            return plan
        self._refused_prefix += 1
        if self._refused_prefix == 1 or self._refused_prefix % 100 == 0:
            log.warning("rtc: the chunk source did not return the prefix it was given as its first %d actions (%d "
                        "times so far); its chunks are adopted as fresh plans, not continuations", d,
                        self._refused_prefix)
        return None

    def run(self, stop: threading.Event, alive: callable = lambda: True) -> None:  # type: ignore[valid-type]
        while not stop.is_set() and alive():
            self.step(stop)


def _test_delay_s() -> float:
    raw = os.environ.get(TEST_INFER_DELAY_ENV, "")
    if not raw:
        return 0.0
    try:
        ms = float(raw)
    except ValueError:
        raise ConfigError(f"{TEST_INFER_DELAY_ENV}={raw!r}: milliseconds expected (a test hook)") from None
    if not math.isfinite(ms) or ms < 0:
        raise ConfigError(f"{TEST_INFER_DELAY_ENV}={raw!r}: milliseconds >= 0 expected (a test hook)")
    if ms:
        log.warning("%s=%g: every inference is slowed by %g ms (a test hook)", TEST_INFER_DELAY_ENV, ms, ms)
    return ms / 1e3
