"""`edge-vla run --link dynamixel://... | feetech://...`: the control loop drives motor devices through the Link
adapter (firmware_bridge.motors.link_adapter), arming only through the operator path.

Real `edge-vla run` subprocesses (as the service user) against the device emulators on real ptys. Most tests start
the emulator themselves, outside the run's process group, so they can read the servos' registers (torque, Bus
Watchdog, position) while `run` drives them and after it is killed. The `--emulate` tests check that `run` starts
the matching emulator by itself with limits inside the bundle's, so it arms.

Bus Watchdog sizing: the URLs carry period_ms=100 (a 200 ms watchdog) because a shared 2-core test box can starve
a process for more than the 40 ms a 50 Hz loop would get; the kill test's outcome does not depend on it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from onboard_helpers import SERVICE_GID, robot_users, service_run_dir, wait_for

from edge_vla.onboard.cli import _motor_emulator
from edge_vla.sim.scene import JOINT_NAMES

pytest.importorskip("dynamixel_sdk", reason="dynamixel-sdk is not installed (pip install 'edge-vla[dynamixel]')")
pytest.importorskip("scservo_sdk", reason="feetech-servo-sdk is not installed (pip install 'edge-vla[feetech]')")

SCHEMES = ("dynamixel", "feetech")
IDS = (1, 2)
STARTUP_S = 60.0  # the sim expert and the control process start on a shared 2-core box
MOVED_TICKS = 20  # ~0.03 rad: the expert's homing moves the joints much further than this


def _space() -> Any:
    from edge_vla.onboard.drill import sim_action_space

    space = sim_action_space()
    assert tuple(space.names) == JOINT_NAMES
    return space


@pytest.fixture()
def emulator(request: pytest.FixtureRequest) -> Iterator[Any]:
    """The scheme's emulator in this test's process tree (not the run's), its pty given to the service user."""
    scheme = request.param
    emu = _motor_emulator(f"{scheme}://emulated?ids=1-2", _space())
    try:
        if robot_users().service:  # a udev rule would give the tty to the service's group (dialout)
            os.chown(emu.port, 0, SERVICE_GID)
            os.chmod(emu.port, 0o660)
        emu.scheme = scheme
        yield emu
    finally:
        emu.close()


def _start(link: str, sock: Path, *extra: str) -> subprocess.Popen[str]:
    users = robot_users()
    cmd = users.edge_vla(users.service, "run", "--expert", "--link", link, "--control-socket", str(sock),
                         "--duration", "120", *extra)
    # Its own session: the kill test kills the run's whole process group, never the emulator's.
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=users.environ(),
                            cwd="/", start_new_session=True)


def _op(sock: Path, *args: str) -> dict[str, Any]:
    users = robot_users()
    proc = subprocess.run(users.edge_vla(users.service, *args, "--control-socket", str(sock), "--json"),
                          capture_output=True, text=True, env=users.environ(), cwd="/", timeout=60)
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError:
        return {"ok": False, "error": proc.stdout + proc.stderr}


def _phase(sock: Path, proc: subprocess.Popen[str]) -> str | None:
    if proc.poll() is not None:
        _, err = proc.communicate()
        raise AssertionError(f"edge-vla run exited {proc.returncode}:\n{err[-3000:]}")
    if not sock.exists():
        return None
    status = _op(sock, "status")
    return status.get("phase") if "phase" in status else None


def _torque(emu: Any) -> list[bool]:
    return [bool(emu.snapshot(i)["torque"]) for i in IDS]


def _positions(emu: Any) -> list[float]:
    return [float(emu.snapshot(i)["position"]) for i in IDS]


def _finish(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
    return proc.returncode, err


def _url(emu: Any) -> str:
    return f"{emu.scheme}://{emu.port}?ids=1-2&period_ms=100&latency_ms=100"


@pytest.mark.parametrize("emulator", SCHEMES, indirect=True)
def test_run_arms_only_on_the_operator_moves_the_servos_and_every_stop_ends_in_torque_off(emulator: Any) -> None:
    emu = emulator
    sock = service_run_dir(f"edge-vla-{emu.scheme}-") / "control.sock"
    start = _positions(emu)
    proc = _start(_url(emu), sock)
    try:
        wait_for(lambda: _phase(sock, proc) == "disarmed", STARTUP_S, "the loop to come up disarmed")
        assert _torque(emu) == [False, False], "torque on before any operator arm"
        reply = _op(sock, "arm")
        if not reply.get("ok"):  # the device's one-line reason is in the service's log
            pytest.fail(f"{reply}\n{_finish(proc, signal.SIGTERM)[1][-3000:]}")
        wait_for(lambda: all(_torque(emu)), 10, "torque on in every servo after the operator's arm")
        # The loop moves the joints toward the expert's targets: the goal leaves the start and the plant follows.
        wait_for(lambda: max(abs(a - b) for a, b in zip(_positions(emu), start, strict=True)) > MOVED_TICKS, 20,
                 f"a joint to move more than {MOVED_TICKS} ticks")
        assert any(emu.snapshot(i)["goal"] != round(s) for i, s in zip(IDS, start, strict=True))
        reply = _op(sock, "stop")
        assert reply.get("ok"), reply
        wait_for(lambda: not any(_torque(emu)), 10, "torque off in every servo after the operator's stop")
        wait_for(lambda: _phase(sock, proc) == "stopped", 10, "the loop to report stopped")
        # Re-arm (the operator again), then SIGTERM: a controlled stop, exit 0, torque off read from each servo.
        reply = _op(sock, "arm")
        if not reply.get("ok"):
            pytest.fail(f"{reply}\n{_finish(proc, signal.SIGTERM)[1][-3000:]}")
        wait_for(lambda: all(_torque(emu)), 10, "torque on after the second arm")
        code, err = _finish(proc, signal.SIGTERM)
        assert code == 0, err[-3000:]
        assert _torque(emu) == [False, False], err[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


@pytest.mark.parametrize("emulator", SCHEMES, indirect=True)
def test_sigterm_to_the_whole_process_group_is_a_clean_stop(emulator: Any) -> None:
    """systemd's default KillMode=control-group sends SIGTERM to every process of the service at once: the control
    process (where the Feetech backend's own SIGTERM hook turns torque off first) and its parent. That is an
    operator-grade stop, not a fault: exit 0, torque off read from each servo. (It exited 3: the loop's next
    setpoint write met the disarmed device and tripped as a link fault.)"""
    emu = emulator
    sock = service_run_dir(f"edge-vla-{emu.scheme}-") / "control.sock"
    proc = _start(_url(emu), sock)
    try:
        wait_for(lambda: _phase(sock, proc) == "disarmed", STARTUP_S, "the loop to come up disarmed")
        reply = _op(sock, "arm")
        if not reply.get("ok"):
            pytest.fail(f"{reply}\n{_finish(proc, signal.SIGTERM)[1][-3000:]}")
        wait_for(lambda: all(_torque(emu)), 10, "torque on in every servo after the operator's arm")
        wait_for(lambda: _phase(sock, proc) in ("homing", "running"), 10, "the loop to drive the servos")
        os.killpg(proc.pid, signal.SIGTERM)
        code, err = _finish(proc)
        assert code == 0, err[-3000:]
        assert _torque(emu) == [False, False], err[-3000:]
        assert "tripped" not in err.lower() or "safety trip" not in err.lower(), err[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


@pytest.mark.parametrize("emulator", ["dynamixel"], indirect=True)
def test_dynamixel_kill_9_of_run_mid_motion_the_bus_watchdog_stops_the_servos(emulator: Any) -> None:
    """The servos hold (Bus Watchdog expiry: stopped with torque on, 98 reads -1); the control case is the same
    servos while the run is alive: moving, watchdog armed, not expired."""
    emu = emulator
    sock = service_run_dir("edge-vla-dxl-kill-") / "control.sock"
    start = _positions(emu)
    proc = _start(_url(emu), sock)
    try:
        wait_for(lambda: _phase(sock, proc) == "disarmed", STARTUP_S, "the loop to come up disarmed")
        assert _op(sock, "arm").get("ok")
        wait_for(lambda: max(abs(a - b) for a, b in zip(_positions(emu), start, strict=True)) > MOVED_TICKS, 20,
                 "motion")
        alive = [emu.snapshot(i) for i in IDS]
        assert all(s["torque"] and not s["holding"] and s["bus_watchdog"] == 10 for s in alive), alive
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        wait_for(lambda: all(emu.snapshot(i)["holding"] for i in IDS), 5, "every servo's Bus Watchdog to expire")
        after = [emu.snapshot(i) for i in IDS]
        assert all(s["torque"] and s["bus_watchdog"] == 0xFF for s in after), after  # a hold with power kept
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


@pytest.mark.parametrize("emulator", SCHEMES, indirect=True)
def test_a_servo_hardware_error_trips_the_loop_category_0_with_torque_off(emulator: Any) -> None:
    """Control case: the same run, armed and moving, has no trip before the injection."""
    emu = emulator
    sock = service_run_dir(f"edge-vla-{emu.scheme}-fault-") / "control.sock"
    proc = _start(_url(emu), sock)
    try:
        wait_for(lambda: _phase(sock, proc) == "disarmed", STARTUP_S, "the loop to come up disarmed")
        assert _op(sock, "arm").get("ok")
        wait_for(lambda: _phase(sock, proc) in ("homing", "running"), 10, "the loop to run")
        assert _op(sock, "status").get("trip") is None
        inject = emu.inject_hardware_error if emu.scheme == "dynamixel" else emu.inject_error
        inject(IDS[1])  # overload on the second joint
        wait_for(lambda: _phase(sock, proc) == "stopped", 10, "the loop to trip")
        status = _op(sock, "status")
        assert status["trip"]["kind"] == "firmware_fault" and status["trip"]["category"] == 0, status
        assert not any(_torque(emu)), status
        code, err = _finish(proc, signal.SIGTERM)
        assert code == 3 and "overload" in err, err[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


# What each backend logs once its stop read back torque off from every device (the disable read back).
DISABLED_READ_BACK = {"damiao": "every motor disabled (read back)", "cia402": "drives disabled, read back"}


@pytest.mark.parametrize("scheme", [*SCHEMES, "damiao", "cia402"])
def test_emulate_starts_the_scheme_emulator_inside_the_bundle_limits_so_it_arms(scheme: str) -> None:
    """`--emulate` starts the scheme's emulator with one device per joint and its own position limits (servo
    limits, CiA 402 0x607D) just inside the bundle's, so the operator's arm passes the backend's limit check."""
    if scheme == "cia402":
        pytest.importorskip("canopen", reason="canopen is not installed (pip install 'edge-vla[cia402]')")
    sock = service_run_dir(f"edge-vla-{scheme}-emu-") / "control.sock"
    proc = _start(f"{scheme}://emulated?period_ms=100", sock, "--emulate")
    try:
        wait_for(lambda: _phase(sock, proc) == "disarmed", STARTUP_S, "the loop to come up disarmed")
        reply = _op(sock, "arm")
        # ARMED is reported only after the device read Torque Enable 1 back from every emulated servo.
        assert reply.get("ok") and reply["status"]["firmware"]["mode"] == "ARMED", reply
        code, err = _finish(proc, signal.SIGTERM)
        assert code == 0, err[-3000:]
        assert DISABLED_READ_BACK.get(scheme, "torque off read back from every servo") in err, err[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


@pytest.mark.parametrize(("url", "joints", "params", "want"), [
    ("cia402://emulated?period_ms=100", 2, {"udp_port": "4242"},
     "cia402://udp_multicast/239.1.2.3?period_ms=100&node=1-2&udp_port=4242"),
    ("cia402://emulated?node=3,4&udp_port=1", 2, {"udp_port": "4242"},  # the emulator's port wins
     "cia402://udp_multicast/239.1.2.3?node=3,4&udp_port=4242"),
    ("damiao://emulated?period_ms=100", 2, {}, "damiao://udp_multicast/239.1.2.3?period_ms=100&ids=1-2"),
    ("feetech://emulated?ids=1,3", 2, {}, "feetech://udp_multicast/239.1.2.3?ids=1,3"),
])
def test_emulated_motor_url_names_the_schemes_devices_and_the_emulators_bus(url: str, joints: int,
                                                                            params: dict[str, str], want: str) -> None:
    from edge_vla.onboard.cli import emulated_motor_url

    assert emulated_motor_url(url, "udp_multicast/239.1.2.3", joints, params) == want


@pytest.mark.parametrize(("url", "says"), [
    ("cia402://emulated?node=1", "names 1 device ids but the bundle's action space has 2 joints (1); give one id per "
                                 "joint, e.g. node=1-2"),
    ("cia402://emulated?node=127-128", "node='127-128': '127-128' is outside 1..127"),
])
def test_emulate_refuses_a_cia402_url_that_names_the_wrong_drives_in_one_line(url: str, says: str) -> None:
    from edge_vla.errors import ConfigError
    from edge_vla.onboard.cli import _motor_ids

    with pytest.raises((ConfigError, ValueError)) as err:
        _motor_ids(url, 2)
    assert says in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_emulate_accepts_a_cia402_url_whose_udp_port_the_emulator_replaces() -> None:
    """With --emulate the emulator's bus replaces the URL's port and udp_port=, so the check before the model loads
    must not refuse them; control: without --emulate, udp_port= on a SocketCAN port is refused in one line."""
    pytest.importorskip("canopen", reason="canopen is not installed (pip install 'edge-vla[cia402]')")
    from edge_vla.errors import ConfigError
    from edge_vla.onboard.cli import check_link

    check_link("cia402://emulated?node=1-2&udp_port=5", emulate=True)
    with pytest.raises(ConfigError, match="udp_port= applies only to the udp_multicast interface"):
        check_link("cia402://socketcan/can0?node=1-2&udp_port=5")
