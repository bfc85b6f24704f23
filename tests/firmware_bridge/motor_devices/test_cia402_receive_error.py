"""A CAN receive error on a CiA 402 host: python-can's receive raises (SocketCAN does, with ENETDOWN, while the
interface is down or a USB-CAN adapter resets), then the bus works again.

canopen's receive thread is python-can's Notifier: an unhandled receive error ends it, and canopen then re-raises
that error from every later send, so the link stayed dead after the bus came back (only a restart recovered it).
What a safety-critical link must do instead, checked here:

- trip at once: the next cycle raises one line naming the interface and the receive failure, a `bus_error` fault is
  latched (frames from the drives may have been lost while receive failed: an EMCY, a statusword change) and the
  drives are stopped (category 0), read back as disabled once the bus answers again;
- behind the control loop's link the latched fault is a trip report (Fault.LINK_ERRORS, category 0);
- recover by the operator's act only: the receive thread lives on, feedback comes back, setpoints stay refused until
  clear faults, after which arm and motion work again;
- an interface that stays down fails every cycle and the receive thread backs off instead of spinning on a core.

In one process on python-can's virtual bus, the drives' emulator on its own bus object; the host's bus fails inside
its real receive path (`_recv_internal`, which the Notifier thread reaches through `BusABC.recv`). Controls: the same
host without the failure drives with fresh feedback and no fault; error frames on the bus are no receive failure.
"""

from __future__ import annotations

import errno
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import can
import numpy as np
import pytest

pytest.importorskip("canopen", reason="canopen is not installed (pip install 'edge-vla[cia402]')")

from cia402_helpers import JOINT_LIMITS, LIMIT_COUNTS, device_from_url, drive, wait_for

from firmware_bridge.motors import cia402
from firmware_bridge.motors.base import FaultLatchedError, MotorBusError, MotorError
from firmware_bridge.motors.cia402 import Cia402Device
from firmware_bridge.motors.cia402_emulator import DriveBus, DriveConfig, snapshot
from firmware_bridge.protocol import Fault, Mode

PERIOD_MS = 50  # heartbeat consumer 100 ms: room for a loaded 2-core box
PERIOD_S = PERIOD_MS / 1000
SOD, OE = "SWITCH ON DISABLED", "OPERATION ENABLED"


class FailingReceive:
    """The host bus's receive fails as SocketCAN's does while its interface is down, for as long as `down` is set."""

    def __init__(self, bus: can.BusABC) -> None:
        self.real = bus._recv_internal
        self.down = False
        self.failures = 0
        bus._recv_internal = self._recv  # type: ignore[method-assign]

    def _recv(self, timeout: float | None) -> tuple[can.Message | None, bool]:
        if self.down:
            self.failures += 1
            raise can.CanOperationError("Failed to receive: Network is down", errno.ENETDOWN)
        return self.real(timeout)

    def blip(self) -> None:
        """The interface goes away until the receive thread has hit it once, then comes back."""
        self.down = True
        try:
            assert wait_for(lambda: self.failures >= 1, 2.0), "the receive thread never read the bus"
        finally:
            self.down = False


@pytest.fixture
def rig(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[DriveBus, Cia402Device, FailingReceive, list[Any]]]:
    """The emulated drive, the opened host and its failing receive; the last item collects threads that died."""
    died: list[Any] = []
    monkeypatch.setattr(threading, "excepthook", died.append)
    channel = f"cia402-rx-{uuid.uuid4().hex[:8]}"
    emu = DriveBus([DriveConfig(node=1, soft_limits=(-LIMIT_COUNTS, LIMIT_COUNTS))], interface="virtual",
                   channel=channel).start()
    dev = device_from_url(f"cia402://virtual/{channel}?node=1&period_ms={PERIOD_MS}", joint_limits=[JOINT_LIMITS])
    try:
        dev.open()
        yield emu, dev, FailingReceive(dev._net.bus), died
    finally:
        dev.close()
        emu.stop()


def first_error(cycle: Callable[[], object], within_s: float) -> MotorError:
    """Run control cycles until one raises (at most `within_s`); the error it raised."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            cycle()
        except MotorError as exc:
            return exc
        time.sleep(PERIOD_S / 2)
    raise AssertionError(f"no cycle failed within {within_s} s")


def fresh_state_age(dev: Cia402Device) -> float:
    """Seconds between the drives' newest feedback and now, right after a poll."""
    state = dev.poll_state()
    return time.monotonic() - state.stamp


def test_control_without_a_receive_error_feedback_stays_fresh(rig: Any) -> None:
    emu, dev, _, died = rig
    dev.arm()
    for _ in range(10):
        assert fresh_state_age(dev) < 2 * PERIOD_S  # answered this (or the last) SYNC
        dev.write_setpoints([0.3])
        time.sleep(PERIOD_S / 2)
    assert dev.armed and not dev.faults and not died
    assert dev.stop(0) is True and snapshot(emu, 1)["state"] == SOD


def test_a_receive_error_trips_at_once_and_the_link_recovers_by_the_operators_act(rig: Any) -> None:
    emu, dev, failing, died = rig
    dev.arm()
    drive(dev, 0.3, 6, PERIOD_S / 2)
    failing.blip()  # the interface goes away briefly and is back before the next cycle
    err = first_error(lambda: drive(dev, 0.3, 1, 0.0), within_s=1.0)
    message = str(err)
    assert isinstance(err, MotorBusError) and "\n" not in message, message
    assert dev.channel in message and "receive" in message and "clear faults" in message, message
    assert [f.code for f in dev.faults] == ["bus_error"], dev.faults
    assert not dev.armed and snapshot(emu, 1)["state"] == SOD and not snapshot(emu, 1)["torque"]  # stopped, cat 0
    with pytest.raises(FaultLatchedError):
        dev.write_setpoints([0.3])
    # The receive thread lives on: feedback is fresh again without a restart.
    assert wait_for(lambda: fresh_state_age(dev) < 2 * PERIOD_S, 1.0), "no feedback after the bus came back"
    dev.clear_faults()  # the operator's act
    dev.arm()
    positions = drive(dev, -0.4, 40, PERIOD_S / 2)
    assert np.allclose(positions, -0.4, atol=0.03) and snapshot(emu, 1)["state"] == OE
    assert not died, died  # no thread ended on an unhandled exception


def test_behind_the_control_loops_link_a_receive_error_is_a_link_trip(rig: Any) -> None:
    from firmware_bridge.motors.link_adapter import MotorDeviceLink

    _, dev, failing, _ = rig
    link = MotorDeviceLink(dev.url, device=dev).open()
    link.hello()
    assert link.ack_result(link.send_arm()) is True
    for _ in range(4):  # control: a healthy cycle reports nothing
        link.poll()
        link.send_setpoints([0.2])
    assert not link.faults and link.latest_state.mode == Mode.ARMED
    failing.blip()
    assert wait_for(lambda: link.poll() == [] and bool(link.faults), 1.0), "the receive error was never reported"
    report = link.faults[0]
    assert report.fault_code == Fault.LINK_ERRORS and report.stop_category == 0 and report.mode == Mode.TRIPPED
    with pytest.raises(MotorError):
        link.send_setpoints([0.2])


def test_an_interface_that_stays_down_fails_every_cycle_without_spinning(rig: Any) -> None:
    _, dev, failing, died = rig
    dev.arm()
    failing.down = True
    t0 = time.monotonic()
    assert wait_for(lambda: failing.failures >= 5, 2.0)
    took = time.monotonic() - t0
    assert took >= 4 * cia402.RECEIVE_RETRY_S * 0.9, f"5 receive failures in {took * 1000:.1f} ms: the thread spins"
    for _ in range(3):  # every cycle says so, none hangs
        t = time.monotonic()
        with pytest.raises(MotorBusError, match="receive"):
            dev.poll_state()
        assert time.monotonic() - t < 2.0
    assert not dev.armed and not died


def test_control_error_frames_are_no_receive_failure(rig: Any) -> None:
    """SocketCAN delivers the controller's error frames (python-can enables them); CANopen drops them, and the
    receive path must go on."""
    emu, dev, _, died = rig
    intruder = can.Bus(interface="virtual", channel=dev.channel)
    try:
        dev.arm()
        for error_class in (0x08, 0x04, 0x40):  # protocol violation, controller problem, bus-off (linux/can/error.h)
            intruder.send(can.Message(arbitration_id=error_class, is_error_frame=True, is_extended_id=False,
                                      data=bytes(8)))
        for _ in range(6):
            assert fresh_state_age(dev) < 2 * PERIOD_S
            dev.write_setpoints([0.2])
            time.sleep(PERIOD_S / 2)
        assert dev.armed and not dev.faults and not died and snapshot(emu, 1)["state"] == OE
    finally:
        intruder.shutdown()


def test_a_receive_error_while_opening_refuses_the_open_without_a_fault_to_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    """open() is not a run: nothing is armed and the device does not open, so the message must not send the operator
    to clear faults on a device that is not open; the same device opens once the bus works. Control: the same open
    with no receive error succeeds."""
    channel = f"cia402-rx-open-{uuid.uuid4().hex[:8]}"
    emu = DriveBus([DriveConfig(node=1, soft_limits=(-LIMIT_COUNTS, LIMIT_COUNTS))], interface="virtual",
                   channel=channel).start()
    dev = device_from_url(f"cia402://virtual/{channel}?node=1&period_ms={PERIOD_MS}", joint_limits=[JOINT_LIMITS])
    real_wait = Cia402Device._sync_and_wait
    failing = {"on": True}

    def wait_with_an_error(self: Cia402Device, timeout: float) -> bool:
        if failing["on"]:
            self._on_receive_error(can.CanOperationError("Failed to receive: Network is down", errno.ENETDOWN))
        return real_wait(self, timeout)

    monkeypatch.setattr(Cia402Device, "_sync_and_wait", wait_with_an_error)
    try:
        with pytest.raises(MotorBusError) as err:
            dev.open()
        message = str(err.value)
        assert "while opening" in message and "open again" in message and "clear faults" not in message, message
        assert "\n" not in message and not dev.faults
        failing["on"] = False  # the bus works again: the same device opens
        dev.open()
        assert not dev.faults and snapshot(emu, 1)["state"] == SOD
    finally:
        dev.close()
        emu.stop()
