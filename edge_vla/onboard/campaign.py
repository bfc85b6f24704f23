"""The fault campaign: each fault injected into the real host process over a real pty, timed on the emulator.

The host is the real control process (OnboardRunner: the loop in its own process, the inference worker
in this one) driving the emulator (the C firmware core) over a pty. For every fault three things are
measured, all on time.monotonic() (one clock for every process on the machine), from the emulator's
events:

- fault -> STOP frame at the firmware (`rx_stop`): from the host's detection (its trip time) for faults
  the host detects; bound: one control period + 1 ms.
- STOP -> torque off at the firmware (`torque_off`); for a dead host, from its last heartbeat, minus the
  firmware's heartbeat timeout. Bound: the ramp + one firmware tick (category 1), one tick (category 0).
- moved afterwards without an operator arm (`unauthorized_motion`, or an `armed` the operator did not
  ask for): must be never. The emulator judges an arm by the live session's nonce (protocol 1.2), so a
  captured session start written again by another node counts as unauthorised (`replayed_session`).

Used by tests/onboard/test_fault_campaign.py (bounds with margins at 100 Hz) and
benchmarks/bench_faults.py (repetitions, p99 and max: the README table).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from edge_vla.action_space import sim_action_space
from edge_vla.onboard.cameras import Frame, SimCamera
from edge_vla.onboard.control import ControlConfig
from edge_vla.onboard.drill import DEMO_REALTIME, EMULATOR_LIMITS, inject_garbage, prioritize_emulator
from edge_vla.onboard.following import TrackingLimits
from edge_vla.onboard.rt import RealtimeConfig
from edge_vla.onboard.runner import OnboardRunner, bus_state_fn
from edge_vla.onboard.watchdog import WatchdogConfig
from edge_vla.onboard.worker import ExpertSource, StallableSource
from edge_vla.runtime.types import ActionChunk, Observation
from edge_vla.sim.env import ReachEnv
from firmware_bridge.injection import write_as_another_node

log = logging.getLogger(__name__)

TICK_S = 0.001  # the emulator's firmware tick (1 kHz)


@dataclass
class FaultRow:
    fault: str
    detected_by: str  # "host" | "firmware" | "-"
    category: int | None = None
    kind: str | None = None  # the host's trip kind, where the host tripped
    fault_to_stop_ms: float | None = None  # host detection -> STOP frame written (the wire)
    stop_rx_ms: float | None = None  # host detection -> STOP received by the firmware (pty + emulator scheduling)
    stop_to_off_ms: float | None = None  # STOP (or last heartbeat + timeout) -> torque off
    bound_stop_ms: float | None = None
    bound_off_ms: float | None = None
    moved_without_arm: bool = False
    notes: str = ""

    @property
    def within_bounds(self) -> bool:
        ok = not self.moved_without_arm
        if self.bound_stop_ms is not None and self.fault_to_stop_ms is not None:
            ok &= self.fault_to_stop_ms <= self.bound_stop_ms
        if self.bound_off_ms is not None and self.stop_to_off_ms is not None:
            ok &= self.stop_to_off_ms <= self.bound_off_ms
        return ok

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "within_bounds": self.within_bounds}


class _Poisonable:
    """Chunk source whose actions can be made NaN/Inf (a corrupted chunk reaching the loop), or a sweep of
    joint 0 by 0.8 rad (a deterministic motion for the blocked-joint fault)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.poison, self.sweep = inner, False, False
        self._sweep_target: np.ndarray | None = None

    def infer(self, obs: Observation) -> ActionChunk:
        chunk = self.inner.infer(obs)
        if self.sweep:  # joint 0 to a fixed target 0.8 rad away, whatever is measured (the block shows)
            q = np.asarray(obs.state, np.float64)
            if self._sweep_target is None:
                self._sweep_target = q.copy()
                self._sweep_target[0] += 0.8 if q[0] < 1.5 else -0.8
            chunk.actions[:] = self._sweep_target
        else:
            self._sweep_target = None
        if self.poison:
            chunk.actions[:] = np.nan
            chunk.actions[::2] = np.inf
        return chunk


class _FreezableCamera:
    """Camera whose frames can freeze (a stalled driver repeating its last frame)."""

    def __init__(self, inner: SimCamera) -> None:
        self.inner, self.frozen, self._last = inner, False, None

    def read(self) -> Frame:
        if self.frozen and self._last is not None:
            return self._last
        self._last = self.inner.read()
        return self._last

    def close(self) -> None:
        self.inner.close()


@dataclass
class Campaign:
    rate_hz: float = 100.0
    heartbeat_timeout_ms: int = 300
    ramp_ms: int = 200
    log_level: int = logging.WARNING
    realtime: bool = True  # SCHED_FIFO for the control loop and the emulator where permitted (as the demo does)
    seed: int = 1_000_010
    emu: Any = None
    run: OnboardRunner | None = None
    rows: list[FaultRow] = field(default_factory=list)

    def __post_init__(self) -> None:
        env = ReachEnv()
        env.reset(self.seed)
        self.env = env
        self.stall = StallableSource(ExpertSource(env.scene, delay_s=0.02))
        self.poison = _Poisonable(self.stall)
        self.camera: _FreezableCamera | None = None
        self.period = 1.0 / self.rate_hz
        self._episode = 0

    # -- plumbing --------------------------------------------------------------------------------
    def __enter__(self) -> Campaign:
        from firmware_bridge.emulator_process import EmulatorProcess

        self.emu = EmulatorProcess(joints=2, limits=EMULATOR_LIMITS, heartbeat_timeout_ms=self.heartbeat_timeout_ms,
                                   stop_ramp_ms=self.ramp_ms, unplug_for=0.3).start()
        if self.realtime:  # the emulator stands in for an MCU, whose ticks no host load delays
            prioritize_emulator(self.emu.proc.pid, 40)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close_host()
        if self.emu is not None:
            self.emu.stop()
            self.emu._dir.cleanup()

    def events(self, name: str, since: float) -> list[dict]:
        return [e for e in self.emu.events() if e["event"] == name and e["t"] >= since]

    def _wait(self, pred: Callable[[], Any], timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = pred()
            if got:
                return got
            time.sleep(0.005)
        return None

    def start_host(self, bench: bool = True, telemetry: str | None = None) -> OnboardRunner:
        self.close_host()
        scene = self.env.scene

        def camera(bus: Any) -> _FreezableCamera:
            self.camera = _FreezableCamera(SimCamera(scene, bus_state_fn(bus), 64))
            return self.camera

        cfg = ControlConfig(link_url=f"serial://{self.emu.port}", action_space=sim_action_space(),
                            rate_hz=self.rate_hz, arm_on_start=bench, first_chunk_timeout_s=5.0,
                            watchdog=WatchdogConfig(link_max_age_s=0.3),  # CPU starvation here is not a fault
                            tracking=TrackingLimits.from_robot(sim_action_space().names, 0.3), telemetry_path=telemetry,
                            realtime=DEMO_REALTIME if self.realtime else RealtimeConfig())
        self.run = OnboardRunner(cfg, self.poison, camera, scene.instruction, image_size=64,
                                 log_level=self.log_level).start()
        return self.run

    def close_host(self) -> None:
        if self.run is not None:
            self.run.close()
            self.run = None

    def rearm(self) -> float:
        """The operator's arm between faults; returns its time. The robot then moves under the expert."""
        assert self.run is not None
        self.stall.stall(0.0)
        self.poison.poison = self.poison.sweep = False
        if self.camera is not None:
            self.camera.frozen = False
        self._episode += 1
        self.env.reset(self.seed + self._episode)  # a fresh target: the expert moves again
        t = time.monotonic()
        self._wait(lambda: self.run.status() in ("running", "homing", "disarmed", "stopped"), 10)
        if self.run.status() in ("disarmed", "stopped"):
            reply = self.run.operator.arm()
            if not reply["ok"]:
                raise RuntimeError(f"operator arm failed: {reply}")
        self._wait(lambda: self.run.bus.get("ready") > 0 and self.run.status() == "running", 10)
        time.sleep(0.4)  # moving under the policy
        return t

    def _verdict(self, name: str, t_fault: float, detected_by: str, notes: str = "",
                 host_death: bool = False) -> FaultRow:
        """Read the emulator's events after `t_fault`: the STOP, torque off, and any motion without an arm.

        STOP -> torque off is taken on the firmware's own clock (its `stop_received`/`stop_cat*` and
        `torque_off` events carry firmware_time_us), so emulator scheduling does not blur the ramp."""
        off = self._wait(lambda: self.events("torque_off", t_fault), 5.0)
        stop = next(iter(self.events("stop_received", t_fault)), None)  # a host STOP reached the firmware
        row = FaultRow(name, detected_by, notes=notes)
        alive = self.run is not None and self.run.proc.is_alive()
        trip = self.run.operator.status()["trip"] if alive else None  # type: ignore[union-attr]
        if trip is not None and trip["t"] >= t_fault - 1e-3:
            row.category, row.kind = trip["category"], trip["kind"]
        if detected_by == "host" and trip is not None:
            row.fault_to_stop_ms = (trip["stop_sent_t"] - trip["t"]) * 1e3
            row.bound_stop_ms = (self.period + 0.001) * 1e3
            if stop is not None:
                row.stop_rx_ms = (stop["t"] - trip["t"]) * 1e3
        if not off:
            row.notes = (row.notes + "; " if row.notes else "") + "no torque off observed"
            return row
        off_ev = off[0]
        if host_death and "since_last_heartbeat_s" in off_ev:
            # The firmware's watchdog: last heartbeat + timeout -> its link-loss stop (category 1: the ramp).
            row.category = 1 if row.category is None else row.category
            row.stop_to_off_ms = (off_ev["since_last_heartbeat_s"] - self.heartbeat_timeout_ms / 1e3) * 1e3
            row.bound_off_ms = (self.ramp_ms / 1e3 + TICK_S) * 1e3
            return row
        if detected_by == "firmware":  # the firmware's own trip -> torque off, on its clock
            trip_ev = next(iter(self.events("stop_cat0", t_fault) + self.events("stop_cat1", t_fault)), None)
            start = trip_ev if trip_ev is not None else stop
            row.category = (0 if trip_ev["event"] == "stop_cat0" else 1) if trip_ev is not None else row.category
            row.fault_to_stop_ms = None
            row.notes = (row.notes + "; " if row.notes else "") + \
                f"fault -> torque off {(off_ev['t'] - t_fault) * 1e3:.1f} ms"
        else:
            start = stop
        if start is not None:
            row.stop_to_off_ms = (off_ev["firmware_time_us"] - start["firmware_time_us"]) / 1e3
            cat = row.category if row.category is not None else start.get("category")
            row.bound_off_ms = ((self.ramp_ms / 1e3 if cat == 1 else 0.0) + TICK_S) * 1e3
        return row

    def _moved(self, since: float, until: float | None = None) -> bool:
        until = time.monotonic() if until is None else until
        bad = [e for e in self.emu.events() if e["t"] >= since and e["t"] <= until
               and e["event"] == "unauthorized_motion"]
        return bool(bad)

    def _record(self, row: FaultRow, t_fault: float, watch_s: float = 0.5) -> FaultRow:
        time.sleep(watch_s)  # does anything move again without an operator arm?
        row.moved_without_arm = self._moved(t_fault) or bool(
            self.events("armed", t_fault + 1e-3) and self.run is not None
            and self.run.operator.status()["phase"] not in ("running", "homing"))
        self.rows.append(row)
        log.info("fault %s: %s", row.fault, row.as_dict())
        return row

    # -- the faults ------------------------------------------------------------------------------
    def stalled_inference(self) -> FaultRow:
        self.rearm()
        t = time.monotonic()
        self.stall.stall(5.0)
        return self._record(self._verdict("stalled inference", t, "host"), t)

    def stale_camera(self) -> FaultRow:
        self.rearm()
        t = time.monotonic()
        assert self.camera is not None
        self.camera.frozen = True
        return self._record(self._verdict("stale camera", t, "host"), t)

    def nonfinite_action(self) -> FaultRow:
        self.rearm()
        t = time.monotonic()
        self.poison.poison = True
        return self._record(self._verdict("NaN/Inf action", t, "host"), t)

    def lost_stop(self) -> FaultRow:
        self.rearm()
        self.emu.drop_next("STOP", 1)
        t = time.monotonic()
        self.run.operator.stop()  # type: ignore[union-attr]
        row = self._verdict("lost STOP frame (operator stop)", t, "host", notes="first STOP dropped; resent after "
                            "stop_retry_s (20 ms)")
        if row.bound_stop_ms is not None:
            row.bound_stop_ms += 20.0  # the retry interval: the first frame never arrives
        return self._record(row, t)

    def lost_disarm(self) -> FaultRow:
        self.rearm()
        self.emu.drop_next("DISARM", 1)
        t = time.monotonic()
        self.run.operator.stop()  # type: ignore[union-attr]
        row = self._verdict("lost DISARM", t, "host")
        self._wait(lambda: self.run.operator.status()["phase"] == "stopped", 3.0)  # type: ignore[union-attr]
        row.notes = "DISARM retried, confirmed" if not self.run.operator.status()["armed"] else \
            "DISARM not confirmed (reported)"  # type: ignore[union-attr]
        return self._record(row, t)

    def garbage_bytes(self) -> FaultRow:
        self.rearm()
        t = inject_garbage(self.emu.port, frames=8)
        return self._record(self._verdict("garbage bytes on the line", t, "firmware"), t)

    def alternating_corruption(self) -> FaultRow:
        self.rearm()
        t = time.monotonic()
        self.emu.corrupt_alternate(6)
        return self._record(self._verdict("alternating corrupt/good frames", t, "firmware"), t)

    def replayed_frames(self) -> FaultRow:
        """After a category-0 stop, an old ARM and an old SETPOINT are replayed: neither may move the robot."""
        self.rearm()
        t = inject_garbage(self.emu.port, frames=8)  # a category-0 trip first
        self._wait(lambda: self.events("torque_off", t), 3.0)
        t_replay = time.monotonic()
        self.emu.replay("ARM", "oldest")
        self.emu.replay("SETPOINT", "oldest")
        row = FaultRow("replayed old ARM + SETPOINT after a stop", "firmware",
                       notes=f"stale frames dropped: {len(self.events('stale_frame', t_replay))}")
        return self._record(row, t_replay, watch_s=0.6)

    def blocked_joint(self) -> FaultRow:
        self.rearm()
        t = time.monotonic()
        self.emu.block_joint(0, True)
        self.poison.sweep = True  # the policy now drives joint 0 0.8 rad away: the block shows as tracking error
        row = self._verdict("following error (blocked joint)", t, "host")
        self.emu.block_joint(0, False)
        return self._record(row, t)

    def time_steps_back(self) -> FaultRow:
        """The firmware's time source jumps back 1 s; its watchdogs and ramp must still work: then a stop."""
        self.rearm()
        self.emu.step_time_back(1.0)
        time.sleep(0.2)
        t = time.monotonic()
        self.run.operator.stop()  # type: ignore[union-attr]
        row = self._verdict("firmware time steps back 1 s, then a stop", t, "host",
                            notes="no spurious trip from the step; ramp timed on the firmware's monotonic clock")
        return self._record(row, t)

    def link_unplug(self) -> FaultRow:
        self.rearm()
        t = time.monotonic()
        self.emu.unplug()
        row = self._verdict("link unplug (0.3 s)", t, "firmware", host_death=True,
                            notes="firmware heartbeat timeout; host link-stale trip")
        return self._record(row, t, watch_s=1.0)

    def host_sigterm(self) -> FaultRow:
        self.rearm()
        t = time.monotonic()
        os.kill(self.run.control_pid, signal.SIGTERM)  # type: ignore[arg-type,union-attr]
        row = self._verdict("host SIGTERM", t, "host", notes="planned category-1 stop")
        stop = next(iter(self.events("rx_stop", t)), None)
        row.category = 1 if stop is None else stop.get("category")
        if stop is not None:
            row.fault_to_stop_ms, row.bound_stop_ms = (stop["t"] - t) * 1e3, (self.period + 0.001) * 1e3 + 1e3 * self.period
        self.run.proc.join(5)  # type: ignore[union-attr]
        return self._record(row, t)

    def host_kill(self) -> FaultRow:
        self.rearm()
        t = time.monotonic()
        os.kill(self.run.control_pid, signal.SIGKILL)  # type: ignore[arg-type,union-attr]
        row = self._verdict("host kill -9", t, "firmware", host_death=True, notes="firmware heartbeat watchdog")
        self.run.proc.join(5)  # type: ignore[union-attr]
        return self._record(row, t)

    def restart_after_crash(self, watch_s: float = 1.5) -> FaultRow:
        """After kill -9 (the previous row), a new host starts as systemd would: it must stay disarmed."""
        t = time.monotonic()
        self.start_host(bench=False)
        self._wait(lambda: self.run.status() == "disarmed", 20)  # type: ignore[union-attr]
        time.sleep(watch_s)
        st = self.run.operator.status()  # type: ignore[union-attr]
        row = FaultRow("host restart after a crash", "-",
                       notes=f"phase {st['phase']}, firmware {(st.get('firmware') or {}).get('mode')}")
        row.moved_without_arm = bool(self.events("armed", t)) or self._moved(t)
        self.rows.append(row)
        return row

    def replayed_session(self) -> FaultRow:
        """Another node on the line captured one session's HELLO, CLEAR_FAULTS and ARM and, after a category-0
        stop, writes them again byte for byte while the robot service is up and disarmed. The replayed HELLO
        starts a new session, so the old session's CLEAR_FAULTS and ARM are refused (BAD_SESSION) and nothing
        arms. Control: the operator's arm through the real host process (which sees its session ended and
        says HELLO again) carries the live session's nonce and is applied."""
        from firmware_bridge import framing
        from firmware_bridge.protocol import MsgType
        from firmware_bridge.schemes import open_link

        self.close_host()
        t = time.monotonic()
        wire: list[bytes] = []
        with open_link(f"serial://{self.emu.port}") as link:  # session 1, tapped as another node would
            write = link.transport.write

            def tap(frame: bytes, urgent: bool = False) -> None:
                wire.append(bytes(frame))
                write(frame, urgent)

            link.transport.write = tap  # type: ignore[method-assign]
            link.hello()
            link.clear_faults()
            link.arm()
            link.stop(0)
        self._wait(lambda: self.events("torque_off", t), 3.0)
        wanted = (MsgType.HELLO, MsgType.CLEAR_FAULTS, MsgType.ARM)
        capture = [next(f for f in wire if framing.decode_raw(f.rstrip(b"\x00")).type == k) for k in wanted]
        self.start_host(bench=False)  # the robot service: its own session, disarmed, the stop still latched
        self._wait(lambda: self.run.status() in ("disarmed", "stopped"), 20)  # type: ignore[union-attr]

        t_replay = write_as_another_node(self.emu.port, capture)
        self._wait(lambda: len(self.events("bad_session", t_replay)) + len(self.events("armed", t_replay)) >= 2, 3.0)
        t_operator = time.monotonic()
        try:
            self.rearm()  # the operator's arm: the host's new HELLO, then CLEAR_FAULTS and ARM of its session
            live = "applied"
        except RuntimeError as exc:
            live = f"refused ({exc})"
        # The firmware takes frames in order: whatever the replay did happened before the host's new HELLO.
        t_host_hello = min((e["t"] for e in self.events("hello", t_operator)), default=time.monotonic())
        refused = len([e for e in self.events("bad_session", t_replay) if e["t"] < t_host_hello])
        armed_by_replay = any(e["t"] < t_host_hello for e in self.events("armed", t_replay))
        live_armed = any(e["t"] >= t_host_hello for e in self.events("armed", t_operator))
        row = FaultRow("replayed session (HELLO, CLEAR_FAULTS, ARM) after a stop", "firmware",
                       notes=f"operator arm in the live session {live}, armed: {live_armed}; "
                             f"replayed frames refused (BAD_SESSION): {refused}")
        row.moved_without_arm = armed_by_replay or self._moved(t_replay)
        self.rows.append(row)
        log.info("fault %s: %s", row.fault, row.as_dict())
        return row

    def kp_kd_out_of_range(self) -> FaultRow:
        """A setpoint with gains far over kp_max/kd_max, on a link of its own: the firmware clamps them."""
        from firmware_bridge.protocol import Status
        from firmware_bridge.schemes import open_link

        self.close_host()
        t = time.monotonic()
        with open_link(f"serial://{self.emu.port}") as link:
            link.hello()
            link.clear_faults()
            link.arm()
            q = np.asarray(link.latest_state.positions if link.latest_state else np.zeros(2))
            link.send_setpoints(q, kp=np.full(2, 1e6), kd=np.full(2, 1e5))
            time.sleep(0.05)
            link.poll(0.05)
            st = link.latest_state
            clamped = st is not None and bool(int(st.fault_bits) & 0x0200)
            link.stop(1)
            link.poll(0.3)
            try:
                link.disarm()
            except Exception as exc:
                log.warning("disarm after the gain test: %s", exc)
        _ = Status
        row = FaultRow("kp/kd out of range", "firmware", notes=f"gains clamped to kp_max/kd_max: {clamped}")
        row.moved_without_arm = self._moved(t)
        self.rows.append(row)
        return row

    def run_all(self) -> list[FaultRow]:
        self.start_host(bench=True)
        for scenario in (self.stalled_inference, self.stale_camera, self.nonfinite_action, self.lost_stop,
                         self.lost_disarm, self.garbage_bytes, self.alternating_corruption, self.replayed_frames,
                         self.blocked_joint, self.time_steps_back, self.link_unplug, self.host_sigterm):
            if self.run is None or not self.run.proc.is_alive():
                self.start_host(bench=True)
            scenario()
        self.start_host(bench=True)
        self.host_kill()
        self.restart_after_crash()
        self.replayed_session()
        self.kp_kd_out_of_range()
        return self.rows


def format_table(rows_by_fault: dict[str, list[FaultRow]]) -> str:
    """Markdown: p99 and max over repetitions of each time, the bound, and the motion verdict."""

    def stat(vals: list[float | None]) -> str:
        v = [x for x in vals if x is not None]
        if not v:
            return "-"
        return f"{np.percentile(v, 99):.1f} / {max(v):.1f}"

    lines = ["| fault | detected by | cat | detection->STOP written ms p99/max (bound) | detection->STOP at firmware ms "
             "| STOP->torque off ms p99/max (bound) | moved without arm |", "|---|---|---|---|---|---|---|"]
    for name, rows in rows_by_fault.items():
        r0 = rows[0]
        cats = sorted({r.category for r in rows if r.category is not None})
        b1 = f" ({r0.bound_stop_ms:.0f})" if r0.bound_stop_ms is not None else ""
        b2 = f" ({r0.bound_off_ms:.0f})" if r0.bound_off_ms is not None else ""
        moved = sum(r.moved_without_arm for r in rows)
        lines.append(f"| {name} | {r0.detected_by} | {','.join(map(str, cats)) or '-'} | "
                     f"{stat([r.fault_to_stop_ms for r in rows])}{b1} | {stat([r.stop_rx_ms for r in rows])} | "
                     f"{stat([r.stop_to_off_ms for r in rows])}{b2} | "
                     f"{'NEVER' if moved == 0 else f'{moved}/{len(rows)}'} |")
    return "\n".join(lines)
