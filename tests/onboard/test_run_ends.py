"""How `edge-vla run` ends, through the real process as the service user over the emulator on a pty.

- A camera unplugged mid-run (its read raises): the robot is stopped (category 1, torque off, disarmed, seen
  by the firmware), then the process exits 3 with one line naming the camera and the error. The old run
  stopped the robot and then stayed alive, stopped, forever.
- The control: the same camera not failing runs to its planned --duration end and exits 0, and the summary
  says the planned duration ended (kind "duration"), not an operator stop.
- An operator's stop still reads as an operator stop.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from onboard_helpers import events, give_pty_to_service, robot_users, service_run_dir, wait_for

from edge_vla.onboard.operator import SocketOperator

SCRIPT = Path(__file__).with_name("camera_unplug_run.py")
EXIT_WAIT_S = 20.0  # from the unplug to the process's exit: a stop takes < 1 s; the rest is a loaded 2-core box


def _start(emulator, run_dir: Path, mode: str, *extra: str, arm: bool = True,
           unplugged: bool = False) -> tuple[subprocess.Popen[str], Path, Path]:
    """`edge-vla run --expert` (the sim camera, wrapped) as the service user, armed in bench mode (`arm`)."""
    users = robot_users()
    give_pty_to_service(emulator)
    script = Path(users.env["PYTHONPATH"]) / SCRIPT.relative_to(Path(__file__).resolve().parents[2])
    trigger, sock = run_dir / "unplug", run_dir / "control.sock"
    if unplugged:
        trigger.touch()
    cmd = [*users.service, users.python, str(script), str(trigger), mode, "run", "--expert", "--link",
           f"serial://{emulator.port}", *(["--arm-on-start"] if arm else []), "--control-socket", str(sock),
           "--json", *extra]
    # Its own session: a run that does not end is killed with its control process, which holds its pipes.
    proc = subprocess.Popen(cmd, cwd=run_dir, env=users.environ(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    return proc, trigger, sock


def _wait_policy_running(proc: subprocess.Popen[str], sock: Path) -> None:
    """Until the policy drives (homing over, then 25 cycles, 0.5 s, of chunks): mid-run, where an unplug matters."""
    def cycles_running() -> int | None:
        assert proc.poll() is None, proc.communicate()
        st = SocketOperator(sock, timeout=5).status() if sock.exists() else {}
        return st["cycles"] if st.get("phase") == "running" else None

    first = wait_for(cycles_running, 40, "the loop to run the policy")
    wait_for(lambda: (cycles_running() or 0) >= first + 25, 10, "25 cycles of the policy driving")


def _finish(proc: subprocess.Popen[str], what: str) -> tuple[str, str, float]:
    try:
        out, err = proc.communicate(timeout=EXIT_WAIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
        raise AssertionError(f"edge-vla run still running {EXIT_WAIT_S:g} s after {what}; stderr:\n"
                             f"{err[-2000:]}") from None
    return out, err, time.monotonic()


def test_unplugged_camera_stops_the_robot_then_exits_3_with_one_line(emulator) -> None:
    run_dir = service_run_dir("edge-vla-unplug-")
    proc, trigger, sock = _start(emulator, run_dir, "raise")
    _wait_policy_running(proc, sock)
    # Taken before the unplug: the run may see the trigger and make its stop before a time taken after touch()
    # (this thread descheduled in between on a loaded box), and the stop would fall outside the window below.
    t_unplug = time.monotonic()
    trigger.touch()
    out, err, t_exit = _finish(proc, "the camera was unplugged")
    assert proc.returncode == 3, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("edge-vla run:")]
    assert len(lines) == 1, err[-3000:]
    assert "camera sim" in lines[0] and "No such device" in lines[0] and "stopped" in lines[0], lines[0]
    assert "Traceback" not in err, err[-3000:]
    summary = json.loads(out)
    # One trip: the worker's failure, a category-1 stop made at once (not when the last chunk ran out).
    assert [(t["kind"], t["category"]) for t in summary["trips"]] == [("worker_dead", 1)], summary["trips"]
    assert summary["end"]["kind"] == "worker_dead" and summary["chunks"]["adopted"] > 0
    assert "No such device" in summary["worker"]["error"]
    assert summary["final_state"] == "stopped" and not summary["armed_at_exit"]
    # The firmware saw the safe stop, completed, before the process ended: STOP, torque off, DISARM.
    names = [e["event"] for e in events(emulator, since=t_unplug) if e["t"] <= t_exit]
    assert "stop_cat1" in names and "torque_off" in names and "disarmed" in names, names
    assert names.index("stop_cat1") < names.index("torque_off") < names.index("disarmed"), names
    assert not events(emulator, "heartbeat_timeout"), "the host left the stop to the firmware's watchdog"


def test_a_camera_dead_before_anything_moved_ends_the_run_with_status_1(emulator) -> None:
    """Disarmed (waiting for an operator), the camera gives nothing: no stop to make, and no run worth waiting in
    (an arm would only lead to the next stop); the run ends with 1 and the line, the firmware never armed."""
    run_dir = service_run_dir("edge-vla-nocamera-")
    proc, _trigger, _sock = _start(emulator, run_dir, "none", arm=False, unplugged=True)
    out, err, _ = _finish(proc, "its camera gave no frame")
    assert proc.returncode == 1, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("edge-vla run:")]
    assert len(lines) == 1 and "camera sim returned no frame (None)" in lines[0], err[-3000:]
    assert "nothing was moving" in lines[0] and "Traceback" not in err, lines
    summary = json.loads(out)
    assert summary["trips"] == [] and summary["end"]["kind"] == "worker_dead" and not summary["armed_at_exit"]
    assert not events(emulator, "armed")


def test_control_a_camera_that_keeps_working_runs_to_its_duration_and_exits_0(emulator) -> None:
    run_dir = service_run_dir("edge-vla-duration-")
    proc, trigger, sock = _start(emulator, run_dir, "ok", "--duration", "5")
    _wait_policy_running(proc, sock)
    trigger.touch()  # as in the unplug test: the camera here ignores it
    out, err, _ = _finish(proc, "its 5 s duration")
    assert proc.returncode == 0, err[-3000:]
    assert not [ln for ln in err.splitlines() if ln.startswith("edge-vla run:")], err[-3000:]
    summary = json.loads(out)
    # The planned end is its own kind, not an operator stop, and no trip.
    assert summary["end"]["kind"] == "duration" and "duration" in summary["end"]["reason"], summary.get("end")
    assert summary["trips"] == [], summary["trips"]
    assert summary["chunks"]["adopted"] > 0 and "error" not in summary["worker"]
    assert summary["final_state"] == "stopped" and not summary["armed_at_exit"]
    names = [e["event"] for e in events(emulator)]
    assert names.index("armed") < names.index("stop_cat1") < names.index("disarmed"), names


def test_control_an_operator_stop_still_reads_as_an_operator_stop(emulator) -> None:
    run_dir = service_run_dir("edge-vla-opstop-")
    proc, _trigger, sock = _start(emulator, run_dir, "ok", "--duration", "5")
    _wait_policy_running(proc, sock)
    assert SocketOperator(sock, timeout=5).stop()["ok"]
    out, err, _ = _finish(proc, "its 5 s duration")
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads(out)
    assert [t["kind"] for t in summary["trips"]] == ["operator_stop"], summary["trips"]
    assert summary["trips"][0]["reason"] == "operator stop"
    # The duration then ended a stopped run: nothing more to stop, and still said as the planned end.
    assert summary["end"]["kind"] == "duration"
