"""The fault campaign per motor backend (issue 24): the real `edge-vla run` against the servo emulators.

Every fault is injected into a real `edge-vla run --expert --link dynamixel://PTY|feetech://PTY` process,
started as the robot's service user, driving that backend's emulator (its own process, on a real pty paced
like a 1 Mbaud UART, two servos). The emulator is the ground truth: its events (each Torque Enable write a
servo accepted, Bus Watchdog expiry, hardware errors, reboots) carry time.monotonic(), the clock of every
process on the machine, and its registers say what each servo does afterwards. The host's side (its trip:
kind, category, time) comes from the operator control socket, or from the run's JSON summary once it ended.

The faults (`MotorCampaign`): host `kill -9` mid-motion (the run's whole process group), host SIGTERM (its
process group, as a control-group stop signals every process of the service), cable unplug (the host's tty
hung up with TIOCVHANGUP, which is what the kernel's USB-serial driver does when the adapter is pulled out;
the servos keep power), stalled inference (the run's inference process frozen: see `stalled_inference`), a
blocked joint, a servo hardware error (overheating), one servo power-cycling mid-run, and a host restarted
after the kill (it must stay disarmed).

Columns (`MotorFaultRow`, a `campaign.FaultRow`):
- detection -> stop at the device (`fault_to_stop_ms`): from the host's trip (faults the host detects), or
  from the fault itself (faults a servo reports in its status byte, which the backend acts on in the state
  read that sees it), to the first Torque Enable 0 from the host that a servo accepted. On Dynamixel, when
  the host is dead, the device detects: the Bus Watchdog expiry's lateness (time since the last packet
  minus the watchdog period), bound one emulator tick.
- stop -> torque off (or hold) in every servo (`stop_to_off_ms`): from that first stop to the last servo's
  torque off (a host write, its own shutdown or reboot) or Bus Watchdog hold.
- moved without an operator arm: torque came back on, or a stopped servo moved more than MOVED_TICKS, in the
  watch window after the stop, with no operator arm. Feetech servos have no watchdog: after `kill -9` or an
  unplug they keep driving to the dead host's last goal under torque; those rows say so (`residual_risk`),
  with the travel measured, and are never counted as a pass.
- the host's outcome (`host`, `host_ok`): a SIGTERM must end in a summary (exit 0, or 3 for earlier trips), an
  unplugged host must stay up and report the lost bus as a category-0 link trip; a row fails otherwise.

The control loop runs without SCHED_FIFO: both vendor SDKs busy-poll the port while they wait for a reply, and a
real-time busy-poller starves the kernel worker that moves a tty's bytes (over the pty every open timed out).
So the Bus Watchdog is sized for `period_ms` (default 50: 100 ms) rather than the 10 ms floor, whose 20 ms
watchdog a loaded 2-core box lets expire by itself.

Every row starts from a control case that shows the probe can tell applied from ignored: the servos armed by
the operator, torque on in each, one of them turning at MOVING_TICKS_S or faster, no trip. A row whose control
case fails (the run tripped by itself on a loaded box) is re-armed and tried again, and the retry is counted.

The CAN backends (issue 25) are in `edge_vla.onboard.can_campaign` (`CanCampaign`), sharing the host plumbing
(`_HostedCampaign`, `HostRun`, `ServiceUser`) and the row format here.

Used by tests/onboard/test_motor_campaign.py (per backend: kill -9, unplug or bus down, and a device error, with
margins) and benchmarks/bench_faults.py --backend dynamixel,feetech,damiao,cia402 (every row, repetitions, p99
and max).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_vla.onboard.campaign import TICK_S, FaultRow
from edge_vla.onboard.operator import OperatorError, SocketOperator
from firmware_bridge.motors.dynamixel import WATCHDOG_UNIT_S, watchdog_units
from firmware_bridge.motors.feetech import TORQUE_CHECK_EVERY

log = logging.getLogger(__name__)

SCHEMES = ("dynamixel", "feetech")  # servo buses on a pty (MotorCampaign)
CAN_SCHEMES = ("damiao", "cia402")  # CAN backends on python-can's udp_multicast bus (CanCampaign)
ALL_SCHEMES = SCHEMES + CAN_SCHEMES
IDS = (1, 2)  # one servo per joint of the sim arm (shoulder, elbow)
MOVING_TICKS_S = 40.0  # a servo turning at least this fast is in motion (~0.06 rad/s)
FAST_TICKS_S = 200.0  # the blocked-joint row waits for this much speed: the block then shows as effort
MOVED_TICKS = 5  # a stopped servo moving more than this in the watch window has moved
TX_MS = 5.0  # one answered transaction (a Torque Enable write and its status) with emulator scheduling
HOLD_WATCH_S = 1.0  # how long a servo left under torque (no watchdog) is watched holding the dead host's goal
TIOCVHANGUP = 0x5437  # linux/tty: hang up a tty, as usb-serial's disconnect does (needs CAP_SYS_ADMIN)
OVERHEATING_BIT = 2  # Dynamixel Hardware Error Status bit 2, Feetech Status bit 2: both "overheat"
STOP_TIMEOUT_S = 0.3  # the backends' default category-1 ramp bound (ServoBusDevice stop_timeout_s)


@dataclass(frozen=True)
class ServiceUser:
    """How the robot-side process starts: a command prefix that drops to the service user (setpriv ...), the
    interpreter and environment it runs with, the group the servo port is given to (a udev rule's dialout on a
    robot), and a factory for a run directory it may create its control socket in. The default runs as this
    user."""

    prefix: tuple[str, ...] = ()
    python: str = sys.executable
    env: Mapping[str, str] | None = None
    port_gid: int | None = None
    run_dir: Callable[[str], Path] | None = None


DEVICE_FAULT_BIT = 0x4000  # firmware_bridge.motors.link_adapter.DEVICE_FAULT: a device's own latched fault


@dataclass
class MotorFaultRow(FaultRow):
    backend: str = ""
    fault_to_detect_ms: float | None = None  # the fault -> the host's trip
    after: str = ""  # what the servos do once it is over (the emulator's registers)
    residual_risk: bool = False  # nothing on the device stops it: the documented residual risk
    control: str = ""  # the control case before the fault
    host: str = ""  # the host's outcome: trip, exit status, errors
    expect_stop: bool = True  # False for a row that must show no stop and no motion (a restart)
    host_ok: bool | None = None  # the host did what it must (exit with a summary, or report the trip); None: n/a
    control_ok: bool | None = None  # a row's second control case (the probe taking the right id) held; None: n/a

    @property
    def stopped(self) -> bool:
        """Every servo ended torque off or holding, and the times were measured."""
        return self.fault_to_stop_ms is not None and self.stop_to_off_ms is not None

    @property
    def verdict(self) -> str:
        if self.moved_without_arm:
            return "FAIL: moved without an operator arm"
        if self.control_ok is False:
            return "FAIL: control case (the probe cannot tell applied from ignored)"
        if self.residual_risk:
            return "residual risk (documented)"
        if self.expect_stop and not self.stopped:
            return "FAIL: no stop"
        if self.host_ok is False:
            return "FAIL: host (see its outcome)"
        return "pass" if self.within_bounds else "over its bound"

    def as_dict(self) -> dict[str, Any]:
        return {**super().as_dict(), "verdict": self.verdict}


class HostRun:
    """One `edge-vla run --expert` process as the service user, in its own session (so the whole robot-side
    process group can be signalled), with its operator socket and its log in files (a pipe could fill)."""

    def __init__(self, user: ServiceUser, url: str, rate_hz: float, run_dir: Path, bundle: str | None = None) -> None:
        self.user, self.url, self.rate_hz, self.bundle = user, url, rate_hz, bundle
        self.sock = run_dir / "control.sock"
        self._files = contextlib.ExitStack()  # stdout (the JSON summary) and stderr (the log), closed by close()
        self._out = self._files.enter_context(tempfile.TemporaryFile("w+"))  # noqa: SIM115 (closed by close())
        self._err = self._files.enter_context(tempfile.TemporaryFile("w+"))  # noqa: SIM115 (closed by close())
        self.proc: subprocess.Popen[str] | None = None
        self.returncode: int | None = None

    def start(self, timeout: float = 90.0) -> HostRun:
        policy = [self.bundle] if self.bundle else ["--expert"]
        cmd = [*self.user.prefix, self.user.python, "-m", "edge_vla.cli", "run", *policy, "--link", self.url,
               "--control-socket", str(self.sock), "--rate-hz", f"{self.rate_hz:g}", "--duration", "900", "--json"]
        env = dict(self.user.env) if self.user.env is not None else None
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=self._err, text=True, env=env, cwd="/",
                                     start_new_session=True)
        wait_until(lambda: self._up(), timeout, "edge-vla run to come up disarmed")
        return self

    def _up(self) -> bool:
        if self.exited():
            raise RuntimeError(f"edge-vla run exited {self.returncode} before it came up:\n{self.stderr()[-3000:]}")
        return self.sock.exists() and self.op("status").get("phase") == "disarmed"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def exited(self) -> bool:
        if self.proc is not None and self.returncode is None and self.proc.poll() is not None:
            self.returncode = self.proc.returncode
        return self.returncode is not None

    def op(self, cmd: str, timeout: float = 10.0) -> dict[str, Any]:
        """One operator command over the control socket (what `edge-vla arm|stop|status` send)."""
        try:
            return SocketOperator(self.sock, timeout=timeout).call(cmd)
        except OperatorError as exc:
            return {"ok": False, "error": str(exc)}

    def status(self) -> dict[str, Any]:
        return self.op("status")

    def signal_group(self, sig: int) -> None:
        os.killpg(self.pid, sig)

    def wait_exit(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.exited() and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.exited()

    def finish(self, timeout: float = 20.0) -> None:
        """SIGTERM if still running, SIGKILL to the group if it does not exit."""
        if self.proc is None:
            return
        if not self.exited():
            self.proc.send_signal(signal.SIGTERM)
            if not self.wait_exit(timeout):
                self.signal_group(signal.SIGKILL)
                self.proc.wait()
                self.exited()

    def summary(self) -> dict[str, Any] | None:
        """The run's JSON summary on stdout (None when it was killed before printing one)."""
        self._out.seek(0)
        text = self._out.read()
        try:
            return json.loads(text[text.index("{"):]) if "{" in text else None
        except ValueError:
            return None

    def stderr(self) -> str:
        self._err.seek(0)
        return self._err.read()

    def close(self) -> None:
        self.finish()
        self._files.close()


def wait_until(pred: Callable[[], Any], timeout: float, what: str, step: float = 0.005) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(step)


def hang_up(port: str) -> float:
    """The USB-serial adapter pulled out: every open file of the host's tty is hung up (reads return EOF,
    writes EIO), as usb-serial's disconnect does with tty_vhangup; the servos behind it keep power. Returns
    the time of the hangup."""
    fd = os.open(os.path.realpath(port), os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        t = time.monotonic()
        fcntl.ioctl(fd, TIOCVHANGUP)
    except PermissionError as exc:
        raise PermissionError(f"hanging up {port} needs CAP_SYS_ADMIN (run the campaign as root): {exc}") from exc
    finally:
        os.close(fd)
    return t


def prioritize_threads(pid: int, priority: int = 40) -> bool:
    """SCHED_FIFO for every thread of the emulator (it stands for the servos' own MCUs, which host load does not
    delay); sched_setscheduler(pid) alone would miss its bus thread. False where not permitted."""
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            os.sched_setscheduler(int(tid), os.SCHED_FIFO, os.sched_param(priority))
        return True
    except (PermissionError, OSError) as exc:
        log.warning("could not give the servo emulator SCHED_FIFO (%s); its timing shares the host's load", exc)
        return False


@dataclass
class _Control:
    """The state just before a fault: who moves, how fast, that torque is on and nothing tripped."""

    t: float
    moving_id: int
    speed: float
    snaps: dict[int, dict]  # every device just before the fault
    start: dict[int, dict]  # every device just after the operator's arm
    devices: str = "servos"  # what the devices are called in the row
    unit: str = "ticks/s"  # the speed's unit (servo ticks; rad/s on the CAN backends)

    def describe(self) -> str:
        speed = f"{abs(self.speed):.0f}" if self.unit == "ticks/s" else f"{abs(self.speed):.2f}"
        return (f"armed by the operator, torque on in {len(self.snaps)} {self.devices}, id {self.moving_id} turning "
                f"at {speed} {self.unit}, no trip")


@dataclass
class _HostedCampaign:
    """What every backend's campaign shares: the emulator's lifetime, the `edge-vla run` host (started, stopped,
    asked for its trip), the operator's arm until the control case holds, and the host's outcome."""

    scheme: str
    user: ServiceUser = field(default_factory=ServiceUser)
    rate_hz: float = 50.0
    period_ms: int = 50  # the device watchdog is sized for this period: 2 x 50 ms = 100 ms (see SAFETY.md)
    realtime: bool = True  # SCHED_FIFO for the emulator (the devices' MCUs) where permitted
    watch_s: float = 0.5
    bundle: str | None = None  # a bundle directory: the run drives with that policy instead of the sim's expert
    rows: list[MotorFaultRow] = field(default_factory=list)
    spurious_trips: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.period = 1.0 / self.rate_hz
        self.emu: Any = None
        self.run: HostRun | None = None
        self._dirs: list[Path] = []

    @property
    def url(self) -> str:
        raise NotImplementedError

    def snaps(self) -> dict[int, dict]:
        raise NotImplementedError

    def __exit__(self, *exc: object) -> None:
        self.close_host()
        if self.emu is not None:
            self.emu.close()
        for d in self._dirs:
            shutil.rmtree(d, ignore_errors=True)

    def start_host(self) -> HostRun:
        self.close_host()
        if self.user.run_dir is not None:
            run_dir = self.user.run_dir(f"edge-vla-{self.scheme}-campaign-")
            self._dirs.append(run_dir.parent)
        else:
            run_dir = Path(tempfile.mkdtemp(prefix=f"edge-vla-{self.scheme}-campaign-"))
            self._dirs.append(run_dir)
        self.run = HostRun(self.user, self.url, self.rate_hz, run_dir, self.bundle).start()
        return self.run

    def close_host(self) -> None:
        if self.run is not None:
            self.run.close()
            self.run = None

    def events(self, kind: str, since: float) -> list[Any]:
        return [e for e in self.emu.events_of(kind) if e.t >= since]

    def _host_alive(self) -> bool:
        return self.run is not None and not self.run.exited()

    def _trip_since(self, t: float) -> dict | None:
        trip = self.run.status().get("trip") if self._host_alive() else None  # type: ignore[union-attr]
        return trip if trip is not None and trip["t"] >= t - 1e-3 else None

    def _arm_until(self, moving: Callable[[float, dict[int, dict]], _Control | None], what: str,
                   tries: int = 3) -> _Control:
        """The operator's arm, then wait until `moving(t_arm, start)` returns the control case. A run that trips by
        itself first (a loaded box) is re-armed, at most `tries` times, and the trip is counted."""
        assert self.run is not None
        for attempt in range(tries):
            wait_until(lambda: self.run.status().get("phase") in ("stopped", "disarmed"), 10.0,  # type: ignore[union-attr]
                       "the run to be stopped or disarmed (an arm is refused while it is still stopping)")
            reply = self.run.op("arm")
            if not reply.get("ok"):
                raise RuntimeError(f"operator arm refused: {reply}\n{self.run.stderr()[-2000:]}")
            t_arm, start = time.monotonic(), self.snaps()
            try:
                return wait_until(lambda t_arm=t_arm, start=start: moving(t_arm, start), 20.0, what)
            except _SpontaneousTrip as trip:
                self.spurious_trips.append({"backend": self.scheme, **trip.trip})
                log.warning("%s: the run tripped before the fault (%s); re-arming (%d)", self.scheme, trip.trip,
                            attempt + 1)
        raise RuntimeError(f"{self.scheme}: the control case failed {tries} times: {self.spurious_trips[-tries:]}")

    def _raise_if_tripped_since(self, t_arm: float) -> dict[str, Any]:
        """The run's status; raises _SpontaneousTrip if it tripped since the operator's arm."""
        status = self.run.status()  # type: ignore[union-attr]
        trip = status.get("trip")
        if trip is not None and trip["t"] >= t_arm:
            raise _SpontaneousTrip(trip)
        return status

    def stalled_inference(self) -> MotorFaultRow:
        """The run's inference process (policy, camera, operator socket) frozen with SIGSTOP: from the control
        loop's side, what a hung inference looks like. campaign.py stalls the policy call inside the process that
        hosts the runner (StallableSource); `edge-vla run` offers no such hook from outside, so the stall is
        applied to its inference process as a whole (the loop runs in its own process and keeps cycling). The same for every backend: what differs is how the
        devices are seen to stop (`_wait_stopped`)."""
        ctl = self.arm_and_move()
        assert self.run is not None
        t = time.monotonic()
        os.kill(self.run.pid, signal.SIGSTOP)
        try:
            self._wait_stopped(t, timeout=10.0)
        finally:
            os.kill(self.run.pid, signal.SIGCONT)
        trip = wait_until(lambda: self._trip_since(t), 5.0, "the host's trip")
        row = self._timed_row("stalled inference (inference process frozen)", t, ctl, trip)
        return self._watch(row, t)

    def _wait_stopped(self, since: float, timeout: float = 5.0) -> dict[int, tuple[float, str]]:
        """Per device, (time, by whom) it was stopped after `since` (torque off, or held by its own watchdog)."""
        raise NotImplementedError

    def _host_outcome(self, since: float, expect_exit: bool = True, settle_s: float = 5.0) -> str:
        """The run's exit status, its control-loop error and the trips it recorded after `since`; for a run that
        stays up (it keeps serving its operator socket after a lost bus), its phase and trip."""
        run = self.run
        if run is None:
            return ""
        if expect_exit:
            run.wait_exit(10.0)
        else:
            with contextlib.suppress(TimeoutError):  # reported below as it is
                wait_until(lambda: run.exited() or (self._trip_since(since) and run.status().get("phase") == "stopped"),
                           settle_s, "the host to trip and finish its stop, or exit")
        if not run.exited():
            status = run.status()
            trip = status.get("trip") or {}
            return (f"still running: phase {status.get('phase')}, armed {status.get('armed')}"
                    + (f", trip {trip['kind']} (cat {trip['category']})" if trip.get("t", 0) >= since - 1e-3 else
                       ", no trip"))
        summary = run.summary() or {}
        trips = [t for t in summary.get("trips", []) if t["t"] >= since - 1e-3]
        what = f"exit {run.returncode}"
        if summary.get("error"):
            what += f", control loop error: {summary['error']}"
        if trips:
            what += ", trips: " + ", ".join(f"{t['kind']} (cat {t['category']})" for t in trips)
        if run.returncode == 3 and not [t for t in trips if t["kind"] != "operator_stop"]:
            what += "; status 3 from this run's earlier rows' trips"
        if run.returncode not in (0, 3, -signal.SIGKILL):  # why it failed: its last error line
            errors = [line for line in run.stderr().splitlines() if " ERROR " in line or line.startswith("edge-vla")]
            what += f"; last error: {errors[-1][-300:]}" if errors else ""
        return what


@dataclass
class MotorCampaign(_HostedCampaign):
    """The rows for one servo backend against one emulator (two servos): `run_all()` (the benchmark) or
    `run_ci()`."""

    latency_ms: int = 16  # the SDKs' reply timeout: 2 x this + 2 ms

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"MotorCampaign drives the servo buses ({', '.join(SCHEMES)}), not {self.scheme!r}; "
                             f"use motor_campaign(), which picks CanCampaign for {', '.join(CAN_SCHEMES)}")
        super().__post_init__()
        self.watchdog_ms = watchdog_units(self.period_ms / 1e3) * WATCHDOG_UNIT_S * 1e3
        self.reply_timeout_ms = 2 * self.latency_ms + 2

    # -- plumbing --------------------------------------------------------------------------------------
    def __enter__(self) -> MotorCampaign:
        from edge_vla.onboard.cli import _motor_emulator
        from edge_vla.onboard.drill import sim_action_space

        self.emu = _motor_emulator(f"{self.scheme}://emulated?ids={IDS[0]}-{IDS[-1]}", sim_action_space())
        if self.user.port_gid is not None:  # a udev rule gives a robot's servo adapter to the service's group
            os.chown(self.emu.port, 0, self.user.port_gid)
            os.chmod(self.emu.port, 0o660)
        if self.realtime:
            prioritize_threads(self.emu._proc.pid)  # BusProcess has no public pid; its process is the emulator
        return self

    @property
    def url(self) -> str:
        return (f"{self.scheme}://{self.emu.port}?ids={IDS[0]}-{IDS[-1]}&period_ms={self.period_ms}"
                f"&latency_ms={self.latency_ms}")

    def snaps(self) -> dict[int, dict]:
        return {i: self.emu.snapshot(i) for i in IDS}

    # -- the control case ------------------------------------------------------------------------------
    def arm_and_move(self, min_speed: float = MOVING_TICKS_S, tries: int = 3) -> _Control:
        """The operator's arm, then wait until a servo turns at `min_speed` with torque on in every servo and no
        trip: the control case. A run that trips by itself first (a loaded box) is re-armed, at most `tries`."""
        return self._arm_until(lambda t_arm, start: self._moving(min_speed, t_arm, start),
                               f"a servo turning at {min_speed:g} ticks/s, torque on in every servo", tries)

    def _moving(self, min_speed: float, t_arm: float, start: dict[int, dict]) -> _Control | None:
        """The control case if it holds now; raises _SpontaneousTrip if the run tripped since the arm."""
        snaps, now = self.snaps(), time.monotonic()
        status = self._raise_if_tripped_since(t_arm)
        fastest = max(IDS, key=lambda i: abs(snaps[i]["velocity"]))
        if (not all(s["torque"] for s in snaps.values()) or abs(snaps[fastest]["velocity"]) < min_speed
                or status.get("phase") not in ("homing", "running")):
            return None
        return _Control(now, fastest, float(snaps[fastest]["velocity"]), snaps, start)

    # -- the verdict -----------------------------------------------------------------------------------
    def _safe_times(self, since: float) -> dict[int, tuple[float, str]]:
        """Per servo: the first time after `since` it was torque off or holding, and how it got there."""
        out: dict[int, tuple[float, str]] = {}

        def note(sid: int, t: float, how: str) -> None:
            if sid in IDS and (sid not in out or t < out[sid][0]):
                out[sid] = (t, how)

        for e in self.events("torque", since):
            if e.detail.get("value") == 0 and not e.detail.get("error"):
                note(e.servo_id, e.t, "host")
        for kind in ("reboot", "power_cycle"):
            for e in self.events(kind, since):
                note(e.servo_id, e.t, "reboot")
        for e in self.events("hardware_error", since):  # Dynamixel Shutdown: the servo cut its own torque
            if e.detail.get("torque") is False:
                note(e.servo_id, e.t, "shutdown")
        for e in self.events("watchdog_expired", since):
            note(e.servo_id, e.t, "hold")
        return out

    def _wait_stopped(self, since: float, timeout: float = 5.0) -> dict[int, tuple[float, str]]:
        return self._wait_safe(since, timeout)

    def _wait_safe(self, since: float, timeout: float = 5.0) -> dict[int, tuple[float, str]]:
        """The servos' safe times once every servo is safe, or whatever is safe when `timeout` runs out."""
        def every_servo() -> dict[int, tuple[float, str]] | None:
            safe = self._safe_times(since)
            return safe if len(safe) == len(IDS) else None

        try:
            return wait_until(every_servo, timeout, "every servo torque off or holding")
        except TimeoutError:
            return self._safe_times(since)

    def _timed_row(self, fault: str, t_fault: float, ctl: _Control, trip: dict | None, *,
                   detected_by: str | None = None, device_latched: bool | None = None, extra_detect_ms: float = 0.0,
                   t_device_fault: float | None = None) -> MotorFaultRow:
        """Detection -> the first accepted host Torque Enable 0, and -> every servo safe, with their bounds."""
        safe = self._wait_safe(t_fault)
        row = MotorFaultRow(fault, detected_by or (f"host: {trip['kind']}" if trip else "-"), backend=self.scheme,
                            control=ctl.describe())
        row.category, row.kind = (trip["category"], trip["kind"]) if trip else (None, None)
        latched = device_latched if device_latched is not None else bool(trip and trip["kind"] == "firmware_fault")
        if trip is not None:
            row.fault_to_detect_ms = (trip["t"] - t_fault) * 1e3
        host_writes = [t for t, how in safe.values() if how == "host"]
        t_stop = min(host_writes, default=None)
        p_ms = self.period * 1e3
        if t_stop is not None:
            if latched:  # the servo reported it: the fault itself is the detection
                start = t_device_fault if t_device_fault is not None else t_fault
                row.fault_to_stop_ms = (t_stop - start) * 1e3
                row.bound_stop_ms = 2 * p_ms + TX_MS + extra_detect_ms
            elif trip is not None:
                row.fault_to_stop_ms = (t_stop - trip["t"]) * 1e3
                row.bound_stop_ms = p_ms + TX_MS + extra_detect_ms + (STOP_TIMEOUT_S * 1e3 if row.category == 1 else 0)
        if len(safe) == len(IDS) and t_stop is not None:
            row.stop_to_off_ms = (max(t for t, _ in safe.values()) - t_stop) * 1e3
            row.bound_off_ms = (len(IDS) - 1) * TX_MS + 1.0
        row.notes = "safe after the fault: " + (", ".join(
            f"id {i} {how} +{(tm - t_fault) * 1e3:.1f} ms" for i, (tm, how) in sorted(safe.items())) or "none")
        missing = [i for i in IDS if i not in safe]
        if missing:
            row.notes += f"; servo ids {missing} NOT torque off or holding"
        return row

    def _watch(self, row: MotorFaultRow, t_fault: float, watch_s: float | None = None) -> MotorFaultRow:
        """After the stop: torque must stay off (or the hold stay put) without an operator arm."""
        start = self.snaps()
        t0 = time.monotonic()
        worst = 0.0
        while time.monotonic() - t0 < (watch_s if watch_s is not None else self.watch_s):
            now = self.snaps()
            worst = max(worst, max(abs(now[i]["position"] - start[i]["position"]) for i in IDS))
            time.sleep(0.02)
        end = self.snaps()
        torque_on = [e for e in self.events("torque", t_fault) if e.detail.get("value") == 1]
        row.moved_without_arm = bool(torque_on) or worst > MOVED_TICKS
        row.after = self._describe_after(end)
        if row.moved_without_arm:
            row.notes += f"; after the stop: torque-on writes {len(torque_on)}, largest motion {worst:.0f} ticks"
        self.rows.append(row)
        log.info("%s %s: %s", self.scheme, row.fault, row.as_dict())
        return row

    def _describe_after(self, snaps: dict[int, dict]) -> str:
        on = [i for i in IDS if snaps[i]["torque"]]
        if not on:
            return "torque off"
        holding = [i for i in on if snaps[i].get("holding")]
        if holding and len(holding) == len(on):
            return "holding, torque on (Bus Watchdog expired: a stop with power kept)"
        return f"torque ON in ids {on}"

    # -- the faults ------------------------------------------------------------------------------------
    def device_error(self) -> MotorFaultRow:
        """A servo reports a hardware error (overheating) in its status byte."""
        ctl = self.arm_and_move()
        sid = ctl.moving_id
        t = time.monotonic()
        inject = self.emu.inject_hardware_error if self.scheme == "dynamixel" else self.emu.inject_error
        inject(sid, OVERHEATING_BIT)
        trip = wait_until(lambda: self._trip_since(t), 5.0, "the host to trip")
        row = self._timed_row("servo hardware error (overheating)", t, ctl, trip,
                              detected_by=f"servo status -> host: {trip['kind']}")
        row.notes += f"; injected in id {sid}"
        return self._watch(row, t)

    def blocked_joint(self) -> MotorFaultRow:
        """The fastest servo's joint stops moving (a collision): the host's following-error check or the servo's
        own overload protection, whichever comes first."""
        ctl = self.arm_and_move(FAST_TICKS_S)
        sid = ctl.moving_id
        t = time.monotonic()
        self.emu.block_joint(sid, True)
        try:
            trip = wait_until(lambda: self._trip_since(t), 5.0, "the host to trip")
        finally:
            self.emu.block_joint(sid, False)
        overload = [e for e in self.events("hardware_error" if self.scheme == "dynamixel" else "error", t)
                    if not e.detail.get("injected")]
        t_overload = overload[0].t if overload else None
        device = trip["kind"] == "firmware_fault" and t_overload is not None
        by = "servo overload -> host: firmware_fault" if device else f"host: {trip['kind']}"
        row = self._timed_row("blocked joint", t, ctl, trip, detected_by=by, device_latched=device,
                              t_device_fault=t_overload)
        row.notes += f"; id {sid} blocked"
        if t_overload is not None:
            row.notes += f"; block -> servo overload {(t_overload - t) * 1e3:.0f} ms"
        return self._watch(row, t)

    def servo_reboot(self) -> MotorFaultRow:
        """One servo loses power and restarts mid-run (RAM back to defaults: torque off, deaf for 50 ms)."""
        ctl = self.arm_and_move()
        sid = ctl.moving_id
        t = time.monotonic()
        self.emu.power_cycle(sid)
        try:
            trip = wait_until(lambda: self._trip_since(t), 3.0, "the host to trip")
        except TimeoutError:
            return self._undetected("one servo reboots mid-run", t, ctl, sid)
        # A deaf servo: up to 3 unanswered Torque Enable writes before the next id's; Feetech finds a restarted
        # servo by reading one servo's Torque_Enable every TORQUE_CHECK_EVERY cycles, in turn.
        extra = 3 * self.reply_timeout_ms
        if trip["kind"] == "firmware_fault":
            extra += TORQUE_CHECK_EVERY * len(IDS) * self.period * 1e3
        row = self._timed_row("one servo reboots mid-run", t, ctl, trip, extra_detect_ms=extra)
        row.notes += f"; id {sid} power-cycled"
        return self._watch(row, t)

    def _undetected(self, fault: str, t: float, ctl: _Control, sid: int) -> MotorFaultRow:
        """The host never tripped: say what the servos did meanwhile, then stop as an operator would."""
        assert self.run is not None
        snaps = self.snaps()
        status = self.run.status()
        row = MotorFaultRow(fault, "NOT detected", backend=self.scheme, control=ctl.describe())
        row.after = (f"id {sid} torque {'on' if snaps[sid]['torque'] else 'OFF'} (restarted), the others torque "
                     f"{'on' if all(snaps[i]['torque'] for i in IDS if i != sid) else 'off'}")
        row.host = (f"{time.monotonic() - t:.1f} s after the fault: phase {status.get('phase')}, armed "
                    f"{status.get('armed')}, no trip")
        row.notes = f"id {sid} power-cycled; the host kept commanding every servo; stopped by the operator"
        self.run.op("stop")
        row.moved_without_arm = bool([e for e in self.events("torque", t) if e.detail.get("value") == 1])
        self.rows.append(row)
        return row

    def host_sigterm(self) -> MotorFaultRow:
        """SIGTERM to every process of the run (a control-group stop): the run ends."""
        ctl = self.arm_and_move()
        assert self.run is not None
        t = time.monotonic()
        self.run.signal_group(signal.SIGTERM)
        self._wait_safe(t)
        self.run.wait_exit(15.0)
        summary = self.run.summary() or {}
        trips = [tr for tr in summary.get("trips", []) if tr["t"] >= t - 1e-3]
        trip = min(trips, key=lambda tr: tr["t"]) if trips else None
        # Feetech's signal handler turns torque off itself before the loop records anything: timed from the signal.
        handler_first = trip is None or min(tm for tm, _ in self._safe_times(t).values()) < trip["t"]
        row = self._timed_row("host SIGTERM (process group)", t, ctl, trip, device_latched=handler_first,
                              detected_by="host: SIGTERM handler (torque off)" if handler_first else None)
        if handler_first:
            row.category = 0
        row.host = self._host_outcome(t)
        row.host_ok = self.run.returncode in (0, 3) and bool(summary) and not summary.get("error")  # a planned end
        return self._watch(row, t)

    def host_kill(self) -> MotorFaultRow:
        """kill -9 of every process of the run, mid-motion."""
        ctl = self.arm_and_move()
        assert self.run is not None
        t = time.monotonic()
        self.run.signal_group(signal.SIGKILL)
        return self._host_death("host kill -9 mid-motion", t, ctl, killed=True)

    def unplug(self) -> MotorFaultRow:
        """The USB-serial adapter pulled out mid-motion (the host's tty hung up); the servos keep power."""
        ctl = self.arm_and_move()
        t = hang_up(self.emu.port)
        return self._host_death("cable unplug (host tty hung up)", t, ctl, killed=False)

    def _host_death(self, fault: str, t: float, ctl: _Control, killed: bool) -> MotorFaultRow:
        """No host writes reach the servos after the fault: what they do by themselves. An unplugged host lives on
        and must report the lost bus."""
        if self.scheme == "dynamixel":
            row = self._watchdog_row(fault, t, ctl)
            row.host = self._host_outcome(t, expect_exit=killed)
            row.host_ok = None if killed else self._reported_lost_bus(row.host)
            return self._watch(row, t)
        row = self._no_watchdog_row(fault, t, ctl)
        row.host = self._host_outcome(t, expect_exit=killed)
        row.host_ok = None if killed else self._reported_lost_bus(row.host)
        self.rows.append(row)
        return row

    @staticmethod
    def _reported_lost_bus(host: str) -> bool:
        """An unplugged host stays up and reports the lost bus as a category-0 link trip on its operator socket."""
        return host.startswith("still running: phase stopped") and host.endswith("trip link_stale (cat 0)")

    def _watchdog_row(self, fault: str, t: float, ctl: _Control) -> MotorFaultRow:
        """Dynamixel: each servo's Bus Watchdog expires (last packet + watchdog) and it holds with torque on."""
        units = watchdog_units(self.period_ms / 1e3)
        armed = all(s["bus_watchdog"] == units and not s["holding"] for s in ctl.snaps.values())
        row = MotorFaultRow(fault, "servo: Bus Watchdog", backend=self.scheme, control=ctl.describe() + (
            f"; Bus Watchdog armed ({self.watchdog_ms:.0f} ms), not expired" if armed else
            f"; Bus Watchdog NOT as armed: {[(s['bus_watchdog'], s['holding']) for s in ctl.snaps.values()]}"))
        try:
            wait_until(lambda: len({e.servo_id for e in self.events("watchdog_expired", t)}) == len(IDS),
                       5.0, "every servo's Bus Watchdog to expire")
        except TimeoutError:
            row.notes = "Bus Watchdog did NOT expire in every servo"
            return row
        expired = {e.servo_id: e for e in reversed(self.events("watchdog_expired", t))}
        first = min(expired.values(), key=lambda e: e.t)
        late = [e.detail["since_last_instruction"] * 1e3 - self.watchdog_ms for e in expired.values()]
        row.fault_to_stop_ms, row.bound_stop_ms = max(late), TICK_S * 1e3
        row.stop_to_off_ms = (max(e.t for e in expired.values()) - first.t) * 1e3
        row.bound_off_ms = TICK_S * 1e3
        row.fault_to_detect_ms = None
        row.notes = (f"last packet -> hold {max(e.detail['since_last_instruction'] for e in expired.values()) * 1e3:.1f}"
                     f" ms (watchdog {self.watchdog_ms:.0f} ms); fault -> hold {(first.t - t) * 1e3:.0f} ms")
        return row

    def _no_watchdog_row(self, fault: str, t: float, ctl: _Control) -> MotorFaultRow:
        """Feetech: nothing on the device notices; the servos drive to the last goal they got and hold it under
        torque. Measured: torque stays on in every servo, the goal never changes, each reaches it."""
        goals = {i: self.emu.snapshot(i)["goal"] for i in IDS}
        start = {i: ctl.snaps[i]["position"] for i in IDS}
        t0 = time.monotonic()
        torque_always, goal_changed = True, False
        while time.monotonic() - t0 < HOLD_WATCH_S:
            snaps = self.snaps()
            torque_always &= all(s["torque"] for s in snaps.values())
            goal_changed |= any(snaps[i]["goal"] != goals[i] for i in IDS)
            time.sleep(0.02)
        end = self.snaps()
        travel = max(abs(end[i]["position"] - start[i]) for i in IDS)
        off_goal = max(abs(end[i]["position"] - goals[i]) for i in IDS)
        changing = any(ctl.snaps[i]["goal"] != ctl.start[i]["goal"] for i in IDS)
        row = MotorFaultRow(fault, "nobody (no device watchdog)", backend=self.scheme, residual_risk=True,
                            control=ctl.describe() + ("; the goal register was changing" if changing else
                                                      "; the goal register had NOT changed since the arm"))
        row.moved_without_arm = goal_changed or bool([e for e in self.events("torque", t)
                                                       if e.detail.get("value") == 1])
        row.after = (f"torque ON in every servo for {HOLD_WATCH_S:g} s, at the dead host's last goal "
                     f"({off_goal:.0f} ticks off)" if torque_always else "torque went off in some servo")
        row.notes = (f"travel after the fault {travel:.0f} ticks (to the last goal; no new goal written); "
                     "mitigation: E-stop on servo power or an MCU with the firmware reference")
        return row

    def restart_after_kill(self) -> MotorFaultRow:
        """After the kill, a new run starts as systemd would restart it: it must stay disarmed until the operator
        arms. Measured on the servos: no torque-on write, no motion, and what torque the servos still have."""
        t = time.monotonic()
        before = self.snaps()
        self.start_host()
        assert self.run is not None
        status = self.run.status()
        row = MotorFaultRow("host restart after kill -9", "-", backend=self.scheme, expect_stop=False,
                            control=f"the killed host's servos: {self._describe_after(before)}")
        row = self._watch(row, t)
        row.host = f"phase {status.get('phase')}, armed {status.get('armed')}"
        row.host_ok = status.get("phase") == "disarmed" and status.get("armed") is False
        if any(s["torque"] for s in self.snaps().values()):
            firmware = status.get("firmware") or {}
            if int(firmware.get("fault_bits", 0)) & DEVICE_FAULT_BIT:
                row.notes = ("the servos still have torque on from before the kill; the new run latched it as a device "
                             "fault (found_torque_on): the operator's arm clears it (torque off, read back) first")
            else:
                row.notes = ("the new run reports DISARMED with no fault while the servos still have torque on from "
                             "before the kill")
                row.host_ok = False
        return row

    # -- campaigns -------------------------------------------------------------------------------------
    def run_all(self) -> list[MotorFaultRow]:
        self.start_host()
        for scenario in (self.stalled_inference, self.blocked_joint, self.device_error, self.servo_reboot,
                         self.host_sigterm):
            scenario()
        self.start_host()
        self.host_kill()
        self.restart_after_kill()
        self.unplug()
        self.close_host()
        return self.rows

    def run_bundle(self) -> list[MotorFaultRow]:
        """With a bundle's policy driving (`bundle`): a device error, then kill -9; the rows are named so."""
        assert self.bundle, "run_bundle needs MotorCampaign(bundle=...)"
        self.start_host()
        rows = [self.device_error(), self.host_kill()]
        self.close_host()
        for row in rows:
            row.fault += f" [bundle {Path(self.bundle).name}]"
        return self.rows

    def run_ci(self) -> list[MotorFaultRow]:
        """The CI subset: a device error and kill -9 in one run, the unplug in a second."""
        self.start_host()
        self.device_error()
        self.host_kill()
        self.start_host()
        self.unplug()
        self.close_host()
        return self.rows


def motor_campaign(scheme: str, user: ServiceUser | None = None, **kw: Any) -> _HostedCampaign:
    """The campaign for one motor backend: a servo bus on a pty, or a CAN backend on python-can's bus."""
    if scheme not in ALL_SCHEMES:
        raise ValueError(f"unknown motor backend {scheme!r}; use one of {', '.join(ALL_SCHEMES)}")
    if scheme in CAN_SCHEMES:
        from edge_vla.onboard.can_campaign import CanCampaign  # it imports this module's shared pieces

        return CanCampaign(scheme, user or ServiceUser(), **kw)
    return MotorCampaign(scheme, user or ServiceUser(), **kw)


class _SpontaneousTrip(Exception):
    def __init__(self, trip: dict) -> None:
        super().__init__(str(trip))
        self.trip = trip


def format_motor_table(rows_by_fault: dict[tuple[str, str], list[MotorFaultRow]]) -> str:
    """Markdown: p99 and max over repetitions of each time with its bound, what the servos do afterwards, the
    motion verdict, and the row's verdict (a residual risk is never a pass)."""

    def stat(vals: list[float | None]) -> str:
        v = [x for x in vals if x is not None]
        return "-" if not v else f"{np.percentile(v, 99):.1f} / {max(v):.1f}"

    lines = ["| backend | fault | detected by | cat | detection->stop at the device ms p99/max (bound) | "
             "stop->torque off (or hold) in every device ms p99/max (bound) | devices afterwards | moved without arm | "
             "verdict |", "|---|---|---|---|---|---|---|---|---|"]
    for (backend, fault), rows in rows_by_fault.items():
        r0 = rows[0]
        cats = sorted({r.category for r in rows if r.category is not None})
        b1 = f" ({max(r.bound_stop_ms for r in rows if r.bound_stop_ms is not None):.0f})" \
            if any(r.bound_stop_ms is not None for r in rows) else ""
        b2 = f" ({r0.bound_off_ms:.0f})" if r0.bound_off_ms is not None else ""
        moved = sum(r.moved_without_arm for r in rows)
        verdicts = sorted({r.verdict for r in rows})
        lines.append(f"| {backend} | {fault} | {' / '.join(sorted({r.detected_by for r in rows}))} | "
                     f"{','.join(map(str, cats)) or '-'} | {stat([r.fault_to_stop_ms for r in rows])}{b1} | "
                     f"{stat([r.stop_to_off_ms for r in rows])}{b2} | {' / '.join(sorted({r.after for r in rows}))} | "
                     f"{'NEVER' if moved == 0 else f'{moved}/{len(rows)}'} | {', '.join(verdicts)} |")
    return "\n".join(lines)
