"""`edge-vla run --link feetech://...|dynamixel://... --calibration FILE [--action-units ...]`: a LeRobot calibration
through the run command.

Real `edge-vla run` processes as the service user: every startup refusal is one stderr line and exit 1, before any
model loads; a control run with a calibration comes up, arms through the operator against emulated servos that
carry the calibration's ids, homing offsets and ranges, and stops. The sim expert acts in radians, so the
LeRobot-unit refusals use a bundle directory holding only its manifest (the refusal comes before the model would
load); the LeRobot units themselves are checked tick for tick in tests/firmware_bridge/motor_devices/.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onboard_helpers import robot_users, service_run_dir, service_user, wait_for

from edge_vla.bundle import FORMAT, MANIFEST, SCHEMA_VERSION
from edge_vla.sim.scene import JOINT_NAMES

pytest.importorskip("dynamixel_sdk", reason="dynamixel-sdk is not installed (pip install 'edge-vla[dynamixel]')")
pytest.importorskip("scservo_sdk", reason="feetech-servo-sdk is not installed (pip install 'edge-vla[feetech]')")

STARTUP_S = 60.0  # the sim expert and the control process start on a shared 2-core box
# The sim arm's joints (shoulder 0..pi, elbow -2.6..2.6 rad) fit a full-turn calibrated range about mid-range.
SIM_CALIBRATION = {"shoulder": {"id": 1, "drive_mode": 0, "homing_offset": -180, "range_min": 0, "range_max": 4095},
                   "elbow": {"id": 2, "drive_mode": 0, "homing_offset": 250, "range_min": 0, "range_max": 4095}}
SO101_CALIBRATION = {"shoulder_pan": {"id": 1, "drive_mode": 0, "homing_offset": -1470, "range_min": 1024,
                                      "range_max": 3072},
                     "gripper": {"id": 6, "drive_mode": 1, "homing_offset": 12, "range_min": 2000, "range_max": 3400}}


def _write(directory: Path, name: str, content: str | bytes) -> str:
    path = directory / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    os.chmod(path, 0o644)  # the service user reads it, as it reads /etc/edge-vla on a robot
    return str(path)


def _lerobot_bundle(directory: Path, units: str, lower: list[float], upper: list[float]) -> str:
    """A bundle directory holding only a manifest that declares a LeRobot-read action space (names ending .pos)."""
    bundle = directory / f"bundle-{len(list(directory.iterdir()))}"
    bundle.mkdir()
    os.chmod(bundle, 0o755)
    space = {"names": ["shoulder_pan.pos", "gripper.pos"], "units": units, "lower": lower, "upper": upper,
             "max_velocity": [50.0, 50.0], "max_acceleration": [500.0, 500.0], "action_period_s": 0.033,
             "kind": "absolute_joint_position", "roles": ["joint", "joint"]}
    manifest = {"schema_version": SCHEMA_VERSION, "format": FORMAT, "model": {}, "precision": "fp32", "graphs": {},
                "normalization": {}, "action_space": space, "sampler": {}, "tokenizer": {}, "files": {},
                "provenance": {}}
    _write(bundle, MANIFEST, json.dumps(manifest))
    return str(bundle)


@pytest.fixture(scope="module")
def files() -> dict[str, str]:
    d = service_user.open_dir("edge-vla-calibration-")
    sim, so101 = json.dumps(SIM_CALIBRATION), json.dumps(SO101_CALIBRATION)
    narrow = {**SIM_CALIBRATION, "shoulder": {**SIM_CALIBRATION["shoulder"], "range_min": 1024, "range_max": 3072}}
    return {
        "sim": _write(d, "sim.json", sim),
        "sim_no_elbow": _write(d, "no_elbow.json", json.dumps({"shoulder": SIM_CALIBRATION["shoulder"]})),
        "sim_narrow": _write(d, "narrow.json", json.dumps(narrow)),
        "so101": _write(d, "so101.json", so101),
        "oversize": _write(d, "oversize.json", sim[:-1] + " " * (2 << 20) + "}"),
        "nested": _write(d, "nested.json", "[" * 200_000 + "]" * 200_000),
        "truncated": _write(d, "truncated.json", sim[: len(sim) // 2]),
        "as_recorded": _lerobot_bundle(d, "as recorded", [-100.0, 0.0], [100.0, 100.0]),
        "range_wide": _lerobot_bundle(d, "lerobot-range", [-110.0, 0.0], [100.0, 100.0]),
    }


def _edge_vla(*args: str) -> list[str]:
    users = robot_users()
    return users.edge_vla(users.service, "run", *args)


def _refusals(cases: dict[str, list[str]]) -> dict[str, tuple[int, str]]:
    """Every case as its own `edge-vla run` process (as the service user), all at once: (exit status, stderr)."""
    users = robot_users()
    procs = {name: subprocess.Popen(_edge_vla(*argv, "--control-socket", "none", "--duration", "30"),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=users.environ(),
                                    cwd="/", start_new_session=True)
             for name, argv in cases.items()}
    out = {}
    for name, proc in procs.items():
        try:
            _, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
        out[name] = (proc.returncode, err)
    return out


def _one_line(name: str, result: tuple[int, str]) -> str:
    code, err = result
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 1 and len(lines) == 1, f"{name}: exit {code}, stderr:\n{err[-3000:]}"
    assert "Traceback" not in err and "[control]" not in err, err
    assert lines[0].startswith("edge-vla run: error: "), lines[0]
    return lines[0]


def test_startup_refusals_are_one_line_and_exit_1_before_anything_loads(files: dict[str, str]) -> None:
    emu = "feetech://emulated?period_ms=100"
    expert = ["--expert", "--emulate", "--link", emu]
    results = _refusals({
        "units_mismatch": [*expert, "--calibration", files["sim"], "--action-units", "degrees"],
        "missing_joint": [*expert, "--calibration", files["sim_no_elbow"]],
        "ids_disagree": ["--expert", "--emulate", "--link", emu + "&ids=2,1", "--calibration", files["sim"]],
        "limits_wider": [*expert, "--calibration", files["sim_narrow"]],
        "no_motor_link": ["--expert", "--emulate", "--calibration", files["sim"]],
        "as_recorded": [files["as_recorded"], "--emulate", "--link", emu, "--calibration", files["so101"]],
        "range_wide": [files["range_wide"], "--emulate", "--link", emu, "--calibration", files["so101"]],
        "uncalibrated_range": [files["range_wide"], "--emulate", "--link", emu],
        "oversize": [*expert, "--calibration", files["oversize"]],
        "nested": [*expert, "--calibration", files["nested"]],
        "truncated": [*expert, "--calibration", files["truncated"]],
        "dev_zero": [*expert, "--calibration", "/dev/zero"],
        # control: past every calibration check, the manifest-only bundle fails where the model would load
        "as_recorded_with_units": [files["as_recorded"], "--emulate", "--link", emu, "--calibration", files["so101"],
                                   "--action-units", "lerobot-range"],
    })
    says = {
        "units_mismatch": "--action-units degrees contradicts the bundle, which declares its actions in 'rad'",
        "missing_joint": "has no motor for the bundle's joint(s) elbow",
        "ids_disagree": "names servo ids 2, 1 but the calibration",
        "limits_wider": "joint 'shoulder': the bundle allows 0..3.14159 rad",
        "no_motor_link": "--calibration needs a motor --link",
        "as_recorded": "declares its actions in 'as recorded'",
        "range_wide": "joint 'shoulder_pan.pos': the bundle allows -110..100 lerobot-range",
        "uncalibrated_range": "without --calibration the servos produce only rad",
        "oversize": "too large for a calibration file",
        "nested": "not valid JSON",
        "truncated": "not valid JSON",
        "dev_zero": "/dev/zero is not a regular file",
    }
    for name, fragment in says.items():
        line = _one_line(name, results[name])
        assert fragment in line, f"{name}: {line}"
    assert "range_min..range_max 1024..3072" in _one_line("limits_wider", results["limits_wider"])
    assert "1, 2" in _one_line("ids_disagree", results["ids_disagree"])
    assert "--action-units lerobot-range|degrees|rad" in _one_line("as_recorded", results["as_recorded"])
    control = _one_line("as_recorded_with_units", results["as_recorded_with_units"])
    assert not any(f in control for f in says.values()), control


def _op(sock: Path, *args: str) -> dict[str, Any]:
    users = robot_users()
    proc = subprocess.run(users.edge_vla(users.service, *args, "--control-socket", str(sock), "--json"),
                          capture_output=True, text=True, env=users.environ(), cwd="/", timeout=60)
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError:
        return {"ok": False, "error": proc.stdout + proc.stderr}


def test_a_calibrated_run_arms_against_servos_holding_the_calibrations_ids_offsets_and_range(
        files: dict[str, str]) -> None:
    sock = service_run_dir("edge-vla-calibrated-") / "control.sock"
    proc = subprocess.Popen(_edge_vla("--expert", "--emulate", "--link", "feetech://emulated?period_ms=100",
                                      "--calibration", files["sim"], "--control-socket", str(sock),
                                      "--duration", "120"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=robot_users().environ(),
                            cwd="/", start_new_session=True)

    def phase() -> str | None:
        if proc.poll() is not None:
            raise AssertionError(f"edge-vla run exited {proc.returncode}:\n{proc.communicate()[1][-3000:]}")
        return _op(sock, "status").get("phase") if sock.exists() else None

    try:
        wait_for(lambda: phase() == "disarmed", STARTUP_S, "the calibrated run to come up disarmed")
        reply = _op(sock, "arm")  # the backend checks each servo's Homing Offset against the file at arm
        assert reply.get("ok") and reply["status"]["firmware"]["mode"] == "ARMED", reply
        wait_for(lambda: phase() in ("homing", "running"), 20, "the loop to run")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-3000:]
        assert "torque off read back from every servo" in err, err[-3000:]
        assert "ids=1,2" in err, err[-3000:]  # the ids came from the calibration, in the bundle's joint order
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


@pytest.mark.parametrize("scheme", ["feetech", "dynamixel"])
def test_emulated_servos_get_the_calibrations_ids_homing_offsets_and_range(scheme: str) -> None:
    """In-process: the emulator `run --emulate` starts, and a calibrated link arms against it (control: a servo
    whose range is wider than the calibration's is refused at arm)."""
    from edge_vla.action_space import sim_action_space
    from edge_vla.onboard.cli import _motor_emulator, calibration_spec
    from firmware_bridge.errors import NackError
    from firmware_bridge.motors.calibration import parse_lerobot_calibration
    from firmware_bridge.motors.link_adapter import MotorDeviceLink

    space = sim_action_space()
    spec = calibration_spec(parse_lerobot_calibration(json.dumps(SIM_CALIBRATION)), space, None, "sim.json")
    limits = [(float(lo), float(hi)) for lo, hi in zip(space.lower, space.upper, strict=True)]

    def link(port: str) -> MotorDeviceLink:
        return MotorDeviceLink(f"{scheme}://{port}?ids=1,2&period_ms=100&latency_ms=100", units=spec,
                               joint_limits=limits, names=list(JOINT_NAMES), period_s=0.1)

    with _motor_emulator(f"{scheme}://emulated?ids=1,2", space) as emu, link(emu.port) as uncalibrated:
        uncalibrated.hello()  # control: servos emulated as before (no calibration) do not carry its offsets
        with pytest.raises(NackError, match="Homing Offset 0 but the LeRobot calibration says -180"):
            uncalibrated.arm()
    with _motor_emulator(f"{scheme}://emulated", space, spec) as emu:
        homing = [emu.snapshot(i).get("homing_offset") for i in (1, 2)] if scheme == "feetech" else None
        with link(emu.port) as calibrated:
            calibrated.hello()
            calibrated.arm()
            assert calibrated.device.armed
            calibrated.poll()
            assert np.all(calibrated.latest_state.positions >= space.lower - 1e-3)
            assert np.all(calibrated.latest_state.positions <= space.upper + 1e-3)
            calibrated.stop(0)
    if homing is not None:
        assert homing == [-180, 250]


def test_the_robots_following_error_limits_are_converted_to_the_bundles_units(tmp_path: Path) -> None:
    """The robot configuration's following-error limit is radians (default 0.5); positions reach the loop in the
    bundle's units, so the limit is scaled by each joint's slope. Unscaled, 0.5 of LeRobot's -100..100 is ~8 ticks
    and a calibrated run tripped within a second of arming (found running a LeRobot-unit bundle on the emulator)."""
    import argparse

    from edge_vla.action_space import ActionSpace
    from edge_vla.onboard.cli import _control_config, calibration_spec, configure
    from firmware_bridge.motors.calibration import parse_lerobot_calibration
    from firmware_bridge.motors.units import UnitMap

    parser = argparse.ArgumentParser()
    configure(parser)
    args = parser.parse_args(["--expert", "--robot-config", str(_write(tmp_path, "robot.conf", ""))])
    space = ActionSpace(("shoulder_pan.pos", "gripper.pos"), "lerobot-range", np.array([-100.0, 0.0]),
                        np.array([100.0, 100.0]), np.array([50.0, 50.0]), np.array([500.0, 500.0]), 0.033).validate()
    spec = calibration_spec(parse_lerobot_calibration(json.dumps(SO101_CALIBRATION)), space, None, "so101.json")
    url = "feetech:///dev/null?ids=1,6"
    radians = _control_config(args, url, space).tracking.max_position_error  # control: the robot's own (rad)
    assert radians.tolist() == [0.5, 0.5]
    converted = _control_config(args, url, space, None, spec).tracking.max_position_error
    from firmware_bridge.motors.feetech import FeetechDevice

    slopes = np.abs(UnitMap.for_backend(spec, FeetechDevice).slopes())
    assert converted.tolist() == (0.5 * slopes).tolist()
    assert converted[0] == pytest.approx(0.5 * 200 / 2048 * 4095 / (2 * np.pi))  # ~31.8 of -100..100


def test_emulating_feetech_servos_refuses_a_homing_offset_they_cannot_hold() -> None:
    """STS Homing Offset is 11 bits of magnitude: the emulated servo could not start (a traceback from its
    process); refused in one line instead, naming the motor. Control: Dynamixel's 4-byte register holds it."""
    from edge_vla.action_space import sim_action_space
    from edge_vla.errors import ConfigError
    from edge_vla.onboard.cli import _calibrated_servos, calibration_spec
    from firmware_bridge.motors.calibration import parse_lerobot_calibration

    big = {**SIM_CALIBRATION, "elbow": {**SIM_CALIBRATION["elbow"], "homing_offset": 5000}}
    space = sim_action_space()
    spec = calibration_spec(parse_lerobot_calibration(json.dumps(big)), space, None, "big.json")
    with pytest.raises(ConfigError, match="motor 'elbow' has homing_offset 5000, which no Feetech STS servo holds"):
        _calibrated_servos("feetech://emulated", space, spec)
    assert [s[4] for s in _calibrated_servos("dynamixel://emulated", space, spec)] == [-180, 5000]
