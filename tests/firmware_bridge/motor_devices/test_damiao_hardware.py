"""Measure, on a real Damiao motor, the two facts the sources disagree on (see firmware_bridge/motors/damiao.py):
the TIMEOUT register's unit (50 us or 1 ms) and what the motor does when it expires (damping or disable).

Skipped unless EDGE_VLA_DAMIAO_URL names ONE unloaded motor on a real bus, e.g.
    EDGE_VLA_DAMIAO_URL='damiao://socketcan/can0?ids=1' pytest -m hardware tests/firmware_bridge/motor_devices/test_damiao_hardware.py
The motor is enabled with kp = kd = 0 and zero torque (it applies no torque while the test runs); TIMEOUT is
written to RAM only (a power cycle restores the flash value) and the motor is disabled at the end."""

from __future__ import annotations

import os
import time
from urllib.parse import parse_qsl, urlsplit

import can
import pytest

from firmware_bridge.motors import damiao as dm

URL = os.environ.get("EDGE_VLA_DAMIAO_URL", "")
TEST_VALUE = 4000  # 0.2 s if the unit is 50 us, 4 s if it is 1 ms


@pytest.mark.hardware
@pytest.mark.skipif(not URL, reason="set EDGE_VLA_DAMIAO_URL=damiao://socketcan/can0?ids=N (one unloaded motor)")
def test_measure_the_timeout_unit_and_the_expiry_action() -> None:
    parts = urlsplit(URL)
    interface, _, channel = (parts.netloc + parts.path).partition("/")
    params = dict(parse_qsl(parts.query))
    esc = int(params["ids"])
    mst = int(params.get("master_ids", esc + dm.MASTER_OFFSET))
    bus = can.Bus(interface=interface, channel=channel)
    try:
        def reply(timeout: float = 0.1) -> can.Message | None:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                msg = bus.recv(deadline - time.monotonic())
                if msg is not None and msg.arbitration_id == mst and len(msg.data) == 8:
                    return msg
            return None

        bus.send(can.Message(arbitration_id=dm.REGISTER_ID, is_extended_id=False,
                             data=dm.register_frame(esc, dm.REG_WRITE, dm.RID_TIMEOUT, TEST_VALUE)))
        reply()
        bus.send(can.Message(arbitration_id=esc, data=dm.ENABLE, is_extended_id=False))
        assert reply() is not None, "the motor did not answer enable"
        ranges = dm.MitRanges(12.5, 30.0, 10.0)
        bus.send(can.Message(arbitration_id=esc, data=dm.encode_mit(0, 0, 0, 0, 0, ranges), is_extended_id=False))
        last_command = time.monotonic()
        expired_after = None
        while time.monotonic() - last_command < 10.0:  # watch the status with refresh frames (0xCC on 0x7FF)
            bus.send(can.Message(arbitration_id=dm.REGISTER_ID, is_extended_id=False,
                                 data=bytes([esc & 0xFF, esc >> 8, dm.REFRESH, 0, 0, 0, 0, 0])))
            msg = reply(0.01)
            if msg is not None and (msg.data[0] >> 4) != dm.STATUS_ENABLED:
                expired_after = time.monotonic() - last_command
                status = msg.data[0] >> 4
                break
        assert expired_after is not None, "no expiry within 10 s: a refresh frame may feed the timeout; retry passively"
        print(f"TIMEOUT {TEST_VALUE} expired after {expired_after:.3f} s, status 0x{status:X}")
        unit_s = expired_after / TEST_VALUE
        assert unit_s == pytest.approx(dm.TIMEOUT_UNIT_S, rel=0.25), f"measured unit {unit_s * 1e6:.0f} us"
        # Expiry action: the status says LOST_COMM either way; a hand on the joint tells damping (it resists
        # being turned) from disable (it turns freely). Record it in docs/motors.md.
        assert status == dm.STATUS_LOST_COMM
    finally:
        bus.send(can.Message(arbitration_id=esc, data=dm.DISABLE, is_extended_id=False))
        bus.shutdown()
