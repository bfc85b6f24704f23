"""Motor devices people own (Dynamixel first), behind one small interface and a URL-scheme registry.

    from firmware_bridge.motors import open_device
    dev = open_device("dynamixel:///dev/ttyUSB0?baud=1000000&ids=1-6", joint_limits=[(-1.5, 1.5)] * 6)

Backends are imported lazily by the registry, so importing this package needs no vendor SDK.
"""

from firmware_bridge.motors.base import (
    ArmRefusedError,
    Capabilities,
    FaultLatchedError,
    MissingDependencyError,
    MotorBusError,
    MotorDevice,
    MotorError,
    MotorFault,
    MotorState,
    MotorUrlError,
    StopCategory,
)
from firmware_bridge.motors.registry import open_device, parse_url, schemes

__all__ = [
    "ArmRefusedError",
    "Capabilities",
    "FaultLatchedError",
    "MissingDependencyError",
    "MotorBusError",
    "MotorDevice",
    "MotorError",
    "MotorFault",
    "MotorState",
    "MotorUrlError",
    "StopCategory",
    "open_device",
    "parse_url",
    "schemes",
]
