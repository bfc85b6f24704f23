"""A host Link driving the emulator (C firmware) over real ptys and python-can's virtual bus."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator

import numpy as np
import pytest

from firmware_bridge.can_link import CanLink
from firmware_bridge.emulator import Emulator, EmulatorConfig, EmulatorProcess, default_limits
from firmware_bridge.errors import IncompatibleProtocolError, LinkDownError, NackError, UrlError
from firmware_bridge.faults import FaultConfig
from firmware_bridge.link import Link, open_link
from firmware_bridge.protocol import Fault, Mode, Nack, NackCode
from firmware_bridge.serial_link import SerialLink
from firmware_bridge.transport import CanTransport, PtyTransport


def wait_for(link: Link, pred, timeout: float = 2.0, heartbeat: bool = False) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if heartbeat and link.connected:
            link.heartbeat()
        link.poll(0.01)
        if pred():
            return
    raise AssertionError(f"condition not met within {timeout} s; stats {link.stats.as_dict()}")


@pytest.fixture
def emu() -> Iterator[Emulator]:
    # 250 ms, not the firmware's 80-100: a loaded 2-core CI box stalls this process for 100 ms now and then,
    # which would trip the watchdog while a test re-arms or waits for a link-error trip
    with Emulator(EmulatorConfig(joints=default_limits(3), heartbeat_timeout_ms=250, stop_ramp_ms=100),
                  PtyTransport()) as e:
        yield e


def test_host_drives_emulator_over_pty() -> None:
    cfg = EmulatorConfig(joints=default_limits(3), heartbeat_timeout_ms=300, stop_ramp_ms=100)
    with Emulator(cfg, PtyTransport()) as emu, open_link(f"serial://{emu.port}?baud=1000000") as link:
        assert isinstance(link, SerialLink) and link.connected
        caps = link.hello()
        assert caps.joint_count == 3 and caps.joint_names == ["joint0", "joint1", "joint2"]
        assert caps.limits_array("position_max").tolist() == [3.0, 3.0, 3.0]
        assert caps.heartbeat_timeout_s == pytest.approx(0.3)
        assert caps.protocol_minor == 2 and caps.safety is not None and caps.safety.link_loss_category == 1
        assert caps.session is not None and caps.session == link.session == emu.fw.session
        assert [j.max_position_error for j in caps.safety.joints] == [1.0, 1.0, 1.0]
        link.arm()
        # in steps: a jump of more than the 1 rad following-error limit would trip category 0
        for q in (0.9, 1.8, 2.6):
            link.send_setpoints([0.5, -0.25, q])
            wait_for(link, lambda q=q: link.latest_state is not None and link.latest_state.positions[2] > q - 0.1,
                     heartbeat=True)
        target = np.array([0.5, -0.25, 5.0])  # the last one beyond the limit: the firmware clamps it to 3.0
        sent = link.send_setpoints(target)
        assert sent.positions.tolist() == target.tolist()
        wait_for(link, lambda: link.latest_state is not None
                 and np.allclose(link.latest_state.positions, [0.5, -0.25, 3.0], atol=0.02), heartbeat=True)
        state = link.latest_state
        assert state is not None and state.mode == Mode.ARMED and Fault.SETPOINT_CLAMPED in state.fault_bits
        assert link.stats.frames_received > 0 and link.stats.crc_errors == 0
        assert set(link.stats.rtt_percentiles()) == {"p50", "p90", "p99"}
        link.disarm()


def test_watchdog_trips_on_heartbeat_loss_and_needs_explicit_rearm(emu: Emulator) -> None:
    with SerialLink(emu.port) as link:
        link.hello()
        link.arm()
        for _ in range(5):
            link.heartbeat()
            link.poll(0.01)
        wait_for(link, lambda: any(f.fault_code == Fault.HEARTBEAT_TIMEOUT for f in link.faults), timeout=3.0)
        fault = next(f for f in link.faults if f.fault_code == Fault.HEARTBEAT_TIMEOUT)
        assert fault.stop_category == 1
        wait_for(link, lambda: link.latest_state is not None and link.latest_state.mode == Mode.TRIPPED)
        link.send_setpoints([0.1, 0.1, 0.1])  # refused while tripped, however long we keep heart-beating
        seen: list = []
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            link.heartbeat()
            seen += link.poll(0.02)
        assert any(isinstance(m, Nack) and m.reason == "NOT_ARMED" for m in seen)
        assert link.latest_state is not None and link.latest_state.mode == Mode.TRIPPED
        with pytest.raises(NackError, match="FAULTS_LATCHED") as refused:  # ARM alone clears nothing
            link.arm()
        assert refused.value.code == NackCode.FAULTS_LATCHED
        link.clear_faults()  # the operator's act
        link.arm()
        wait_for(link, lambda: link.latest_state.mode == Mode.ARMED and not link.latest_state.fault_bits,
                 heartbeat=True)
    kinds = [e["event"] for e in emu.events]
    assert kinds.index("heartbeat_timeout") < kinds.index("stop_cat1") < kinds.index("torque_off")
    assert kinds.count("armed") == 2


def test_link_reconnects_after_pty_closed_and_reopened(tmp_path) -> None:
    link_path = str(tmp_path / "ttyEMU")
    with Emulator(EmulatorConfig(joints=default_limits(2)), PtyTransport(link_path)) as emu, \
            SerialLink(link_path, backoff=0.02, max_backoff=0.1) as link:
        link.hello()
        link.arm()
        emu.unplug(0.4)
        wait_for(link, lambda: not link.connected, timeout=2.0)
        with pytest.raises(LinkDownError, match=link_path):
            link.heartbeat()
        wait_for(link, lambda: link.connected, timeout=10.0)
        assert link.stats.reconnects == 1
        link.hello()
        wait_for(link, lambda: link.latest_state is not None and link.latest_state.mode == Mode.TRIPPED)
        with pytest.raises(NackError, match="FAULTS_LATCHED"):
            link.arm()  # the firmware tripped while unplugged; re-arming is an operator's explicit act
        link.clear_faults()
        link.arm()
    assert [e["event"] for e in emu.events].count("replugged") == 1


def test_can_virtual_bus_round_trip_and_urgent_stop() -> None:
    channel = f"fb-{uuid.uuid4().hex[:8]}"
    cfg = EmulatorConfig(joints=default_limits(7))
    with Emulator(cfg, CanTransport("virtual", channel, node_id=5, side="firmware")), \
            open_link(f"can://virtual/{channel}?node=5") as link:
        assert isinstance(link, CanLink)
        assert link.hello().joint_count == 7  # 240-byte CAPABILITIES, segmented into 31 CAN frames
        link.arm()
        link.send_setpoints(np.full(7, 0.2), velocities=np.zeros(7), efforts=np.zeros(7), kp=np.full(7, 40.0),
                            kd=np.full(7, 1.5))
        wait_for(link, lambda: link.latest_state is not None and link.latest_state.ack_seq > 0)
        assert link.stop(0) is True  # acknowledged
        wait_for(link, lambda: any(f.fault_code == Fault.HOST_STOP_CAT0 for f in link.faults))
        assert link.faults[-1].stop_category == 0 and link.faults[-1].mode == Mode.TRIPPED
        link.send_setpoints(np.zeros(7))  # fire-and-forget: the refusal comes back as a NACK
        refused = lambda msgs: any(isinstance(m, Nack) and m.reason == "NOT_ARMED" for m in msgs)
        seen: list = []
        deadline = time.monotonic() + 2.0
        while not refused(seen) and time.monotonic() < deadline:
            seen += link.poll(0.01)
        assert refused(seen)
        link.clear_faults()
        link.arm()
        assert link.stop(1)
        with pytest.raises(NackError, match="BUSY"):  # ARM mid-ramp is refused
            link.arm()


def test_bad_frames_are_counted_and_never_applied() -> None:
    faults = FaultConfig(drop=0.05, corrupt=0.2, duplicate=0.1, delay_prob=0.05, delay_s=0.005, direction="tx")
    with Emulator(EmulatorConfig(joints=default_limits(2), faults=faults, seed=1, state_rate_hz=500),
                  PtyTransport()) as emu, SerialLink(emu.port) as link:
        states = []
        # Collect until enough states arrived (a loaded CI box may deliver fewer than 500 per second).
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and (len(states) <= 150 or link.stats.drops == 0):
            states += [m for m in link.poll(0.01) if type(m).__name__ == "State"]
        s = link.stats
        assert s.crc_errors + s.framing_errors > 10 and s.duplicates > 0 and s.drops > 0
        assert len(states) > 100
        assert all(np.all(np.abs(st.positions) <= 3.0) and st.mode == Mode.DISARMED for st in states)
        assert emu.injector.counts["corrupted"] > 0


def test_link_errors_trip_category_0(emu: Emulator) -> None:
    with SerialLink(emu.port) as link:
        link.hello()
        link.arm()
        emu.injector.config = FaultConfig(corrupt=1.0, direction="rx")
        for _ in range(6):
            link.heartbeat()
            time.sleep(0.005)
        wait_for(link, lambda: any(f.fault_code == Fault.LINK_ERRORS for f in link.faults))
        assert link.faults[-1].stop_category == 0


def test_incompatible_firmware_is_refused_cleanly() -> None:
    with Emulator(EmulatorConfig(protocol=(2, 0)), PtyTransport()) as emu, SerialLink(emu.port) as link, \
            pytest.raises(IncompatibleProtocolError, match=r"speaks protocol 2\.0"):
        link.hello(timeout=5.0)  # refused at the first answer; the margin is for a loaded machine


def test_open_link_lists_accepted_forms() -> None:
    with pytest.raises(UrlError, match="accepted forms"):
        open_link("tcp://robot:1234")
    with pytest.raises(UrlError, match="interface and a channel"):
        open_link("can://virtual")
    link = open_link("serial:///dev/ttyUSB3?baud=115200")
    assert isinstance(link, SerialLink) and link.baudrate == 115200 and link.url == "serial:///dev/ttyUSB3?baud=115200"
    with pytest.raises(LinkDownError, match="/dev/ttyUSB3"):
        link.open()


@pytest.mark.slow
def test_firmware_stops_motors_after_host_is_killed() -> None:
    """kill -9 of the host process: the emulator (another process) stops the motors on its own."""
    with EmulatorProcess(joints=2, heartbeat_timeout_ms=100, stop_ramp_ms=200) as emu:
        host = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
            import time
            from firmware_bridge.serial_link import SerialLink
            link = SerialLink({emu.port!r}).open()
            link.hello(); link.arm()
            while True:
                link.send_setpoints([0.5, -0.5]); link.poll(0.01)
            """)], env={**os.environ, "PYTHONPATH": os.getcwd()})
        try:
            emu.wait_event("armed", timeout=10)
            time.sleep(0.3)
        finally:
            os.kill(host.pid, signal.SIGKILL)
            host.wait()
        off = emu.wait_event("torque_off", timeout=5)
        assert 0.1 <= off["since_last_heartbeat_s"] <= 0.4
        kinds = [e["event"] for e in emu.events()]
        assert kinds.index("heartbeat_timeout") < kinds.index("torque_off")


def test_stalled_host_injection_trips_the_watchdog() -> None:
    # the stall starts 1 s after the emulator: HELLO and ARM must get through first, on a slow box too
    cfg = EmulatorConfig(joints=default_limits(2), heartbeat_timeout_ms=50, stop_ramp_ms=50, stall_at=1.0,
                         stall_for=5.0)
    with Emulator(cfg, PtyTransport()) as emu, SerialLink(emu.port) as link:
        link.hello()
        link.arm()
        wait_for(link, lambda: any(f.fault_code == Fault.HEARTBEAT_TIMEOUT for f in link.faults), timeout=5.0,
                 heartbeat=True)  # the host keeps heart-beating; the firmware stops hearing it
        deadline = time.monotonic() + 2.0
        while "torque_off" not in [e["event"] for e in emu.events] and time.monotonic() < deadline:
            time.sleep(0.01)
    assert "torque_off" in [e["event"] for e in emu.events]
