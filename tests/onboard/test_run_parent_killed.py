"""`edge-vla run` killed with SIGKILL (the OOM killer, `systemctl kill -s KILL`, a crash in a native library):
its control process must not live on as an orphan holding the port, the CAN socket and the shared memory.

The real `edge-vla run --expert` as the service user over the emulator on a pty, armed and running the policy:

- SIGKILL to the parent: the control process notices within a few control periods, makes the controlled
  stop a SIGTERM makes (category-1 STOP, torque off confirmed, DISARM, all seen by the firmware) and exits
  within EXIT_BOUND_S. The old one stayed alive for good (stopped by the stale-worker trip, then latched).
- The control: SIGTERM to the parent still makes the normal controlled stop, and the run exits 0.
- The other control: a runner started from a thread that then ends keeps running (the parent process, not its
  starting thread, is watched).
- A parent dead before the control process started: the loop's check ends the run on its first cycle, before the
  bench-mode arm.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

from onboard_helpers import events, give_pty_to_service, robot_users, service_run_dir, wait_for

from edge_vla.action_space import sim_action_space
from edge_vla.onboard.cameras import SimCamera
from edge_vla.onboard.control import PARENT_DIED_REASON, ControlConfig, control_main
from edge_vla.onboard.operator import SocketOperator
from edge_vla.onboard.runner import OnboardRunner, bus_state_fn
from edge_vla.onboard.shared import SharedBus
from edge_vla.onboard.worker import ExpertSource
from edge_vla.sim.env import ReachEnv

EXIT_BOUND_S = 5.0  # parent killed -> control process gone: a stop takes < 1 s; the rest is a loaded 2-core box
SPAWN_MAIN = b"multiprocessing.spawn"  # the control process's command line (multiprocessing's spawn context)


# -- processes, by pid and start time (a pid reused by another process is not ours) -----------------------

def _stat(pid: int) -> tuple[int, str, int, int] | None:
    """(ppid, state, start time, process group) from /proc/PID/stat, or None once the pid is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = raw[raw.rindex(b")") + 2:].split()  # after "pid (comm) ": the comm may hold spaces
    return int(fields[1]), fields[0].decode(), int(fields[19]), int(fields[2])


def _group_left(pgid: int) -> list[int]:
    """Live (not zombie) processes still in process group `pgid`: what is left of a run started in its own
    session (its control process, multiprocessing's resource tracker)."""
    stats = {int(p): _stat(int(p)) for p in os.listdir("/proc") if p.isdigit()}
    return [pid for pid, st in stats.items() if st is not None and st[3] == pgid and st[1] != "Z"]


def _alive(pid: int, started: int) -> bool:
    """The process that had `started` as its start time still runs (a zombie has exited)."""
    st = _stat(pid)
    return st is not None and st[2] == started and st[1] != "Z"


def _control_process(parent: int) -> tuple[int, int]:
    """(pid, start time) of the run's control process: the child of `parent` that multiprocessing spawned."""
    found = []
    for entry in os.listdir("/proc"):
        st = _stat(int(entry)) if entry.isdigit() else None
        if st is not None and st[0] == parent:
            with contextlib.suppress(OSError):
                if SPAWN_MAIN in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append((int(entry), st[2]))
    assert len(found) == 1, f"expected one control process under pid {parent}, found {found}"
    return found[0]


def _wait_gone(pid: int, started: int, timeout: float) -> float | None:
    """Seconds until the process ended (polled), or None if it still runs after `timeout`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if not _alive(pid, started):
            return time.monotonic() - t0
        time.sleep(0.02)
    return None


# -- the run ----------------------------------------------------------------------------------------------

class Run:
    """`edge-vla run --expert --arm-on-start` as the service user, in its own session; output in files (an orphan
    writing to a pipe nobody reads would block on it)."""

    def __init__(self, emulator, tmp_path: Path) -> None:
        users = robot_users()
        give_pty_to_service(emulator)
        self.dir = service_run_dir("edge-vla-parentkill-")
        self.sock, self.telemetry = self.dir / "control.sock", self.dir / "telemetry.jsonl"
        self.out_path, self.err_path = tmp_path / "stdout", tmp_path / "stderr"
        cmd = users.edge_vla(users.service, "run", "--expert", "--link", f"serial://{emulator.port}",
                             "--arm-on-start", "--control-socket", str(self.sock), "--telemetry",
                             str(self.telemetry), "--json", "--duration", "600")
        with self.out_path.open("w") as out, self.err_path.open("w") as err:
            self.proc = subprocess.Popen(cmd, cwd=self.dir, env=users.environ(), stdout=out, stderr=err,
                                         start_new_session=True)
        self.control: tuple[int, int] | None = None

    def stderr(self) -> str:
        return self.err_path.read_text()[-3000:]

    def wait_policy_running(self) -> None:
        """Until the policy drives (homing over, then 25 cycles of chunks), and note the control process."""
        def cycles_running() -> int | None:
            assert self.proc.poll() is None, self.stderr()
            st = SocketOperator(self.sock, timeout=5).status() if self.sock.exists() else {}
            return st["cycles"] if st.get("phase") == "running" else None

        first = wait_for(cycles_running, 60, "the loop to run the policy")
        wait_for(lambda: (cycles_running() or 0) >= first + 25, 10, "25 cycles of the policy driving")
        self.control = _control_process(self.proc.pid)

    def summary_record(self) -> dict:
        """The control process's own summary, the last record it writes to the telemetry file before exiting."""
        lines = [json.loads(ln) for ln in self.telemetry.read_text().splitlines() if ln.strip()]
        summaries = [r for r in lines if r["topic"] == "/control/summary"]
        assert len(summaries) == 1, f"{len(summaries)} summary records in {self.telemetry}"
        return summaries[0]

    def kill_all(self) -> None:
        """Whatever is left of this run: the parent, its control process (by pid, checked by start time), and
        anything else in the run's own process group."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        if self.control is not None and _alive(*self.control):
            os.kill(self.control[0], signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def _assert_host_made_the_stop(emulator, since: float) -> None:
    """The firmware saw this host's safe stop, in order: STOP, torque off, DISARM; not its own watchdog's."""
    names = [e["event"] for e in events(emulator, since=since)]
    assert "stop_cat1" in names and "torque_off" in names and "disarmed" in names, names
    assert names.index("stop_cat1") < names.index("torque_off") < names.index("disarmed"), names
    assert not events(emulator, "heartbeat_timeout"), "the host left the stop to the firmware's watchdog"


def test_sigkill_of_the_parent_stops_the_robot_and_ends_the_control_process(emulator, tmp_path) -> None:
    run = Run(emulator, tmp_path)
    try:
        run.wait_policy_running()
        assert run.control is not None
        t_kill = time.monotonic()
        os.kill(run.proc.pid, signal.SIGKILL)
        run.proc.wait(timeout=10)
        took = _wait_gone(*run.control, EXIT_BOUND_S)
        assert took is not None, (f"control process {run.control[0]} still alive {EXIT_BOUND_S:g} s after its parent "
                                  f"was killed (an orphan holding the port); its log:\n{run.stderr()}")
        # Nothing else of the run lives on either (multiprocessing's resource tracker ends with its last client).
        wait_for(lambda: not _group_left(run.proc.pid), 5, "the rest of the run's processes to end")
        _assert_host_made_the_stop(emulator, t_kill)
        summary = run.summary_record()
        # The stop the parent's death made (not the stale-worker trip a second later), then the exit.
        assert [(t["kind"], t["category"]) for t in summary["trips"]] == [("worker_dead", 1)], summary["trips"]
        assert summary["end"]["kind"] == "worker_dead" and "parent process" in summary["end"]["reason"], summary["end"]
        assert summary["final_state"] == "stopped" and not summary["armed_at_exit"]
        assert "Traceback" not in run.stderr(), run.stderr()  # its summary had nowhere to go: said, not a crash
    finally:
        run.kill_all()


def test_control_sigterm_of_the_parent_still_makes_the_normal_stop_and_exits_0(emulator, tmp_path) -> None:
    run = Run(emulator, tmp_path)
    try:
        run.wait_policy_running()
        assert run.control is not None
        t_term = time.monotonic()
        run.proc.send_signal(signal.SIGTERM)
        assert run.proc.wait(timeout=20) == 0, run.stderr()
        assert not _alive(*run.control), "the parent exited before its control process"
        wait_for(lambda: not _group_left(run.proc.pid), 5, "the rest of the run's processes to end")
        _assert_host_made_the_stop(emulator, t_term)
        summary = json.loads(run.out_path.read_text())
        assert [(t["kind"], t["category"]) for t in summary["trips"]] == [("operator_stop", 1)], summary["trips"]
        assert summary["end"] == {"kind": "operator_stop", "reason": "stop requested by the parent process"}
        assert summary["final_state"] == "stopped" and not summary["armed_at_exit"]
    finally:
        run.kill_all()


def test_control_the_thread_that_started_the_runner_ending_does_not_stop_the_robot(emulator) -> None:
    """The thread that started the control process ends, its process lives on: the robot keeps running (a check
    of the starting thread, as PR_SET_PDEATHSIG makes, would stop it)."""
    env = ReachEnv()
    env.reset(1_000_001)
    scene = env.scene
    config = ControlConfig(link_url=f"serial://{emulator.port}", action_space=sim_action_space(), rate_hz=100.0,
                           arm_on_start=True)
    run = OnboardRunner(config, ExpertSource(scene, delay_s=0.02), lambda bus: SimCamera(scene, bus_state_fn(bus), 64),
                        scene.instruction, image_size=64)
    starter = threading.Thread(target=run.start, name="short-lived-starter")
    starter.start()
    starter.join(60)
    try:
        assert run.wait_ready(30), "the loop did not become ready"
        assert not starter.is_alive(), "the starting thread did not end"
        n = run.bus.get("cycles")
        wait_for(lambda: run.bus.get("cycles") >= n + 30, 10, "30 more control cycles")
        assert run.status() == "running" and run.proc.is_alive(), run.status()
        assert not events(emulator, "stop_cat1"), "the starting thread's end stopped the robot"
    finally:
        summary = run.close()
    assert summary is not None and [(t["kind"], t["category"]) for t in summary["trips"]] == [("operator_stop", 1)]


def test_a_parent_dead_before_the_control_process_watched_it_ends_the_run_before_any_arm(emulator) -> None:
    """The race the per-cycle check covers: the parent died before the control process started.
    Bench mode would arm at once; the loop instead sees its parent gone on its first cycle and exits, unarmed."""
    dead = subprocess.Popen(["true"])
    dead.wait()  # reaped: a pid that is no process's parent
    config = ControlConfig(link_url=f"serial://{emulator.port}", action_space=sim_action_space(), rate_hz=100.0,
                           arm_on_start=True)
    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=control_main, args=(config, SharedBus(config.action_space.dim, 64), send,
                                                  logging.INFO, dead.pid), name="edge-vla-control")
    proc.start()
    send.close()
    try:
        assert recv.poll(30), "no summary from the control process"
        summary = recv.recv()
        proc.join(EXIT_BOUND_S)
        assert proc.exitcode == 0, proc.exitcode
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
    assert summary["end"] == {"kind": "worker_dead", "reason": PARENT_DIED_REASON.format(pid=dead.pid)}, summary
    assert summary["trips"] == [] and not summary["armed_at_exit"], summary
    assert not events(emulator, "armed"), "a control process whose parent was gone armed the firmware"
