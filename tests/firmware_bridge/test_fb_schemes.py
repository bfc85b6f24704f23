"""The link scheme registry (firmware_bridge.schemes) and the one Controller interface every backend implements."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from firmware_bridge.can_link import CanLink
from firmware_bridge.controller import Controller
from firmware_bridge.errors import UrlError
from firmware_bridge.link import Link
from firmware_bridge.motors.link_adapter import MotorDeviceLink
from firmware_bridge.schemes import backend_class, backends, open_link, scheme_of, schemes
from firmware_bridge.serial_link import SerialLink

BACKEND_MODULES = ("firmware_bridge.serial_link", "firmware_bridge.can_link", "firmware_bridge.motors.link_adapter",
                   "firmware_bridge.motors.dynamixel", "firmware_bridge.motors.feetech", "dynamixel_sdk",
                   "scservo_sdk", "can", "serial")


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
                         check=True, capture_output=True, text=True, timeout=60)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_listing_the_schemes_imports_no_backend_and_no_vendor_sdk() -> None:
    loaded = _modules_after("from firmware_bridge.schemes import schemes; assert len(schemes()) >= 4")
    assert not loaded & set(BACKEND_MODULES), sorted(loaded & set(BACKEND_MODULES))
    # Control: opening a serial URL imports its backend (the check can see an import).
    loaded = _modules_after("from firmware_bridge.schemes import open_link; open_link('serial:///dev/null')")
    assert "firmware_bridge.serial_link" in loaded and "firmware_bridge.motors.dynamixel" not in loaded


def test_the_protocol_module_imports_none_of_its_transports_classes() -> None:
    """link.py <-> serial_link.py/can_link.py imported each other; the registry now sits apart from all three."""
    loaded = _modules_after("import firmware_bridge.link")
    assert {"firmware_bridge.serial_link", "firmware_bridge.can_link", "firmware_bridge.schemes"}.isdisjoint(loaded)


def test_every_scheme_is_a_controller_backend() -> None:
    assert {"serial", "can", "dynamixel", "feetech"} <= set(schemes())
    expected = {"serial": SerialLink, "can": CanLink, "dynamixel": MotorDeviceLink, "feetech": MotorDeviceLink}
    for scheme, cls in expected.items():
        assert backend_class(scheme) is cls and issubclass(cls, Controller)
    # The firmware protocol is one backend among them, not the loop's interface.
    assert issubclass(Link, Controller) and not issubclass(MotorDeviceLink, Link)
    for scheme, (_, desc) in backends().items():
        assert desc.rsplit(": ", 1)[-1].startswith(f"{scheme}://"), desc  # each description ends with an example


def test_open_link_builds_each_backend_without_opening_it() -> None:
    serial_link = open_link("SERIAL:///dev/ttyUSB9?baud=57600")
    assert isinstance(serial_link, SerialLink) and serial_link.baudrate == 57600 and not serial_link.connected
    can_link = open_link("can://virtual/bus7?node=3&fd=1")
    assert isinstance(can_link, CanLink) and can_link.node_id == 3 and can_link.fd
    for scheme in ("dynamixel", "feetech"):
        dev = open_link(f"{scheme}:///dev/ttyUSB9?ids=1-2", joint_limits=[(-1.0, 1.0)] * 2)
        assert isinstance(dev, MotorDeviceLink) and not dev.connected and dev.url.startswith(scheme)


@pytest.mark.parametrize(("url", "message"), [
    ("tcp://robot:1234", "unknown scheme 'tcp'; accepted forms: serial:///dev/ttyACM0"),
    ("/dev/ttyACM0", "is not a URL"),
    ("serial://?baud=9600", "no port"),
    ("serial:///dev/ttyACM0?baud=fast", "baud='fast'"),
    ("can://virtual", "interface and a channel"),
    ("can://socketcan/can0?node=x", "node and bitrate are integers"),
    ("dynamixel:///dev/ttyUSB0?ids=1-300", "outside 0..252"),
    ("feetech:///dev/ttyUSB0?ids=1-3&colour=red", "unknown query parameter"),
])
def test_bad_urls_get_one_line_errors(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        open_link(url)
    assert "\n" not in str(info.value)


def test_scheme_of_rejects_non_strings() -> None:
    with pytest.raises(UrlError, match="not a URL"):
        scheme_of(None)  # type: ignore[arg-type]


def test_a_half_written_backend_is_refused_at_construction() -> None:
    class Partial(Controller):  # implements nothing the loop needs
        pass

    with pytest.raises(TypeError, match="abstract"):
        Partial()  # type: ignore[abstract]


def test_run_help_lists_every_registered_scheme() -> None:
    out = subprocess.run([str(Path(sys.executable).with_name("edge-vla")), "run", "--help"], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    flat = " ".join(out.split())
    for scheme in schemes():
        assert f"{scheme}://" in flat, scheme
    assert "NO device watchdog" in flat  # the Feetech line says what protects the arm (nothing on the device)
