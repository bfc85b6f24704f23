"""`edge-vla motors scan | configure` as a real process run by the service user, against the servo emulators in
their own processes on real ptys (the pty handed to the service's group, as a udev rule does on a robot)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from onboard_helpers import SERVICE_GID, robot_users

pytest.importorskip("dynamixel_sdk", reason="dynamixel-sdk is not installed (pip install 'edge-vla[dynamixel]')")
pytest.importorskip("scservo_sdk", reason="feetech-servo-sdk is not installed (pip install 'edge-vla[feetech]')")

from firmware_bridge.motors import dynamixel_emulator as demu
from firmware_bridge.motors import feetech_emulator as femu

EMULATORS = {"dynamixel": (demu, "dxl_id"), "feetech": (femu, "servo_id")}


@pytest.fixture
def emulator(request: pytest.FixtureRequest) -> Iterator[Any]:
    """Servos 1 and 2 at 1 Mbaud, factory return delay, full-range limits, torque off."""
    scheme = request.param
    module, id_field = EMULATORS[scheme]
    emu = module.EmulatorProcess([module.ServoConfig(**{id_field: i}) for i in (1, 2)])
    try:
        if robot_users().service:
            os.chown(emu.port, 0, SERVICE_GID)
            os.chmod(emu.port, 0o660)
        emu.scheme, emu.module = scheme, module
        yield emu
    finally:
        emu.close()


def motors(*args: str) -> subprocess.CompletedProcess[str]:
    users = robot_users()
    return subprocess.run(users.edge_vla(users.service, "motors", *args), capture_output=True, text=True,
                          env=users.environ(), cwd="/", timeout=60)


def one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def url(emu: Any, query: str = "ids=1-2") -> str:
    """latency_ms=50: wait ~100 ms for each reply (a shared 2-core test box can starve the emulator's process)."""
    return f"{emu.scheme}://{emu.port}?{query}&latency_ms=50"


def eeprom(emu: Any) -> list[int]:
    return [emu.eeprom_writes(i) for i in (1, 2)]


@pytest.mark.parametrize("emulator", ["dynamixel", "feetech"], indirect=True)
def test_scan_finds_the_servos_and_nothing_at_a_wrong_baud(emulator: Any) -> None:
    query = "ids=0-6" if emulator.scheme == "feetech" else "ids=0-252"  # a Feetech scan pings each id
    proc = motors("scan", url(emulator, query), "--baud", "1000000", "--timeout-ms", "60", "--json")
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    assert found["ok"] is True
    assert [(s["id"], s["baud"], s["return_delay_us"], s["torque"]) for s in found["servos"]] == \
        [(1, 1_000_000, 500, False), (2, 1_000_000, 500, False)]
    if emulator.scheme == "feetech":  # the human format once (a Dynamixel broadcast ping waits ~0.8 s)
        human = motors("scan", url(emulator, query), "--baud", "1000000", "--timeout-ms", "60")
        assert human.returncode == 0 and len(human.stdout.strip().splitlines()) == 2 and "id 1 " in human.stdout
    miss = motors("scan", url(emulator, "ids=0-6"), "--baud", "115200", "--timeout-ms", "60")
    one_line_error(miss, "no servo answered", "115200", "0-6")


@pytest.mark.parametrize("emulator", ["feetech"], indirect=True)
def test_configure_sets_values_then_already_set_and_dry_run_writes_nothing(emulator: Any) -> None:
    m, target = emulator.module, url(emulator)
    dry = motors("configure", target, "--return-delay", "0", "--limits", "1=1000:3000", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "Return Delay Time" in dry.stdout and "250 -> 0" in dry.stdout and eeprom(emulator) == [0, 0]
    done = motors("configure", target, "--return-delay", "0", "--limits", "1=1000:3000", "--limits", "2=1100:2900")
    assert done.returncode == 0, done.stderr
    assert [emulator.register(i, m.RETURN_DELAY_TIME) for i in (1, 2)] == [0, 0]
    assert [(emulator.register(i, m.MIN_ANGLE_LIMIT), emulator.register(i, m.MAX_ANGLE_LIMIT)) for i in (1, 2)] == \
        [(1000, 3000), (1100, 2900)]
    assert [emulator.register(i, m.LOCK) for i in (1, 2)] == [1, 1]
    written = eeprom(emulator)
    again = motors("configure", target, "--return-delay", "0", "--limits", "1=1000:3000", "--limits", "2=1100:2900",
                   "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["already_set"] is True
    assert eeprom(emulator) == written


@pytest.mark.parametrize("emulator", ["dynamixel"], indirect=True)
def test_configure_refuses_torque_on_and_collisions_then_renumbers_and_rebauds(emulator: Any) -> None:
    emulator.set_register(2, demu.TORQUE_ENABLE, 1)
    one_line_error(motors("configure", url(emulator), "--return-delay", "0"), "servo id 2 has torque on")
    assert eeprom(emulator) == [0, 0] and emulator.register(2, demu.TORQUE_ENABLE) == 1
    collide = motors("configure", url(emulator), "--set-id", "1:2", "--torque-off")
    one_line_error(collide, "id 2 already answers")
    done = motors("configure", url(emulator), "--torque-off", "--set-id", "1:4", "--baud", "57600")
    assert done.returncode == 0, done.stderr
    assert emulator.register(2, demu.TORQUE_ENABLE) == 0
    found = motors("scan", url(emulator, "baud=57600"), "--json")
    assert found.returncode == 0, found.stderr
    assert [(s["id"], s["baud"]) for s in json.loads(found.stdout)["servos"]] == [(2, 57_600), (4, 57_600)]


@pytest.mark.parametrize("emulator", ["feetech"], indirect=True)
def test_hostile_input_gets_one_line_and_writes_nothing(emulator: Any) -> None:
    one_line_error(motors("scan", "not-a-url"), "not a URL")
    one_line_error(motors("scan", "servo:///dev/ttyUSB0"), "unknown motor link scheme")
    one_line_error(motors("configure", url(emulator), "--set-id", "300:1"), "300", "outside 0..253")
    one_line_error(motors("configure", url(emulator), "--limits", "1=3000:1000"), "3000:1000", "low end first")
    one_line_error(motors("configure", url(emulator), "--return-delay", "7"), "return delay 7 us")
    one_line_error(motors("configure", url(emulator, "ids=1-2&bogus=1"), "--return-delay", "0"), "bogus")
    for timeout in ("inf", "nan", "1e9"):  # unbounded: an OverflowError traceback, or a scan that never ends
        one_line_error(motors("scan", url(emulator), "--baud", "1000000", "--timeout-ms", timeout), "--timeout-ms")
    proc = motors("configure", url(emulator), "--json", "--limits", "9=1:2")
    assert proc.returncode == 1 and json.loads(proc.stdout)["ok"] is False
    assert eeprom(emulator) == [0, 0]


@pytest.mark.parametrize("emulator", ["feetech"], indirect=True)
def test_a_servo_that_goes_silent_mid_configure_fails_in_one_line_naming_what_is_left(emulator: Any) -> None:
    emulator.silence_after_eeprom_writes(2, 1)
    proc = motors("configure", url(emulator), "--return-delay", "0", "--limits", "2=1000:3000")
    line = one_line_error(proc, "servo id 2", "did not answer", "Lock")
    assert "written and read back" in line
    assert emulator.register(1, femu.RETURN_DELAY_TIME) == 0 and emulator.register(1, femu.LOCK) == 1
