"""The host's CAN interface goes down mid-motion (`ip link set can0 down`, a USB-CAN adapter pulled out): on
SocketCAN every send and receive then fails (python-can raises CanOperationError with errno ENETDOWN). The fault
campaign's bus-down row (edge_vla.onboard.can_campaign.CanCampaign.bus_down) models the devices' half over
python-can's udp_multicast bus, where a host's send cannot fail; this is the host's half, in one process on
python-can's virtual bus with the host's bus made to fail as SocketCAN's does:

- the next cycle refuses in one line naming the interface (the control loop then trips category 0), a stop says
  it could not confirm torque off (False) instead of raising, and close() returns;
- the devices, which hear nothing more, stop by their own watchdog (Damiao TIMEOUT, CiA 402 heartbeat consumer).

Control: the same host on the same bus, without the failure, drives and stops with every device confirmed off.
"""

from __future__ import annotations

import errno
import time
import uuid
from typing import Any

import can
import pytest
from cia402_helpers import wait_for

from firmware_bridge.motors.base import MotorError, StopCategory

PERIOD_MS = 50
CYCLE_S = PERIOD_MS / 1000 / 2


def interface_down(bus: can.BusABC) -> None:
    """From now on this host's bus fails as SocketCAN's does when its interface is down."""

    def down(*_: Any, **__: Any) -> None:
        raise can.CanOperationError("Failed to transmit: Network is down", errno.ENETDOWN)

    bus.send = down  # type: ignore[method-assign]
    bus.recv = down  # type: ignore[method-assign]


def cycles(dev: Any, target: float, n: int) -> None:
    for _ in range(n):
        dev.poll_state()
        dev.write_setpoints([target] * len(dev.names))
        time.sleep(CYCLE_S)


def damiao_pair(channel: str) -> tuple[Any, Any]:
    from firmware_bridge.motors import damiao_emulator as dme
    from firmware_bridge.motors.damiao import DamiaoDevice

    emu = dme.DamiaoBusEmulator([dme.MotorConfig(esc_id=1)], interface="virtual", channel=channel).start()
    dev = DamiaoDevice.from_url(f"virtual/{channel}", {"ids": "1", "period_ms": str(PERIOD_MS)},
                                joint_limits=[(-1.6, 1.6)])
    return emu, dev.open()


def cia402_pair(channel: str) -> tuple[Any, Any]:
    pytest.importorskip("canopen", reason="canopen is not installed (pip install 'edge-vla[cia402]')")
    from cia402_helpers import JOINT_LIMITS, LIMIT_COUNTS, device_from_url

    from firmware_bridge.motors.cia402_emulator import DriveBus, DriveConfig

    emu = DriveBus([DriveConfig(node=1, soft_limits=(-LIMIT_COUNTS, LIMIT_COUNTS))], interface="virtual",
                   channel=channel).start()
    dev = device_from_url(f"cia402://virtual/{channel}?node=1&period_ms={PERIOD_MS}", joint_limits=[JOINT_LIMITS])
    return emu, dev.open()


PAIRS = {"damiao": (damiao_pair, "timeout_expired"), "cia402": (cia402_pair, "heartbeat_expired")}


@pytest.mark.parametrize("scheme", sorted(PAIRS))
def test_control_the_same_host_drives_and_confirms_its_stop(scheme: str) -> None:
    make, _ = PAIRS[scheme]
    emu, dev = make(f"{scheme}-{uuid.uuid4().hex[:8]}")
    try:
        dev.arm()
        cycles(dev, 0.3, 6)
        assert dev.stop(StopCategory.TORQUE_OFF) is True
    finally:
        dev.close()
        emu.stop()


# canopen's receive thread (python-can's Notifier) survives the receive errors and backs off: no thread ends on an
# unhandled exception (test_cia402_receive_error.py covers the CiA 402 receive side and its recovery).
@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("scheme", sorted(PAIRS))
def test_interface_down_mid_motion_refuses_in_one_line_and_the_devices_stop_themselves(scheme: str) -> None:
    make, expired = PAIRS[scheme]
    channel = f"{scheme}-{uuid.uuid4().hex[:8]}"
    emu, dev = make(channel)
    try:
        dev.arm()
        cycles(dev, 0.3, 6)
        interface_down(dev._bus if scheme == "damiao" else dev._net.bus)
        down_at = time.monotonic()
        with pytest.raises(MotorError) as err:
            cycles(dev, 0.3, 20)
        message = str(err.value)
        assert "\n" not in message and channel in message, message
        assert time.monotonic() - down_at < 3.0  # refused within the cycles, not after a long hang
        t0 = time.monotonic()
        assert dev.stop(StopCategory.TORQUE_OFF) is False  # nothing confirmed over a dead interface, no exception
        assert time.monotonic() - t0 < 5.0
        assert wait_for(lambda: bool(emu.events_of(expired)), 2.0)  # the device stopped by its own watchdog
        assert emu.events_of(expired)[0].t >= down_at
    finally:
        dev.close()  # returns on a dead interface
        emu.stop()
    assert dev.closed
