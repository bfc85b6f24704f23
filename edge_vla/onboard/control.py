"""The control loop: fixed rate, absolute deadlines, its own process, the robot stopped in a `finally`.

Per cycle: read the motor controller, adopt a new chunk if the worker published one, sample the
scheduler, pass the setpoint through the safety layer, write it, check the watchdog, queue telemetry,
write telemetry in the slack, sleep to the next absolute deadline (missed deadlines are skipped, never
replayed). It runs in a child process (diffusion_policy's RTDE controller habit) so that the inference
worker's Python preprocessing cannot hold the GIL across a deadline.

Lifecycle: open link -> hello -> first state -> arm -> home (optional) -> wait for the first chunk
(holding) -> run -> [trip -> stop (cat 0 / cat 1) -> latched until a re-arm request] -> controlled
stop + disarm at the end, on SIGINT/SIGTERM, or on a stop request from the parent.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from edge_vla.action_space import ActionSpace
from edge_vla.onboard import shared as sh
from edge_vla.onboard.errors import StartupError
from edge_vla.onboard.rt import DeadlineClock, RealtimeConfig, apply_realtime
from edge_vla.onboard.safety import SafetyLayer, SafetyLimits
from edge_vla.onboard.scheduler import Scheduler, Trajectory, make_scheduler
from edge_vla.onboard.telemetry import CycleStats, Telemetry, summarize
from edge_vla.onboard.watchdog import FaultKind, Signals, State, Watchdog, WatchdogConfig
from edge_vla.provision.sdnotify import Notifier, watchdog_interval_s

log = logging.getLogger(__name__)

# Firmware fault bits that mean the firmware itself tripped (not the host's own stop requests).
_FIRMWARE_TRIP_BITS = 0x0001 | 0x0002 | 0x0010  # HEARTBEAT_TIMEOUT | LINK_ERRORS | INJECTED
_MODE_ARMED, _MODE_STOPPING, _MODE_TRIPPED = 1, 2, 3


class LinkLike(Protocol):
    """What the loop needs from firmware_bridge.link.Link (kept narrow so the loop stays link-agnostic)."""

    stats: Any
    faults: list

    def open(self) -> Any: ...
    def close(self) -> None: ...
    def hello(self, timeout: float = 1.0) -> Any: ...
    def arm(self, timeout: float = 0.5) -> None: ...
    def disarm(self, timeout: float = 0.5) -> None: ...
    def send_setpoints(self, positions: Any, velocities: Any = None, efforts: Any = None, kp: Any = None,
                       kd: Any = None) -> Any: ...
    def heartbeat(self) -> int: ...
    def stop(self, category: int, reason: int = 0) -> int: ...
    def poll(self, timeout: float = 0.0) -> list: ...

    @property
    def latest_state(self) -> Any: ...

    @property
    def connected(self) -> bool: ...


@dataclass(frozen=True)
class ControlConfig:
    link_url: str
    action_space: ActionSpace
    rate_hz: float = 100.0
    duration_s: float | None = None  # None: until stopped
    strategy: str = "receding"
    interp: str = "cubic"
    blend_s: float = 0.1
    execute: int | None = None  # sync: actions played per chunk (None: all)
    ensemble_m: float = 0.1
    max_step: float | None = None  # rad per cycle on top of the velocity limit
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    home: tuple[float, ...] | None = None  # move here (safety-limited) before the policy takes over
    home_time_s: float = 2.0
    first_chunk_timeout_s: float = 30.0
    stop_timeout_s: float = 1.0  # cat-1 stop: wait this long for the firmware's ramp to end
    telemetry_path: str | None = None
    realtime: RealtimeConfig = field(default_factory=RealtimeConfig)
    spin_s: float = 0.0002
    telemetry_every: int = 1  # write every n-th cycle record
    link_kwargs: dict[str, Any] = field(default_factory=dict)


class ControlLoop:
    """One control loop over one link; `run()` returns the summary dict."""

    def __init__(self, config: ControlConfig, bus: sh.SharedBus, link: LinkLike) -> None:
        self.cfg = config
        self.bus = bus
        self.link = link
        self.period = 1.0 / config.rate_hz
        self.safety = SafetyLayer(SafetyLimits.from_action_space(config.action_space, config.rate_hz,
                                                                 config.max_step))
        self.scheduler: Scheduler = make_scheduler(config.strategy, config.interp, config.blend_s, config.execute,
                                                   config.ensemble_m)
        self.watchdog = Watchdog(config.watchdog)
        self.telemetry = Telemetry(config.telemetry_path)
        self.stats = CycleStats(self.period)
        self.clock: DeadlineClock | None = None
        self.stop_requested: str | None = None  # reason, set by signal handlers or the parent
        self.armed = False
        self.stop_info: dict[str, float] = {}
        self.chunks_adopted = 0
        self._last_chunk_seq = 0
        self._latest_chunk_obs_t: float | None = None
        self._first_chunk_t: float | None = None  # adoption time of the first chunk since arming
        self._exhausted_since: float | None = None
        self._arm_t = 0.0
        self._arm_errors = 0
        self._seen_faults = 0
        self._ready = False
        self._realtime: dict[str, str] = {}
        self._rearms = 0
        # systemd supervision (Type=notify, WatchdogSec): pinged from this loop, so a stuck loop stops the
        # pings. The unit sets NotifyAccess=all because this child process, not the service's main PID, pings.
        env = {k: v for k, v in os.environ.items() if k != "WATCHDOG_PID"}
        self._notifier = Notifier(env)
        self._sd_watchdog_s = watchdog_interval_s(env)
        self._next_sd_ping = 0.0

    # -- helpers ---------------------------------------------------------------------------------
    def _link_errors(self) -> int:
        s = self.link.stats
        return int(s.crc_errors + s.framing_errors + s.bad_messages)

    def _state(self) -> Any:
        st = self.link.latest_state
        if st is not None:
            self.bus.write_state(st.positions, st.velocities, st.host_time)
        return st

    def _event(self, t: float, name: str, **fields: Any) -> None:
        self.telemetry.record("/watchdog/event", t, {"event": name, **fields})

    def _wait_state(self, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.link.poll(0.01)
            st = self._state()
            if st is not None:
                return st
        raise StartupError(f"no joint state from the motor controller at {self.cfg.link_url} within {timeout:g} s; "
                           "check that it is powered and streaming STATE frames")

    def _arm(self) -> np.ndarray:
        self.link.arm()
        self.armed = True  # from here on, the `finally` must stop and disarm, whatever fails next
        st = self._wait_state(1.0)
        q = np.asarray(st.positions, np.float64)
        self.safety.reset(q)
        self.scheduler.reset(q)
        now = time.monotonic()
        self._arm_t = now
        self._arm_errors = self._link_errors()
        self._seen_faults = len(self.link.faults)
        self._first_chunk_t = None
        self._exhausted_since = None
        self._last_chunk_seq = self.bus.chunk_seq()  # chunks from before the arm are not used
        self.watchdog.arm(now, link_errors_total=self._arm_errors)
        self.armed = True
        self.bus.set("armed_since", now)
        self._event(now, "armed", position=q.tolist())
        return q

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        self._realtime = apply_realtime(self.cfg.realtime)
        clean = False
        try:
            self.link.open()
            caps = self.link.hello()
            n = getattr(caps, "joint_count", self.cfg.action_space.dim)
            if n != self.cfg.action_space.dim:
                raise StartupError(f"the motor controller has {n} joints but the bundle's action space has "
                                   f"{self.cfg.action_space.dim} ({', '.join(self.cfg.action_space.names)}); "
                                   "connect the right controller or export the bundle for this robot")
            self._wait_state(2.0)
            self._arm()
            self._loop()
            clean = True
        finally:
            self._shutdown(clean)
        return self.summary()

    def _loop(self) -> None:
        cfg = self.cfg
        t_start = time.monotonic()
        end = t_start + cfg.duration_s if cfg.duration_s else float("inf")
        homing = self._home_trajectory(t_start)
        self.bus.set("status", sh.STATUS_HOMING if homing is not None else sh.STATUS_RUNNING)
        clock = self.clock = DeadlineClock(self.period, cfg.spin_s, start=t_start)
        n = 0
        while True:
            missed_before = clock.missed
            lateness = clock.wait()
            t = time.monotonic()
            n += 1
            if self.stop_requested is None and self.bus.get("stop_request") > 0:
                self.stop_requested = "stop requested by the parent process"
            if self.stop_requested is not None or t >= end:
                reason = self.stop_requested or f"duration {cfg.duration_s:g} s reached"
                if self.watchdog.state is State.RUNNING:
                    self._stop(1, reason, t, operator=True)
                return
            self._cycle(t, homing, n)
            if self._sd_watchdog_s is not None and t >= self._next_sd_ping:
                self._notifier.watchdog()
                self._next_sd_ping = t + self._sd_watchdog_s
            if homing is not None and t >= homing.end:
                homing = None
                self.bus.set("status", sh.STATUS_RUNNING)
                self._event(t, "homed")
            self.stats.add(t, lateness, time.monotonic() - t, clock.missed - missed_before)
            self.bus.set("cycles", float(self.stats.cycles))
            # Telemetry writes only in the slack, leaving a margin for the wake-up.
            self.telemetry.drain(clock.slack() - 0.3 * self.period)

    def _home_trajectory(self, t0: float) -> Trajectory | None:
        """A smoothstep move to `home` (zero velocity at both ends), at most half the velocity limit."""
        if self.cfg.home is None:
            return None
        q0 = self.safety.last_sent
        home = np.clip(np.asarray(self.cfg.home, np.float64), self.safety.limits.lower, self.safety.limits.upper)
        vmax = 0.5 * self.safety.limits.max_velocity
        duration = max(self.cfg.home_time_s, float(np.max(1.5 * np.abs(home - q0) / vmax)))
        steps = max(2, round(duration * 20))
        tau = np.arange(1, steps + 1)[:, None] / steps
        waypoints = q0 + (home - q0) * (3 * tau**2 - 2 * tau**3)
        return Trajectory(t0, q0, waypoints, duration / steps, "cubic")

    def _cycle(self, t: float, homing: Trajectory | None, n: int) -> None:
        link, wd = self.link, self.watchdog
        link.poll(0.0)
        st = self._state()
        if wd.state is not State.RUNNING:
            self._stopped_cycle(t, st)
            return
        self._maybe_rearm_request(t)
        # New chunk?
        if homing is None and self.bus.chunk_seq() != self._last_chunk_seq:
            got = self.bus.read_chunk()
            if got is not None:
                chunk, _published = got
                self._last_chunk_seq = chunk.seq
                self._latest_chunk_obs_t = chunk.obs_timestamp  # the watchdog's chunk age, without re-reading
                if chunk.obs_timestamp >= self._arm_t:
                    self.scheduler.push(chunk, t)
                    self.chunks_adopted += 1
                    if self._first_chunk_t is None:
                        self._first_chunk_t = t
                    self.telemetry.record("/control/chunk", t, {
                        "seq": chunk.seq, "obs_t": chunk.obs_timestamp, "latency_s": t - chunk.obs_timestamp,
                        "actions": chunk.actions.tolist()})
        if homing is not None:
            target, exhausted, index = homing(t), False, -1
        else:
            sample = self.scheduler.sample(t)
            target, exhausted, index = sample.q, sample.exhausted, sample.index
            self.bus.set("consumed_seq", float(self.scheduler.consumed_seq))
        res = self.safety.command(target)
        link.send_setpoints(res.sent)
        if self.telemetry.enabled and (res.clamped or n % self.cfg.telemetry_every == 0):
            self.telemetry.record("/control/cycle", t, {
                "n": n, "requested": res.requested.tolist(), "sent": res.sent.tolist(),
                "state": None if st is None else np.asarray(st.positions).tolist(),
                "clamped": list(res.clamped), "index": index, "exhausted": exhausted})
        # Exhaustion counts only once the policy is in charge (after homing and a first chunk).
        if homing is None and self._first_chunk_t is not None and exhausted:
            self._exhausted_since = self._exhausted_since or t
        else:
            self._exhausted_since = None
        if homing is None and self._first_chunk_t is None and t - self._arm_t > self.cfg.first_chunk_timeout_s:
            self._stop(1, f"no chunk from the inference worker within {self.cfg.first_chunk_timeout_s:g} s",
                       t, kind=FaultKind.CHUNK_STALE)
            return
        trip = wd.check(self._signals(t, st, homing is not None))
        if trip is not None:
            self._execute_stop(trip.category, trip.reason, t, trip.kind.value)
        elif not self._ready:
            self._ready = True
            self.bus.set("ready", 1.0)
            self._notifier.ready(f"running at {self.cfg.rate_hz:.0f} Hz")
            log.info("control loop ready: first good cycle at %.0f Hz", self.cfg.rate_hz)

    def _signals(self, t: float, st: Any, homing: bool) -> Signals:
        bus = self.bus
        frame_t, beat = bus.get("frame_time"), bus.get("worker_heartbeat")
        policy_phase = not homing and self._first_chunk_t is not None
        new_faults = [f for f in self.link.faults[self._seen_faults:] if int(f.fault_code) & _FIRMWARE_TRIP_BITS]
        bits = int(st.fault_bits) & _FIRMWARE_TRIP_BITS if st is not None else 0
        if st is not None and int(st.mode) != _MODE_ARMED and st.host_time > self._arm_t + 0.05:
            bits |= 0x8000  # the firmware left ARMED on its own
        if new_faults:
            bits |= int(new_faults[-1].fault_code)
        # Camera age: how stale frames are when the worker takes them, or how long it has been blocked
        # inside camera.read(). A worker hung elsewhere (inference) is the worker check's business.
        stuck = (t - beat) if beat > 0 else 0.0
        in_camera = bus.get("worker_phase") == sh.WORKER_CAMERA
        camera_age = max(bus.get("frame_age"), stuck if in_camera else 0.0) if policy_phase and frame_t > 0 else None
        return Signals(
            now=t,
            camera_age_s=camera_age,
            chunk_age_s=(t - self._latest_chunk_obs_t)
            if policy_phase and self._latest_chunk_obs_t is not None else None,
            exhausted_for_s=(t - self._exhausted_since) if self._exhausted_since is not None else 0.0,
            consecutive_overruns=self.clock.consecutive if self.clock else 0,
            link_age_s=(t - st.host_time) if st is not None else None,
            link_errors_total=self._link_errors(),
            firmware_faults=bits,
            worker_age_s=stuck if beat > 0 and not in_camera else None,
            consecutive_nonfinite=self.safety.consecutive_rejects,
        )

    # -- stopping ------------------------------------------------------------------------------
    def _stop(self, category: int, reason: str, t: float, kind: FaultKind | None = None,
              operator: bool = False) -> None:
        trip = self.watchdog.trip(FaultKind.OPERATOR_STOP if operator else (kind or FaultKind.LOOP_ERROR), reason, t)
        if trip is not None:
            self._execute_stop(trip.category, reason, t, trip.kind.value)

    def _execute_stop(self, category: int, reason: str, t_fault: float, kind: str) -> None:
        """Stop frame first (the latency that matters), then wait out a cat-1 ramp, then disarm."""
        self.bus.set("status", sh.STATUS_STOPPING)
        try:
            self.link.stop(category)
        except Exception as exc:  # the link may be the thing that failed; the firmware watchdog covers it
            log.error("could not send the category-%d stop frame (%s); relying on the firmware watchdog",
                      category, exc)
        t_wire = time.monotonic()
        self._notifier.status(f"safety stop category {category}: {reason}")
        self.stop_info = {"category": category, "fault_to_stop_frame_ms": (t_wire - t_fault) * 1e3}
        self._event(t_wire, "stop_sent", category=category, kind=kind, reason=reason, t_fault=t_fault)
        if category == 1:
            self._wait_ramp()
        self.watchdog.stop_complete()
        self._disarm()
        self.bus.set("status", sh.STATUS_STOPPED)
        self._event(time.monotonic(), "stopped", category=category, kind=kind)

    def _wait_ramp(self) -> None:
        # Keep the firmware's heartbeat alive during its ramp: silence would turn cat 1 into cat 0.
        deadline = time.monotonic() + self.cfg.stop_timeout_s
        while time.monotonic() < deadline:
            try:
                self.link.heartbeat()
            except Exception:
                return
            self.link.poll(self.period)
            st = self._state()
            if st is not None and int(st.mode) not in (_MODE_ARMED, _MODE_STOPPING):
                return
        log.warning("the firmware did not finish its category-1 ramp within %.1f s", self.cfg.stop_timeout_s)

    def _disarm(self) -> None:
        if not self.armed:
            return
        try:
            self.link.disarm()
            self.armed = False
        except Exception as exc:
            log.error("disarm failed (%s); the firmware watchdog will stop the motors", exc)

    def _stopped_cycle(self, t: float, st: Any) -> None:
        """Latched: keep reading state for the worker and the operator, command nothing, wait for re-arm."""
        if self.link.connected:
            try:
                self.link.heartbeat()  # keeps the link's liveness visible; the firmware is disarmed
            except Exception as exc:
                log.debug("heartbeat while stopped failed: %s", exc)
        self._maybe_rearm_request(t)

    def _maybe_rearm_request(self, t: float) -> None:
        req = int(self.bus.get("rearm_request"))
        if req <= self._rearms:
            return
        self._rearms = req
        if self.watchdog.state is not State.STOPPED:
            return
        log.warning("re-arm requested")
        self.watchdog.rearm()
        self._event(t, "rearm")
        self._arm()
        self.bus.set("status", sh.STATUS_RUNNING)

    def _shutdown(self, clean: bool) -> None:
        """The `finally`: whatever happened, the robot ends stopped and disarmed, the link closed."""
        if self.armed:
            cat = 1 if clean else 0
            try:
                self.link.stop(cat)  # the stop frame first: nothing below may delay or prevent it
                if self.watchdog.state is State.RUNNING:
                    self.watchdog.trip(FaultKind.OPERATOR_STOP if clean else FaultKind.LOOP_ERROR,
                                       "control loop exiting", time.monotonic())
                if cat == 1:
                    self._wait_ramp()
            except Exception as exc:
                log.error("stop on exit failed: %s", exc)
            self._disarm()
        try:
            self.link.close()
        except Exception as exc:
            log.error("closing the link failed: %s", exc)
        self.bus.set("status", sh.STATUS_EXITED)
        summary = self.summary()
        self.telemetry.record("/control/summary", time.monotonic(), summary)
        self.telemetry.close()

    def summary(self) -> dict[str, Any]:
        stats = self.link.stats
        link = {k: getattr(stats, k) for k in ("frames_sent", "frames_received", "crc_errors", "framing_errors",
                                               "bad_messages", "drops", "reconnects")}
        return summarize(
            self.stats, self.clock.missed if self.clock else 0, self.safety.counts,
            [tr.as_dict() for tr in self.watchdog.trips],
            extra={"chunks": {"adopted": self.chunks_adopted, "strategy": self.cfg.strategy},
                   "link": link, "realtime": self._realtime, "stop": self.stop_info,
                   "telemetry": str(self.telemetry.path) if self.telemetry.path else None,
                   "final_state": self.watchdog.state.value, "armed_at_exit": self.armed},
        )


def control_main(config: ControlConfig, bus: sh.SharedBus, conn: Any = None, log_level: int = logging.INFO) -> None:
    """Entry point of the control process: SIGINT/SIGTERM -> controlled stop; summary sent over `conn`."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s[control]: %(message)s")
    from firmware_bridge.link import open_link

    link = open_link(config.link_url, **config.link_kwargs)
    loop = ControlLoop(config, bus, link)

    def on_signal(signum: int, _frame: Any) -> None:
        loop.stop_requested = f"{signal.Signals(signum).name} received"

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    result: dict[str, Any]
    try:
        result = loop.run()
    except Exception as exc:
        log.exception("control loop failed")
        result = {**loop.summary(), "error": f"{type(exc).__name__}: {exc}"}
    if conn is not None:
        conn.send(result)
        conn.close()
