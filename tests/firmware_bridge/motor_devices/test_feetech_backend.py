"""The feetech:// backend against the emulator in its own process, on a real pty at 1 Mbaud."""

from __future__ import annotations

import json
import logging
import math
import time

import numpy as np
import pytest

pytest.importorskip("scservo_sdk", reason="feetech-servo-sdk is not installed (pip install 'edge-vla[feetech]')")

from motor_helpers import drive, servo_configs

from firmware_bridge.motors import (
    ArmRefusedError,
    FaultLatchedError,
    MotorBusError,
    StopCategory,
    open_device,
    schemes,
)
from firmware_bridge.motors import feetech_emulator as emu
from firmware_bridge.motors.calibration import parse_lerobot_calibration
from firmware_bridge.motors.feetech import FeetechDevice
from firmware_bridge.motors.feetech_emulator import EmulatorProcess, ServoConfig

IDS = (1, 2, 3)
LIMITS = [(-1.6, 1.6)] * len(IDS)  # rad around mid-range (tick 2048)
SAFE = {"min_angle": 1024, "max_angle": 3072}  # +-1.571 rad: inside LIMITS
TICK = 2 * math.pi / 4096


def servos(**kw: object) -> list[ServoConfig]:
    return servo_configs(ServoConfig, "servo_id", IDS, **{**SAFE, **kw})


@pytest.fixture
def emulator():  # type: ignore[no-untyped-def]
    with EmulatorProcess(servos()) as e:
        yield e


# The SDK waits 2 x latency_ms + 2 ms for a reply (34 ms at its 16 ms default); an emulator process descheduled on a
# loaded 2-core box missed that once in CI ("servo id 1 did not answer the sync read"). Real servos answer in
# microseconds; the dynamixel tests give the emulator the same 100 ms.
LATENCY_MS = 100


def device(e: EmulatorProcess, **kw: object) -> FeetechDevice:
    url = f"feetech://{e.port}?ids=1-3&latency_ms={LATENCY_MS}"
    return open_device(url, joint_limits=LIMITS, **kw)  # type: ignore[return-value]


def cycle(dev: FeetechDevice, target: float, n: int) -> np.ndarray:
    return drive(dev, target, n, 0.005)


def torques(e: EmulatorProcess) -> list[int]:
    return [e.register(i, emu.TORQUE_ENABLE) for i in IDS]


def test_no_device_watchdog_is_said_everywhere(emulator: EmulatorProcess, caplog: pytest.LogCaptureFixture) -> None:
    assert "NO device watchdog" in schemes()["feetech"]
    with device(emulator) as dev:
        caps = dev.capabilities
        assert not caps.has_device_watchdog and caps.watchdog_period_s == 0
        assert "holding their last goal with torque on" in caps.on_watchdog_expiry
        for _ in range(2):  # a WARNING at every arm, not only the first
            with caplog.at_level(logging.WARNING, logger="firmware_bridge.motors.feetech"):
                caplog.clear()
                dev.arm()
            assert "NO communication watchdog" in caplog.text and "kill -9" in caplog.text and "E-stop" in caplog.text
            dev.stop()


def test_arm_enables_torque_and_writes_no_eeprom_and_never_128(emulator: EmulatorProcess) -> None:
    with device(emulator) as dev:
        assert torques(emulator) == [0, 0, 0]  # control: open() arms nothing
        dev.arm()
        assert torques(emulator) == [1, 1, 1]
        cycle(dev, 0.3, 5)
        dev.stop(StopCategory.CONTROLLED)
        dev.arm()
    assert torques(emulator) == [0, 0, 0]  # close() torques off
    assert emulator.events_of("eeprom_write") == [] and emulator.events_of("recentre") == []
    assert emulator.events_of("lock") == []  # the Lock flag is checked, never written
    assert {e.detail["value"] for e in emulator.events_of("torque")} == {0, 1}


def test_a_cycle_reads_state_and_writes_clamped_goals(emulator: EmulatorProcess) -> None:
    with device(emulator) as dev:
        dev.arm()
        state = dev.poll_state()
        assert np.allclose(state.positions, 0.0, atol=1e-3) and state.positions.shape == (3,)
        sent = cycle(dev, -0.5, 5)  # a goal below mid-range: positive ticks, negative radians
        assert np.allclose(sent, -0.5, atol=TICK)
        assert emulator.register(2, emu.GOAL_POSITION) == 2048 + round(-0.5 / TICK)
        assert emulator.wait_until(lambda: abs(emulator.snapshot(1)["position"] - (2048 - 326)) < 5, 5.0)
        moving = [dev.poll_state()]
        assert np.allclose(moving[0].positions, -0.5, atol=0.01)
        dev.write_setpoints([0.5, 0.5, 0.5])
        assert emulator.wait_until(lambda: abs(emulator.snapshot(1)["velocity"]) > 500, 5.0)
        assert dev.poll_state().velocities[0] > 1.0  # positive speed decoded from sign-magnitude
        clamped = dev.write_setpoints([5.0, -5.0, 0.0])
        assert clamped[0] == pytest.approx((3072 - 2048) * TICK)  # the device's limit is tighter
        assert clamped[1] == pytest.approx((1024 - 2048) * TICK)
        with pytest.raises(Exception, match="non-finite position for joint 'joint3'"):
            dev.write_setpoints([0.0, 0.0, float("nan")])


@pytest.mark.parametrize("category", [StopCategory.TORQUE_OFF, StopCategory.CONTROLLED])
def test_stops_end_in_torque_off_read_back_from_each_id(emulator: EmulatorProcess, category: StopCategory) -> None:
    with device(emulator) as dev:
        dev.arm()
        far_goal = 2048 + round(1.2 / TICK)
        cycle(dev, 1.2, 2)
        assert emulator.wait_until(lambda: abs(emulator.snapshot(1)["velocity"]) > 500, 5.0)  # moving fast
        assert dev.stop(category) is True and not dev.armed
        assert torques(emulator) == [0, 0, 0]
        reads = [e for e in emulator.events_of("torque") if e.detail["value"] == 0]
        assert sorted(e.servo_id for e in reads) == list(IDS)  # one acknowledged write per id, no broadcast
        goal, position = emulator.register(1, emu.GOAL_POSITION), emulator.snapshot(1)["position"]
        if category is StopCategory.CONTROLLED:  # braked to hold first: the last goal is where it stopped
            assert abs(goal - position) < 30 and goal < far_goal - 50
        else:  # torque off now: the last goal is still the far one
            assert goal == far_goal


def test_device_limits_wider_than_the_configuration_are_refused_in_one_line() -> None:
    with EmulatorProcess(servos(min_angle=0, max_angle=4095)) as e, \
            device(e, names=["pan", "lift", "elbow"]) as dev:
        with pytest.raises(ArmRefusedError) as err:
            dev.arm()
        message = str(err.value)
        assert "\n" not in message and "joint 'pan'" in message
        assert "-3.142..3.140 rad" in message and "-1.600..1.600 rad" in message
        assert torques(e) == [0, 0, 0]


@pytest.mark.parametrize(("cfg", "says"), [
    ({"lock": 0}, r"EEPROM unlocked \(Lock 55 = 0\)"),
    ({"min_angle": 0, "max_angle": 0}, "multi-turn"),
    ({"operating_mode": 3}, "operating mode 3"),
    ({"initial_position": 3500, "min_angle": 1024, "max_angle": 3072}, "outside its limits"),
])
def test_unsafe_device_configurations_are_refused(cfg: dict, says: str) -> None:
    with EmulatorProcess(servos(**cfg)) as e, device(e) as dev:
        with pytest.raises(ArmRefusedError, match=says):
            dev.arm()
        assert torques(e) == [0, 0, 0]


def test_scs_servos_are_refused_at_open_in_one_line() -> None:
    big_endian_scs0009 = 0x0405  # model 1284 stored big-endian reads as 1029 little-endian
    with EmulatorProcess([ServoConfig(servo_id=1, return_delay=0, model_number=big_endian_scs0009)]) as e:
        with pytest.raises(MotorBusError) as err:
            open_device(f"feetech://{e.port}?ids=1&latency_ms={LATENCY_MS}", joint_limits=[(-1, 1)])
        assert "\n" not in str(err.value) and "SCS-series servo (SCS0009)" in str(err.value)


def test_lerobot_calibration_homing_offset_is_checked_not_applied_twice() -> None:
    cal = {f"m{i}": {"id": i, "drive_mode": 0, "homing_offset": -300, "range_min": 1024, "range_max": 3072}
           for i in IDS}
    motors = parse_lerobot_calibration(json.dumps(cal))
    with EmulatorProcess(servos(homing_offset=-300)) as e:
        with open_device(f"feetech://{e.port}?ids=1-3&latency_ms={LATENCY_MS}", joint_limits=LIMITS,
                         lerobot_calibration=motors) as dev:
            dev.arm()
            # the servo reports 2048 with its offset applied: LeRobot's DEGREES gives 0 at mid-range, and so do we
            assert np.allclose(dev.poll_state().positions, (2048 - 2048) * TICK, atol=1e-3)
        e.set_register(2, emu.HOMING_OFFSET, 12)
        with open_device(f"feetech://{e.port}?ids=1-3&latency_ms={LATENCY_MS}", joint_limits=LIMITS,
                         lerobot_calibration=motors) as dev, \
                pytest.raises(ArmRefusedError, match="m2.*Homing Offset 12 but the LeRobot calibration says -300"):
            dev.arm()


def test_overload_latches_with_its_reason_and_stops(emulator: EmulatorProcess) -> None:
    with device(emulator, names=["pan", "lift", "elbow"]) as dev:
        dev.arm()
        cycle(dev, 0.2, 2)
        assert dev.faults == []  # control: nothing latched before the injection
        emulator.inject_error(3, emu.ERR_OVERLOAD)
        dev.poll_state()
        assert [str(f) for f in dev.faults] == ["elbow: servo_error (overload error)"]
        assert torques(emulator) == [0, 0, 0] and not dev.armed
        with pytest.raises(FaultLatchedError, match="overload error"):
            dev.write_setpoints([0.0] * 3)
        with pytest.raises(FaultLatchedError, match="overload error"):
            dev.arm()
        dev.clear_faults()  # operator act: torque is off, the servo's bit has cleared
        dev.arm()
        assert dev.armed


def test_blocked_joint_trips_overload_and_is_reported(emulator: EmulatorProcess) -> None:
    with device(emulator) as dev:
        dev.arm()
        emulator.block_joint(2)
        deadline = time.monotonic() + 5.0
        while not dev.faults and time.monotonic() < deadline:
            dev.poll_state()
            if not dev.faults:
                dev.write_setpoints([0.6] * 3)
            time.sleep(0.005)
        assert [(f.joint, f.reason) for f in dev.faults] == [("joint2", "overload error")]
        assert torques(emulator) == [0, 0, 0]


def test_a_servo_that_restarts_mid_run_is_found_and_latched(emulator: EmulatorProcess) -> None:
    with device(emulator) as dev:
        dev.arm()
        cycle(dev, 0.1, 3)
        emulator.power_cycle(2)
        deadline = time.monotonic() + 5.0
        while not dev.faults and time.monotonic() < deadline:
            try:
                cycle(dev, 0.1, 1)
            except MotorBusError:
                pass  # deaf while it restarts: the read times out
            except FaultLatchedError:
                break  # found by the poll: the setpoint after it is refused
        assert [(f.joint, f.code) for f in dev.faults] == [("joint2", "torque_lost")]
        assert not dev.armed and torques(emulator) == [0, 0, 0]


def test_signal_handlers_are_installed_at_arm_and_given_back_at_stop(emulator: EmulatorProcess) -> None:
    import signal

    from firmware_bridge.motors.feetech import _ExitHooks

    before = signal.getsignal(signal.SIGTERM)
    with device(emulator) as dev:
        assert signal.getsignal(signal.SIGTERM) == before  # control: open() installs nothing
        dev.arm()
        assert signal.getsignal(signal.SIGTERM) == _ExitHooks.on_signal
        dev.stop()
        assert signal.getsignal(signal.SIGTERM) == before  # the host gets its own handler back


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_rearming_after_a_stop_keeps_the_hosts_signal_handler_chained(emulator: EmulatorProcess, signame: str) -> None:
    """Arm, stop, arm, SIGTERM: torque off, then the host's own handler, once. (The hook compared bound methods
    with `is`, never true: after the first stop it did not restore the host's handler, and the re-arm recorded
    its own handler as the host's, so a SIGTERM recursed until the process died without its summary.)"""
    import os
    import signal

    calls: list[int] = []
    sig = getattr(signal, signame)

    def host(signum: int, frame: object) -> None:
        calls.append(signum)

    original = signal.signal(sig, host)
    try:
        with device(emulator) as dev:
            dev.arm()
            dev.stop()
            assert signal.getsignal(sig) is host  # nothing armed: the host's handler is back
            dev.arm()
            assert torques(emulator) == [1, 1, 1]
            os.kill(os.getpid(), sig)
            assert emulator.wait_until(lambda: torques(emulator) == [0, 0, 0], 5.0)
            assert calls == [sig]  # the host's handler ran once, after the torque-off
            assert signal.getsignal(sig) is host
    finally:
        signal.signal(sig, original)


def test_servos_found_with_torque_on_at_open_latch_until_the_operator_clears(emulator: EmulatorProcess) -> None:
    """A host that died (kill -9) leaves Feetech servos driving to its last goal; the next host used to report
    "disarmed" with the arm powered. Now the open latches found_torque_on, arming is refused, and the operator's
    clear_faults turns torque off (read back) first."""
    with device(emulator) as previous:  # stands in for the host that died: torque on, never stopped
        previous._write(2, emu.TORQUE_ENABLE, [1])
    assert torques(emulator) == [0, 1, 0]
    with device(emulator) as dev:
        assert [(f.joint, f.code) for f in dev.faults] == [("joint2", "found_torque_on")]
        with pytest.raises(FaultLatchedError):
            dev.arm()
        assert torques(emulator) == [0, 1, 0]  # nothing is switched by the open itself
        dev.clear_faults()
        assert torques(emulator) == [0, 0, 0] and not dev.faults
        dev.arm()
        assert torques(emulator) == [1, 1, 1]
    # Control: a bus left torque off opens clean.
    with device(emulator) as dev:
        assert not dev.faults
