"""CiA 402 drives over CANopen (the `canopen` package): `cia402://socketcan/can0?node=1-6&bitrate=1000000`.

One drive is one joint; `node=` lists the drives' node ids in joint order (several drives share one bus). The port
is `<python-can interface>/<channel>`: `socketcan/can0`, `pcan/PCAN_USBBUS1`, and in emulation
`udp_multicast/<group>?udp_port=N` (python-can's cross-process virtual bus; its `virtual` interface reaches only the
same process).

Open (drives left disabled, whatever the host finds):
  NMT enter pre-operational; device type 0x1000 must name device profile 402; supported drive modes 0x6502 pick
  cyclic synchronous position (8) or, where CSP is absent, profile position (1), written to 0x6060 and read back
  from 0x6061; position units per joint turn from `counts_per_turn=` or the feed constant 0x6092; a drive found
  with its power stage on is disabled. PDOs through canopen's PdoMap (then read back): RPDO1 = controlword 0x6040
  + target position 0x607A (type 255: acts on reception), TPDO1 = statusword 0x6041 + position actual 0x6064 and
  TPDO2 = velocity actual 0x606C + current actual 0x6078 (type 1: after every SYNC), every other PDO invalid.
  Then the objects that protect the arm, each read back:
    0x1016:1 consumer heartbeat time = host node << 16 | 2 control periods in ms (CiA 301; CANopenNode
             301/CO_HBconsumer.c decodes node id bits 16-23, time bits 0-15),
    0x6007   abort connection option code = 3, "quick stop command" (CiA 402: 0 no action, 1 fault signal,
             2 disable voltage command, 3 quick stop command; e.g. Elmo's AbortConnectionOption in
             RCPRG-ros-pkg/velmwheel, .../elmo/config/common_entries.hpp),
    0x605A   quick stop option code = 2, "slow down on quick stop ramp and transit into Switch On Disabled"
             (Beckhoff AX8000 object 605A; velmwheel .../elmo/config/device_control.hpp);
  NMT start, and a SYNC must be answered by every drive's TPDOs.

The cycle (the caller's thread only, the control loop's; there is no helper thread and no `send_periodic`):
  poll_state(): the host heartbeat (0x700 + host node, one byte 0x05) once the first arm started the drives'
  watch, one SYNC (0x080), and the TPDOs it triggers; write_setpoints(): one RPDO1 per drive (CSP: controlword 0x0F
  and the target; PP: the new set-point handshake on bit 4 against statusword bit 12). canopen's Network runs one
  receive thread (python-can's Notifier) that only files incoming frames; it sends nothing. So a stalled or killed
  loop stops the heartbeat: each drive's consumer expires after two periods and the drive quick-stops on its own
  ramp (0x6085) to Switch On Disabled, torque off (EMCY 0x8130, NMT pre-operational per 0x1029).

arm() (operator act): refused while a fault is latched; software position limits 0x607D must lie inside the
robot configuration's (or `host_limits=1`); present position inside them; target 0x607A <- position actual; the
controlword walks Switch On Disabled -> Ready To Switch On (0x06) -> Switched On (0x07) -> Operation Enabled
(0x0F), each state read back from the statusword. stop(0): disable voltage (controlword 0x00: RPDO at once, then
SDO) read back as Switch On Disabled; stop(1): quick stop (0x02; the drive's ramp, then 0x605A = 2 takes it to
Switch On Disabled), at most `stop_timeout_s`, then the same disable voltage. A statusword fault bit, an EMCY
(0x8130: the drive lost the host's heartbeat) or a drive leaving Operation Enabled by itself latches a fault and
stops (category 0); only clear_faults() sends a fault reset (controlword bit 7 rising edge) and the NMT start a
drive needs after a lost heartbeat. close() disables the drives, turns their consumer off (0x1016:1 <- 0) and
leaves them pre-operational.

A receive error (python-can's recv raising: SocketCAN's ENETDOWN while the interface is down, an adapter that
resets): python-can's Notifier would end canopen's receive thread on it, and canopen would then re-raise it from
every later send, so the link stayed dead after the bus came back. The listener handles it instead: the thread
backs off `RECEIVE_RETRY_S` and reads on, and the control thread's next call latches a `bus_error` fault (frames
from the drives may have been lost meanwhile: an EMCY, a statusword change), stops the drives (category 0) and
raises one line. Once the bus works again the stop is read back, feedback flows, and the operator's clear_faults
and arm resume; nothing resumes by itself.
"""

from __future__ import annotations

import collections
import logging
import math
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from firmware_bridge.motors.base import (
    ArmRefusedError,
    ArrayLike,
    Capabilities,
    MissingDependencyError,
    MotorBusError,
    MotorDevice,
    MotorError,
    MotorFault,
    MotorState,
    MotorUrlError,
    StopCategory,
)
from firmware_bridge.motors.calibration import JointCalibration
from firmware_bridge.motors.registry import parse_ids, parse_int

try:
    import can
    import canopen
    from canopen import objectdictionary as odict
    from canopen.network import MessageListener
    from canopen.profiles.p402 import State402
    from canopen.sdo import SdoAbortedError, SdoCommunicationError
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise MissingDependencyError(f"cia402:// needs canopen ({exc}); install it with: pip install 'edge-vla[cia402]'") \
        from exc

log = logging.getLogger(__name__)

CSP, PP = 8, 1  # modes of operation 0x6060
SUPPORTS_PP, SUPPORTS_CSP = 0x01, 0x80  # 0x6502 bits 0 and 7
CW_DISABLE_VOLTAGE, CW_QUICK_STOP, CW_SHUTDOWN, CW_SWITCH_ON, CW_ENABLE = 0x00, 0x02, 0x06, 0x07, 0x0F
CW_FAULT_RESET = 0x80
PP_NEW_SETPOINT, PP_CHANGE_IMMEDIATELY, SW_SETPOINT_ACK = 0x10, 0x20, 0x1000
ABORT_QUICK_STOP = 3  # 0x6007
QUICK_STOP_THEN_DISABLED = 2  # 0x605A
NMT_START, NMT_PRE_OPERATIONAL = 0x01, 0x80
HEARTBEAT_OPERATIONAL = b"\x05"
EMCY_RESET, EMCY_HEARTBEAT = 0x0000, 0x8130
SOD, OE, FAULT = "SWITCH ON DISABLED", "OPERATION ENABLED", "FAULT"
TORQUE_OFF_STATES = {SOD, FAULT, "NOT READY TO SWITCH ON", "READY TO SWITCH ON", "SWITCHED ON"}
POWER_ON_STATES = {OE, "QUICK STOP ACTIVE", "FAULT REACTION ACTIVE"}
PERIOD_FLOOR_S = 0.004  # 250 Hz: one SYNC round trip plus an RPDO per drive fits; below that, refuse
MAX_BUS_LOAD = 0.70  # of the bit rate: leaves room for SDO, EMCY and another master's frames
DEFAULT_PERIOD_S = 0.010
HOST_NODE = 127
TPDO_LAYOUT = ((1, (0x6041, 0x6064), 0x180), (2, (0x606C, 0x6078), 0x280))  # (map, objects, base COB-ID)
RPDO_LAYOUT = (1, (0x6040, 0x607A), 0x200)
RECEIVE_RETRY_S = 0.01  # after a receive error the receive thread waits this long: no busy loop on a downed interface


def frame_bits(data_bytes: int) -> int:
    """Worst-case bits of a classic 11-bit CAN frame with n data bytes, stuff bits and interframe space
    included (Davis et al., "CAN schedulability analysis refuted, revisited and revised", 2007: 8n + 47 +
    floor((34 + 8n - 1) / 4))."""
    return 8 * data_bytes + 47 + (34 + 8 * data_bytes - 1) // 4


def bus_load(drives: int, period_s: float, bitrate: int) -> float:
    """Share of the bit rate one control cycle takes: SYNC (0 bytes), host heartbeat (1), and per drive RPDO1,
    TPDO1 and TPDO2 (6 bytes each)."""
    bits = frame_bits(0) + frame_bits(1) + drives * 3 * frame_bits(6)
    return bits / period_s / bitrate


def state_of(statusword: int) -> str:
    """The CiA 402 state a statusword shows (canopen's State402 masks)."""
    for name, (mask, value) in State402.SW_MASK.items():
        if statusword & mask == value:
            return name
    return f"UNKNOWN (statusword 0x{statusword:04X})"


def _host_dictionary() -> odict.ObjectDictionary:
    """The objects this host touches, with their CiA 301/402 types (canopen encodes SDO and PDO data with them)."""
    u8, u16, u32 = odict.UNSIGNED8, odict.UNSIGNED16, odict.UNSIGNED32
    i8, i16, i32 = odict.INTEGER8, odict.INTEGER16, odict.INTEGER32
    spec: dict[int, list[tuple[int, int]]] = {
        0x1000: [(0, u32)], 0x1001: [(0, u8)], 0x1016: [(0, u8), (1, u32)], 0x603F: [(0, u16)],
        0x6007: [(0, i16)], 0x6040: [(0, u16)], 0x6041: [(0, u16)], 0x605A: [(0, i16)], 0x605E: [(0, i16)],
        0x6060: [(0, i8)], 0x6061: [(0, i8)], 0x6064: [(0, i32)], 0x606C: [(0, i32)], 0x6075: [(0, u32)],
        0x6078: [(0, i16)], 0x607A: [(0, i32)], 0x607D: [(0, u8), (1, i32), (2, i32)], 0x6085: [(0, u32)],
        0x6092: [(0, u8), (1, u32), (2, u32)], 0x6502: [(0, u32)],
    }
    for k in range(4):
        spec[0x1400 + k] = [(0, u8), (1, u32), (2, u8)]
        spec[0x1800 + k] = [(0, u8), (1, u32), (2, u8), (3, u16), (5, u16), (6, u8)]
        spec[0x1600 + k] = spec[0x1A00 + k] = [(0, u8)] + [(s, u32) for s in range(1, 9)]
    dictionary = odict.ObjectDictionary()
    for index, members in spec.items():
        variables = []
        for sub, dtype in members:
            var = odict.ODVariable(f"0x{index:04X}:{sub}", index, sub)
            var.data_type, var.access_type = dtype, "rw"
            variables.append(var)
        if len(variables) == 1:
            dictionary.add_object(variables[0])
            continue
        record = odict.ODRecord(f"0x{index:04X}", index)
        for var in variables:
            record.add_member(var)
        dictionary.add_object(record)
    return dictionary


class _StandardFrames(MessageListener):
    """CANopen uses classic 11-bit frames: an extended-id or FD frame is no CANopen frame, whatever its id says.
    A receive error is reported to `on_receive_error` and handled, so the receive thread reads on."""

    def __init__(self, network: canopen.Network, on_receive_error: Callable[[Exception], None]) -> None:
        super().__init__(network)
        self._on_receive_error = on_receive_error

    def on_message_received(self, msg: can.Message) -> None:
        if msg.is_extended_id or msg.is_fd:
            return
        super().on_message_received(msg)

    def on_error(self, exc: Exception) -> None:
        """Called by python-can's Notifier in its receive thread. Handled (returning normally), the thread goes on
        reading; unhandled it would end, and canopen's send_message re-raises the error the Notifier stored from
        every later send: cleared here, as the device reports it instead."""
        notifier = self.network.notifier
        if notifier is not None and notifier.exception is exc:
            notifier.exception = None
        self._on_receive_error(exc)
        time.sleep(RECEIVE_RETRY_S)


@dataclass
class _Received:
    """The latest TPDOs of one drive (written by canopen's receive thread, read by the control thread)."""

    statusword: int = 0
    position: int = 0
    velocity: int = 0
    current: int = 0
    seq1: int = 0
    seq2: int = 0
    stamp1: float = -math.inf
    stamp2: float = -math.inf


class Cia402Device(MotorDevice):
    URL_PARAMS: ClassVar[dict[str, str]] = {
        "node": "drive node ids in joint order, one drive per joint: 1, 1-6 or 1,2,5 (required)",
        "bitrate": "bus bit rate for the interfaces that set it, and for the bus-load check (default 1000000)",
        "period_ms": "control period; each drive's heartbeat consumer (0x1016) is set to 2 periods (default 10)",
        "host_node": "node id of the host's heartbeat (default 127; not one of the drives)",
        "counts_per_turn": "position units per joint revolution (default: the drive's feed constant 0x6092)",
        "host_limits": "1: accept drives whose software limits (0x607D) are wider than the configuration's",
        "udp_port": "UDP port of python-can's udp_multicast interface (emulation only)",
    }

    def __init__(self, interface: str, channel: str, nodes: Sequence[int], *, bitrate: int = 1_000_000,
                 udp_port: int | None = None, host_node: int = HOST_NODE, period_s: float = DEFAULT_PERIOD_S,
                 joint_limits: Sequence[tuple[float, float]] | None = None, names: Sequence[str] | None = None,
                 calibration: Sequence[JointCalibration] | None = None, counts_per_turn: float | None = None,
                 host_limits: bool = False, stop_timeout_s: float = 0.5, lerobot_calibration: Any = None) -> None:
        super().__init__()
        if lerobot_calibration is not None:
            raise MotorUrlError("cia402:// takes no LeRobot calibration: give calibration=[JointCalibration...] "
                                "or counts_per_turn=")
        self.interface, self.channel, self.nodes = interface, channel, tuple(nodes)
        self.bitrate, self.udp_port, self.host_node = bitrate, udp_port, host_node
        self.period_s, self.host_limits, self.stop_timeout_s = period_s, host_limits, stop_timeout_s
        self.counts_per_turn = counts_per_turn
        self._check_config()
        n = len(self.nodes)
        self.consumer_ms = max(1, math.ceil(2 * period_s * 1000 - 1e-9))
        self.names = tuple(names) if names else tuple(f"joint{i}" for i in self.nodes)
        self.joint_limits = None if joint_limits is None else tuple((float(lo), float(hi)) for lo, hi in joint_limits)
        self._given_calibration = tuple(calibration) if calibration else None
        for what, seq in (("names", self.names), ("calibration", self._given_calibration or self.nodes),
                          ("joint_limits", self.joint_limits or self.nodes)):
            if len(seq) != n:
                raise MotorUrlError(f"{what} has {len(seq)} entries for {n} drive nodes {list(self.nodes)}")
        self.calibration: tuple[JointCalibration, ...] = self._given_calibration or ()
        self.url = (f"cia402://{interface}/{channel}?node={','.join(map(str, self.nodes))}&bitrate={bitrate}"
                    + (f"&udp_port={udp_port}" if udp_port else ""))
        self._net: Any = None
        self._remote: dict[int, Any] = {}
        self._mode: dict[int, int] = {}
        self._rated_a: dict[int, float] = {}
        self._count_range: list[tuple[int, int]] = []
        self._rx = {node: _Received() for node in self.nodes}
        self._rx_cond = threading.Condition()
        self._rx_errors = 0  # receive errors the listener handled (counted by the receive thread)
        self._rx_error: Exception | None = None  # the latest of them
        self._rx_errors_reported = 0  # how many of them the control thread has reported
        self._emcy: collections.deque[tuple[int, int, float]] = collections.deque()
        self._armed = False
        self._watching = False  # the drives' consumer watches from the first heartbeat, sent at the first arm
        self._last_beat = -math.inf
        self._target: dict[int, int] = {}
        self._pp_high: dict[int, bool] = {}

    def _check_config(self) -> None:
        """One-line refusals of a configuration this backend cannot drive safely."""
        if self.interface not in can.interfaces.VALID_INTERFACES:
            raise MotorUrlError(f"unknown python-can interface {self.interface!r}; use one of "
                                f"{', '.join(sorted(can.interfaces.VALID_INTERFACES))}")
        if self.udp_port is not None and self.interface != "udp_multicast":
            raise MotorUrlError("udp_port= applies only to the udp_multicast interface (emulation); remove it")
        if not self.nodes:
            raise MotorUrlError("no drive node ids given; write node=1 (or node=1-6: one drive per joint)")
        bad = [i for i in self.nodes if not 1 <= i <= 127]
        if bad:
            raise MotorUrlError(f"node={bad[0]} is outside the CANopen node ids 1..127")
        if not 1 <= self.host_node <= 127 or self.host_node in self.nodes:
            raise MotorUrlError(f"host_node={self.host_node} is also a drive or outside 1..127; give the host's "
                                "heartbeat a node id no drive uses (default 127)")
        if self.period_s < PERIOD_FLOOR_S:
            raise MotorUrlError(f"period {self.period_s * 1000:.1f} ms is below this backend's floor of "
                                f"{PERIOD_FLOOR_S * 1000:.0f} ms")
        if 2 * self.period_s * 1000 > 0xFFFF:
            raise MotorUrlError("the heartbeat consumer time (2 periods) exceeds 65535 ms; shorten the period")
        if self.counts_per_turn is not None and not self.counts_per_turn > 0:
            raise MotorUrlError(f"counts_per_turn={self.counts_per_turn} must be positive")
        load = bus_load(len(self.nodes), self.period_s, self.bitrate)
        if load > MAX_BUS_LOAD:
            raise MotorUrlError(
                f"bus load {load:.0%} of {self.bitrate} bit/s for {len(self.nodes)} drives every "
                f"{self.period_s * 1000:.0f} ms exceeds {MAX_BUS_LOAD:.0%}; use fewer drives per bus, a longer "
                "period or a faster bit rate")

    @classmethod
    def from_url(cls, port: str, params: dict[str, str], **kw: Any) -> Cia402Device:
        interface, _, channel = port.partition("/")
        if not interface or not channel:
            raise MotorUrlError(f"cia402://{port} needs an interface and a channel: write "
                                "cia402://socketcan/can0?node=1")
        if "node" not in params:
            raise MotorUrlError("cia402:// needs node=...: the drives' node ids in joint order, e.g. node=1-6")
        period_ms = parse_int(params, "period_ms", round(kw.pop("period_s", DEFAULT_PERIOD_S) * 1000))
        counts = params.get("counts_per_turn")
        try:
            counts_per_turn = float(counts) if counts is not None else None
        except ValueError:
            raise MotorUrlError(f"counts_per_turn={counts!r} is not a number") from None
        udp_port = parse_int(params, "udp_port", 0) or None
        return cls(interface.lower(), channel, parse_ids(params["node"], "node", scheme="cia402"),
                   bitrate=parse_int(params, "bitrate", 1_000_000), udp_port=udp_port,
                   host_node=parse_int(params, "host_node", HOST_NODE), period_s=period_ms / 1000.0,
                   counts_per_turn=counts_per_turn, host_limits=parse_int(params, "host_limits", 0, (0, 1)) == 1,
                   **kw)

    # -- the interface --------------------------------------------------------------------------------------
    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            vendor="CiA 402 drive (CANopen)", joint_names=self.names, has_device_watchdog=True,
            watchdog_period_s=self.consumer_ms / 1000.0,
            on_watchdog_expiry="each drive's heartbeat consumer (0x1016) expires: abort connection option 0x6007 = 3 "
                               "quick stop on its quick-stop ramp (0x6085), then with 0x605A = 2 Switch On Disabled "
                               "(torque off); EMCY 0x8130 latches until an operator clears faults",
            units="rad", min_period_s=PERIOD_FLOOR_S)

    @property
    def armed(self) -> bool:
        return self._armed

    # -- open -------------------------------------------------------------------------------------------------
    def _open(self) -> None:
        with self._rx_cond:  # a receive error of an earlier, failed open is not this one's
            self._rx_errors = self._rx_errors_reported = 0
            self._rx_error = None
        self._net = self._connect()
        try:
            for node in self.nodes:
                self._add_node(node)
            for node in self.nodes:
                self._send(0, bytes([NMT_PRE_OPERATIONAL, node]))
            calibration = []
            for j, node in enumerate(self.nodes):
                calibration.append(self._configure(j, node))
            self.calibration = self._given_calibration or tuple(calibration)
            for node in self.nodes:
                self._send(0, bytes([NMT_START, node]))
            answered = self._sync_and_wait(0.5)
            self._refuse_open_on_receive_error()
            if not answered:
                silent = [n for n in self.nodes if self._rx[n].seq1 == 0 or self._rx[n].seq2 == 0]
                raise MotorBusError(f"{self.url}: drive node(s) {silent} send no PDO after NMT start; check that "
                                    "no other master holds them stopped")
        except BaseException:
            self._disconnect()
            raise
        log.info("%s: drives %s ready (modes %s, heartbeat consumer %d ms from host node %d), disabled",
                 self.url, list(self.nodes), [self._mode[n] for n in self.nodes], self.consumer_ms, self.host_node)

    def _connect(self) -> Any:
        kw: dict[str, Any] = {"interface": self.interface, "channel": self.channel}
        if self.udp_port is not None:
            kw["port"] = self.udp_port
        elif self.interface not in ("virtual", "udp_multicast"):
            kw["bitrate"] = self.bitrate
        try:
            bus = can.Bus(**kw)
        except (can.CanError, OSError, ValueError, ImportError) as exc:
            raise MotorBusError(f"cannot open CAN {self.interface}/{self.channel}: {exc}; check that the interface "
                                "exists and is up (ip link set can0 up type can bitrate 1000000)") from exc
        network = canopen.Network(bus)
        network.NOTIFIER_CYCLE = 0.05  # close() then waits at most 50 ms for the receive thread
        network.listeners = [_StandardFrames(network, self._on_receive_error)]
        return network.connect()

    def _add_node(self, node: int) -> None:
        remote = canopen.RemoteNode(node, _host_dictionary())
        self._net.add_node(remote)
        self._remote[node] = remote
        self._net.subscribe(0x180 + node, self._on_tpdo1)
        self._net.subscribe(0x280 + node, self._on_tpdo2)
        remote.emcy.add_callback(lambda err, n=node: self._emcy.append((n, err.code, time.monotonic())))

    def _configure(self, j: int, node: int) -> JointCalibration:
        """Identify, pick the mode, map the PDOs, set the watchdog objects (each read back); pre-operational."""
        device_type = self._read(node, 0x1000, 0, "<I")
        if device_type & 0xFFFF != 402:
            raise MotorError(f"{self.url}: node {node} is not a CiA 402 drive: device type 0x{device_type:08X} "
                             f"names device profile {device_type & 0xFFFF}; check node= ")
        modes = self._read(node, 0x6502, 0, "<I")
        mode = CSP if modes & SUPPORTS_CSP else PP if modes & SUPPORTS_PP else 0
        if not mode:
            raise MotorError(f"{self.url}: node {node} supports neither cyclic synchronous position nor profile "
                             f"position (0x6502 = 0x{modes:08X}); this backend sends positions")
        if state_of(self._read(node, 0x6041, 0, "<H")) in POWER_ON_STATES:
            log.warning("%s: node %d was found with its power stage on: disabling it (torque off)", self.url, node)
            self._write(node, 0x6040, 0, "<H", CW_DISABLE_VOLTAGE)
        self._write_checked(node, 0x6060, 0, "<b", mode, "modes of operation")
        if self._wait(lambda: self._read(node, 0x6061, 0, "<b") == mode, 0.3) is False:
            raise MotorError(f"{self.url}: node {node} does not show mode {mode} in 0x6061 after 0x6060 = {mode}")
        self._mode[node] = mode
        self._configure_pdos(node)
        for index, sub, fmt, value, what in (
                (0x1016, 1, "<I", (self.host_node << 16) | self.consumer_ms, "consumer heartbeat time"),
                (0x6007, 0, "<h", ABORT_QUICK_STOP, "abort connection option code"),
                (0x605A, 0, "<h", QUICK_STOP_THEN_DISABLED, "quick stop option code")):
            self._write_checked(node, index, sub, fmt, value, what)
        try:
            self._rated_a[node] = self._read(node, 0x6075, 0, "<I") / 1000.0
        except MotorError:
            self._rated_a[node] = math.nan  # 0x6078 is per mille of it: without it the current is unknown
        log.info("%s: node %d: mode %d, fault reaction 0x605E = %s, quick stop deceleration 0x6085 = %s", self.url,
                 node, mode, self._optional(node, 0x605E, "<h"), self._optional(node, 0x6085, "<I"))
        return JointCalibration(offset=0.0, direction=1, ticks_per_turn=self._counts_per_turn(node))

    def _counts_per_turn(self, node: int) -> float:
        if self.counts_per_turn is not None:
            return self.counts_per_turn
        try:
            feed, revolutions = self._read(node, 0x6092, 1, "<I"), self._read(node, 0x6092, 2, "<I")
        except MotorError as exc:
            raise MotorError(f"{self.url}: node {node} has no feed constant 0x6092 ({exc}); give counts_per_turn= "
                             "(position units per joint revolution) in the URL") from None
        if not feed or not revolutions:
            raise MotorError(f"{self.url}: node {node} has feed constant 0x6092 = {feed}/{revolutions}; give "
                             "counts_per_turn= in the URL")
        return feed / revolutions

    def _configure_pdos(self, node: int) -> None:
        """RPDO1 and TPDO1/2 as documented, every other PDO invalid; through canopen's PdoMap, then read back."""
        remote = self._remote[node]
        wanted: list[tuple[Any, tuple[int, ...], int | None]] = []
        number, objects, _ = RPDO_LAYOUT
        for k in range(1, 5):
            wanted.append((remote.rpdo[k], objects if k == number else (), 255 if k == number else None))
        layout = {k: objects for k, objects, _ in TPDO_LAYOUT}
        for k in range(1, 5):
            wanted.append((remote.tpdo[k], layout.get(k, ()), 1 if k in layout else None))
        try:
            for pdo, objects, trans_type in wanted:
                pdo.clear()
                pdo.cob_id = pdo.predefined_cob_id
                pdo.enabled, pdo.trans_type = bool(objects), trans_type
                for index in objects:
                    pdo.add_variable(index)
                pdo.save()
            for pdo, objects, trans_type in wanted:
                pdo.read()
                got = (pdo.enabled, tuple(v.index for v in pdo.map) if pdo.enabled else (),
                       pdo.trans_type if pdo.enabled else None)
                if got != (bool(objects), objects, trans_type):
                    raise MotorError(f"{self.url}: node {node} reads back PDO 0x{pdo.com_record.od.index:04X} as "
                                     f"{got}, not {(bool(objects), objects, trans_type)}")
        except (SdoAbortedError, SdoCommunicationError) as exc:
            raise MotorError(f"{self.url}: node {node} refused its PDO mapping: {exc}") from None

    # -- the cycle ------------------------------------------------------------------------------------------
    def poll_state(self) -> MotorState:
        self._require_open("poll_state")
        self._raise_on_receive_error()
        self._beat(force=True)
        fresh = self._sync_and_wait(0.5 * self.period_s)
        self._raise_on_receive_error()  # one during this cycle's wait: its answers may be lost
        now = time.monotonic()
        with self._rx_cond:
            rx = {n: _Received(**vars(r)) for n, r in self._rx.items()}
        stamp = now if fresh else min(min(r.stamp1, r.stamp2) for r in rx.values())
        if now - stamp > 3 * self.period_s:
            rx, stamp = self._read_by_sdo(rx), time.monotonic()  # no PDO: not operational, or silent
        self._collect_emcy()
        self._check_statuswords(rx)
        if self._faults and self._armed:
            self._fault_stop()
        return self._state_from(rx, stamp)

    def write_setpoints(self, positions: ArrayLike) -> np.ndarray:
        self._require_open("write_setpoints")
        self._raise_on_receive_error()
        target = self._setpoint_target(positions, self.names)
        sent = np.empty_like(target)
        for j, node in enumerate(self.nodes):
            cal, (lo, hi) = self.calibration[j], self._count_range[j]
            counts = min(hi, max(lo, cal.to_ticks(float(target[j]))))
            sent[j] = cal.to_radians(counts)
            self._send_rpdo(node, self._cycle_controlword(node, counts), counts)
        self._beat()
        return sent

    def _cycle_controlword(self, node: int, counts: int) -> int:
        """CSP: enable operation. PP: the set-point handshake (bit 4 up with a new target once the drive has
        dropped its acknowledge, statusword bit 12; down once it acknowledged), so a target is taken every other
        cycle at best."""
        if self._mode[node] == CSP:
            self._target[node] = counts
            return CW_ENABLE
        ack = bool(self._rx[node].statusword & SW_SETPOINT_ACK)
        if self._pp_high[node]:
            self._pp_high[node] = not ack
        elif not ack:
            self._pp_high[node] = True
            self._target[node] = counts
        return CW_ENABLE | PP_CHANGE_IMMEDIATELY | (PP_NEW_SETPOINT if self._pp_high[node] else 0)

    # -- arm, stop, faults --------------------------------------------------------------------------------
    def arm(self) -> None:
        self._require_open("arm")
        self._refuse_if_faulted("arm")
        if self.joint_limits is None:
            raise ArmRefusedError("arm refused: no joint limits configured; give the robot configuration's joint "
                                  "limits (joint_limits=[(lo, hi), ...] in rad)")
        state = self.poll_state()
        self._refuse_if_faulted("arm")
        ranges = []
        for j, node in enumerate(self.nodes):
            found = state_of(self._rx[node].statusword)
            if found != SOD:
                raise ArmRefusedError(f"arm refused: joint {self.names[j]!r} (node {node}) is in {found}, not "
                                      "SWITCH ON DISABLED; stop it (or clear faults) first")
            ranges.append(self._check_limits(j, node, state.positions[j]))
        self._count_range = ranges
        self._watching = True  # the drives' heartbeat consumers start watching at this first heartbeat
        self._beat(force=True)
        try:
            for node in self.nodes:
                actual = self._read(node, 0x6064, 0, "<i")
                self._write(node, 0x607A, 0, "<i", actual)  # target = actual: no jump at enable
                self._target[node], self._pp_high[node] = actual, False
            for command, want in ((CW_SHUTDOWN, "READY TO SWITCH ON"), (CW_SWITCH_ON, "SWITCHED ON"),
                                  (CW_ENABLE, OE)):
                for node in self.nodes:
                    self._write(node, 0x6040, 0, "<H", command)
                self._expect_states(want, 0.5, f"controlword 0x{command:02X}")
            for node in self.nodes:
                self._send_rpdo(node, CW_ENABLE, self._target[node])
        except MotorError as exc:
            self._disable_all()
            raise ArmRefusedError(f"arm failed: {exc}") from None
        self._armed = True
        log.info("%s: armed (Operation Enabled); heartbeat consumer %d ms", self.url, self.consumer_ms)

    def _check_limits(self, j: int, node: int, present: float) -> tuple[int, int]:
        """The target count range of a joint (configuration inside the drive's 0x607D), or one line refusing."""
        assert self.joint_limits is not None
        cal, (lo, hi), name = self.calibration[j], self.joint_limits[j], self.names[j]
        c_lo, c_hi = sorted((cal.to_ticks(lo), cal.to_ticks(hi)))
        try:
            d_lo, d_hi = self._read(node, 0x607D, 1, "<i"), self._read(node, 0x607D, 2, "<i")
        except MotorError:
            d_lo, d_hi = -(1 << 31), (1 << 31) - 1  # no software limit in the drive
        if (d_lo < c_lo - 1 or d_hi > c_hi + 1) and not self.host_limits:
            r_lo, r_hi = sorted((cal.to_radians(d_lo), cal.to_radians(d_hi)))
            raise ArmRefusedError(
                f"arm refused: joint {name!r} (node {node}) allows {r_lo:.3f}..{r_hi:.3f} rad (software position "
                f"limit 0x607D {d_lo}..{d_hi}) but the robot configuration allows {lo:.3f}..{hi:.3f} rad ({c_lo}.."
                f"{c_hi}); narrow 0x607D with the drive's commissioning tool, or pass host_limits=1 to rely on the "
                "host's clamp")
        if not lo - 1e-3 <= present <= hi + 1e-3:
            raise ArmRefusedError(f"arm refused: joint {name!r} (node {node}) is at {present:.3f} rad, outside its "
                                  f"limits {lo:.3f}..{hi:.3f} rad; move it inside with the drive disabled")
        return max(c_lo, d_lo), min(c_hi, d_hi)

    def stop(self, category: int = StopCategory.TORQUE_OFF) -> bool:
        if self._net is None:
            return False
        category = StopCategory(category)
        was_armed, self._armed = self._armed, False
        if category is StopCategory.CONTROLLED and was_armed and not self._faults:
            try:
                for node in self.nodes:
                    self._send_rpdo(node, CW_QUICK_STOP, self._target.get(node, 0))
                    self._write(node, 0x6040, 0, "<H", CW_QUICK_STOP)
                self._expect_states(SOD, self.stop_timeout_s, "quick stop (0x605A = 2)")
            except MotorError as exc:  # the ramp did not finish in time, or the bus fails: disable now
                log.error("%s: controlled stop incomplete (%s); disabling now", self.url, exc)
        confirmed = self._disable_all()
        log.warning("%s: stop category %d: drives %s", self.url, int(category),
                    "disabled, read back" if confirmed else "NOT all confirmed disabled")
        return confirmed

    def clear_faults(self) -> None:
        """Operator act: NMT start (a drive that lost the heartbeat went pre-operational), a fault reset (controlword
        bit 7 rising edge) to each drive in Fault, read back; the drives stay disabled."""
        self._require_open("clear_faults")
        if self._armed:
            raise MotorError(f"{self.url}: clear_faults refused while armed; stop first")
        self._raise_on_receive_error()
        for node in self.nodes:
            self._send(0, bytes([NMT_START, node]))
        for node in self.nodes:
            if state_of(self._read(node, 0x6041, 0, "<H")) == FAULT:
                for command in (CW_DISABLE_VOLTAGE, CW_FAULT_RESET, CW_DISABLE_VOLTAGE):
                    self._write(node, 0x6040, 0, "<H", command)
        try:
            self._expect_states(SOD, 0.5, "fault reset")
        except MotorError as exc:
            codes = {n: self._optional(n, 0x603F, "<H") for n in self.nodes}
            raise MotorError(f"{exc}; error codes 0x603F {codes}: remove the cause (see the drive's manual), then "
                             "clear faults again") from None
        answered = self._sync_and_wait(0.5)
        self._raise_on_receive_error()  # it failed again while clearing: the latch stays
        if not answered:
            raise MotorBusError(f"{self.url}: the drives send no PDO after NMT start; check the bus")
        self._emcy.clear()
        log.warning("%s: faults cleared by the operator: %s", self.url, "; ".join(map(str, self._faults)) or "none")
        self._faults.clear()

    def _check_statuswords(self, rx: dict[int, _Received]) -> None:
        for j, node in enumerate(self.nodes):
            state = state_of(rx[node].statusword)
            if state in (FAULT, "FAULT REACTION ACTIVE"):
                if any(f.joint == self.names[j] and f.code == "drive_fault" for f in self._faults):
                    continue  # latched already: no SDO read every cycle
                code = self._optional(node, 0x603F, "<H")
                code_text = f"0x{code:04X}" if isinstance(code, int) else "unknown"
                self._latch(MotorFault(self.names[j], "drive_fault", f"node {node} in {state}, error code 0x603F = "
                                       f"{code_text}"))
            elif self._armed and state != OE:
                self._latch(MotorFault(self.names[j], "drive_disabled",
                                       f"node {node} left Operation Enabled by itself: {state}"))

    def _collect_emcy(self) -> None:
        while self._emcy:
            node, code, _ = self._emcy.popleft()
            if code & 0xFF00 == EMCY_RESET:  # error reset / no error (canopen's EmcyConsumer: the same test)
                continue
            j = self.nodes.index(node)
            if code == EMCY_HEARTBEAT:
                self._latch(MotorFault(self.names[j], "heartbeat_lost", f"node {node} lost the host's heartbeat "
                                       "(EMCY 0x8130): it quick-stopped and disabled itself (0x6007, 0x605A)"))
            else:
                self._latch(MotorFault(self.names[j], "drive_fault", f"node {node} sent EMCY 0x{code:04X} "
                                       f"({canopen.emcy.EmcyError(code, 0, b'', 0).get_desc() or 'device specific'})"))

    def _fault_stop(self) -> None:
        log.error("%s: %s -> stop category 0", self.url, "; ".join(map(str, self._faults)))
        self.stop(StopCategory.TORQUE_OFF)

    def _disable_all(self) -> bool:
        """Disable voltage on every drive: the RPDO first (no wait), then SDO (acknowledged), then the statusword
        read back; True when every drive reads a state without torque."""
        for node in self.nodes:
            self._send_rpdo(node, CW_DISABLE_VOLTAGE, self._target.get(node, 0), quiet=True)
        for node in self.nodes:
            for _ in range(2):
                try:
                    self._write(node, 0x6040, 0, "<H", CW_DISABLE_VOLTAGE)
                    break
                except MotorError as exc:
                    log.error("%s: disable voltage on node %d failed: %s", self.url, node, exc)
        try:
            self._expect_states(TORQUE_OFF_STATES - {"READY TO SWITCH ON", "SWITCHED ON"}, 0.3, "disable voltage")
            return True
        except MotorError as exc:
            log.error("%s: %s", self.url, exc)
            return False

    # -- close ----------------------------------------------------------------------------------------------
    def _close(self) -> None:
        try:
            answering: dict[int, int] = {}
            for node in self.nodes:  # one SDO timeout per silent drive, not one per step
                try:
                    answering[node] = self._read(node, 0x6041, 0, "<H")
                except MotorError as exc:
                    log.error("%s: close: %s", self.url, exc)
            if self._armed or any(state_of(w) in POWER_ON_STATES for w in answering.values()):
                self.stop(StopCategory.TORQUE_OFF)
            self._armed = False
            for node in answering:  # the host's heartbeat ends here: the drives stop watching it
                self._optional_write(node, 0x1016, 1, "<I", 0)
                self._send(0, bytes([NMT_PRE_OPERATIONAL, node]), quiet=True)
        finally:
            self._disconnect()

    def _disconnect(self) -> None:
        if self._net is not None:
            try:
                self._net.disconnect()
            except Exception as exc:  # a vanished interface must not mask the caller's error
                log.error("%s: CAN disconnect: %s", self.url, exc)
            self._net = None

    # -- frames -----------------------------------------------------------------------------------------------
    def _beat(self, force: bool = False) -> None:
        """The host heartbeat the drives consume: sent from the caller's thread only (the control cycle, or the
        arm/stop/clear sequence it runs), never by a timer."""
        if not self._watching:
            return
        now = time.monotonic()
        if force or now - self._last_beat >= 0.5 * self.period_s:
            self._send(0x700 + self.host_node, HEARTBEAT_OPERATIONAL)
            self._last_beat = now

    def _send(self, can_id: int, data: bytes, quiet: bool = False) -> None:
        try:
            self._net.send_message(can_id, data)
        except (can.CanError, OSError, RuntimeError) as exc:
            if not quiet:
                raise MotorBusError(f"{self.url}: cannot send frame 0x{can_id:03X}: {exc}; check the CAN "
                                    "interface (ip -details link show) and its cable") from exc

    def _send_rpdo(self, node: int, controlword: int, counts: int, quiet: bool = False) -> None:
        self._send(RPDO_LAYOUT[2] + node, struct.pack("<Hi", controlword, counts), quiet=quiet)

    def _on_tpdo1(self, can_id: int, data: bytearray, timestamp: float) -> None:
        if len(data) != 6:
            return  # not the mapping this host configured: never decode a guess
        statusword, position = struct.unpack("<Hi", bytes(data))
        with self._rx_cond:
            rx = self._rx[can_id - 0x180]
            rx.statusword, rx.position, rx.seq1, rx.stamp1 = statusword, position, rx.seq1 + 1, time.monotonic()
            self._rx_cond.notify_all()

    def _on_tpdo2(self, can_id: int, data: bytearray, timestamp: float) -> None:
        if len(data) != 6:
            return
        velocity, current = struct.unpack("<ih", bytes(data))
        with self._rx_cond:
            rx = self._rx[can_id - 0x280]
            rx.velocity, rx.current, rx.seq2, rx.stamp2 = velocity, current, rx.seq2 + 1, time.monotonic()
            self._rx_cond.notify_all()

    def _on_receive_error(self, exc: Exception) -> None:
        """Receive thread: count the error and wake a control thread waiting for answers (it reports it)."""
        with self._rx_cond:
            self._rx_errors += 1
            self._rx_error = exc
            self._rx_cond.notify_all()

    def _refuse_open_on_receive_error(self) -> None:
        """open(): a receive error means the drives' answers to the setup may be lost. Nothing is armed and the
        device does not open, so there is no fault to latch or clear: say so and what to check."""
        with self._rx_cond:
            count, exc = self._rx_errors, self._rx_error
        if count:
            cause = " ".join(str(exc).split()) or type(exc).__name__
            raise MotorBusError(f"{self.url}: receiving from CAN {self.interface}/{self.channel} failed while opening "
                                f"({cause}); check the interface (ip -details link show) and open again")

    def _raise_on_receive_error(self) -> None:
        """Control thread: a receive error since the last check latches `bus_error`, stops the drives (category 0)
        when armed, and raises one line; the next check passes unless the receive failed again."""
        with self._rx_cond:
            count, exc = self._rx_errors, self._rx_error
        new = count - self._rx_errors_reported
        if not new:
            return
        self._rx_errors_reported = count
        cause = " ".join(str(exc).split()) or type(exc).__name__  # one line, whatever the interface wrote
        reason = (f"receiving from CAN {self.interface}/{self.channel} failed ({cause}; {new} time(s)): frames from "
                  "the drives may have been lost")
        self._latch(MotorFault(f"{self.interface}/{self.channel}", "bus_error", reason))
        stopped = ""
        if self._armed:
            confirmed = self.stop(StopCategory.TORQUE_OFF)
            stopped = ("; drives stopped (category 0, read back)" if confirmed else
                       "; stop NOT read back (each drive's heartbeat consumer stops it if the bus stays down)")
        raise MotorBusError(f"{self.url}: {reason}; fault latched{stopped}: once the bus works again (check it with "
                            "ip -details link show), clear faults and arm")

    def _sync_and_wait(self, timeout: float) -> bool:
        """One SYNC; True when every drive's TPDO1 and TPDO2 answered it within `timeout` (False at once on a
        receive error: its answers may be lost)."""
        with self._rx_cond:
            before = {n: (r.seq1, r.seq2) for n, r in self._rx.items()}
            errors = self._rx_errors
        self._send(0x80, b"")
        with self._rx_cond:
            return self._rx_cond.wait_for(
                lambda: self._rx_errors != errors
                or all(r.seq1 > before[n][0] and r.seq2 > before[n][1] for n, r in self._rx.items()),
                timeout) and self._rx_errors == errors

    def _read_by_sdo(self, rx: dict[int, _Received]) -> dict[int, _Received]:
        now = time.monotonic()
        for node in self.nodes:
            r = rx[node]
            r.statusword, r.position = self._read(node, 0x6041, 0, "<H"), self._read(node, 0x6064, 0, "<i")
            r.velocity, r.stamp1 = self._read(node, 0x606C, 0, "<i"), now
            self._latch(MotorFault(self.names[self.nodes.index(node)], "pdo_silent",
                                       f"node {node} answers SDO but sends no PDO: not NMT operational (a lost "
                                       "heartbeat, or another master changed its NMT state)"))
        return rx

    def _state_from(self, rx: dict[int, _Received], stamp: float) -> MotorState:
        n = len(self.nodes)
        pos, vel, cur = np.empty(n), np.empty(n), np.empty(n)
        for j, node in enumerate(self.nodes):
            cal = self.calibration[j]
            pos[j] = cal.to_radians(rx[node].position)
            vel[j] = rx[node].velocity * cal.rad_per_tick() * cal.direction
            cur[j] = rx[node].current / 1000.0 * self._rated_a.get(node, math.nan) * cal.direction
        return MotorState(pos, vel, cur, stamp)

    # -- SDO helpers ------------------------------------------------------------------------------------------
    def _read(self, node: int, index: int, sub: int, fmt: str) -> int:
        self._beat()
        try:
            data = self._remote[node].sdo.upload(index, sub)
        except SdoAbortedError as exc:
            raise MotorError(f"{self.url}: node {node} refused a read of 0x{index:04X}:{sub}: {exc}") from None
        except (SdoCommunicationError, can.CanError, OSError) as exc:
            raise MotorBusError(f"{self.url}: node {node} did not answer a read of 0x{index:04X}:{sub} ({exc}); "
                                "check power, node id, bit rate and termination") from None
        size = struct.calcsize(fmt)
        if len(data) < size:
            raise MotorBusError(f"{self.url}: node {node} answered 0x{index:04X}:{sub} with {len(data)} bytes, "
                                f"expected {size}")
        return int(struct.unpack(fmt, bytes(data[:size]))[0])

    def _write(self, node: int, index: int, sub: int, fmt: str, value: int) -> None:
        self._beat()
        try:
            self._remote[node].sdo.download(index, sub, struct.pack(fmt, value))
        except SdoAbortedError as exc:
            raise MotorError(f"{self.url}: node {node} refused {value} in 0x{index:04X}:{sub}: {exc}") from None
        except (SdoCommunicationError, can.CanError, OSError) as exc:
            raise MotorBusError(f"{self.url}: node {node} did not answer a write of 0x{index:04X}:{sub} ({exc}); "
                                "check power, node id, bit rate and termination") from None

    def _write_checked(self, node: int, index: int, sub: int, fmt: str, value: int, what: str) -> None:
        self._write(node, index, sub, fmt, value)
        back = self._read(node, index, sub, fmt)
        if back != value:
            raise MotorError(f"{self.url}: node {node} reads back {what} 0x{index:04X}:{sub} = {back}, not {value}")

    def _optional(self, node: int, index: int, fmt: str) -> int | str:
        try:
            return self._read(node, index, 0, fmt)
        except MotorError as exc:
            return f"unreadable ({exc})"

    def _optional_write(self, node: int, index: int, sub: int, fmt: str, value: int) -> None:
        try:
            self._write(node, index, sub, fmt, value)
        except MotorError as exc:
            log.error("%s: %s", self.url, exc)

    def _expect_states(self, want: str | set[str], timeout: float, after: str) -> None:
        """Poll every drive's statusword (SDO) until each shows a wanted state; one line naming the laggards."""
        accept = {want} if isinstance(want, str) else want
        states: dict[int, str] = {}

        def done() -> bool:
            for node in self.nodes:
                if states.get(node) not in accept:
                    states[node] = state_of(self._read(node, 0x6041, 0, "<H"))
            return all(s in accept for s in states.values())

        if not self._wait(done, timeout):
            late = {n: s for n, s in states.items() if s not in accept}
            raise MotorError(f"{self.url}: after {after}, drive node(s) {late} did not reach "
                             f"{' or '.join(sorted(accept))} within {timeout:.2f} s")

    def _wait(self, predicate: Any, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if predicate():
                return True
            if time.monotonic() >= deadline:
                return False
            self._beat()
            time.sleep(0.001)

    def _require_open(self, what: str) -> None:
        if self._net is None:
            raise MotorError(f"{what} on {self.url}: the device is not open (open() first)")
