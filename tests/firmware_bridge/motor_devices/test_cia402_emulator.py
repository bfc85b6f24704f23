"""The CiA 402 drive emulator: its state machine against CiA 402's state diagram (table-driven), its statusword
against canopen's own decoding table, and, over the wire (the emulator in its own process, a raw canopen client
here), the CiA 301 heartbeat consumer it models: inactive until the first heartbeat, a frame that is not one byte
is no heartbeat, and on expiry EMCY 0x8130, the 0x6007 action and NMT pre-operational (0x1029 = 0)."""

from __future__ import annotations

import struct
import time

import pytest

canopen = pytest.importorskip("canopen", reason="canopen is not installed (pip install 'edge-vla[cia402]')")

from canopen.profiles.p402 import State402  # noqa: E402
from cia402_helpers import wait_for  # noqa: E402

from firmware_bridge.motors import cia402_emulator as emu  # noqa: E402
from firmware_bridge.motors.cia402_emulator import DriveConfig, EmulatorProcess  # noqa: E402

SOD, RTSO, SO, OE = "SWITCH ON DISABLED", "READY TO SWITCH ON", "SWITCHED ON", "OPERATION ENABLED"
QSA, FAULT = "QUICK STOP ACTIVE", "FAULT"

# (state, controlword, quick stop option code 0x605A) -> (next state, CiA 402 transition number or None)
TRANSITIONS = [
    (SOD, 0x06, 2, RTSO, 2),          # shutdown
    (RTSO, 0x07, 2, SO, 3),           # switch on
    (RTSO, 0x0F, 2, OE, 3),           # switch on + enable operation: 3 then 4 at once
    (SO, 0x0F, 2, OE, 4),             # enable operation
    (OE, 0x07, 2, SO, 5),             # disable operation
    (SO, 0x06, 2, RTSO, 6),           # shutdown
    (RTSO, 0x00, 2, SOD, 7),          # disable voltage
    (RTSO, 0x02, 2, SOD, 7),          # quick stop
    (OE, 0x06, 2, RTSO, 8),           # shutdown
    (OE, 0x00, 2, SOD, 9),            # disable voltage
    (SO, 0x00, 2, SOD, 10),           # disable voltage
    (SO, 0x02, 2, SOD, 10),           # quick stop
    (OE, 0x02, 2, QSA, 11),           # quick stop
    (QSA, 0x00, 2, SOD, 12),          # disable voltage
    (QSA, 0x0F, 6, OE, 16),           # enable operation, only with options 5..8
    # commands a state has no transition for: nothing happens
    (QSA, 0x0F, 2, QSA, None),
    (SOD, 0x0F, 2, SOD, None),
    (SOD, 0x07, 2, SOD, None),
    (SO, 0x80, 2, SO, None),          # bit 7 held: no command (the reset is an edge, and only from FAULT)
    (FAULT, 0x0F, 2, FAULT, None),
    (FAULT, 0x06, 2, FAULT, None),
    (OE, 0x0F, 2, OE, None),
]


@pytest.mark.parametrize(("state", "cw", "qs_option", "want", "transition"), TRANSITIONS)
def test_state_machine_follows_the_cia402_diagram(state: str, cw: int, qs_option: int, want: str,
                                                  transition: int | None) -> None:
    assert emu.next_state(state, emu.decode_command(cw), qs_option) == (want, transition)


def test_fault_reset_is_a_rising_edge_of_bit_7_from_fault_only() -> None:
    assert emu.fault_reset_edge(0x00, 0x80) and emu.fault_reset_edge(0x06, 0x86)
    assert not emu.fault_reset_edge(0x80, 0x80)  # held, no edge
    assert not emu.fault_reset_edge(0x80, 0x00)


@pytest.mark.parametrize("state", list(State402.SW_MASK))
def test_statusword_decodes_with_canopens_own_table(state: str) -> None:
    word = emu.statusword_for(state)
    matches = [name for name, (mask, value) in State402.SW_MASK.items() if word & mask == value]
    assert matches == [state]


# -- over the wire ---------------------------------------------------------------------------------------------

@pytest.fixture
def wire():  # type: ignore[no-untyped-def]
    with EmulatorProcess([DriveConfig(node=3)]) as e:
        net = canopen.Network()
        net.NOTIFIER_CYCLE = 0.05
        net.connect(interface="udp_multicast", channel=e.group, port=e.udp_port)
        node = net.add_node(3, canopen.ObjectDictionary())
        try:
            yield e, net, node
        finally:
            net.disconnect()


def _enable(node) -> None:  # type: ignore[no-untyped-def]
    for cw in (0x06, 0x07, 0x0F):
        node.sdo.download(0x6040, 0, struct.pack("<H", cw))


def test_heartbeat_consumer_watches_only_after_the_first_heartbeat_and_acts_on_expiry(wire) -> None:  # type: ignore[no-untyped-def]
    e, net, node = wire
    net.send_message(0, [0x01, 3])  # NMT start
    node.sdo.download(0x6060, 0, struct.pack("<b", 8))
    node.sdo.download(0x6007, 0, struct.pack("<h", 3))  # quick stop
    node.sdo.download(0x605A, 0, struct.pack("<h", 2))  # ... then switch on disabled
    node.sdo.download(0x1016, 1, struct.pack("<I", (0x7F << 16) | 50))
    _enable(node)
    time.sleep(0.2)  # 4 consumer times without any heartbeat: not watching yet (CiA 301: starts at the first one)
    snap = e.snapshot(3)
    assert snap["state"] == OE and snap["consumer"] == "unknown" and not e.events_of("heartbeat_expired")
    net.send_message(0x77F, b"\x05\x00")  # two bytes: not a heartbeat
    time.sleep(0.15)
    assert e.snapshot(3)["consumer"] == "unknown"
    # Taken before the send: the emulator's thread may receive the frame before send_message returns, so a
    # timestamp taken after it could be later than the heartbeat's arrival (a flaky 49.96 ms in CI).
    sent_before = time.monotonic()
    net.send_message(0x77F, b"\x05")
    assert wait_for(lambda: bool(e.events_of("heartbeat_expired")), 2.0)
    expired = e.events_of("heartbeat_expired")[0]
    assert expired.detail["since_last"] >= 0.050 and expired.t - sent_before >= 0.050
    assert wait_for(lambda: e.snapshot(3)["state"] == SOD, 2.0)
    snap = e.snapshot(3)
    assert snap["nmt"] == "PRE-OPERATIONAL" and not snap["torque"]
    assert 0x8130 in [ev.detail["code"] for ev in e.events_of("emcy")]
    states = [(ev.detail["to"], ev.detail["transition"]) for ev in e.events_of("state")]
    assert states[-2:] == [(QSA, 11), (SOD, 12)]


def test_control_with_the_consumer_off_the_drive_keeps_driving(wire) -> None:  # type: ignore[no-untyped-def]
    e, net, node = wire
    net.send_message(0, [0x01, 3])
    node.sdo.download(0x6060, 0, struct.pack("<b", 8))
    _enable(node)
    net.send_message(0x77F, b"\x05")
    node.sdo.download(0x607A, 0, struct.pack("<i", 5000))
    time.sleep(0.3)
    snap = e.snapshot(3)
    assert snap["state"] == OE and snap["torque"] and abs(snap["position"] - 5000) < 50
    assert not e.events_of("heartbeat_expired")
