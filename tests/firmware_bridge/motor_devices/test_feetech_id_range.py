"""Feetech servo ids: one range at every entry point.

Feetech's STS/SMS memory table gives ID (address 5) the range 0..253; 254 (0xFE) is the broadcast id (every servo
acts on it, none answers). scservo_sdk refuses only ids >= 0xFE (its MAX_ID = 0xFC is carried over from the
Dynamixel SDK and used nowhere). The motor URL used to cap Feetech ids at 252 while `motors configure --set-id`
allowed 253, so a servo configured to 253 could never be driven. Here 253 is taken by every entry point (motor URL,
configure's URL and ids, --set-id, scan, LeRobot calibration files, robot configurations, a calibrated run's --link), 254 is
refused by each in one line naming broadcast, with the same wording; end to end, a servo moved to 253 by configure
is driven through its URL. Control: Dynamixel keeps its Protocol 2.0 range 0..252 at the same entry points."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("scservo_sdk", reason="feetech-servo-sdk is not installed (pip install 'edge-vla[feetech]')")

from firmware_bridge.motors import MotorError, open_device
from firmware_bridge.motors import configure as cfg
from firmware_bridge.motors import feetech_emulator as femu
from firmware_bridge.motors.calibration import parse_lerobot_calibration
from firmware_bridge.motors.registry import parse_ids

LIMITS = [(-1.5, 1.5)]


def _calibration(servo_id: int) -> str:
    return json.dumps({"gripper": {"id": servo_id, "drive_mode": 0, "homing_offset": 0, "range_min": 1024,
                                   "range_max": 3072}})


def _entry_points(scheme: str) -> dict[str, Any]:
    """Each way an id reaches this runtime, as a call taking the id."""
    from edge_vla.onboard.cli import url_with_calibrated_ids
    from edge_vla.provision.robot_config import link_kind

    vendor = cfg.VENDORS[scheme]
    return {
        "registry": lambda i: parse_ids(str(i), scheme=scheme),
        "device URL": lambda i: open_device(f"{scheme}:///dev/null?ids={i}", open_now=False, joint_limits=LIMITS),
        "configure URL": lambda i: cfg.parse_target(f"{scheme}:///dev/null?ids={i}"),
        "--set-id": lambda i: cfg.validate(vendor, cfg.Request(ids=(1,), set_ids={1: i})),
        "configure ids": lambda i: cfg.validate(vendor, cfg.Request(ids=(i,))),
        "robot configuration": lambda i: link_kind(f"{scheme}:///dev/ttyUSB0?ids={i}"),
        "calibrated --link": lambda i: url_with_calibrated_ids(
            f"{scheme}:///dev/null?ids={i}", SimpleNamespace(ids=(i,), joints=("gripper",)), "cal.json"),
    }


def _refusal(call: Any, servo_id: int) -> str:
    from edge_vla.errors import ConfigError

    with pytest.raises((MotorError, ConfigError)) as err:  # each entry point's own error class
        call(servo_id)
    return str(err.value)


@pytest.mark.parametrize("entry", list(_entry_points("feetech")))
def test_253_is_a_feetech_id_at_every_entry_point(entry: str) -> None:
    _entry_points("feetech")[entry](253)  # raises on refusal
    _entry_points("feetech")[entry](0)


def test_253_is_a_feetech_id_in_a_lerobot_calibration_file() -> None:
    assert parse_lerobot_calibration(_calibration(253))["gripper"].id == 253


def test_254_is_refused_everywhere_in_one_line_naming_broadcast_with_the_same_words() -> None:
    messages = {entry: _refusal(call, 254) for entry, call in _entry_points("feetech").items()}
    with pytest.raises(MotorError) as err:
        parse_lerobot_calibration(_calibration(254))
    messages["calibration file"] = str(err.value)
    with pytest.raises(MotorError) as err:
        cfg.scan("feetech", "/dev/null", bauds=[1_000_000], ids=[1, 254])  # refused before the port is opened
    messages["scan ids"] = str(err.value)
    cores = set()
    for entry, message in messages.items():
        assert "\n" not in message and "broadcast" in message and "0..253" in message, (entry, message)
        core = re.search(r"id 254 is the broadcast id.*", message)
        assert core, (entry, message)
        cores.add(core.group(0).rstrip(")"))
    assert len(cores) == 1, cores


@pytest.mark.parametrize("entry", ["registry", "device URL", "configure URL", "--set-id", "robot configuration"])
def test_control_dynamixel_keeps_0_to_252(entry: str) -> None:
    calls = _entry_points("dynamixel")
    calls[entry](252)
    message = _refusal(calls[entry], 253)
    assert "\n" not in message and "0..252" in message, message
    assert "broadcast" in _refusal(calls[entry], 254)


def test_a_servo_configure_moved_to_253_is_driven_through_its_url() -> None:
    """End to end on the emulated STS bus (a real pty): configure --set-id 1:253, scan finds 253, the backend opens
    feetech://...?ids=253 and reads the servo. Control: id 1 no longer answers."""
    with femu.BusEmulator([femu.ServoConfig(servo_id=1, return_delay=0, min_angle=1024, max_angle=3072)]) as bus:
        with cfg.open_bus("feetech", bus.port, 1_000_000, 50) as handle:
            plan = cfg.make_plan(handle, cfg.Request(ids=(1,), set_ids={1: 253}))
            cfg.apply_plan(handle, plan)
        assert bus.register(253, femu.ID_ADDR) == 253
        found = cfg.scan("feetech", bus.port, bauds=[1_000_000], ids=[1, 253], timeout_ms=100, latency_ms=50)
        assert [s.id for s in found.servos] == [253]
        with open_device(f"feetech://{bus.port}?ids=253&latency_ms=50", joint_limits=LIMITS) as dev:
            assert dev.ids == (253,)
            state = dev.poll_state()
            assert abs(state.positions[0]) < 0.01  # the emulated servo rests at mid-range (tick 2048)
