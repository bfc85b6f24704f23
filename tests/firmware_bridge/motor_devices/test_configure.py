"""`firmware_bridge.motors.configure` (scan, plan, apply) against the emulators on real ptys, and the emulator
behaviour it relies on: EEPROM writable only with torque off (Dynamixel), the Feetech Lock, an ID change that
takes effect at once, a baud change that takes effect after the status reply, servos at different baud rates
on one bus, the Dynamixel broadcast ping, and a per-servo EEPROM write counter.

Scans run against the emulator in its own process (short per-id timeouts must not share the GIL with the SDK's
busy-polling host); configure runs against an in-thread bus, whose servos the test reads directly."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

scs = pytest.importorskip("scservo_sdk", reason="feetech-servo-sdk is not installed (pip install 'edge-vla[feetech]')")

import dynamixel_sdk as dxl  # noqa: E402
from motor_helpers import sdk_session  # noqa: E402

from firmware_bridge.motors import ArmRefusedError, open_device  # noqa: E402
from firmware_bridge.motors import configure as cfg  # noqa: E402
from firmware_bridge.motors import dynamixel_emulator as demu  # noqa: E402
from firmware_bridge.motors import feetech_emulator as femu  # noqa: E402

# Per vendor: emulator module, its ServoConfig id field, its register addresses, the scheme.
VENDORS: dict[str, dict[str, Any]] = {
    "dynamixel": {"emu": demu, "id": "dxl_id", "min": "min_position", "max": "max_position",
                  "regs": {"rd": demu.RETURN_DELAY_TIME, "lo": demu.MIN_POSITION_LIMIT, "hi": demu.MAX_POSITION_LIMIT,
                           "torque": demu.TORQUE_ENABLE, "baud": demu.BAUD_RATE, "id": demu.ID_ADDR}},
    "feetech": {"emu": femu, "id": "servo_id", "min": "min_angle", "max": "max_angle",
                "regs": {"rd": femu.RETURN_DELAY_TIME, "lo": femu.MIN_ANGLE_LIMIT, "hi": femu.MAX_ANGLE_LIMIT,
                         "torque": femu.TORQUE_ENABLE, "baud": femu.BAUD_RATE, "id": femu.ID_ADDR}},
}


def servo(scheme: str, servo_id: int, **kw: Any) -> Any:
    v = VENDORS[scheme]
    return v["emu"].ServoConfig(**{v["id"]: servo_id}, **kw)


@pytest.fixture
def bus(request: pytest.FixtureRequest) -> Iterator[Any]:
    """An in-thread bus of servos 1 and 2 at 1 Mbaud with the factory return delay (500 us) and full-range limits."""
    scheme = request.param
    with VENDORS[scheme]["emu"].BusEmulator([servo(scheme, 1), servo(scheme, 2)]) as b:
        b.scheme = scheme
        yield b


def reg(b: Any, servo_id: int, name: str) -> int:
    return b.register(servo_id, VENDORS[b.scheme]["regs"][name])


def request_(**kw: Any) -> cfg.Request:
    return cfg.Request(**{"ids": (1, 2), **kw})


# The in-thread emulator shares the GIL with the SDK's busy-polling host on a loaded 2-core box: wait up to
# ~100 ms for each reply (2 x latency + 2 ms), as test_run_motor_devices does; only absent ids cost that long.
LATENCY_MS = 50
SCAN_TIMEOUT_MS = 100


def configure(b: Any, req: cfg.Request, baud: int = 1_000_000) -> list[cfg.Change]:
    with cfg.open_bus(b.scheme, b.port, baud, LATENCY_MS) as handle:
        plan = cfg.make_plan(handle, req)
        return cfg.apply_plan(handle, plan)


BOTH = pytest.mark.parametrize("bus", ["dynamixel", "feetech"], indirect=True)


# -- the emulators -----------------------------------------------------------------------------------------
def test_dxl_eeprom_refused_with_torque_on_and_counted_only_when_written() -> None:
    with sdk_session(demu.BusEmulator([servo("dynamixel", 1)]), dxl, 2.0) as (b, port, ph):
        assert ph.write1ByteTxRx(port, 1, demu.TORQUE_ENABLE, 1) == (dxl.COMM_SUCCESS, 0)
        assert ph.write1ByteTxRx(port, 1, demu.RETURN_DELAY_TIME, 0) == (dxl.COMM_SUCCESS, demu.ERR_ACCESS)
        assert b.eeprom_writes(1) == 0 and b.register(1, demu.RETURN_DELAY_TIME) == 250
        assert ph.write1ByteTxRx(port, 1, demu.TORQUE_ENABLE, 0) == (dxl.COMM_SUCCESS, 0)  # RAM: not counted
        assert ph.write1ByteTxRx(port, 1, demu.RETURN_DELAY_TIME, 0) == (dxl.COMM_SUCCESS, 0)  # control
        assert b.eeprom_writes(1) == 1 and b.register(1, demu.RETURN_DELAY_TIME) == 0


@pytest.mark.parametrize("scheme", ["dynamixel", "feetech"])
def test_id_change_answers_with_the_old_id_then_only_at_the_new_one(scheme: str) -> None:
    v = VENDORS[scheme]
    sdk, protocol = (dxl, 2.0) if scheme == "dynamixel" else (scs, 0)
    with sdk_session(v["emu"].BusEmulator([servo(scheme, 1), servo(scheme, 2)]), sdk, protocol) as (b, port, ph):
        # writeTxRx only accepts a status packet from the id it wrote to: the reply carries the old id.
        assert ph.write1ByteTxRx(port, 1, v["regs"]["id"], 7) == (sdk.COMM_SUCCESS, 0)
        assert ph.ping(port, 7)[1] == sdk.COMM_SUCCESS
        assert ph.ping(port, 1)[1] == sdk.COMM_RX_TIMEOUT
        assert b.register(7, v["regs"]["id"]) == 7
        # Onto an id another servo has at this rate: both answer at once on a real bus; here neither is heard.
        assert ph.write1ByteTxRx(port, 7, v["regs"]["id"], 2) == (sdk.COMM_SUCCESS, 0)
        assert ph.ping(port, 2)[1] != sdk.COMM_SUCCESS and b.events_of("id_collision")
        assert ph.ping(port, 1)[1] == sdk.COMM_RX_TIMEOUT  # control: the bus still answers nothing else there


@pytest.mark.parametrize("scheme", ["dynamixel", "feetech"])
def test_baud_change_takes_effect_after_the_status_reply(scheme: str) -> None:
    v = VENDORS[scheme]
    sdk, protocol = (dxl, 2.0) if scheme == "dynamixel" else (scs, 0)
    index = {b: i for i, b in v["emu"].BAUD_RATES.items()}[57_600]
    with sdk_session(v["emu"].BusEmulator([servo(scheme, 1), servo(scheme, 2)]), sdk, protocol) as (b, port, ph):
        assert ph.write1ByteTxRx(port, 1, v["regs"]["baud"], index) == (sdk.COMM_SUCCESS, 0)  # acknowledged
        assert ph.ping(port, 1)[1] == sdk.COMM_RX_TIMEOUT  # no longer at 1 Mbaud...
        assert ph.ping(port, 2)[1] == sdk.COMM_SUCCESS  # ...where servo 2 still is (control)
        assert port.setBaudRate(57_600)
        assert ph.ping(port, 1)[1] == sdk.COMM_SUCCESS and ph.ping(port, 2)[1] == sdk.COMM_RX_TIMEOUT
        assert b.eeprom_writes(1) == 1 and b.eeprom_writes(2) == 0


# -- scan ------------------------------------------------------------------------------------------------------
def test_dxl_scan_finds_exactly_the_servos_at_each_baud() -> None:
    # one broadcast Ping per rate (dynamixel-sdk's broadcastPing), every servo at that rate answering in turn
    servos = [servo("dynamixel", 1, return_delay=0, min_position=100, max_position=4000),
              servo("dynamixel", 3, return_delay=10), servo("dynamixel", 200, baud_index=1)]  # 200 at 57600
    with demu.EmulatorProcess(servos) as e:
        result = cfg.scan("dynamixel", e.port, bauds=[1_000_000, 57_600])
    found = {(s.id, s.baud) for s in result.servos}
    assert found == {(1, 1_000_000), (3, 1_000_000), (200, 57_600)}
    one = next(s for s in result.servos if s.id == 1)
    assert (one.model, one.model_name, one.firmware, one.return_delay_us, one.limits, one.torque) == \
        (1020, "XM430-W350", "45", 0, (100, 4000), False)
    assert next(s for s in result.servos if s.id == 3).return_delay_us == 20
    assert result.tried_bauds == (1_000_000, 57_600)


def test_feetech_scan_pings_each_id_and_finds_nothing_at_a_wrong_baud() -> None:
    servos = [servo("feetech", 2, return_delay=0), servo("feetech", 9, return_delay=0, min_angle=500, max_angle=3500)]
    with femu.EmulatorProcess(servos) as e:
        hit = cfg.scan("feetech", e.port, bauds=[1_000_000], ids=range(0, 11), timeout_ms=50)
        # 250000 has no termios constant: pyserial sets it as a custom speed, which the emulator must read too
        miss = cfg.scan("feetech", e.port, bauds=[250_000], ids=range(0, 11), timeout_ms=50)
    assert [(s.id, s.baud) for s in hit.servos] == [(2, 1_000_000), (9, 1_000_000)]
    nine = hit.servos[1]
    assert (nine.model_name, nine.limits, nine.lock, nine.torque) == ("STS3215", (500, 3500), 1, False)
    assert miss.servos == [] and miss.tried_ids == tuple(range(0, 11))


# -- configure -------------------------------------------------------------------------------------------------
@BOTH
def test_configure_writes_reads_back_and_a_second_run_writes_nothing(bus: Any) -> None:
    req = request_(return_delay_us=0, limits={1: (1000, 3000), 2: (1500, 2600)})
    done = configure(bus, req)
    vendor = cfg.VENDORS[bus.scheme]
    assert {(c.servo_id, c.register) for c in done} >= {(1, vendor.return_delay), (2, vendor.min_limit)}
    assert [reg(bus, i, "rd") for i in (1, 2)] == [0, 0]
    assert [(reg(bus, i, "lo"), reg(bus, i, "hi")) for i in (1, 2)] == [(1000, 3000), (1500, 2600)]
    written = [bus.eeprom_writes(i) for i in (1, 2)]
    assert all(written)
    assert configure(bus, req) == []  # already set: EEPROM wears, so nothing is written
    assert [bus.eeprom_writes(i) for i in (1, 2)] == written
    if bus.scheme == "feetech":  # unlocked to write, so the values survive a power cycle; locked again
        assert [bus.register(i, femu.LOCK) for i in (1, 2)] == [1, 1]
        assert all(e.detail["saved"] for e in bus.events_of("eeprom_write"))
        bus.power_cycle(1)
        assert bus.wait_for(lambda: bus.servo(1).offline_until <= time.monotonic(), 1.0)
        assert (reg(bus, 1, "rd"), reg(bus, 1, "lo")) == (0, 1000)


def test_feetech_lock_restored_so_the_backend_arms() -> None:
    # LeRobot's disable_torque leaves Lock 0: the backend refuses to arm such a servo until configure locks it.
    servos = [servo("feetech", i, lock=0, return_delay=0) for i in (1, 2)]
    with femu.BusEmulator(servos) as b:
        b.scheme = "feetech"
        url, limits = f"feetech://{b.port}?ids=1-2", [(-1.7, 1.5)] * 2  # ticks 940..3026 at the default calibration
        with open_device(url, joint_limits=limits) as dev, pytest.raises(ArmRefusedError, match="Lock 55 = 0"):
            dev.arm()  # control: refused as found
        configure(b, request_(limits={1: (1000, 3000), 2: (1000, 3000)}))
        assert [b.register(i, femu.LOCK) for i in (1, 2)] == [1, 1]
        with open_device(url, joint_limits=limits) as dev:
            dev.arm()
            assert [b.register(i, femu.TORQUE_ENABLE) for i in (1, 2)] == [1, 1]
            assert dev.stop()


@BOTH
def test_refuses_while_a_servo_has_torque_on_unless_told_to_turn_it_off(bus: Any) -> None:
    with cfg.open_bus(bus.scheme, bus.port, 1_000_000, LATENCY_MS) as handle:
        handle.write(2, handle.vendor.torque, 1)
        with pytest.raises(cfg.ConfigureError, match="servo id 2 has torque on") as err:
            cfg.make_plan(handle, request_(return_delay_us=0))
        assert "\n" not in str(err.value) and "--torque-off" in str(err.value)
        assert [bus.eeprom_writes(i) for i in (1, 2)] == [0, 0] and reg(bus, 2, "torque") == 1
        cfg.apply_plan(handle, cfg.make_plan(handle, request_(return_delay_us=0, torque_off=True)))  # control
    assert reg(bus, 2, "torque") == 0 and [reg(bus, i, "rd") for i in (1, 2)] == [0, 0]


@BOTH
def test_refuses_id_collisions_and_ids_out_of_range(bus: Any) -> None:
    with cfg.open_bus(bus.scheme, bus.port, 1_000_000, LATENCY_MS) as handle:
        with pytest.raises(cfg.ConfigureError, match="id 2 already answers"):
            cfg.make_plan(handle, request_(set_ids={1: 2}))
        with pytest.raises(cfg.ConfigureError, match="id 300 is outside 0..25"):
            cfg.make_plan(handle, request_(set_ids={1: 300}))
        with pytest.raises(cfg.ConfigureError, match="both to id 5"):
            cfg.make_plan(handle, request_(set_ids={1: 5, 2: 5}))
        with pytest.raises(cfg.ConfigureError, match="servo id 9 is not in ids"):
            cfg.make_plan(handle, request_(set_ids={9: 5}))
        with pytest.raises(cfg.ConfigureError, match="3000:1000.*low end first"):
            cfg.make_plan(handle, request_(limits={1: (3000, 1000)}))
    assert [bus.eeprom_writes(i) for i in (1, 2)] == [0, 0]


@pytest.mark.parametrize("scheme", ["dynamixel", "feetech"])
def test_an_id_shared_at_another_baud_is_not_a_collision_until_the_baud_changes(scheme: str) -> None:
    index = {b: i for i, b in VENDORS[scheme]["emu"].BAUD_RATES.items()}[115_200]
    servos = [servo(scheme, 1), servo(scheme, 2), servo(scheme, 3, baud_index=index)]  # 3 at 115200 baud
    with VENDORS[scheme]["emu"].BusEmulator(servos) as b:
        b.scheme = scheme
        configure(b, request_(set_ids={2: 3}, return_delay_us=0))  # on the wire at 1 Mbaud only one id 3 answers
        assert reg(b, 3, "rd") == 0  # the servo that took id 3 last (the one at 115200 kept its 500 us)
        written = [b.eeprom_writes(i) for i in (1, 3)]
        with cfg.open_bus(scheme, b.port, 1_000_000, LATENCY_MS) as handle, \
                pytest.raises(cfg.ConfigureError, match="id 3 already answers at 115200 baud"):
            cfg.make_plan(handle, cfg.Request(ids=(1, 3), baud=115_200))  # the move would make them collide
        assert [b.eeprom_writes(i) for i in (1, 3)] == written


@BOTH
def test_id_then_baud_change_is_found_by_a_scan_at_the_new_baud(bus: Any) -> None:
    changes = configure(bus, request_(set_ids={1: 5}, baud=57_600, return_delay_us=0))
    assert [c.register.name for c in changes][-2:] == ["Baud Rate", "Baud Rate"]  # the baud rate is last
    timeout = {"timeout_ms": SCAN_TIMEOUT_MS, "latency_ms": LATENCY_MS, "ids": range(0, 7)}
    assert [(s.id, s.baud) for s in cfg.scan(bus.scheme, bus.port, bauds=[57_600], **timeout).servos] == \
        [(2, 57_600), (5, 57_600)]
    with cfg.open_bus(bus.scheme, bus.port, 1_000_000, LATENCY_MS) as handle:  # gone from the old rate
        assert not any(handle.ping(i) for i in (1, 2, 5))
    if bus.scheme == "feetech":
        assert bus.register(5, femu.LOCK) == 1 and all(e.detail["saved"] for e in bus.events_of("eeprom_write"))


@BOTH
def test_dry_run_plans_without_writing(bus: Any) -> None:
    with cfg.open_bus(bus.scheme, bus.port, 1_000_000, LATENCY_MS) as handle:
        plan = cfg.make_plan(handle, request_(return_delay_us=0, limits={2: (10, 4000)}))
    vendor = cfg.VENDORS[bus.scheme]
    lines = [(c.servo_id, c.register, c.old, c.new) for c in plan.changes]
    assert (1, vendor.return_delay, 250, 0) in lines and (2, vendor.min_limit, 0, 10) in lines
    assert [bus.eeprom_writes(i) for i in (1, 2)] == [0, 0] and reg(bus, 1, "rd") == 250


@BOTH
def test_a_servo_that_goes_silent_mid_configure_is_named_with_what_was_left(bus: Any) -> None:
    bus.silence_after_eeprom_writes(2, 1)  # its first EEPROM write is applied and acknowledged, then it is gone
    with pytest.raises(cfg.ConfigureError) as err:
        configure(bus, request_(return_delay_us=0, limits={1: (1000, 3000), 2: (1000, 3000)}))
    text = str(err.value)
    assert "\n" not in text and "servo id 2" in text and "did not answer" in text
    assert "written and read back" in text and "not written" in text  # what is done and what is not
    assert [reg(bus, 1, "rd"), reg(bus, 1, "lo")] == [0, 1000]  # servo 1 was finished before servo 2 started
    if bus.scheme == "feetech":
        assert "Lock" in text  # servo 2 was left unlocked: the message says so (arm refuses it)
        assert bus.register(1, femu.LOCK) == 1


@BOTH
def test_an_adapter_unplugged_mid_configure_is_one_line_not_a_traceback(bus: Any) -> None:
    with cfg.open_bus(bus.scheme, bus.port, 1_000_000, LATENCY_MS) as handle:
        plan = cfg.make_plan(handle, request_(return_delay_us=0))
        bus.stop()  # the emulator closes its side of the pty: what the host sees when the USB adapter is pulled
        with pytest.raises(cfg.ConfigureError) as err:
            cfg.apply_plan(handle, plan)
    text = str(err.value)
    assert "\n" not in text and "servo id 1" in text and "not written" in text


@pytest.mark.parametrize("scheme, mode, position", [("dynamixel", 4, 3), ("feetech", 1, 0)])
def test_position_mode_is_set_where_the_backends_need_it(scheme: str, mode: int, position: int) -> None:
    address = VENDORS[scheme]["emu"].OPERATING_MODE
    with VENDORS[scheme]["emu"].BusEmulator([servo(scheme, 1, operating_mode=mode)]) as b:
        b.scheme = scheme
        assert [(c.register.address, c.old, c.new) for c in configure(b, request_(ids=(1,), position_mode=True))] \
            == [(address, mode, position)]
        assert b.register(1, address) == position
