"""The vendor SDKs' clearPort() leaves stale input in place: a late reply is then read as the next request's."""

from __future__ import annotations

import os
import termios
import time
import tty

import pytest

from firmware_bridge.motors.sdk_port import port_handler

SDKS = [pytest.param("dynamixel_sdk", id="dynamixel"), pytest.param("scservo_sdk", id="feetech")]
# What each SDK's own clearPort leaves behind: dynamixel-sdk 4.x resets the input buffer; feetech-servo-sdk 1.0
# only flushes output (the defect this wrapper fixes).
SDK_OWN_LEFTOVER = {"dynamixel_sdk": 0, "scservo_sdk": 7}


def _pty() -> tuple[int, str]:
    master, slave = os.openpty()
    tty.setraw(master)
    path = os.ttyname(slave)
    os.close(slave)
    return master, path


def _buffered_after_clear(port) -> int:
    port.setBaudRate(1_000_000)
    master = port._test_master
    os.write(master, bytes([0xFF, 0xFF, 0x01, 0x03, 0x00, 0x01, 0xFA]))  # a late status packet arrives
    deadline = time.monotonic() + 5
    while port.getBytesAvailable() < 7 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert port.getBytesAvailable() == 7, "the stale reply reached the host's input buffer"
    port.clearPort()  # what txPacket does before every request
    left = port.getBytesAvailable()
    port.closePort()
    return left


@pytest.mark.parametrize("module", SDKS)
def test_stale_input_is_discarded_before_the_next_request(module: str) -> None:
    sdk = pytest.importorskip(module)
    master, path = _pty()
    try:
        ours = port_handler(sdk, path)
        ours._test_master = master
        assert _buffered_after_clear(ours) == 0
        termios.tcflush(master, termios.TCIOFLUSH)
        theirs = sdk.PortHandler(path)  # control: the SDK's own clearPort (Feetech's keeps the stale bytes)
        theirs._test_master = master
        assert _buffered_after_clear(theirs) == SDK_OWN_LEFTOVER[module]
    finally:
        os.close(master)


@pytest.mark.parametrize("module", SDKS)
def test_reply_timeout_follows_the_adapters_latency(module: str) -> None:
    sdk = pytest.importorskip(module)
    master, path = _pty()
    try:
        port = port_handler(sdk, path, latency_ms=100)
        port.setBaudRate(1_000_000)
        port.setPacketTimeout(10)
        assert port.packet_timeout == pytest.approx(port.tx_time_per_byte * 10 + 202.0)
        port.closePort()
    finally:
        os.close(master)
