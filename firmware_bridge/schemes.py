"""Link URL scheme -> `Controller` backend, imported lazily (python-can's interface registry shape).

The registry holds only "module:Class" strings, so listing the schemes (`edge-vla run --help`, one-line errors)
imports no backend, no vendor SDK, no python-can. It lives apart from the classes: no backend module imports
this one, and this one imports a backend only when a URL names its scheme.

    serial:///dev/ttyACM0?baud=1000000          this project's firmware protocol (firmware_bridge.link)
    can://socketcan/can0?node=1&fd=0            the same protocol over python-can
    dynamixel:///dev/ttyUSB0?ids=1-6            servo buses (firmware_bridge.motors): a MotorDevice behind the
    feetech:///dev/ttyUSB0?ids=1-6              Controller interface (motors.link_adapter)
"""

from __future__ import annotations

import importlib
from typing import Any

from firmware_bridge.controller import Controller
from firmware_bridge.errors import UrlError

# scheme -> (import path, one-line description with an example). The motor schemes' descriptions come from the
# motor registry (firmware_bridge.motors.registry), which also builds their devices.
FIRMWARE_BACKENDS: dict[str, tuple[str, str]] = {
    "serial": (
        "firmware_bridge.serial_link:SerialLink",
        "this project's firmware protocol over a UART, USB CDC or pty (or any pyserial URL after serial://): "
        "serial:///dev/ttyACM0?baud=1000000",
    ),
    "can": (
        "firmware_bridge.can_link:CanLink",
        "this project's firmware protocol over python-can (any interface; can://virtual/<channel> in tests): "
        "can://socketcan/can0?node=1&fd=0&bitrate=1000000",
    ),
}
MOTOR_BACKEND = "firmware_bridge.motors.link_adapter:MotorDeviceLink"


def _motor_schemes() -> dict[str, str]:
    from firmware_bridge.motors.registry import schemes as motor_schemes  # imports no backend either

    return motor_schemes()


def backends() -> dict[str, tuple[str, str]]:
    """Every accepted scheme -> (import path, description)."""
    table = dict(FIRMWARE_BACKENDS)
    table.update({scheme: (MOTOR_BACKEND, desc) for scheme, desc in _motor_schemes().items()})
    return table


def schemes() -> dict[str, str]:
    """Accepted URL schemes, each with a one-line description (for `edge-vla run --link` help and errors)."""
    return {scheme: desc for scheme, (_, desc) in backends().items()}


def accepted() -> str:
    """One example URL per scheme (the end of each description), for one-line errors."""
    return ", ".join(desc.rsplit(": ", 1)[-1] for desc in schemes().values())


def scheme_of(url: str) -> str:
    """The URL's scheme, lower-cased; UrlError for a string that is not SCHEME://... or names no backend."""
    if not isinstance(url, str) or "://" not in url:
        raise UrlError(f"link {url!r} is not a URL: write SCHEME://...; accepted forms: {accepted()}")
    scheme = url.partition("://")[0].lower()
    if scheme not in backends():
        raise UrlError(f"unsupported link URL {url!r}: unknown scheme {scheme!r}; accepted forms: {accepted()}")
    return scheme


def backend_class(scheme: str) -> type[Controller]:
    target, _ = backends()[scheme]
    module_name, _, class_name = target.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(cls, type) and issubclass(cls, Controller)):  # a registry typo fails here, not in the loop
        raise TypeError(f"{target} is not a firmware_bridge.controller.Controller")
    return cls


def open_link(url: str, **kw: Any) -> Controller:
    """The controller a URL names, built but not opened (use `with open_link(url) as link:`). Keyword arguments
    go to the backend (Link: backoff...; motor devices: joint_limits, joint_names, period_s, calibration)."""
    return backend_class(scheme_of(url)).from_url(url, **kw)


__all__ = ["accepted", "backend_class", "backends", "open_link", "scheme_of", "schemes"]
