"""The damiao:// backend (MIT mode over python-can) against emulated motors in their own process.

python-can's `virtual` interface only connects buses inside one process, so the emulator process and the backend
meet on python-can's `udp_multicast` interface (its cross-process virtual bus), one multicast group and port per
test. Every safety check here has a control that shows the probe can tell "applied" from "ignored"."""

from __future__ import annotations

import socket
import time
import uuid
from urllib.parse import parse_qsl

import can
import numpy as np
import pytest
from motor_helpers import drive

from firmware_bridge.motors import ArmRefusedError, FaultLatchedError, MotorUrlError, StopCategory
from firmware_bridge.motors import damiao as dm
from firmware_bridge.motors import damiao_emulator as emu
from firmware_bridge.motors.damiao import DamiaoDevice
from firmware_bridge.motors.damiao_emulator import EmulatorProcess, MotorConfig

IDS = (1, 2, 3)
LIMITS = [(-1.6, 1.6)] * len(IDS)
PERIOD_MS = 50  # TIMEOUT 100 ms: room for a loaded 2-core machine running the emulator as a process too
TIMEOUT_UNITS = 2 * PERIOD_MS * 20  # two periods in 50 us units (the facts table's choice)


def motors(**kw: object) -> list[MotorConfig]:
    return [MotorConfig(esc_id=i, **kw) for i in IDS]  # type: ignore[arg-type]


@pytest.fixture
def emulator():  # type: ignore[no-untyped-def]
    with EmulatorProcess(motors(), interface="udp_multicast", channel=emu.unique_udp_channel()) as e:
        yield e


def device(port: str, query: str = f"ids=1-3&period_ms={PERIOD_MS}", **kw: object) -> DamiaoDevice:
    dev = DamiaoDevice.from_url(port, dict(parse_qsl(query)), **{"joint_limits": LIMITS, **kw})
    return dev.open()  # type: ignore[return-value]


def cycle(dev: DamiaoDevice, target: float, n: int) -> np.ndarray:
    return drive(dev, target, n, PERIOD_MS / 1000 / 2)


def test_open_reads_the_mapping_and_enables_nothing_arm_writes_timeout_to_ram(emulator: EmulatorProcess) -> None:
    with device(emulator.port) as dev:
        dev.poll_state()
        # control: open() and a disarmed poll enable nothing and write nothing
        assert not emulator.events_of("enable") and not emulator.events_of("register_write")
        assert [emulator.register(i, dm.RID_TIMEOUT) for i in IDS] == [0, 0, 0]
        reads = {(e.servo_id, e.detail["rid"]) for e in emulator.events_of("register_read")}
        assert {(i, r) for i in IDS for r in (dm.RID_PMAX, dm.RID_VMAX, dm.RID_TMAX)} <= reads
        dev.arm()
        assert [emulator.snapshot(i)["enabled"] for i in IDS] == [True] * 3
        assert [emulator.register(i, dm.RID_TIMEOUT) for i in IDS] == [TIMEOUT_UNITS] * 3  # RAM
        assert [emulator.flash(i, dm.RID_TIMEOUT) for i in IDS] == [0, 0, 0]  # flash untouched
        assert {e.detail["rid"] for e in emulator.events_of("register_write")} == {dm.RID_TIMEOUT}
        assert dev.capabilities.watchdog_period_s == pytest.approx(2 * PERIOD_MS / 1000)
        cycle(dev, 0.3, 6)
    assert [emulator.snapshot(i)["enabled"] for i in IDS] == [False] * 3  # close() disabled them
    assert not emulator.events_of("save") and not emulator.events_of("set_zero")  # never flash, never re-zero
    disables = len(emulator.events_of("disable"))
    dev.close()  # idempotent: nothing more is sent
    assert len(emulator.events_of("disable")) == disables and dev.closed


@pytest.mark.parametrize(("register", "value"), [("pmax", 3.1415926), ("vmax", 45.0), ("tmax", 28.0)])
def test_a_mapping_mismatch_is_refused_at_open_in_one_line(register: str, value: float) -> None:
    configs = motors()
    configs[1] = MotorConfig(esc_id=2, **{register: value})  # type: ignore[arg-type]
    with EmulatorProcess(configs, interface="udp_multicast", channel=emu.unique_udp_channel()) as e:
        with pytest.raises(ArmRefusedError) as err:
            device(e.port)
        msg = str(err.value)
        assert "\n" not in msg and "motor id 2" in msg and register.upper() in msg
        assert f"{value:g}" in msg and {"pmax": "12.5", "vmax": "30", "tmax": "10"}[register] in msg
        # control: the configuration that matches the motor is accepted
        default = {"pmax": 12.5, "vmax": 30.0, "tmax": 10.0}[register]
        with device(e.port, **{register: [default, value, default]}) as dev:
            assert dev.poll_state().positions.shape == (3,)
        assert not e.events_of("enable")


def test_stop_torque_off_disables_every_motor_read_back(emulator: EmulatorProcess) -> None:
    with device(emulator.port) as dev:
        dev.arm()
        cycle(dev, 0.5, 4)
        t0 = time.monotonic()
        assert dev.stop(StopCategory.TORQUE_OFF) is True
        elapsed = time.monotonic() - t0
        assert not dev.armed and elapsed < 0.5
        assert [emulator.snapshot(i)["enabled"] for i in IDS] == [False] * 3
        assert len(emulator.events_of("disable")) >= len(IDS)


def test_stop_controlled_damps_then_disables(emulator: EmulatorProcess) -> None:
    with device(emulator.port, kp=2.0, kd=0.2, damping_kd=2.0) as dev:  # soft gains: a slow swing to damp
        dev.arm()
        drive(dev, 1.5, 6, 0.01)
        assert emulator.wait_until(lambda: all(abs(emulator.snapshot(i)["velocity"]) > 0.5 for i in IDS), 2.0)
        t0 = time.monotonic()
        assert dev.stop(StopCategory.CONTROLLED) is True
        stop_s = time.monotonic() - t0
        assert stop_s < 0.3 + 0.5  # stop_timeout_s, then the disable round trip
        for i in IDS:
            snap = emulator.snapshot(i)
            assert not snap["enabled"] and abs(snap["velocity"]) < 0.5
            recent = snap["recent"]
            first = next(k for k, c in enumerate(recent) if c["kp"] == 0.0)  # the first damping frame
            damping = recent[first:]
            # from then on only damping frames (kp 0, kd 2, no torque), none driving, all before the disable
            assert all(c["kp"] == 0.0 and c["kd"] > 1.9 and c["tau"] == pytest.approx(0, abs=0.01) for c in damping)
            assert all(c["kp"] > 1.9 for c in recent[:first])  # control: the frames before were driving frames
            disabled_at = max(e.t for e in emulator.events_of("disable", i))
            assert damping[-1]["t"] <= disabled_at


def test_overtemperature_latches_stops_and_refuses_arm_until_cleared(emulator: EmulatorProcess) -> None:
    with device(emulator.port) as dev:
        dev.arm()
        cycle(dev, 0.2, 3)
        emulator.set_temperature(2, mos=130.0, rotor=60.0)
        with pytest.raises(FaultLatchedError):
            for _ in range(20):  # the next reply carries status 0xB: latched, stop category 0, setpoints refused
                cycle(dev, 0.2, 1)
        assert not dev.armed and [f.code for f in dev.faults] == ["mos_overtemp"]
        assert "motor id 2" in dev.faults[0].reason
        assert [emulator.snapshot(i)["enabled"] for i in IDS] == [False] * 3
        with pytest.raises(FaultLatchedError):
            dev.arm()
        assert len(emulator.events_of("enable")) == 3  # the refused arm sent nothing
        emulator.set_temperature(2, mos=40.0, rotor=40.0)  # cooled down
        dev.clear_faults()  # operator
        assert not dev.faults and not dev.armed and len(emulator.events_of("clear_error")) == 3
        dev.arm()  # control: with the latch cleared the same arm is accepted
        assert [emulator.snapshot(i)["enabled"] for i in IDS] == [True] * 3


def test_a_motor_in_lost_comm_at_open_is_not_armed_until_an_operator_clears_it(emulator: EmulatorProcess) -> None:
    emulator.inject_fault(3, dm.STATUS_LOST_COMM)
    with device(emulator.port) as dev:
        assert [f.code for f in dev.faults] == ["lost_comm"]
        with pytest.raises(FaultLatchedError):
            dev.arm()
        assert not emulator.events_of("enable")
        dev.clear_faults()
        dev.arm()
        assert len(emulator.events_of("enable")) == 3


def test_a_silent_motor_is_counted_then_faulted(emulator: EmulatorProcess) -> None:
    with device(emulator.port, max_missed=3) as dev:
        dev.arm()
        cycle(dev, 0.1, 3)
        assert dev.counters["missed"] == 0, (dev.counters, dev._missed)
        emulator.silence(3)
        with pytest.raises(FaultLatchedError):
            cycle(dev, 0.1, 10)
        assert [f.code for f in dev.faults] == ["no_reply"] and dev.counters["missed"] >= 3
        assert "motor id 3" in dev.faults[0].reason and not dev.armed


def test_kp_and_kd_are_clamped_to_the_configured_maxima(emulator: EmulatorProcess) -> None:
    with device(emulator.port, kp=20.0, kd=1.0, kp_max=40.0, kd_max=2.0) as dev:
        dev.arm()
        dev.poll_state()
        t_sent = time.monotonic()
        sent = dev.write_setpoints([5.0, 0.1, -9.0], kp=[1000.0, 30.0, -5.0], kd=[9.0, 1.5, 0.5])
        assert list(sent) == pytest.approx([1.6, 0.1, -1.6])  # positions clamped to the joint limits
        assert emulator.wait_until(lambda: all(emulator.snapshot(i)["recent"][-1]["t"] >= t_sent for i in IDS), 2.0)
        got = [emulator.snapshot(i)["recent"][-1] for i in IDS]
        assert [c["kp"] for c in got] == pytest.approx([40.0, 30.0, 0.0], abs=0.13)
        assert [c["kd"] for c in got] == pytest.approx([2.0, 1.5, 0.5], abs=0.002)
        assert [c["p"] for c in got] == pytest.approx([1.6, 0.1, -1.6], abs=0.001)


def test_hostile_frames_are_ignored_and_counted(emulator: EmulatorProcess) -> None:
    group, _, udp_port = emulator.port.partition("/")[2].rpartition(":")
    with device(emulator.port) as dev:
        dev.arm()
        cycle(dev, 0.2, 3)
        before = dict(dev.counters)
        with can.Bus(interface="udp_multicast", channel=group, port=int(udp_port)) as rogue:
            master = 0x11
            fault = emu.encode_reply_word(dm.STATUS_OVERLOAD, 1, 32768, 2048, 2048, 30, 30)
            for msg in (
                can.Message(arbitration_id=0x123, data=fault, is_extended_id=False),  # foreign id, fault status
                can.Message(arbitration_id=master, data=b"\x01\x02\x03", is_extended_id=False),  # short
                can.Message(arbitration_id=master, data=emu.encode_reply_word(1, 9, 0, 0, 0, 0, 0),
                            is_extended_id=False),  # a nibble no motor on this reply id has
                can.Message(arbitration_id=master, data=emu.encode_reply_word(5, 1, 0, 0, 0, 0, 0),
                            is_extended_id=False),  # undocumented status
                can.Message(arbitration_id=master, data=fault[:8], is_extended_id=True),  # 29-bit id
                can.Message(arbitration_id=master, is_remote_frame=True, dlc=8, is_extended_id=False),
            ):
                rogue.send(msg)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:  # transport garbage: not a frame at all
            raw.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
            raw.sendto(b"\xc1\xffgarbage\x00" * 8, (group, int(udp_port)))
        cycle(dev, 0.2, 6)
        after = dev.counters
        assert after["foreign"] - before["foreign"] >= 3  # 0x123, the 29-bit and the remote frame
        assert after["malformed"] - before["malformed"] >= 3  # short, unknown nibble, undocumented status
        assert after["rx_errors"] - before["rx_errors"] >= 1  # the datagram python-can could not unpack
        assert dev.armed and not dev.faults  # nothing was latched from a frame that is not a motor's reply
        # control: the same overload status from the motor itself is latched
        emulator.inject_fault(1, dm.STATUS_OVERLOAD)
        with pytest.raises(FaultLatchedError):
            cycle(dev, 0.2, 10)
        assert [f.code for f in dev.faults] == ["overload"]


def test_bus_load_above_the_limit_is_refused_with_the_fixes() -> None:
    dev = DamiaoDevice.from_url("virtual/unused", {"ids": "1-7", "period_ms": "2"}, joint_limits=[(-1, 1)] * 7)
    with pytest.raises(MotorUrlError) as err:
        dev.open()
    msg = str(err.value)
    assert "\n" not in msg and "94.5%" in msg and "70%" in msg
    assert "fewer motors" in msg and "lower" in msg and "CAN FD" in msg
    assert dev.closed
    # control: the same 7 motors at 250 Hz (47%) open against the emulator
    with EmulatorProcess([MotorConfig(esc_id=i) for i in range(1, 8)], interface="udp_multicast",
                         channel=emu.unique_udp_channel()) as e, \
            device(e.port, "ids=1-7&period_ms=4", joint_limits=[(-1, 1)] * 7) as ok:
        assert ok.bus_load == pytest.approx(0.4725)


@pytest.mark.parametrize(("port", "params", "want"), [
    ("can0", {"ids": "1"}, "INTERFACE/CHANNEL"),
    ("socketcan/can0", {}, "ids="),
    ("nosuchiface/can0", {"ids": "1"}, "nosuchiface"),
    ("socketcan/can0", {"ids": "1-2", "master_ids": "17"}, "master_ids"),
    ("socketcan/can0", {"ids": "1,2", "master_ids": "2,18"}, "0x002"),
    ("socketcan/can0", {"ids": "1", "period_ms": "0"}, "period_ms"),
])
def test_bad_urls_are_refused_in_one_line(port: str, params: dict[str, str], want: str) -> None:
    with pytest.raises(MotorUrlError) as err:
        DamiaoDevice.from_url(port, params, joint_limits=[(-1, 1)] * 2)
    assert want in str(err.value) and "\n" not in str(err.value)


def test_joint_limits_outside_the_position_range_are_refused() -> None:
    with pytest.raises(MotorUrlError, match="PMAX"):
        DamiaoDevice("virtual", "x", (1,), joint_limits=[(-13.0, 1.0)])


def test_in_process_virtual_bus_and_the_emulator_flags_save_and_set_zero() -> None:
    channel = f"dm-{uuid.uuid4().hex[:8]}"  # python-can's virtual bus: both ends in this process
    with emu.DamiaoBusEmulator([MotorConfig(esc_id=1)], interface="virtual", channel=channel) as e:
        with DamiaoDevice.from_url(f"virtual/{channel}", {"ids": "1", "period_ms": "50"},
                                   joint_limits=[(-1.0, 1.0)]).open() as dev:
            dev.arm()
            drive(dev, 0.2, 3, 0.01)
            assert dev.stop(StopCategory.TORQUE_OFF)
        assert not e.events_of("save") and not e.events_of("set_zero")
        assert e.flash(1, dm.RID_TIMEOUT) == 0 and e.register(1, dm.RID_TIMEOUT) == 2000
        # control: the emulator does flag both when they are sent, and a save copies RAM to flash
        with can.Bus(interface="virtual", channel=channel) as raw:
            raw.send(can.Message(arbitration_id=dm.REGISTER_ID, data=dm.register_frame(1, dm.REG_SAVE, 1),
                                 is_extended_id=False))
            raw.send(can.Message(arbitration_id=1, data=dm.SET_ZERO, is_extended_id=False))
            assert e.wait_until(lambda: bool(e.events_of("save") and e.events_of("set_zero")), 2.0)
        assert e.flash(1, dm.RID_TIMEOUT) == 2000


@pytest.mark.parametrize("action", ["disable", "damping"])
def test_the_emulator_models_both_documented_expiry_actions(action: str) -> None:
    channel = f"dm-{uuid.uuid4().hex[:8]}"
    with emu.DamiaoBusEmulator([MotorConfig(esc_id=1, timeout=200)], interface="virtual", channel=channel,
                               on_timeout=action, damping_kd=2.0) as e, \
            can.Bus(interface="virtual", channel=channel) as raw:
        raw.send(can.Message(arbitration_id=1, data=dm.ENABLE, is_extended_id=False))
        raw.send(can.Message(arbitration_id=1, data=dm.encode_mit(1.0, 0, 20, 1, 0, dm.MitRanges(12.5, 30, 10)),
                             is_extended_id=False))
        assert e.wait_until(lambda: bool(e.events_of("timeout_expired")), 2.0)  # TIMEOUT 200 x 50 us = 10 ms
        event = e.events_of("timeout_expired")[0]
        assert event.detail["since_last_command"] >= 0.010 and event.detail["action"] == action
        snap = e.snapshot(1)
        assert snap["status"] == dm.STATUS_LOST_COMM and not snap["enabled"]
        assert snap["damping"] is (action == "damping")
        # a command after expiry does not bring it back: enable is refused until clear error
        raw.send(can.Message(arbitration_id=1, data=dm.ENABLE, is_extended_id=False))
        assert e.wait_until(lambda: bool(e.events_of("enable_refused")), 2.0)
