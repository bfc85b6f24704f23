"""The motor registry: schemes, URL parsing, lazy imports, one-line errors, and the device lifecycle."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

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
