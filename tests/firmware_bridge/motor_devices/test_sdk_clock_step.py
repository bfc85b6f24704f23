"""A wall-clock step during a servo read must not change when the read times out.

Both vendor SDKs (dynamixel-sdk 4.x, feetech-servo-sdk 1.0) time every reply with `time.time()`, the wall clock. A
robot computer that boots without an RTC (a Jetson) steps its clock when NTP first syncs, often by hours, while the
control loop already runs:
- a forward step makes the read in progress time out at once although the servo is answering (a spurious lost
  link: the backend raises MotorBusError and the control loop trips);
- a backward step is caught by the SDKs' own "negative elapsed time" guard, which restarts the timeout from the
  step: the read is held up to one more full timeout past its deadline.
`sdk_port.port_handler` times replies with the monotonic clock, which NTP never steps.

The step is real for the process: `time.time` itself jumps by an hour (monkeypatched) when the port first reads the
pty during the reply wait; the read runs in a thread with a deadline, so no outcome can hang the test. Controls
(no step): the same reply is read, and an unanswered read ends at its deadline, not before.
"""

from __future__ import annotations

import os
import select
import threading
import time
import tty
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from firmware_bridge.motors import dynamixel_emulator, feetech_emulator
from firmware_bridge.motors.sdk_port import port_handler

HOUR_S = 3600.0
LATENCY_MS = 250  # reply timeout = 2 x 250 + 2 ms + wire time ~= 0.5 s: room to step the clock inside one read
LATE_STEP_AT_S = 0.4  # a backward step this far into the reply wait (before its ~0.5 s deadline)
DEADLINE_SLACK_S = 0.25  # a loaded host's lateness; the old code's backward step overran by LATE_STEP_AT_S (0.4 s)
JOIN_S = 10.0  # a read still running after this is reported, not waited for
SERVO_ID, ADDR, SIZE = 1, 132, 4
VALUE = (0x12345678).to_bytes(SIZE, "little")


@dataclass(frozen=True)
class Sdk:
    module: str
    packet_handler: Callable[[Any], Any]
    status_packet: Callable[..., bytes]


SDKS = {
    "dynamixel": Sdk("dynamixel_sdk", lambda sdk: sdk.PacketHandler(2.0), dynamixel_emulator.status_packet),
    "feetech": Sdk("scservo_sdk", lambda sdk: sdk.PacketHandler(0), feetech_emulator.status_packet),
}


@dataclass
class Bus:
    spec: Sdk
    sdk: Any
    port: Any  # our PortHandler on the pty
    master: int  # the pty's other end: the servo's side

    def reply_timeout_s(self) -> float:
        """The read's timeout as the SDK computes it (readTxRx waits for SIZE + 11 bytes at most)."""
        return (self.port.tx_time_per_byte * (SIZE + 11) + LATENCY_MS * 2.0 + 2.0) / 1000.0


@pytest.fixture(params=list(SDKS))
def bus(request: pytest.FixtureRequest) -> Iterator[Bus]:
    spec = SDKS[request.param]
    sdk = pytest.importorskip(spec.module)
    master, slave = os.openpty()
    tty.setraw(master)
    path = os.ttyname(slave)
    os.close(slave)
    port = port_handler(sdk, path, LATENCY_MS)
    port.setBaudRate(1_000_000)
    try:
        yield Bus(spec, sdk, port, master)
    finally:
        port.closePort()
        os.close(master)


class ClockStep:
    """Steps the process's wall clock (`time.time`) by `offset_s` at the port's first pty read that starts at least
    `after_s` after the request was sent (when the SDK's reply wait has begun)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, port: Any, offset_s: float, after_s: float = 0.0) -> None:
        self.offset_s, self.after_s = offset_s, after_s
        self.applied = 0.0  # the wall clock's current offset
        self.sent_at: float | None = None  # monotonic time of the request
        wall_time, write, read = time.time, port.ser.write, port.ser.read
        monkeypatch.setattr(time, "time", lambda: wall_time() + self.applied)

        def recording_write(data: bytes) -> int:
            self.sent_at = time.monotonic()
            return write(data)

        def stepping_read(size: int = 1) -> bytes:
            if self.sent_at is not None and time.monotonic() - self.sent_at >= self.after_s:
                self.applied = self.offset_s
            return read(size)

        port.ser.write, port.ser.read = recording_write, stepping_read


def _servo_answers(bus: Bus) -> threading.Thread:
    """The servo: answers the next request with VALUE."""

    def answer() -> None:
        if select.select([bus.master], [], [], JOIN_S)[0]:
            os.read(bus.master, 4096)
            os.write(bus.master, bus.spec.status_packet(SERVO_ID, 0, VALUE))

    servo = threading.Thread(target=answer, name="servo", daemon=True)
    servo.start()
    return servo


def _read(bus: Bus) -> tuple[int, bytes, float]:
    """One readTxRx of SERVO_ID in a thread with a deadline: (SDK result, data, seconds it took)."""
    out: dict[str, Any] = {}

    def read() -> None:
        t0 = time.monotonic()
        data, result, _ = bus.spec.packet_handler(bus.sdk).readTxRx(bus.port, SERVO_ID, ADDR, SIZE)
        out.update(result=result, data=bytes(data or b""), took=time.monotonic() - t0)

    reader = threading.Thread(target=read, name="servo-read", daemon=True)
    reader.start()
    reader.join(JOIN_S)
    assert not reader.is_alive(), f"the read did not end within {JOIN_S} s (its timeout is {bus.reply_timeout_s()} s)"
    return out["result"], out["data"], out["took"]


def test_a_forward_clock_step_does_not_time_out_a_read_being_answered(bus: Bus, monkeypatch) -> None:
    """The wall clock jumps an hour ahead as the reply wait begins; the servo's reply is read all the same."""
    step = ClockStep(monkeypatch, bus.port, +HOUR_S)
    servo = _servo_answers(bus)
    result, data, took = _read(bus)
    servo.join(JOIN_S)
    assert step.applied == HOUR_S, "the clock step never happened: the probe tested nothing"
    assert result == bus.sdk.COMM_SUCCESS, (
        f"{bus.spec.packet_handler(bus.sdk).getTxRxResult(result)} after {took:.4f} s: a wall-clock step ended "
        f"the read, not its {bus.reply_timeout_s():.3f} s timeout")
    assert data == VALUE


def test_a_backward_clock_step_does_not_hold_a_read_past_its_timeout(bus: Bus, monkeypatch) -> None:
    """The wall clock jumps an hour back late in the wait for a reply that never comes: the read still ends at its
    deadline (the SDKs' guard restarted the timeout there, holding the read another ~0.5 s)."""
    step = ClockStep(monkeypatch, bus.port, -HOUR_S, after_s=LATE_STEP_AT_S)
    result, _, took = _read(bus)
    timeout_s = bus.reply_timeout_s()
    assert step.applied == -HOUR_S, "the clock step never happened: the probe tested nothing"
    assert result == bus.sdk.COMM_RX_TIMEOUT
    assert took < timeout_s + DEADLINE_SLACK_S, (
        f"the read took {took:.3f} s for a {timeout_s:.3f} s timeout: a wall-clock step held it past its deadline")


def test_control_without_a_step_the_reply_is_read_and_silence_ends_at_the_deadline(bus: Bus) -> None:
    """The probes can tell: with a steady clock the servo's reply is read, and an unanswered read takes its full
    timeout (so a read ended early or late by a step shows)."""
    servo = _servo_answers(bus)
    result, data, _ = _read(bus)
    servo.join(JOIN_S)
    assert result == bus.sdk.COMM_SUCCESS and data == VALUE
    result, _, took = _read(bus)
    timeout_s = bus.reply_timeout_s()
    assert result == bus.sdk.COMM_RX_TIMEOUT
    assert timeout_s <= took < timeout_s + DEADLINE_SLACK_S, (took, timeout_s)
