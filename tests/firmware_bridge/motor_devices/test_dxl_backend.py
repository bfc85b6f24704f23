"""The dynamixel:// backend against the emulator in its own process, on a real pty at 1 Mbaud."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from motor_helpers import drive, servo_configs

from firmware_bridge.motors import ArmRefusedError, FaultLatchedError, StopCategory, open_device
from firmware_bridge.motors import dynamixel_emulator as emu
from firmware_bridge.motors.dynamixel import DynamixelDevice
from firmware_bridge.motors.dynamixel_emulator import EmulatorProcess, ServoConfig

IDS = (1, 2, 3)
LIMITS = [(-1.6, 1.6)] * len(IDS)  # rad around mid-range (tick 2048)
SAFE = {"min_position": 1024, "max_position": 3072}  # +-1.571 rad: inside LIMITS
PERIOD_MS = 100  # Bus Watchdog 200 ms: room for a loaded 2-core CI machine (the emulator is a process there too)
# A reply is awaited 2 x 100 ms + wire time (the SDK assumes a 16 ms adapter latency: 34 ms, which a descheduled
# emulator process missed on a loaded machine, "There is no status packet").
BUS = f"ids=1-3&period_ms={PERIOD_MS}&latency_ms=100"


def servos(**kw: object) -> list[ServoConfig]:
    return servo_configs(ServoConfig, "dxl_id", IDS, **{**SAFE, **kw})


@pytest.fixture
def emulator():  # type: ignore[no-untyped-def]
    with EmulatorProcess(servos()) as e:
        yield e


def device(e: EmulatorProcess, period_ms: int = PERIOD_MS, **kw: object) -> DynamixelDevice:
    url = f"dynamixel://{e.port}?ids=1-3&period_ms={period_ms}&latency_ms=100"
    return open_device(url, joint_limits=LIMITS, **kw)  # type: ignore[return-value]


def cycle(dev: DynamixelDevice, target: float, n: int) -> np.ndarray:
    return drive(dev, target, n, PERIOD_MS / 1000 / 4)


def test_arm_writes_watchdog_and_torque_and_no_eeprom(emulator: EmulatorProcess) -> None:
    eeprom_before = [[emulator.register(i, a) for a in (9, 11, 20, 48, 52)] for i in IDS]
    with device(emulator) as dev:
        assert [emulator.register(i, emu.TORQUE_ENABLE) for i in IDS] == [0, 0, 0]  # control: open() arms nothing
        dev.arm()
        assert [emulator.register(i, emu.TORQUE_ENABLE) for i in IDS] == [1, 1, 1]
        assert [emulator.register(i, emu.BUS_WATCHDOG) for i in IDS] == [PERIOD_MS * 2 // 20] * 3
        assert dev.capabilities.watchdog_period_s == pytest.approx(2 * PERIOD_MS / 1000)
    assert [[emulator.register(i, a) for a in (9, 11, 20, 48, 52)] for i in IDS] == eeprom_before
    assert [emulator.register(i, emu.TORQUE_ENABLE) for i in IDS] == [0, 0, 0]  # close() torques off


@pytest.mark.parametrize(("firmware", "arms"), [(37, False), (38, True)])
def test_firmware_older_than_the_bus_watchdog_is_refused(firmware: int, arms: bool) -> None:
    with EmulatorProcess(servos(firmware_version=firmware)) as e, device(e) as dev:
        if arms:
            dev.arm()
        else:
            with pytest.raises(ArmRefusedError, match=r"runs firmware v37; the Bus Watchdog needs v38"):
                dev.arm()
        assert e.register(1, emu.TORQUE_ENABLE) == int(arms)


def test_device_limits_wider_than_the_configuration_are_refused_in_one_line() -> None:
    with EmulatorProcess(servos(min_position=0, max_position=4095)) as e, device(e, names=["pan", "lift", "elbow"]) as dev:
        with pytest.raises(ArmRefusedError) as err:
            dev.arm()
        message = str(err.value)
        assert "\n" not in message and "joint 'pan'" in message
        assert "-3.142..3.140 rad" in message and "-1.600..1.600 rad" in message
        assert e.register(1, emu.TORQUE_ENABLE) == 0


def test_extended_position_mode_needs_host_limits() -> None:
    with EmulatorProcess(servos(operating_mode=4)) as e:
        with device(e) as dev, pytest.raises(ArmRefusedError, match="enforces no position limit"):
            dev.arm()
        with open_device(f"dynamixel://{e.port}?{BUS}&host_limits=1",
                         joint_limits=LIMITS) as dev:
            dev.arm()  # control: the operator accepted host-side limits
            assert dev.armed


def test_a_cycle_reads_state_and_writes_clamped_goals(emulator: EmulatorProcess) -> None:
    with device(emulator) as dev:
        dev.arm()
        state = dev.poll_state()
        assert np.allclose(state.positions, 0.0, atol=1e-3) and state.positions.shape == (3,)
        sent = cycle(dev, 0.5, 25)
        assert np.allclose(sent, 0.5, atol=2 * math.pi / 4096)
        assert emulator.register(2, emu.GOAL_POSITION) == 2048 + round(0.5 * 4096 / (2 * math.pi))
        assert emulator.wait_until(lambda: abs(emulator.snapshot(1)["position"] - 2374) < 5, 2.0)
        assert np.allclose(dev.poll_state().positions, 0.5, atol=0.01)
        clamped = dev.write_setpoints([5.0, -5.0, 0.0])  # LeRobot habit: returns what was sent
        assert clamped[0] == pytest.approx((3072 - 2048) * 2 * math.pi / 4096)  # the device's limit is tighter
        assert clamped[1] == pytest.approx((1024 - 2048) * 2 * math.pi / 4096)
        with pytest.raises(Exception, match="non-finite position for joint 'joint3'"):
            dev.write_setpoints([0.0, 0.0, float("nan")])


def test_watchdog_trips_when_the_host_stops_cycling_and_latches_until_clear(emulator: EmulatorProcess) -> None:
    # An 80 ms watchdog, so that it expires mid-motion: a spurious early trip on a loaded machine would pass this
    # test too (it trips anyway); the control case below keeps the longer watchdog.
    with device(emulator, period_ms=40) as dev:
        dev.arm()
        cycle(dev, 0.8, 3)  # moving toward 0.8 rad
        silent_since = time.monotonic()
        assert emulator.wait_until(lambda: len(emulator.events_of("watchdog_expired")) == 3, 2.0)
        period = dev.capabilities.watchdog_period_s
        for event in emulator.events_of("watchdog_expired"):
            # Never early. The upper bounds only catch a watchdog that was not armed (it would never fire) or
            # armed far too long: the emulator's own tick thread can be descheduled for 100+ ms on a shared
            # 2-core machine, so a tight bound here measured the scheduler, not the device (it flaked at 0.167 s).
            assert period <= event.detail["since_last_instruction"] <= period + 0.5
            assert event.t - silent_since <= period + 0.5
        snap = [emulator.snapshot(i) for i in IDS]
        assert all(s["torque"] and s["holding"] and s["bus_watchdog"] == 0xFF for s in snap)  # stopped, torque on
        held = emulator.snapshot(1)["position"]
        assert abs(held - 2048 - 0.8 * 4096 / (2 * math.pi)) > 20  # it stopped short of the goal
        # the host comes back: the fault is found, latched, and every servo torqued off (category 0)
        dev.poll_state()
        assert {f.code for f in dev.faults} == {"bus_watchdog"} and not dev.armed
        assert [emulator.register(i, emu.TORQUE_ENABLE) for i in IDS] == [0, 0, 0]
        with pytest.raises(FaultLatchedError):
            dev.write_setpoints([0.0] * 3)
        with pytest.raises(FaultLatchedError):
            dev.arm()
        dev.clear_faults()  # operator act
        assert [emulator.register(i, emu.BUS_WATCHDOG) for i in IDS] == [0, 0, 0] and dev.faults == []
        dev.arm()
        assert dev.armed


def test_control_a_host_that_keeps_cycling_never_trips(emulator: EmulatorProcess) -> None:
    with device(emulator) as dev:
        dev.arm()
        deadline = time.monotonic() + 4 * dev.capabilities.watchdog_period_s
        while time.monotonic() < deadline:
            cycle(dev, 0.3, 1)
        assert emulator.events_of("watchdog_expired") == [] and dev.faults == []


@pytest.mark.parametrize("category", [StopCategory.TORQUE_OFF, StopCategory.CONTROLLED])
def test_stops_end_in_torque_off_read_back(emulator: EmulatorProcess, category: StopCategory) -> None:
    with device(emulator) as dev:
        dev.arm()
        cycle(dev, 1.2, 2)  # moving fast toward 1.2 rad
        assert dev.stop(category) is True and not dev.armed
        assert [emulator.register(i, emu.TORQUE_ENABLE) for i in IDS] == [0, 0, 0]
        goal, position = emulator.register(1, emu.GOAL_POSITION), emulator.snapshot(1)["position"]
        far_goal = 2048 + round(1.2 * 4096 / (2 * math.pi))
        if category is StopCategory.CONTROLLED:  # decelerated to hold: the last goal is where it stopped
            assert abs(goal - position) < 30 and goal < far_goal - 100
        else:  # torque off now: the last goal is still the far one
            assert goal == far_goal


def test_hardware_error_latches_with_its_reason(emulator: EmulatorProcess) -> None:
    with device(emulator, names=["pan", "lift", "elbow"]) as dev:
        dev.arm()
        cycle(dev, 0.2, 2)
        assert dev.faults == []  # control: nothing latched before the injection
        emulator.inject_hardware_error(3, emu.HW_OVERLOAD)
        dev.poll_state()
        assert [str(f) for f in dev.faults] == ["elbow: hardware_error (overload error)"]
        assert [emulator.register(i, emu.TORQUE_ENABLE) for i in IDS] == [0, 0, 0] and not dev.armed
        with pytest.raises(FaultLatchedError, match="overload error"):
            dev.arm()
        dev.clear_faults()
        assert [e.dxl_id for e in emulator.events_of("reboot")] == [3]  # only the faulted servo rebooted
        assert emulator.register(3, emu.HARDWARE_ERROR_STATUS) == 0
        dev.arm()


def test_blocked_joint_trips_overload_and_is_reported(emulator: EmulatorProcess) -> None:
    with device(emulator) as dev:
        dev.arm()
        emulator.block_joint(2)
        deadline = time.monotonic() + 3.0
        while not dev.faults and time.monotonic() < deadline:
            dev.poll_state()  # the fault is found by the read; the goal write after it is then refused
            if not dev.faults:
                dev.write_setpoints([0.6] * 3)
            time.sleep(PERIOD_MS / 4000)
        assert [(f.joint, f.reason) for f in dev.faults] == [("joint2", "overload error")]


def test_a_servo_that_restarts_mid_run_is_found_and_latched(emulator: EmulatorProcess) -> None:
    """A rebooted X-series servo comes back torque off with its Bus Watchdog at 0: nothing expires, and the others
    keep moving. The periodic check reads Torque Enable with the watchdog and latches torque_lost (it was missed:
    the fault campaign found the run still `running` 3 s after one servo rebooted)."""
    from firmware_bridge.motors import MotorBusError

    with device(emulator) as dev:
        dev.arm()
        cycle(dev, 0.1, 3)
        emulator.power_cycle(2)
        deadline = time.monotonic() + 10.0
        while not dev.faults and time.monotonic() < deadline:
            try:
                cycle(dev, 0.1, 1)
            except MotorBusError:
                pass  # deaf while it restarts: the read times out
            except FaultLatchedError:
                break
        # While it is deaf the bus stalls on its reads, so the others' watchdogs may expire too (also latched).
        assert ("joint2", "torque_lost") in [(f.joint, f.code) for f in dev.faults]
        assert not dev.armed and [emulator.register(i, emu.TORQUE_ENABLE) for i in IDS] == [0, 0, 0]
