"""The control loop: fixed rate, absolute deadlines, its own process, the robot stopped in a `finally`.

Per cycle: read the motor controller, serve operator requests, then advance the loop's state machine
by one step, sleep to the next absolute deadline (missed deadlines are skipped, never replayed). It runs
in a child process (diffusion_policy's RTDE controller habit) so that the inference worker's Python
preprocessing cannot hold the GIL across a deadline.

State machine (the STATUS word; nothing below ever waits inside a cycle):

    disarmed --operator arm--> arming --ARM acked + STATE says ARMED--> homing/running
    running --trip | operator stop | exit--> stopping --torque off confirmed + DISARM acked--> stopped
    stopped --operator arm (CLEAR_FAULTS, ARM)--> arming ...

- Starts disarmed, always: after power-up, a crash, a systemd restart. Only an operator request arms
  (edge_vla.onboard.operator; bench mode `arm_on_start` makes that one request itself, refused under
  systemd unless the unit allows it).
- Arming: CLEAR_FAULTS then ARM, sent without waiting; the answers are read in later cycles. No answer
  within `arm_timeout_s` -> the arm fails (and, if the ARM may have landed, a stop follows).
- Stopping: the STOP frame goes out in the cycle of the trip, and is resent every `stop_retry_s` until
  the firmware ACKs it or the link is declared dead (`link_dead_s` without a fresh state). Nothing that
  feeds the firmware's motion watchdog (HEARTBEAT, SETPOINT) is sent once a stop is requested, so its
  own watchdog stays the last line. A category-1 stop whose torque-off is not confirmed within
  `stop_timeout_s` escalates to category 0. Then DISARM, resent until ACKed; if it never is, that is
  logged as an error and `armed` stays true (the firmware is still latched, its torque confirmed off).
- Keep-alives (which never feed the motion watchdog) go only to a firmware confirmed not armed.
- The parent process dying (`edge-vla run` killed with SIGKILL: the OOM killer, `systemctl kill -s KILL`, a crash
  in a native library) takes the inference worker and the operator socket with it: the loop sees it within one
  cycle (getppid() no longer the parent's pid), makes the stop a SIGTERM
  makes (category 1 if moving, as a dead worker), disarms and exits, rather than living on as an orphan holding
  the port, the CAN socket and the shared memory.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_vla.action_space import ActionSpace, require_executable
from edge_vla.onboard import shared as sh
from edge_vla.onboard.errors import StartupError
from edge_vla.onboard.following import TrackingCheck, TrackingLimits
from edge_vla.onboard.linkops import OK, PENDING, Commands
from edge_vla.onboard.operator import ARM_OK, check_bench_mode
from edge_vla.onboard.rt import DeadlineClock, RealtimeConfig, apply_realtime
from edge_vla.onboard.safety import SafetyLayer, SafetyLimits
from edge_vla.onboard.scheduler import RtcScheduler, Scheduler, Trajectory, make_scheduler, start_ramp_s
from edge_vla.onboard.telemetry import CycleStats, Telemetry, summarize
from edge_vla.onboard.watchdog import PLANNED_STOPS, FaultKind, Signals, State, Watchdog, WatchdogConfig
from edge_vla.provision.sdnotify import Notifier, watchdog_interval_s

if TYPE_CHECKING:  # the loop's one interface to the motor controller, whatever the backend
    from firmware_bridge.controller import Controller

log = logging.getLogger(__name__)

_MODE_DISARMED, _MODE_ARMED, _MODE_STOPPING, _MODE_TRIPPED = 0, 1, 2, 3
# Fault bits that are the host's own stop requests or status, not a firmware trip (protocol.Fault).
_NOT_FIRMWARE_TRIPS = 0x0004 | 0x0008 | 0x0100 | 0x0200  # HOST_STOP_CAT0/1, SETPOINT_CLAMPED, GAINS_CLAMPED
_ARM_NOT_DISARMED, _ARM_REFUSED, _ARM_TIMEOUT, _ARM_LINK_DOWN, _ARM_ENABLE_OFF = 1, 2, 3, 4, 5
_NACK_ENABLE_OFF = 9

# The parent's `stop_request` word: why it asks the loop to stop and exit (the loop acts on the first it sees).
STOP_EXIT = 1.0  # a signal to the parent, its close(): a controlled stop, as an operator's
STOP_WORKER_FAILED = 2.0  # the inference worker ended on an error (a camera unplugged): a fault, stop now
WORKER_FAILED_REASON = "the inference worker stopped on an error (a camera failure or a bug; the run says which)"
# The parent process died without asking for a stop (SIGKILL, a crash): nothing infers or serves operators again.
PARENT_DIED_REASON = "the parent process (pid {pid}) died: no inference worker and no operator socket are left"

# The link carries joint-position setpoints (firmware_bridge SETPOINT), so the loop executes one action kind.
EXECUTABLE_ACTION_KINDS = ("absolute_joint_position",)
EXECUTES_BECAUSE = "edge-vla run streams joint-position setpoints to the motor controller"


@dataclass(frozen=True)
class ControlConfig:
    link_url: str
    action_space: ActionSpace
    rate_hz: float = 100.0
    duration_s: float | None = None  # None: until stopped
    strategy: str = "receding"
    interp: str = "cubic"
    blend_s: float = 0.1  # cross-fade for the anchored hand-over and the ensemble (scheduler.py)
    handover: str = "continuous"  # a new chunk starts from the commanded position and velocity (scheduler.py)
    start_ramp_s: float | None = None  # plan-clock ramp on a start from rest (None: from the action space's limits)
    velocity_feedforward: bool = True  # send the commanded velocity with each setpoint (see _cycle)
    execute: int | None = None  # sync: actions played per chunk (None: all)
    ensemble_m: float = 0.1
    max_step: float | None = None  # rad per cycle on top of the velocity limit
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    home: tuple[float, ...] | None = None  # move here (safety-limited) after each arm, before the policy
    home_time_s: float = 2.0
    first_chunk_timeout_s: float = 30.0
    arm_on_start: bool = False  # bench mode: one arm request at start (refused under systemd)
    arm_timeout_s: float = 1.0  # ARM acknowledged and STATE says ARMED within this, or the arm fails
    stop_timeout_s: float = 0.5  # cat 1: torque off confirmed within this (the firmware's ramp + margin), else cat 0
    stop_retry_s: float = 0.02  # resend an unacknowledged STOP (or DISARM) this often
    disarm_tries: int = 5
    link_dead_s: float = 0.5  # no fresh state for this long while stopping: the link is dead
    tracking: TrackingLimits | None = None  # host following-error limits (robot config, narrowed by the bundle)
    telemetry_path: str | None = None
    realtime: RealtimeConfig = field(default_factory=RealtimeConfig)
    spin_s: float = 0.0002
    telemetry_every: int = 1  # write every n-th cycle record
    link_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        require_executable(self.action_space, EXECUTABLE_ACTION_KINDS, "the action space", "the control loop",
                           EXECUTES_BECAUSE)


class ControlLoop:
    """One control loop over one link; `run()` returns the summary dict."""

    def __init__(self, config: ControlConfig, bus: sh.SharedBus, link: Controller,
                 parent_pid: int | None = None) -> None:
        """`parent_pid`: the process that runs the inference worker; its death ends the loop (None: not watched)."""
        if config.arm_on_start:
            check_bench_mode()
        self.cfg = config
        self.bus = bus
        self.link = link
        self.cmds = Commands(link)
        self.period = 1.0 / config.rate_hz
        self.safety = SafetyLayer(SafetyLimits.from_action_space(config.action_space, config.rate_hz,
                                                                 config.max_step))
        space = config.action_space
        ramp = start_ramp_s(space.max_velocity, space.max_acceleration) if config.start_ramp_s is None \
            else config.start_ramp_s
        self.scheduler: Scheduler = make_scheduler(config.strategy, config.interp, config.blend_s, config.execute,
                                                   config.ensemble_m, config.handover, ramp)
        # rtc: the loop publishes the plan it follows (the worker takes each prefix from it) and reports chunks
        # that missed their takeover; the reports are logged after the cycle's setpoint went out.
        self._rtc = self.scheduler if isinstance(self.scheduler, RtcScheduler) else None
        self._rtc_reports: list[str] = []
        self.watchdog = Watchdog(config.watchdog, defer_logs=True)
        self.tracking = TrackingCheck(config.tracking) if config.tracking is not None else None
        self.telemetry = Telemetry(config.telemetry_path)
        self.stats = CycleStats(self.period)
        self.clock: DeadlineClock | None = None
        self.stop_requested: str | None = None  # exit reason, set by signal handlers, the parent, the duration
        self.exit_kind = FaultKind.OPERATOR_STOP  # the stop an exit request makes (see _request_exit)
        self.armed = False  # True from the moment an ARM may have reached the firmware until a DISARM is ACKed
        self.status = sh.STATUS_STARTING
        self.stop_info: dict[str, Any] = {}
        self.chunks_adopted = 0
        self.homing: Trajectory | None = None
        self._n = 0
        self._last_chunk_seq = 0
        self._latest_chunk_obs_t: float | None = None
        self._first_chunk_t: float | None = None  # adoption time of the first chunk since arming
        self._exhausted_since: float | None = None
        self._arm_t = 0.0
        self._adopt_after = 0.0
        self._ready = False
        self._realtime: dict[str, str] = {}
        self._requests = {"arm": 0.0, "clear": 0.0, "op_stop": 0.0}
        self._fault_count = 0
        self._fw_time = -1.0  # firmware clock of the newest state, and when it last advanced (host time)
        self._fw_fresh_t = 0.0
        self._last_keepalive = 0.0
        self._exit_deadline: float | None = None
        self.parent_pid = parent_pid
        # arming / stopping sub-state
        self._clear_seq: int | None = None
        self._arm_seq: int | None = None
        self._arm_acked_t: float | None = None
        self._arm_deadline = 0.0
        self._arm_sent_t = 0.0
        self._hello_reconnects = 0
        self._stop: dict[str, Any] = {}
        self._disarm: dict[str, Any] = {}
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

    def _state(self, now: float) -> Any:
        st = self.link.latest_state
        if st is None:
            return None
        # Freshness on the firmware's own clock: a STATE whose firmware time does not advance (replayed,
        # stuck in a buffer, or a firmware clock that stepped back) does not count as a sign of life.
        sampled = getattr(st, "sampled_host_time", None)
        if sampled is not None:
            self._fw_fresh_t = max(self._fw_fresh_t, min(float(sampled), now))
        elif st.firmware_time_s > self._fw_time:
            self._fw_time = float(st.firmware_time_s)
            self._fw_fresh_t = st.host_time
        self.bus.write_state(st.positions, st.velocities, st.host_time)
        return st

    def _event(self, t: float, name: str, **fields: Any) -> None:
        self.telemetry.record("/watchdog/event", t, {"event": name, **fields})

    def _set_status(self, status: int) -> None:
        self.status = status
        self.bus.set("status", status)

    def _set_armed(self, armed: bool) -> None:
        self.armed = armed
        self.bus.set("armed", 1.0 if armed else 0.0)

    def _publish(self, st: Any) -> None:
        if st is not None:
            self.bus.set("fw_mode", float(int(st.mode)))
            self.bus.set("fw_faults", float(int(st.fault_bits)))
            self.bus.set("fw_status", float(int(getattr(st, "status", 0))))

    def _wait_first_state(self, timeout: float) -> Any:
        """Startup only (before the first cycle): the controller must be streaming state."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.link.poll(0.01)
            st = self._state(time.monotonic())
            if st is not None:
                return st
        raise StartupError(f"no joint state from the motor controller at {self.cfg.link_url} within {timeout:g} s; "
                           "check that it is powered and streaming STATE frames")

    def _new_faults(self) -> list:
        """Fault reports since the last cycle; Link.faults is bounded (a deque) or trimmed here."""
        faults = self.link.faults
        since = getattr(self.link, "faults_since", None)
        if callable(since):
            new = since(self._fault_count)
            self._fault_count = int(self.link.fault_count)
            return list(new)
        new = list(faults)
        faults.clear()  # older Link: a plain list this loop is the only reader of
        return new

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
            st = self._wait_first_state(2.0)
            self._publish(st)
            self._set_status(sh.STATUS_DISARMED)
            mode = int(st.mode)
            log.info("control loop up and DISARMED (firmware mode %d, faults 0x%04x); waiting for an operator arm%s",
                     mode, int(st.fault_bits), " (bench mode: arming now)" if self.cfg.arm_on_start else "")
            # READY: the service is up (disarmed is its normal resting state; arming is the operator's act).
            self._notifier.ready("control loop up, disarmed: waiting for an operator arm")
            if self.cfg.arm_on_start:
                self.bus.set("arm_request", self.bus.get("arm_request") + 1)  # the same path as an operator's
            self._loop()
            clean = True
        finally:
            self._shutdown(clean)
        return self.summary()

    def _loop(self) -> None:
        cfg = self.cfg
        t_start = time.monotonic()
        end = t_start + cfg.duration_s if cfg.duration_s else float("inf")
        clock = self.clock = DeadlineClock(self.period, cfg.spin_s, start=t_start)
        while True:
            missed_before = clock.missed
            lateness = clock.wait()
            t = time.monotonic()
            self._n += 1
            self.link.poll(0.0)
            st = self._state(t)
            self._publish(st)
            if self.stop_requested is None:
                self._exit_requests(t, end)
            if self.stop_requested is not None and self._exit_step(t):
                return
            self._operator_requests(t)
            if self.status in (sh.STATUS_RUNNING, sh.STATUS_HOMING):
                self._cycle(t, st)
            elif self.status == sh.STATUS_ARMING:
                self._arming_cycle(t, st)
            elif self.status == sh.STATUS_STOPPING:
                self._stopping_cycle(t, st)
            else:
                self._idle_cycle(t, st)
            if self._sd_watchdog_s is not None and t >= self._next_sd_ping:
                self._notifier.watchdog()
                self._next_sd_ping = t + self._sd_watchdog_s
            self.watchdog.flush_logs()  # after this cycle's frames went out
            self.stats.add(t, lateness, time.monotonic() - t, clock.missed - missed_before)
            self.bus.set("cycles", float(self.stats.cycles))
            # Telemetry writes only in the slack, leaving a margin for the wake-up.
            self.telemetry.drain(clock.slack() - 0.3 * self.period)

    def orphaned(self) -> bool:
        """The parent process is gone: this one was re-parented (to init, or to a subreaper such as systemd's)."""
        return self.parent_pid is not None and os.getppid() != self.parent_pid

    def _parent_died(self) -> bool:
        """Every cycle (one getppid() call): a dead parent sends no chunk and no stop request, ever again. A process,
        not a thread, is watched: a runner started from a short-lived thread runs on when that thread ends."""
        if not self.orphaned():
            return False
        reason = PARENT_DIED_REASON.format(pid=self.parent_pid)
        self._request_exit(FaultKind.WORKER_DEAD, reason)
        if self.status not in (sh.STATUS_RUNNING, sh.STATUS_HOMING):  # moving: the trip's line says it, after STOP
            log.error("%s (killed?); nothing was moving: exiting", reason)
        return True

    def _exit_requests(self, t: float, end: float) -> None:
        """The parent's death, its stop request, else the planned end: each exits with its own kind of stop (a
        signal to this process sets `stop_requested` itself, an operator's stop)."""
        if self._parent_died():
            return
        request = self.bus.get("stop_request")
        if request >= STOP_WORKER_FAILED:
            self._request_exit(FaultKind.WORKER_DEAD, WORKER_FAILED_REASON)
        elif request > 0:
            self._request_exit(FaultKind.OPERATOR_STOP, "stop requested by the parent process")
        elif t >= end:
            self._request_exit(FaultKind.DURATION, "duration reached")

    def _request_exit(self, kind: FaultKind, reason: str) -> None:
        self.stop_requested, self.exit_kind = reason, kind

    def _exit_step(self, t: float) -> bool:
        """On an exit request: a stop of the request's kind if moving, then leave once stopped (bounded)."""
        if self._exit_deadline is None:
            self._exit_deadline = t + 2 * self.cfg.stop_timeout_s + self.cfg.disarm_tries * 0.1 + 0.5
            if self.status in (sh.STATUS_RUNNING, sh.STATUS_HOMING):
                self._trip(self.exit_kind, self.stop_requested or "exit", t)
            elif self.status == sh.STATUS_ARMING:
                self._abort_arm(t, "exit requested while arming")
        if self.status in (sh.STATUS_DISARMED, sh.STATUS_STOPPED):
            return True
        if t > self._exit_deadline:
            log.error("exiting before the stop was confirmed (status %s); the finally sends a category-0 stop",
                      sh.STATUS_NAMES[self.status])
            return True
        return False

    # -- operator requests -----------------------------------------------------------------------
    def _take(self, word: str) -> float | None:
        n = self.bus.get(f"{word}_request")
        if n <= self._requests[word]:
            return None
        self._requests[word] = n
        return n

    def _operator_requests(self, t: float) -> None:
        n = self._take("op_stop")
        if n is not None:
            if self.status in (sh.STATUS_RUNNING, sh.STATUS_HOMING):
                self._trip(FaultKind.OPERATOR_STOP, "operator stop", t)
            elif self.status == sh.STATUS_ARMING:
                self._abort_arm(t, "operator stop while arming")
            self.bus.set("op_stop_ack", n)
        n = self._take("clear")
        if n is not None:
            if self.status in (sh.STATUS_DISARMED, sh.STATUS_STOPPED):
                if self.watchdog.state is State.STOPPED:
                    self.watchdog.rearm()
                self._clear_seq = self._send(self.cmds.clear_faults, "CLEAR_FAULTS")
                self._set_status(sh.STATUS_DISARMED)
                self._event(t, "faults_cleared")
            self.bus.set("clear_ack", n)
        n = self._take("arm")
        if n is not None:
            self._arm_request_n = n
            if self.status == sh.STATUS_ARMING:
                pass  # the arm under way answers this request too
            elif self.status in (sh.STATUS_RUNNING, sh.STATUS_HOMING) and self.stop_requested is None:
                self._arm_done(ARM_OK)  # already armed: arming is idempotent for the operator
            elif self.status not in (sh.STATUS_DISARMED, sh.STATUS_STOPPED) or self.stop_requested is not None:
                self._arm_done(_ARM_NOT_DISARMED)
            elif not self.link.connected:
                self._arm_done(_ARM_LINK_DOWN)
            else:
                self._begin_arm(t)

    def _send(self, fn: Any, what: str, *args: Any) -> int | None:
        try:
            return fn(*args)
        except Exception as exc:
            log.error("could not send %s: %s", what, exc)
            return None

    # -- arming ----------------------------------------------------------------------------------
    def _begin_arm(self, t: float) -> None:
        log.info("operator arm: CLEAR_FAULTS then ARM")
        reconnects = int(getattr(self.link.stats, "reconnects", 0))
        if reconnects != self._hello_reconnects or getattr(self.link, "needs_hello", False) is True:
            # The port was lost and re-opened since the last HELLO, or another HELLO (another node, a replayed
            # frame) ended this link's session (protocol 1.2): a new session first. This one blocking call
            # (<= 0.3 s) happens only here, disarmed, on an operator's request.
            try:
                self.link.hello(timeout=0.3)
                self._hello_reconnects = reconnects
            except Exception as exc:
                self._arm_failed(t, _ARM_LINK_DOWN, f"no HELLO answer after the link reconnected: {exc}")
                return
        if self.watchdog.state is State.STOPPED:
            self.watchdog.rearm()
        self._clear_seq = self._send(self.cmds.clear_faults, "CLEAR_FAULTS") if self.cmds.has_clear_faults else None
        self._arm_seq = None
        self._arm_acked_t = None
        self._arm_deadline = t + self.cfg.arm_timeout_s
        self._arm_sent_t = t
        self._set_status(sh.STATUS_ARMING)
        if self._clear_seq is None:
            self._send_arm()

    def _send_arm(self) -> None:
        self._set_armed(True)  # from here the firmware may be armed: every exit path must stop it
        self._arm_seq = self._send(self.cmds.arm, "ARM")
        self._arm_sent_t = time.monotonic()

    def _arming_cycle(self, t: float, st: Any) -> None:
        # An unanswered CLEAR_FAULTS or ARM (a frame lost on the line) is resent every 0.1 s until the timeout.
        resend = t - self._arm_sent_t >= 0.1
        if self._arm_seq is None and self._clear_seq is not None:
            r = self.cmds.result(self._clear_seq)
            if isinstance(r, str) and r not in ("forgotten", "unsent"):
                self._arm_failed(t, _ARM_REFUSED, f"CLEAR_FAULTS refused: {r}")
                return
            if r is OK:
                self._send_arm()
            elif resend:
                self._clear_seq = self._send(self.cmds.clear_faults, "CLEAR_FAULTS (resend)")
                self._arm_sent_t = t
        elif self._arm_seq is not None and self._arm_acked_t is None:
            r = self.cmds.result(self._arm_seq)
            if (r is PENDING and resend) or r in ("forgotten", "unsent"):
                self._send_arm()
                return
            if isinstance(r, str):
                code = _ARM_ENABLE_OFF if "ENABLE" in r else _ARM_REFUSED
                self._arm_failed(t, code, f"ARM refused by the firmware: {r}")
                return
            if r is OK:
                self._arm_acked_t = t
        if self._arm_acked_t is not None and st is not None and int(st.mode) == _MODE_ARMED \
                and st.host_time >= self._arm_acked_t - self.period:
            self._armed_ok(t, st)
        elif t > self._arm_deadline:
            self._arm_failed(t, _ARM_TIMEOUT, f"the firmware did not confirm ARMED within {self.cfg.arm_timeout_s:g} s")

    def _arm_failed(self, t: float, code: int, why: str) -> None:
        log.error("arm failed: %s", why)
        self._event(t, "arm_failed", reason=why)
        self._arm_done(code)
        st = self.link.latest_state
        if self.armed and code != _ARM_TIMEOUT and (st is None or int(st.mode) != _MODE_ARMED):
            self._set_armed(False)  # refused (NACK) and the firmware does not report ARMED: it never armed
        if self.armed:  # the ARM may have landed: stop and disarm it the usual way
            self.watchdog.arm(t, link_errors_total=self._link_errors())
            self._trip(FaultKind.LOOP_ERROR, f"arm not confirmed: {why}", t)
        else:
            self._set_status(sh.STATUS_STOPPED if self.watchdog.state is State.STOPPED else sh.STATUS_DISARMED)

    def _abort_arm(self, t: float, why: str) -> None:
        self._arm_done(_ARM_NOT_DISARMED)
        if self.armed:
            self.watchdog.arm(t, link_errors_total=self._link_errors())
            self._trip(FaultKind.OPERATOR_STOP, why, t)
        else:
            self._set_status(sh.STATUS_DISARMED)

    def _arm_done(self, code: int) -> None:
        self.bus.set("arm_result", float(code))
        self.bus.set("arm_ack", getattr(self, "_arm_request_n", self.bus.get("arm_request")))

    def _armed_ok(self, t: float, st: Any) -> None:
        q = np.asarray(st.positions, np.float64)
        self.safety.reset(q)
        self.scheduler.reset(q)
        if self.tracking is not None:
            self.tracking.reset()
        self._arm_t = self._adopt_after = t
        self._latest_chunk_obs_t = None
        self._first_chunk_t = None
        self._exhausted_since = None
        self._new_faults()  # reports from before this arm are not this run's
        self._last_chunk_seq = self.bus.chunk_seq()  # chunks from before the arm are not used
        self.watchdog.arm(t, link_errors_total=self._link_errors())
        self.bus.set("armed_since", t)
        self.homing = self._home_trajectory(t)
        self._set_status(sh.STATUS_HOMING if self.homing is not None else sh.STATUS_RUNNING)
        self._event(t, "armed", position=q.tolist())
        log.info("armed by operator request; firmware confirmed ARMED")
        self._arm_done(ARM_OK)

    # -- running ---------------------------------------------------------------------------------
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

    def _motion_time(self, t: float) -> float:
        """The deadline this cycle was scheduled for. Setpoints are sampled on that grid, not at the wake-up:
        the safety layer differentiates at the nominal period, so a wake-up 2 ms late at 2.25 rad/s would
        read as a 0.45 rad/s velocity step (45 rad/s^2 at 100 Hz) and be clamped as acceleration."""
        return self.clock.next - self.period if self.clock is not None else t

    def _cycle(self, t: float, st: Any) -> None:
        tm = self._motion_time(t)
        homing = self.homing
        if homing is not None and t >= homing.end:
            self.homing = homing = None
            self._adopt_after = t
            # Hold the home pose until the first chunk (not the pose the arm was armed at, which the loop
            # would otherwise head back to at full acceleration for an inference latency).
            self.scheduler.reset(self.safety.last_sent)
            self._set_status(sh.STATUS_RUNNING)
            self._event(t, "homed")
        # New chunk?
        if homing is None and self.bus.chunk_seq() != self._last_chunk_seq:
            got = self.bus.read_chunk()
            if got is not None:
                chunk, _published = got
                self._last_chunk_seq = chunk.seq
                # Only chunks observed after the policy took over (arm, or the end of homing) are used.
                if chunk.obs_timestamp >= self._adopt_after:
                    self._latest_chunk_obs_t = chunk.obs_timestamp  # the watchdog's chunk age, without re-reading
                    # The command continuing at its current velocity this cycle: where a continuous hand-over starts.
                    v = self.safety.velocity
                    self.scheduler.push(chunk, tm, commanded=(self.safety.last_sent + v * self.period, v))
                    self.chunks_adopted += 1
                    if self._first_chunk_t is None:
                        self._first_chunk_t = t
                    self.telemetry.record("/control/chunk", t, {
                        "seq": chunk.seq, "obs_t": chunk.obs_timestamp, "latency_s": t - chunk.obs_timestamp,
                        "actions": chunk.actions.tolist(), "prefix_base": chunk.prefix_base,
                        "prefix_index": chunk.prefix_index, "prefix_len": chunk.prefix_len})
                    if self._rtc is not None:
                        self._rtc_report(t - chunk.obs_timestamp)
        if homing is not None:
            target, exhausted, index = homing(tm), False, -1
        else:
            sample = self.scheduler.sample(tm)
            target, exhausted, index = sample.q, sample.exhausted, sample.index
            self.bus.set("consumed_seq", float(self.scheduler.consumed_seq))
        if self._rtc is not None:
            self.bus.publish_plan(*self._rtc.plan_position(tm), tm, seen=self._last_chunk_seq)
        commanded_before = self.safety.last_sent
        res = self.safety.command(target)
        trip = self.watchdog.check(self._signals(t, st, homing is not None, commanded_before))
        if trip is not None:  # checked before the write: a tripped cycle sends the STOP, not a setpoint
            self._begin_stop(trip.category, trip.reason, t, trip.kind.value)
            return
        try:
            # Velocity feedforward: a PD drive given only positions lags a moving setpoint by (kd + friction) *
            # v / kp (about 0.1 rad at 2.25 rad/s on the emulator), and every chunk is planned from that lagging
            # measured state; with the command's own velocity as v* the lag is friction * v / kp.
            if self.cfg.velocity_feedforward:
                self.link.send_setpoints(res.sent, velocities=self.safety.velocity)
            else:
                self.link.send_setpoints(res.sent)
        except Exception as exc:
            if self.stop_requested:  # a SIGTERM reached the device's own hook first (Feetech: torque off, then the
                # write is refused): the requested stop runs next cycle; a refused write after it is not a fault.
                log.info("setpoint not sent after %s (%s); stopping as requested", self.stop_requested, exc)
                return
            self._trip(FaultKind.LINK_STALE, f"could not send a setpoint: {exc}", t)
            return
        if self.telemetry.enabled and (res.clamped or self._n % self.cfg.telemetry_every == 0):
            self.telemetry.record("/control/cycle", t, {
                "n": self._n, "requested": res.requested.tolist(), "sent": res.sent.tolist(),
                "state": None if st is None else np.asarray(st.positions).tolist(),
                "clamped": list(res.clamped), "index": index, "exhausted": exhausted})
        for line in self._rtc_reports:  # after the setpoint: a log write never delays it
            log.warning("%s", line)
        self._rtc_reports.clear()
        # Exhaustion counts only once the policy is in charge (after homing and a first chunk).
        if homing is None and self._first_chunk_t is not None and exhausted:
            self._exhausted_since = self._exhausted_since or t
        else:
            self._exhausted_since = None
        if homing is None and self._first_chunk_t is None and t - self._adopt_after > self.cfg.first_chunk_timeout_s:
            self._trip(FaultKind.CHUNK_STALE,
                       f"no chunk from the inference worker within {self.cfg.first_chunk_timeout_s:g} s", t)
            return
        if not self._ready:
            self._ready = True
            self.bus.set("ready", 1.0)
            self._notifier.status(f"armed, running at {self.cfg.rate_hz:.0f} Hz")
            log.info("control loop ready: first good armed cycle at %.0f Hz", self.cfg.rate_hz)

    def _rtc_report(self, took_s: float) -> None:
        """Say what became of an rtc chunk that missed its takeover at index d (the first 10 of each kind, then
        every 100th: at the replanning rate a persistently slow policy would flood the log)."""
        assert self._rtc is not None
        counts = self._rtc.rtc_counts
        for ev in self._rtc.events:
            n = counts.get(ev.kind, 0)
            if ev.kind == "no_prefix" or not (n <= 10 or n % 100 == 0):
                continue
            over = f"rtc: inference took {took_s * 1e3:.0f} ms, over the d = {ev.delay} actions planned"
            if ev.kind == "late":
                self._rtc_reports.append(f"{over}: adopted late at index {ev.index} ({n} late so far)")
            else:
                self._rtc_reports.append(f"{over}: the chunk ran out, held its last action for {ev.held_s * 1e3:.0f} "
                                         f"ms, resumed at index {ev.index} ({n} held so far)")
        self._rtc.events.clear()

    def _signals(self, t: float, st: Any, homing: bool, commanded: np.ndarray) -> Signals:
        bus = self.bus
        frame_t, beat = bus.get("frame_time"), bus.get("worker_heartbeat")
        policy_phase = not homing and self._first_chunk_t is not None
        bits = 0
        for f in self._new_faults():
            bits |= int(f.fault_code) & ~_NOT_FIRMWARE_TRIPS
        if st is not None:
            bits |= int(st.fault_bits) & ~_NOT_FIRMWARE_TRIPS
            if int(st.mode) != _MODE_ARMED and st.host_time > self._arm_t + 0.05:
                bits |= 0x8000  # the firmware left ARMED on its own
        following = effort = None
        if self.tracking is not None and st is not None and t - self._fw_fresh_t < 2 * self.period + 0.01:
            following, effort = self.tracking.check(commanded, st.positions, getattr(st, "efforts", None),
                                                    self.cfg.action_space.names)
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
            link_age_s=(t - self._fw_fresh_t) if st is not None else None,
            link_errors_total=self._link_errors(),
            firmware_faults=bits,
            worker_age_s=stuck if beat > 0 and not in_camera else None,
            consecutive_nonfinite=self.safety.consecutive_rejects,
            following_error=following,
            effort_limit=effort,
        )

    # -- stopping ------------------------------------------------------------------------------
    def _trip(self, kind: FaultKind, reason: str, t: float) -> None:
        trip = self.watchdog.trip(kind, reason, t)
        if trip is not None:
            self._begin_stop(trip.category, reason, t, trip.kind.value)

    def _begin_stop(self, category: int, reason: str, t_fault: float, kind: str) -> None:
        """The STOP frame first (the latency that matters); the rest happens in the next cycles."""
        self._set_status(sh.STATUS_STOPPING)
        seq = self._send(self.cmds.stop, f"the category-{category} STOP", category)
        t_wire = time.monotonic()
        self.bus.set("stop_sent_t", t_wire)
        self._stop = {"category": category, "seq": seq, "t0": t_wire, "sent": t_wire, "tries": 1,
                      "acked": False, "deadline": t_wire + self.cfg.stop_timeout_s, "link_dead": False}
        self._disarm = {}
        k = FaultKind(kind)
        self.bus.set("trip_kind", float(list(FaultKind).index(k) + 1))
        self.bus.set("trip_category", float(category))
        self.bus.set("trip_t", t_fault)
        self._notifier.status(f"{'stopped' if k in PLANNED_STOPS else 'safety stop'} category {category}: "
                              f"{reason}")
        self.stop_info = {"category": category, "fault_to_stop_frame_ms": (t_wire - t_fault) * 1e3}
        self._event(t_wire, "stop_sent", category=category, kind=kind, reason=reason, t_fault=t_fault)

    def _stopping_cycle(self, t: float, st: Any) -> None:
        s = self._stop
        fresh = st is not None and st.host_time > s["t0"]
        torque_off = fresh and int(st.mode) in (_MODE_TRIPPED, _MODE_DISARMED)
        if self._disarm:
            self._disarming_cycle(t, st)
            return
        r = self.cmds.result(s["seq"])
        if r is OK or (isinstance(r, str) and r not in ("forgotten", "unsent")):
            s["acked"] = True
        if torque_off:
            self.watchdog.stop_complete()
            self.stop_info["stop_to_torque_off_confirmed_ms"] = (t - s["t0"]) * 1e3
            self.stop_info["stop_frames"] = s["tries"]
            self._event(t, "torque_off_confirmed", category=s["category"])
            self._start_disarm(t)
            return
        if t - max(self._fw_fresh_t, s["t0"]) > self.cfg.link_dead_s or (not self.link.connected and \
                t - s["t0"] > self.cfg.link_dead_s):
            log.error("the link is dead during a category-%d stop (no fresh state for %.2f s, %d STOP frames sent); "
                      "the firmware's own watchdog stops the motors: nothing here feeds it", s["category"],
                      t - max(self._fw_fresh_t, s["t0"]), s["tries"])
            s["link_dead"] = True
            self.stop_info["link_dead"] = True
            self.watchdog.stop_complete()
            self._finish_stop(t)
            return
        if s["category"] == 1 and t > s["deadline"]:
            trip = self.watchdog.trip(FaultKind.STOP_ESCALATED, f"torque not confirmed off {self.cfg.stop_timeout_s:g} s "
                                      "after the category-1 STOP", t)
            s.update(category=0, acked=False, deadline=t + self.cfg.stop_timeout_s, sent=0.0)
            self.stop_info["escalated"] = True
            if trip is not None:
                self.bus.set("trip_kind", float(list(FaultKind).index(FaultKind.STOP_ESCALATED) + 1))
                self.bus.set("trip_category", 0.0)
        if not s["acked"] and t - s["sent"] >= self.cfg.stop_retry_s:
            s["seq"] = self._send(self.cmds.stop, f"the category-{s['category']} STOP (retry)", s["category"])
            s["sent"] = t
            s["tries"] += 1

    def _start_disarm(self, t: float) -> None:
        if not self.armed:
            self._finish_stop(t)
            return
        self._disarm = {"seq": self._send(self.cmds.disarm, "DISARM"), "sent": t, "tries": 1}

    def _disarming_cycle(self, t: float, st: Any) -> None:
        d = self._disarm
        r = self.cmds.result(d["seq"])
        if r is OK:
            self._set_armed(False)
            self._finish_stop(t)
            return
        if t - d["sent"] < max(self.cfg.stop_retry_s, 0.05) and r is PENDING:
            return
        if d["tries"] >= self.cfg.disarm_tries:
            log.error("DISARM was not acknowledged after %d tries (last answer: %s); the firmware reported torque off "
                      "and stays latched, but this host cannot confirm it is disarmed", d["tries"], r)
            self.stop_info["disarm_failed"] = True
            self._finish_stop(t)
            return
        d.update(seq=self._send(self.cmds.disarm, "DISARM (retry)"), sent=t, tries=d["tries"] + 1)

    def _finish_stop(self, t: float) -> None:
        self._set_status(sh.STATUS_STOPPED)
        kind = self.watchdog.active.kind.value if self.watchdog.active else "unknown"
        self._event(t, "stopped", category=self._stop.get("category"), kind=kind, armed=self.armed)
        then = "exiting" if self.stop_requested is not None else "latched until an operator arms"
        if kind in {k.value for k in PLANNED_STOPS}:
            log.info("stopped (%s); %s", self.watchdog.active.reason, then)  # type: ignore[union-attr]
        else:
            log.error("stopped after a category-%s stop (%s); %s", self._stop.get("category"), kind, then)

    def _idle_cycle(self, t: float, st: Any) -> None:
        """Disarmed or stopped: command nothing. A keep-alive (never the motion watchdog's food) goes only to a
        firmware that reports itself not armed."""
        if st is None or int(st.mode) not in (_MODE_DISARMED, _MODE_TRIPPED) or t - self._last_keepalive < 0.1:
            return
        self._last_keepalive = t
        if self.link.connected:
            self._send(self.cmds.keepalive, "KEEPALIVE")

    def _shutdown(self, clean: bool) -> None:
        """The `finally`: whatever happened, a category-0 stop if this host may have left the firmware armed."""
        if self.armed:
            cat = 0  # the loop is over: torque off now, whatever stop was under way
            for _ in range(3):  # no waiting for answers: the loop is over; the firmware watchdog is the backstop
                if self._send(self.cmds.stop, f"the category-{cat} STOP on exit", cat) is not None:
                    break
            if self.watchdog.state is State.RUNNING:
                self.watchdog.trip(FaultKind.LOOP_ERROR, "control loop exiting", time.monotonic())
            self.watchdog.flush_logs()
            self._disarm_blocking()
        try:
            self.link.close()
        except Exception as exc:
            log.error("closing the link failed: %s", exc)
        self.watchdog.flush_logs()
        self._set_status(sh.STATUS_EXITED)
        summary = self.summary()
        self.telemetry.record("/control/summary", time.monotonic(), summary)
        self.telemetry.close()

    def _disarm_blocking(self) -> None:
        """Exit path only (the loop has ended): DISARM, waiting briefly for the answer; `armed` stays true if not."""
        deadline = time.monotonic() + 0.3
        seq = self._send(self.cmds.disarm, "DISARM on exit")
        while seq is not None and time.monotonic() < deadline:
            self.link.poll(0.01)
            r = self.cmds.result(seq)
            if r is OK:
                self._set_armed(False)
                return
        log.error("DISARM on exit not confirmed; the firmware's watchdog and latched STOP keep the motors off")

    def _end(self) -> dict[str, Any] | None:
        """Why the loop ended: {"kind": "duration" (the planned --duration), "operator_stop" (a signal, the
        parent's stop) or "worker_dead" (the inference worker failed), "reason": ...}; None before an exit request
        (still running, or ended by an error)."""
        if self.stop_requested is None:
            return None
        return {"kind": self.exit_kind.value, "reason": self.stop_requested}

    def summary(self) -> dict[str, Any]:
        stats = self.link.stats
        link = {k: getattr(stats, k) for k in ("frames_sent", "frames_received", "crc_errors", "framing_errors",
                                               "bad_messages", "drops", "reconnects", "reads_at_budget")}
        link["ignored_frames"] = dict(getattr(stats, "ignored_frames", {}))  # CAN: frames not ours, by kind
        # A planned end is not a trip: it is the summary's `end`, and stays out of `trips`, where every reader (the
        # exit status, drills, campaigns, benchmarks) takes any kind but operator_stop for a fault.
        trips = [tr.as_dict() for tr in self.watchdog.trips if tr.kind is not FaultKind.DURATION]
        return summarize(
            self.stats, self.clock.missed if self.clock else 0, self.safety.counts, trips,
            extra={"end": self._end(), "chunks": {"adopted": self.chunks_adopted, "strategy": self.cfg.strategy,
                              **{k: round(v, 6) if isinstance(v, float) else v
                                 for k, v in self.scheduler.summary().items()}},
                   "link": link, "realtime": self._realtime, "stop": self.stop_info,
                   "telemetry": _telemetry_text(self.telemetry),
                   "final_state": self.watchdog.state.value, "armed_at_exit": self.armed},
        )


def _telemetry_text(telemetry: Telemetry) -> str | None:
    """The summary's telemetry entry: the file, and whether recording stopped mid-run (a full disk)."""
    if telemetry.path is None:
        return None
    if telemetry.failed is None:
        return str(telemetry.path)
    return f"{telemetry.path} (stopped mid-run: {telemetry.failed}; {telemetry.dropped} records not written)"


def control_main(config: ControlConfig, bus: sh.SharedBus, conn: Any = None, log_level: int = logging.INFO,
                 parent_pid: int | None = None) -> None:
    """Entry point of the control process: SIGINT/SIGTERM -> controlled stop; summary sent over `conn`.
    `parent_pid` (the runner's pid, passed in: by the time this runs, getppid() may already be init's): its death
    -> the same controlled stop, then exit."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s[control]: %(message)s")
    from firmware_bridge.schemes import open_link

    try:
        link = open_link(config.link_url, **config.link_kwargs)
        loop = ControlLoop(config, bus, link, parent_pid)
    except Exception as exc:  # e.g. a telemetry file the service user may not write: the parent says why
        log.error("control loop could not start: %s", exc, exc_info=log.isEnabledFor(logging.DEBUG))
        if conn is not None:
            conn.send({"error": f"{type(exc).__name__}: {exc}"})
            conn.close()
        return

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
        _send_summary(conn, result)


def _send_summary(conn: Any, result: dict[str, Any]) -> None:
    """The summary to the parent; a parent that died (the loop stopped because of that) cannot take it."""
    try:
        conn.send(result)
        conn.close()
    except OSError as exc:  # BrokenPipeError: the reading end died with the parent
        where = f"it is in {result['telemetry']}" if result.get("telemetry") else "no telemetry file was set to keep it"
        log.warning("the summary could not reach the parent process (%s); %s", exc, where)
