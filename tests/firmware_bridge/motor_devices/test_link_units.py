"""MotorDeviceLink with a LeRobot calibration: the control loop's setpoints and states are in the bundle's units,
and the servos receive exactly the ticks LeRobot's `_unnormalize` gives (emulators on real ptys at 1 Mbaud)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

pytest.importorskip("scservo_sdk", reason="feetech-servo-sdk is not installed (pip install 'edge-vla[feetech]')")

from firmware_bridge.errors import NackError
from firmware_bridge.motors import dynamixel_emulator as dxl
from firmware_bridge.motors import feetech_emulator as ft
from firmware_bridge.motors.calibration import JointCalibration, LeRobotMotor
from firmware_bridge.motors.link_adapter import MotorDeviceLink
from firmware_bridge.motors.units import ActionUnits, UnitSpec

# An SO-101-like pair: the gripper wired reversed (drive_mode 1), homing offsets as LeRobot writes them.
CALIBRATION = {"shoulder_pan": LeRobotMotor("shoulder_pan", 3, 0, -1470, 1000, 3100),
               "gripper": LeRobotMotor("gripper", 6, 1, 37, 1900, 3350)}
JOINTS = ("shoulder_pan.pos", "gripper.pos")
LIMITS = [(-100.0, 100.0), (0.0, 100.0)]
START = (1500, 2600)  # present positions (the servo's homing offset already applied)
APPLY_DRIVE_MODE = {"feetech": True, "dynamixel": False}  # LeRobot's FeetechMotorsBus / DynamixelMotorsBus


def _servos(scheme: str, homing: dict[str, int] | None = None) -> list[Any]:
    homing = homing or {}
    out = []
    for m, start in zip(CALIBRATION.values(), START, strict=True):
        offset = homing.get(m.name, m.homing_offset)
        if scheme == "feetech":
            out.append(ft.ServoConfig(servo_id=m.id, min_angle=m.range_min, max_angle=m.range_max,
                                      homing_offset=offset, initial_position=start, return_delay=0))
        else:
            out.append(dxl.ServoConfig(dxl_id=m.id, min_position=m.range_min, max_position=m.range_max,
                                       homing_offset=offset, initial_position=start, return_delay=0))
    return out


@pytest.fixture(params=["feetech", "dynamixel"])
def bus(request: pytest.FixtureRequest) -> Iterator[Any]:
    module = ft if request.param == "feetech" else dxl
    with module.EmulatorProcess(_servos(request.param)) as emu:
        emu.scheme = request.param
        yield emu


def _link(emu: Any, units: ActionUnits = ActionUnits.LEROBOT_RANGE,
          limits: list[tuple[float, float]] = LIMITS) -> MotorDeviceLink:
    spec = UnitSpec.build(CALIBRATION, JOINTS, None, units)
    # period_s 0.1: a 200 ms Bus Watchdog, so a starved 2-core test box does not trip it between writes; a
    # reply is awaited 2 x latency_ms (the SDK's 16 ms default is 34 ms, which a descheduled emulator can miss)
    return MotorDeviceLink(f"{emu.scheme}://{emu.port}?ids=3,6&latency_ms=100", units=spec, joint_limits=limits,
                           names=list(JOINTS), period_s=0.1)


def _goals(emu: Any) -> list[int]:
    register = ft.GOAL_POSITION if emu.scheme == "feetech" else dxl.GOAL_POSITION
    return [emu.register(m.id, register) for m in CALIBRATION.values()]


def test_setpoints_in_lerobot_range_reach_the_servos_as_lerobots_unnormalize_ticks(bus: Any) -> None:
    apply = APPLY_DRIVE_MODE[bus.scheme]
    pan, grip = CALIBRATION.values()
    with _link(bus) as link:
        caps = link.hello()
        assert [(j.position_min, j.position_max) for j in caps.joints] == LIMITS  # the loop sees the bundle's units
        assert link.units is not None
        modes = [j.mode for j in link.units.joints]
        link.poll()
        # States are LeRobot's _normalize of the present ticks, the homing offset not added again by the host.
        assert link.latest_state.positions.tolist() == [
            m.normalize(p, mode, apply_drive_mode=apply) for m, p, mode in zip((pan, grip), START, modes, strict=True)]
        link.arm()
        for target in ([-73.37, 12.5], [99.99, 87.04], [0.0, 55.55], [-100.0, 0.0]):
            sent = link.send_setpoints(np.array(target))
            want = [m.unnormalize(v, mode, apply_drive_mode=apply)
                    for m, v, mode in zip((pan, grip), target, modes, strict=True)]
            bus.wait_until(lambda w=want: _goals(bus) == w, 2.0)  # the sync write is not acknowledged: in flight
            assert _goals(bus) == want, (bus.scheme, target)
            # What the link reports as sent is LeRobot's reading of those ticks: the round trip's truncation only.
            assert sent.positions.tolist() == [m.normalize(t, mode, apply_drive_mode=apply)
                                               for m, t, mode in zip((pan, grip), want, modes, strict=True)]
        # Control: without the unit layer these numbers would have been radians about tick 2048.
        assert JointCalibration().to_ticks(-100.0) != pan.unnormalize(-100.0, modes[0], apply_drive_mode=apply)
        link.stop(0)


def test_states_and_velocities_come_back_in_the_bundles_units(bus: Any) -> None:
    pan = CALIBRATION["shoulder_pan"]
    half = (pan.range_max - pan.range_min) / 2 * 360 / 4095  # the servo's own limits, in degrees
    with _link(bus, ActionUnits.DEGREES, [(-half, half), (0.0, 100.0)]) as link:
        link.hello()
        umap = link.units
        assert umap is not None and umap.slopes()[0] == pytest.approx(57.29577951308232)  # degrees per radian
        seen = []  # what the device itself reported (radians), one read per link.poll()
        device_poll = link.device.poll_state
        link.device.poll_state = lambda: seen.append(device_poll()) or seen[-1]  # type: ignore[method-assign]
        link.arm()
        for _ in range(300):  # drive the body joint until the plant reports a velocity
            link.send_setpoints(np.array([60.0, 50.0]))
            link.poll()
            if abs(seen[-1].velocities[0]) > 0.05:
                break
        raw, st = seen[-1], link.latest_state
        assert abs(raw.velocities[0]) > 0.05, "the plant never moved"
        assert st.velocities.tolist() == (umap.slopes() * raw.velocities).tolist()
        assert st.positions.tolist() == umap.from_radians(raw.positions).tolist()
        assert st.positions[0] == pytest.approx(np.degrees(raw.positions[0]), abs=1e-9)  # DEGREES = rad * 180/pi
        link.stop(0)


def test_a_homing_offset_that_differs_from_the_file_still_refuses_the_arm() -> None:
    """The homing offset lives in the servo: the backend checks it against the file (never applies it)."""
    with ft.EmulatorProcess(_servos("feetech", {"gripper": 40})) as emu:
        emu.scheme = "feetech"
        with _link(emu) as link:
            link.hello()
            with pytest.raises(NackError, match="Homing Offset 40 but the LeRobot calibration says 37"):
                link.arm()
    with ft.EmulatorProcess(_servos("feetech")) as emu:  # control: the file's offsets arm
        emu.scheme = "feetech"
        with _link(emu) as link:
            link.hello()
            link.arm()
            assert link.device.armed
            link.stop(0)


def test_bundle_limits_wider_than_the_calibration_are_refused_before_the_device_is_built() -> None:
    spec = UnitSpec.build(CALIBRATION, JOINTS, None, ActionUnits.LEROBOT_RANGE)
    with pytest.raises(ValueError, match=r"joint 'gripper.pos': the bundle allows 0..110 lerobot-range"):
        MotorDeviceLink("feetech:///dev/null?ids=3,6", units=spec, joint_limits=[(-100, 100), (0, 110)],
                        names=list(JOINTS))
    with pytest.raises(ValueError, match="names servo ids 6, 3 but the calibration gives ids 3, 6"):
        MotorDeviceLink("feetech:///dev/null?ids=6,3", units=spec, joint_limits=LIMITS, names=list(JOINTS))
    MotorDeviceLink("feetech:///dev/null?ids=3,6", units=spec, joint_limits=LIMITS, names=list(JOINTS))  # control
