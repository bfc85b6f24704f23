"""The motor registry: schemes, URL parsing, lazy imports, one-line errors, and the device lifecycle."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware_bridge.motors import MissingDependencyError, MotorUrlError, open_device, parse_url, schemes
from firmware_bridge.motors.dynamixel import DynamixelDevice
from firmware_bridge.motors.dynamixel_emulator import BusEmulator, ServoConfig
from firmware_bridge.motors.registry import parse_ids


def test_schemes_list_only_backends_that_exist_with_a_description() -> None:
    listed = schemes()
    assert list(listed) == ["dynamixel", "feetech", "damiao", "cia402"]
    assert "dynamixel://" in listed["dynamixel"] and "Bus Watchdog" in listed["dynamixel"]


def test_registry_imports_no_backend_sdk_and_never_edge_vla_or_torch() -> None:
    code = ("import sys, firmware_bridge.motors as m; m.schemes(); m.parse_url('dynamixel:///dev/x?ids=1');"
            "print(sorted(k for k in ('dynamixel_sdk', 'edge_vla', 'torch', 'firmware_bridge.motors.dynamixel')"
            " if k in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize(("text", "ids"), [("1-6", (1, 2, 3, 4, 5, 6)), ("1,2,5", (1, 2, 5)), ("1-3,7", (1, 2, 3, 7)),
                                           ("0", (0,)), ("252", (252,))])
def test_parse_ids(text: str, ids: tuple[int, ...]) -> None:
    assert parse_ids(text) == ids


@pytest.mark.parametrize("text", ["6-1", "a", "1,,2", "1-2-3", "253", "-1", "1,1", "1-3,2", ""])
def test_parse_ids_refuses_with_one_line(text: str) -> None:
    with pytest.raises(MotorUrlError) as err:
        parse_ids(text)
    assert "\n" not in str(err.value) and "ids=" in str(err.value)


def test_parse_url_port_forms() -> None:
    assert parse_url("dynamixel:///dev/ttyUSB0?ids=1-6").port == "/dev/ttyUSB0"
    assert parse_url("dynamixel://COM3?ids=1").port == "COM3"
    assert parse_url("DYNAMIXEL:///dev/ttyUSB0?ids=1&baud=57600").params == {"ids": "1", "baud": "57600"}


@pytest.mark.parametrize(("url", "says"), [
    ("robstride:///dev/ttyUSB0?ids=1-6", "unknown motor link scheme 'robstride'"),
    ("/dev/ttyUSB0", "not a URL"),
    ("dynamixel://?ids=1", "names no port"),
    ("dynamixel:///dev/x?ids=1&ids=2", "given twice"),
    ("dynamixel:///dev/x?ids=1&speed=3", "unknown query parameter(s) speed"),
    ("dynamixel:///dev/x?ids=1&baud=12345", "baud=12345 is not supported"),
    ("dynamixel:///dev/x?ids=1&baud=fast", "baud='fast' is not an integer"),
    ("dynamixel:///dev/x?baud=1000000", "needs ids="),
    ("dynamixel:///dev/x?ids=1-x", "is not an id or a range"),
    ("dynamixel:///dev/x?ids=1&period_ms=5", "below this backend's floor"),
    ("dynamixel:///dev/x?ids=1&host_limits=yes", "host_limits='yes' is not an integer"),
    ("dynamixel:///dev/x?ids", "malformed query"),
])
def test_bad_urls_get_one_line_errors(url: str, says: str) -> None:
    with pytest.raises(MotorUrlError) as err:
        open_device(url, open_now=False)
    assert says in str(err.value)
    assert "\n" not in str(err.value)


def test_open_device_builds_the_backend_from_the_url() -> None:
    dev = open_device("dynamixel:///dev/null?ids=1,2,5&baud=57600&period_ms=20", open_now=False,
                      joint_limits=[(-1, 1)] * 3)
    assert isinstance(dev, DynamixelDevice)
    assert (dev.ids, dev.baud, dev.watchdog_units) == ((1, 2, 5), 57600, 2)
    assert dev.capabilities.watchdog_period_s == pytest.approx(0.04)
    assert dev.closed  # not opened: close() is a no-op and nothing warns
    dev.close()


def test_missing_sdk_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "dynamixel_sdk", None)  # import fails as if not installed
    dev = open_device("dynamixel:///dev/null?ids=1", open_now=False)
    with pytest.raises(MissingDependencyError, match=r"pip install 'edge-vla\[dynamixel\]'"):
        dev.open()


def test_open_fails_clearly_on_a_missing_port() -> None:
    with pytest.raises(Exception) as err:
        open_device("dynamixel:///dev/does-not-exist?ids=1")
    assert "cannot open /dev/does-not-exist" in str(err.value)


def test_close_is_idempotent_and_a_skipped_close_warns(caplog: pytest.LogCaptureFixture) -> None:
    with BusEmulator([ServoConfig(dxl_id=1, return_delay=0)]) as bus:
        dev = open_device(f"dynamixel://{bus.port}?ids=1", joint_limits=[(-3.0, 3.0)])
        dev.close()
        dev.close()
        assert dev.closed
        dropped = open_device(f"dynamixel://{bus.port}?ids=1")
        with caplog.at_level(logging.WARNING):
            dropped.__del__()  # what the garbage collector does to a device nobody closed
        assert "was not closed" in caplog.text
        assert dropped.closed


# -- device ids per scheme (issue 25): servo-bus ids, 11-bit CAN ids (Damiao), CANopen node ids (CiA 402) ---------
ID_RANGES = {"dynamixel": (0, 252), "feetech": (0, 253), "damiao": (0, 0x7FE), "cia402": (1, 127)}
ID_KEYS = {"cia402": "node"}


@pytest.mark.parametrize(("scheme", "lo", "hi"), [(s, lo, hi) for s, (lo, hi) in ID_RANGES.items()])
def test_each_scheme_takes_its_own_id_range(scheme: str, lo: int, hi: int) -> None:
    key = ID_KEYS.get(scheme, "ids")
    assert parse_ids(f"{lo},{hi}", key, scheme=scheme) == (lo, hi)
    for outside in (lo - 1, hi + 1):
        with pytest.raises(MotorUrlError) as err:
            parse_ids(f"{lo}-{outside}" if outside > lo else str(outside), key, scheme=scheme)
        message = str(err.value)
        assert "\n" not in message and f"{key}=" in message and f"{lo}..{hi}" in message, message


@given(scheme=st.sampled_from(sorted(ID_RANGES)), ident=st.integers(min_value=-5, max_value=5000))
def test_an_id_parses_exactly_when_it_is_inside_its_schemes_range(scheme: str, ident: int) -> None:
    lo, hi = ID_RANGES[scheme]
    key = ID_KEYS.get(scheme, "ids")
    if lo <= ident <= hi:
        assert parse_ids(str(ident), key, scheme=scheme) == (ident,)
    else:
        with pytest.raises(MotorUrlError, match=rf"{lo}\.\.{hi}"):
            parse_ids(str(ident), key, scheme=scheme)


@pytest.mark.parametrize(("url", "ids"), [
    ("damiao://virtual/x?ids=300,301&master_ids=400,401", (300, 301)),  # 11-bit CAN ids above the servo buses' 252
    ("damiao://virtual/x?ids=0x7FE", None),  # not a decimal id
    ("cia402://virtual/x?node=126,127&host_node=1", (126, 127)),  # the host heartbeat moved off 127
])
def test_can_urls_take_can_ids_wider_than_a_servo_bus(url: str, ids: tuple[int, ...] | None) -> None:
    if url.startswith("cia402"):
        pytest.importorskip("canopen")
    if ids is None:
        with pytest.raises(MotorUrlError, match="is not an id or a range"):
            open_device(url, open_now=False)
        return
    dev = open_device(url, open_now=False, joint_limits=[(-1.0, 1.0)] * len(ids))
    assert getattr(dev, "ids", None) == ids or getattr(dev, "nodes", None) == ids


@pytest.mark.parametrize(("url", "says"), [
    ("damiao://virtual/x?ids=2047", "ids='2047': '2047' is outside 0..2046"),
    ("cia402://virtual/x?node=128", "node='128': '128' is outside 1..127"),
    ("cia402://virtual/x?node=0-2", "node='0-2': '0-2' is outside 1..127"),
    ("feetech:///dev/null?ids=254", "ids='254': id 254 is the broadcast id"),  # Feetech's own ids are 0..253
    ("dynamixel:///dev/null?ids=253", "ids='253': '253' is outside 0..252"),
])
def test_an_id_outside_the_schemes_range_is_refused_naming_the_range(url: str, says: str) -> None:
    if url.startswith("cia402"):
        pytest.importorskip("canopen")
    with pytest.raises(MotorUrlError) as err:
        open_device(url, open_now=False)
    assert says in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_the_robot_configurations_link_check_uses_the_schemes_id_range() -> None:
    """Provisioning checks a robot configuration's motor link with the same per-scheme range (it refused Damiao
    CAN ids above 252 as servo-bus ids)."""
    from edge_vla.provision.robot_config import ConfigError, link_kind

    assert link_kind("damiao://socketcan/can0?ids=300") == "damiao"
    with pytest.raises(ConfigError, match=r"outside 0\.\.2046"):
        link_kind("damiao://socketcan/can0?ids=2047")
    with pytest.raises(ConfigError, match=r"outside 0\.\.252"):
        link_kind("dynamixel:///dev/ttyUSB0?ids=300")
