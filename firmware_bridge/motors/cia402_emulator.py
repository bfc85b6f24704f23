"""Emulated CiA 402 drives (one joint per CANopen node) on a python-can bus, in their own process for the tests.

Written from the CiA 301 / CiA 402 object definitions (sources below, also in docs/motors.md), not from the
backend: the backend (`cia402.py`) and this emulator check each other. The SDO server is canopen's own
(`canopen.sdo.SdoServer`, expedited and segmented transfers, abort codes); everything else is here:

- NMT (COB-ID 0, two bytes): start (1), stop (2), pre-operational (0x80), reset node (0x81: every object back to
  its default, state machine back to Switch On Disabled), reset communication (0x82: objects 0x1000-0x1FFF back
  to defaults); a reset sends the boot-up message (0x700 + node, one byte 0) and enters pre-operational. SDO is
  served in pre-operational and operational, PDOs and SYNC only in operational, nothing but NMT when stopped;
- the CiA 402 state machine exactly as its state diagram (`next_state`, transitions 2-12 and 16 by controlword,
  13/14 on a fault, 15 on a rising edge of controlword bit 7 in Fault; canopen's `State402` names and statusword
  masks); torque only in Operation Enabled, Quick Stop Active and a ramped Fault Reaction Active;
- quick stop option 0x605A: 0 disable at once; 1/2 (3/4) slow down on the profile (quick stop, maximum) ramp
  then Switch On Disabled (transition 12); 5..8 the same ramps then stay in Quick Stop Active (16 back to
  Operation Enabled). Fault reaction 0x605E: 0 torque off at once, otherwise the quick stop ramp, then Fault;
- abort connection option 0x6007 (CiA 402: 0 no action, 1 fault signal, 2 disable voltage command, 3 quick stop
  command) applied on heartbeat loss, NMT stop and NMT resets;
- the heartbeat consumer 0x1016 (CiA 301; CANopenNode's 301/CO_HBconsumer.c): sub 1 = node id << 16 | time in
  ms; monitoring starts at the first heartbeat from that node (a frame of exactly one byte; a boot-up byte 0
  re-arms it), only while pre-operational or operational; on expiry (never early: time since the last heartbeat
  >= the consumer time) EMCY 0x8130 "life guard error or heartbeat error", error register bit 4, the 0x6007
  action, then communication error behaviour 0x1029:1 (0 = pre-operational when operational, 1 = none,
  2 = stopped);
- PDOs: RPDO/TPDO 1-4 (0x1400/0x1600, 0x1800/0x1A00), mapping writable only while the PDO is invalid (COB-ID
  bit 31) and its entry count is 0; RPDO types 0-240 act at the next SYNC, 254/255 at once; an RPDO of the wrong
  length is not processed (EMCY 0x8210 shorter, 0x8220 longer); TPDO types 1-240 answer every n-th SYNC,
  254/255 on change (inhibit time) and on their event timer;
- cyclic synchronous position (8: the target 0x607A, clamped to the software limits 0x607D, followed by a
  velocity- and acceleration-limited position loop) and profile position (1: a new set-point on a rising edge of
  controlword bit 4, acknowledged in statusword bit 12, reached at the profile velocity 0x6081);
- EMCY (0x80 + node: code, error register, 5 bytes) on every error, 0x0000 on a fault reset; an injected fault
  (`inject_fault`) latches in Fault until a fault reset (with `persistent=True` the cause stays and resets fail);
- hostile input: extended-id, FD, remote and error frames are dropped; an SDO request that is not 8 bytes is
  ignored (`sdo_malformed` event); a heartbeat that is not one byte is none;
- fault-campaign injections: `block_joint` (the joint cannot move: a collision; no following-error fault is
  modelled) and `cut_bus` (the bus between host and drives is gone: nothing is heard or sent, every drive's
  timers, its heartbeat consumer among them, run on).

Emulator assumptions the sources leave open: a PDO mapping write while the PDO is valid is refused with abort
0x08000022; the disable operation / shutdown option codes (0x605C/0x605B) act as 0 (drive function off at once);
velocity units are position units per second; 0x6078 is per mille of 0x6075.

    python -m firmware_bridge.motors.cia402_emulator --nodes 1-6 --print-url
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import struct
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import can

from firmware_bridge.motors import emulator_common as common
from firmware_bridge.motors.base import MissingDependencyError

try:  # the cia402 extra, as for the backend: a robot without it never imports this module
    import canopen
    from canopen import objectdictionary as odict
    from canopen.sdo import SdoAbortedError, SdoServer
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise MissingDependencyError(f"the CiA 402 emulator needs canopen ({exc}); install it with: pip install "
                                 "'edge-vla[cia402]'") from exc

# -- CiA 402 states (canopen's State402 names), statusword bits and the controlword commands -------------------
NOT_READY, SOD, RTSO, SO, OE = ("NOT READY TO SWITCH ON", "SWITCH ON DISABLED", "READY TO SWITCH ON",
                                "SWITCHED ON", "OPERATION ENABLED")
QSA, FRA, FAULT = "QUICK STOP ACTIVE", "FAULT REACTION ACTIVE", "FAULT"
STATE_BITS = {NOT_READY: 0x0000, SOD: 0x0040, RTSO: 0x0021, SO: 0x0023, OE: 0x0027, QSA: 0x0007, FRA: 0x000F,
              FAULT: 0x0008}
VOLTAGE_ENABLED = 0x0010  # statusword bit 4: high voltage applied
REMOTE, TARGET_REACHED, INTERNAL_LIMIT, OP_MODE_BIT12 = 0x0200, 0x0400, 0x0800, 0x1000
CSP, PP = 8, 1  # modes of operation (0x6060)
SUPPORTS_PP, SUPPORTS_CSP = 0x01, 0x80  # supported drive modes (0x6502) bits 0 and 7

# (state, command) -> (next state, CiA 402 transition number)
TRANSITIONS: dict[tuple[str, str], tuple[str, int]] = {
    (SOD, "shutdown"): (RTSO, 2),
    (RTSO, "switch_on"): (SO, 3),
    (RTSO, "enable_operation"): (OE, 3),  # "switch on + enable operation": 3, then 4 at once
    (SO, "enable_operation"): (OE, 4),
    (OE, "switch_on"): (SO, 5),  # disable operation
    (SO, "shutdown"): (RTSO, 6),
    (RTSO, "disable_voltage"): (SOD, 7),
    (RTSO, "quick_stop"): (SOD, 7),
    (OE, "shutdown"): (RTSO, 8),
    (OE, "disable_voltage"): (SOD, 9),
    (SO, "disable_voltage"): (SOD, 10),
    (SO, "quick_stop"): (SOD, 10),
    (OE, "quick_stop"): (QSA, 11),
    (QSA, "disable_voltage"): (SOD, 12),
}

# NMT
INITIALISING, STOPPED, OPERATIONAL, PRE_OPERATIONAL = 0x00, 0x04, 0x05, 0x7F
NMT_NAMES = {INITIALISING: "INITIALISING", STOPPED: "STOPPED", OPERATIONAL: "OPERATIONAL",
             PRE_OPERATIONAL: "PRE-OPERATIONAL"}

# EMCY error codes (CiA 301; openCANopen's cia302-error-codes.h)
EMCY_HEARTBEAT, EMCY_PDO_LENGTH, EMCY_PDO_TOO_LONG, EMCY_RESET = 0x8130, 0x8210, 0x8220, 0x0000
# SDO abort codes (CiA 301)
ABORT_RO, ABORT_WO, ABORT_NO_OBJECT, ABORT_NO_SUB = 0x06010002, 0x06010001, 0x06020000, 0x06090011
ABORT_LENGTH, ABORT_RANGE, ABORT_NOT_MAPPABLE, ABORT_MAP_TOO_LONG = 0x06070010, 0x06090030, 0x06040041, 0x06040042
ABORT_DEVICE_STATE = 0x08000022

DEFAULT_GROUP = "239.74.163.2"  # python-can's UdpMulticastBus.DEFAULT_GROUP_IPv4


def decode_command(cw: int) -> str | None:
    """The device control command a controlword carries (CiA 402 command coding; bit 7 set: none)."""
    if cw & 0x80:
        return None  # fault reset is an edge (fault_reset_edge); bit 7 held is no command
    if cw & 0x02 == 0:
        return "disable_voltage"  # 0xxx xx0x
    if cw & 0x04 == 0:
        return "quick_stop"  # 0xxx x01x
    if cw & 0x01 == 0:
        return "shutdown"  # 0xxx x110
    return "enable_operation" if cw & 0x08 else "switch_on"  # 0xxx 1111 / 0xxx 0111 (= disable operation)


def fault_reset_edge(previous: int, cw: int) -> bool:
    return not previous & 0x80 and bool(cw & 0x80)


def next_state(state: str, command: str | None, quick_stop_option: int) -> tuple[str, int | None]:
    """(next state, transition) for a command; (state, None) where the diagram has no such transition."""
    if command is None:
        return state, None
    if state == QSA and command == "enable_operation" and 5 <= quick_stop_option <= 8:
        return OE, 16
    return TRANSITIONS.get((state, command), (state, None))


def statusword_for(state: str) -> int:
    return STATE_BITS[state] | (VOLTAGE_ENABLED if state in (RTSO, SO, OE, QSA) else 0)


def error_register_bits(code: int) -> int:
    """0x1001 for an error code: bit 0 generic, 1 current, 2 voltage, 3 temperature, 4 communication."""
    bits = 0x01
    bits |= {0x2: 0x02, 0x3: 0x04, 0x4: 0x08}.get(code >> 12, 0)
    return bits | (0x10 if code & 0xFF00 == 0x8100 else 0)


# -- configuration and object dictionary -------------------------------------------------------------------------
@dataclass(frozen=True)
class DriveConfig:
    """One emulated drive. The defaults that the backend must change (0x1016, 0x6007, 0x605A) are deliberately
    not what it writes, so a test can tell "configured" from "left as found"."""

    node: int = 1
    device_type: int = 0x00020192  # 0x1000: device profile 402 (low 16 bits), servo drive
    supported_modes: int = SUPPORTS_PP | SUPPORTS_CSP
    position: int = 0  # counts at power-on
    counts_per_turn: int = 65536  # feed constant 0x6092 (position units per output revolution)
    soft_limits: tuple[int, int] = (-(1 << 31), (1 << 31) - 1)  # 0x607D
    max_velocity: float = 65536.0  # counts/s the position loop may command (1 rev/s)
    max_accel: float = 1_310_720.0  # counts/s^2
    quick_stop_decel: int = 655_360  # 0x6085, counts/s^2
    abort_connection_option: int = 0  # 0x6007 as shipped: no action
    quick_stop_option: int = 6  # 0x605A as shipped: quick stop ramp, then stay in Quick Stop Active (torque on)
    fault_reaction_option: int = 0  # 0x605E
    error_behaviour: int = 0  # 0x1029:1
    rated_current_ma: int = 2000  # 0x6075


U8, U16, U32 = odict.UNSIGNED8, odict.UNSIGNED16, odict.UNSIGNED32
I8, I16, I32 = odict.INTEGER8, odict.INTEGER16, odict.INTEGER32
RPDO_MAPPABLE = {0x6040, 0x6060, 0x607A}
TPDO_MAPPABLE = {0x603F, 0x6041, 0x6061, 0x6064, 0x606C, 0x6077, 0x6078}
DYNAMIC = {0x6041, 0x6061, 0x6064, 0x606C, 0x6077, 0x6078}
# factory PDO layout (checked by the tests to be replaced): RPDO1 controlword, RPDO2 controlword + mode, TPDO1
# statusword, TPDO2 statusword + mode display, all event driven
FACTORY_RPDO = {0: [0x60400010], 1: [0x60400010, 0x60600008]}
FACTORY_TPDO = {0: [0x60410010], 1: [0x60410010, 0x60610008]}


def _objects(cfg: DriveConfig) -> list[tuple[int, int, str, int, str, int]]:
    """(index, subindex, name, type, access, default) of every object the drive has."""
    n = cfg.node
    rows = [
        (0x1000, 0, "Device type", U32, "ro", cfg.device_type),
        (0x1001, 0, "Error register", U8, "ro", 0),
        (0x1005, 0, "COB-ID SYNC", U32, "rw", 0x80),
        (0x1014, 0, "COB-ID EMCY", U32, "ro", 0x80 + n),
        (0x1016, 0, "Consumer heartbeat time entries", U8, "ro", 1),
        (0x1016, 1, "Consumer heartbeat time", U32, "rw", 0),
        (0x1017, 0, "Producer heartbeat time", U16, "rw", 0),
        (0x1018, 0, "Identity entries", U8, "ro", 4),
        (0x1018, 1, "Vendor-ID", U32, "ro", 0),
        (0x1018, 2, "Product code", U32, "ro", 0x402),
        (0x1018, 3, "Revision number", U32, "ro", 1),
        (0x1018, 4, "Serial number", U32, "ro", n),
        (0x1029, 0, "Error behaviour entries", U8, "ro", 1),
        (0x1029, 1, "Communication error", U8, "rw", cfg.error_behaviour),
        (0x603F, 0, "Error code", U16, "ro", 0),
        (0x6007, 0, "Abort connection option code", I16, "rw", cfg.abort_connection_option),
        (0x6040, 0, "Controlword", U16, "rw", 0),
        (0x6041, 0, "Statusword", U16, "ro", 0),
        (0x605A, 0, "Quick stop option code", I16, "rw", cfg.quick_stop_option),
        (0x605B, 0, "Shutdown option code", I16, "rw", 0),
        (0x605C, 0, "Disable operation option code", I16, "rw", 0),
        (0x605E, 0, "Fault reaction option code", I16, "rw", cfg.fault_reaction_option),
        (0x6060, 0, "Modes of operation", I8, "rw", 0),
        (0x6061, 0, "Modes of operation display", I8, "ro", 0),
        (0x6064, 0, "Position actual value", I32, "ro", 0),
        (0x606C, 0, "Velocity actual value", I32, "ro", 0),
        (0x6075, 0, "Motor rated current", U32, "rw", cfg.rated_current_ma),
        (0x6077, 0, "Torque actual value", I16, "ro", 0),
        (0x6078, 0, "Current actual value", I16, "ro", 0),
        (0x607A, 0, "Target position", I32, "rw", 0),
        (0x607D, 0, "Software position limit entries", U8, "ro", 2),
        (0x607D, 1, "Min position limit", I32, "rw", cfg.soft_limits[0]),
        (0x607D, 2, "Max position limit", I32, "rw", cfg.soft_limits[1]),
        (0x6081, 0, "Profile velocity", U32, "rw", cfg.counts_per_turn),
        (0x6083, 0, "Profile acceleration", U32, "rw", cfg.counts_per_turn * 20),
        (0x6085, 0, "Quick stop deceleration", U32, "rw", cfg.quick_stop_decel),
        (0x6092, 0, "Feed constant entries", U8, "ro", 2),
        (0x6092, 1, "Feed", U32, "rw", cfg.counts_per_turn),
        (0x6092, 2, "Shaft revolutions", U32, "rw", 1),
        (0x6502, 0, "Supported drive modes", U32, "ro", cfg.supported_modes),
    ]
    for k in range(4):
        rows += [
            (0x1400 + k, 0, f"RPDO{k + 1} communication entries", U8, "ro", 2),
            (0x1400 + k, 1, f"RPDO{k + 1} COB-ID", U32, "rw",
             0x200 + 0x100 * k + n + (0 if k in FACTORY_RPDO else 1 << 31)),
            (0x1400 + k, 2, f"RPDO{k + 1} transmission type", U8, "rw", 255),
            (0x1800 + k, 0, f"TPDO{k + 1} communication entries", U8, "ro", 6),
            (0x1800 + k, 1, f"TPDO{k + 1} COB-ID", U32, "rw",
             0x180 + 0x100 * k + n + (0 if k in FACTORY_TPDO else 1 << 31)),
            (0x1800 + k, 2, f"TPDO{k + 1} transmission type", U8, "rw", 255),
            (0x1800 + k, 3, f"TPDO{k + 1} inhibit time", U16, "rw", 0),
            (0x1800 + k, 5, f"TPDO{k + 1} event timer", U16, "rw", 0),
            (0x1800 + k, 6, f"TPDO{k + 1} SYNC start value", U8, "rw", 0),
        ]
        for base, factory in ((0x1600, FACTORY_RPDO), (0x1A00, FACTORY_TPDO)):
            entries = factory.get(k, [])
            rows.append((base + k, 0, f"PDO mapping 0x{base + k:04X} entries", U8, "rw", len(entries)))
            rows += [(base + k, s, f"PDO mapping 0x{base + k:04X} entry {s}", U32, "rw",
                      entries[s - 1] if s <= len(entries) else 0) for s in range(1, 9)]
    return rows


def build_dictionary(rows: Iterable[tuple[int, int, str, int, str, int]]) -> odict.ObjectDictionary:
    """A canopen ObjectDictionary of the rows: a variable where an index has only subindex 0, else a record."""
    by_index: dict[int, list[tuple[int, int, str, int, str, int]]] = {}
    for row in rows:
        by_index.setdefault(row[0], []).append(row)
    dictionary = odict.ObjectDictionary()
    for index, members in by_index.items():
        variables = []
        for _, sub, name, dtype, access, default in members:
            var = odict.ODVariable(name, index, sub)
            var.data_type, var.access_type, var.default = dtype, access, default
            variables.append(var)
        if len(variables) == 1 and variables[0].subindex == 0:
            dictionary.add_object(variables[0])
        else:
            record = odict.ODRecord(f"Object 0x{index:04X}", index)
            for var in variables:
                record.add_member(var)
            dictionary.add_object(record)
    return dictionary


# -- one drive -----------------------------------------------------------------------------------------------------
class EmulatedDrive:
    """One CiA 402 drive. Every method runs under the bus lock (frames, the tick, inspection)."""

    def __init__(self, cfg: DriveConfig, bus: DriveBus) -> None:
        if not 1 <= cfg.node <= 127:
            raise ValueError(f"node {cfg.node} is outside 1..127")
        self.cfg, self.bus, self.node = cfg, bus, cfg.node
        self.rows = _objects(cfg)
        self.object_dictionary = build_dictionary(self.rows)  # the name canopen's SdoServer reads
        self.sdo = SdoServer(0x600 + self.node, 0x580 + self.node, self)  # canopen's server, this drive's objects
        self.sdo._index = self.sdo._subindex = 0  # an abort before any request names 0x0000:00, not None
        self.read_only: set[tuple[int, int]] = set()
        self.values: dict[tuple[int, int], int] = {}
        self.state, self.nmt = NOT_READY, INITIALISING
        self.position, self.velocity, self.accel = float(cfg.position), 0.0, 0.0
        self.cw = 0
        self.pp_goal: float | None = None
        self.pp_ack = False
        self.limited = False
        self.fault_cause: int | None = None  # a persistent injected fault: resets fail while it is there
        self.blocked = False  # the joint cannot move (fault injection: a collision)
        self.consumer = "unconfigured"
        self.last_heartbeat = 0.0
        self.heartbeats = self.rpdos = self.syncs = 0
        self.sync_count = [0, 0, 0, 0]
        self.pending_rpdo: dict[int, bytes] = {}
        self.tpdo_last: dict[int, tuple[bytes, float]] = {}
        self.next_producer_beat = 0.0
        self._restore(lambda index: True)

    # -- the object dictionary seen through SDO (canopen's SdoServer calls these) ------------------------------
    def _restore(self, which: Any) -> None:
        for index, sub, _, _, _, default in self.rows:
            if which(index):
                self.values[(index, sub)] = default
        self._arm_consumer()

    def _variable(self, index: int, subindex: int) -> odict.ODVariable:
        if index not in self.object_dictionary:
            raise SdoAbortedError(ABORT_NO_OBJECT)
        obj = self.object_dictionary[index]
        if isinstance(obj, odict.ODVariable):
            if subindex != 0:
                raise SdoAbortedError(ABORT_NO_SUB)
            return obj
        if subindex not in obj:
            raise SdoAbortedError(ABORT_NO_SUB)
        return obj[subindex]

    def get_data(self, index: int, subindex: int, check_readable: bool = False) -> bytes:
        var = self._variable(index, subindex)
        if check_readable and not var.readable:
            raise SdoAbortedError(ABORT_WO)
        return var.encode_raw(self.value(index, subindex))

    def set_data(self, index: int, subindex: int, data: bytes, check_writable: bool = False) -> None:
        var = self._variable(index, subindex)
        if check_writable and (not var.writable or (index, subindex) in self.read_only):
            raise SdoAbortedError(ABORT_RO)
        if len(data) * 8 != len(var):
            raise SdoAbortedError(ABORT_LENGTH)
        self.write(index, subindex, var.decode_raw(bytes(data)), via="sdo")

    def value(self, index: int, subindex: int = 0) -> int:
        if index == 0x6041:
            return self.statusword()
        if index == 0x6064:
            return round(self.position)
        if index == 0x606C:
            return round(self.velocity)
        if index in (0x6077, 0x6078):
            return max(-1000, min(1000, round(1000 * self.accel / self.cfg.max_accel))) if self.torque else 0
        if index == 0x6061:
            return self.values[(0x6060, 0)]
        return self.values[(index, subindex)]

    def write(self, index: int, sub: int, value: int, via: str) -> None:
        """Apply a write from SDO or an RPDO; SdoAbortedError refuses it."""
        if 0x1400 <= index <= 0x1403 or 0x1800 <= index <= 0x1803:
            self._check_pdo_communication(index, sub, value)
        elif 0x1600 <= index <= 0x1603 or 0x1A00 <= index <= 0x1A03:
            self._check_pdo_mapping(index, sub, value)
        elif index == 0x6060 and value != 0 and not self._supports(value):
            raise SdoAbortedError(ABORT_RANGE)
        self.values[(index, sub)] = value
        if index == 0x6040:
            self._controlword(value, via)
        elif index == 0x1016:
            self._arm_consumer()
        elif index == 0x1017:
            self.next_producer_beat = time.monotonic()

    def _supports(self, mode: int) -> bool:
        return bool(self.cfg.supported_modes & {PP: SUPPORTS_PP, CSP: SUPPORTS_CSP}.get(mode, 0))

    # -- PDO configuration (CiA 301 rules) -------------------------------------------------------------------
    def _check_pdo_communication(self, index: int, sub: int, value: int) -> None:
        if sub == 1:
            old = self.values[(index, 1)]
            if not old >> 31 and not value >> 31 and old & 0x7FF != value & 0x7FF:
                raise SdoAbortedError(ABORT_RANGE)  # the COB-ID of a valid PDO cannot change
        if sub == 2 and index < 0x1800 and 240 < value < 254:
            raise SdoAbortedError(ABORT_RANGE)

    def _check_pdo_mapping(self, index: int, sub: int, value: int) -> None:
        communication = index - 0x200  # 0x1600 -> 0x1400, 0x1A00 -> 0x1800
        if not self.values[(communication, 1)] >> 31:
            raise SdoAbortedError(ABORT_DEVICE_STATE)  # only while the PDO is invalid
        mappable = RPDO_MAPPABLE if index < 0x1A00 else TPDO_MAPPABLE
        if sub == 0:
            if value > 8:
                raise SdoAbortedError(ABORT_RANGE)
            entries = [self.values[(index, s)] for s in range(1, value + 1)]
            if any((e >> 16) not in mappable for e in entries):
                raise SdoAbortedError(ABORT_NOT_MAPPABLE)
            if sum(e & 0xFF for e in entries) > 64:
                raise SdoAbortedError(ABORT_MAP_TOO_LONG)
            return
        if self.values[(index, 0)] != 0:
            raise SdoAbortedError(ABORT_DEVICE_STATE)  # entries only while the count is 0
        if value and ((value >> 16) not in mappable
                      or len(self._variable(value >> 16, (value >> 8) & 0xFF)) != value & 0xFF):
            raise SdoAbortedError(ABORT_NOT_MAPPABLE)

    def _pdo(self, communication: int) -> tuple[bool, int, int, list[tuple[int, int, int]]]:
        """(valid, COB-ID, transmission type, [(index, sub, bits)]) of a PDO by its communication index."""
        mapping = communication + 0x200
        cob = self.values[(communication, 1)]
        entries = [self.values[(mapping, s)] for s in range(1, self.values[(mapping, 0)] + 1)]
        return (not cob >> 31, cob & 0x7FF, self.values[(communication, 2)],
                [(e >> 16, (e >> 8) & 0xFF, e & 0xFF) for e in entries])

    def pdo_summary(self, base: int) -> list[dict[str, Any]]:
        out = []
        for k in range(4):
            valid, cob, ttype, entries = self._pdo(base + k)
            out.append({"valid": valid, "cob_id": cob, "type": ttype, "map": [i for i, _, _ in entries]})
        return out

    # -- the state machine -----------------------------------------------------------------------------------
    @property
    def torque(self) -> bool:
        return self.state in (OE, QSA) or (self.state == FRA and self.values[(0x605E, 0)] != 0)

    def statusword(self) -> int:
        word = statusword_for(self.state) | REMOTE
        goal = self._goal()
        if self.state == OE and goal is not None and abs(goal - self.position) < 20 and abs(self.velocity) < 200:
            word |= TARGET_REACHED
        if self.limited:
            word |= INTERNAL_LIMIT
        mode = self.values[(0x6060, 0)]
        if self.state == OE and ((mode == CSP) or (mode == PP and self.pp_ack)):
            word |= OP_MODE_BIT12  # CSP: following the command value; PP: set-point acknowledge
        return word

    def set_state(self, new: str, transition: int | None, cause: str) -> None:
        if new == self.state:
            return
        old, self.state = self.state, new
        if new == OE and old != QSA:
            self.pp_goal = None  # PP: no set-point until the next rising edge of bit 4
        self.bus.event(self.node, "state", **{"from": old, "to": new, "transition": transition, "cause": cause})
        if new == QSA and self.values[(0x605A, 0)] == 0:
            self.set_state(SOD, 12, "quick stop option 0x605A = 0: drive function disabled")

    def _controlword(self, cw: int, via: str) -> None:
        previous, self.cw = self.cw, cw
        if cw != previous or via == "sdo":
            self.bus.event(self.node, "controlword", value=cw, via=via)
        if fault_reset_edge(previous, cw):
            self._fault_reset()
            return
        new, transition = next_state(self.state, decode_command(cw), self.values[(0x605A, 0)])
        if transition is not None:
            self.set_state(new, transition, f"controlword 0x{cw:04X}")
        if self.state == OE and self.values[(0x6060, 0)] == PP:
            if cw & 0x10 and not previous & 0x10:  # new set-point
                self.pp_goal, self.pp_ack = float(self.values[(0x607A, 0)]), True
            elif not cw & 0x10:
                self.pp_ack = False

    def _fault_reset(self) -> None:
        if self.state != FAULT:
            return
        if self.fault_cause is not None:
            self.bus.event(self.node, "fault_reset_refused", code=self.fault_cause)
            return
        self.values[(0x603F, 0)] = 0
        self.values[(0x1001, 0)] = 0
        self.emcy(EMCY_RESET)
        self.bus.event(self.node, "fault_reset")
        self.set_state(SOD, 15, "fault reset (controlword bit 7 rising edge)")

    def fault(self, code: int, cause: str) -> None:
        """Transitions 13 (and 14): the fault reaction per 0x605E, then Fault."""
        self.values[(0x603F, 0)] = code
        self.values[(0x1001, 0)] |= error_register_bits(code)
        self.emcy(code)
        if self.state in (FAULT, FRA):
            return
        self.set_state(FRA, 13, cause)
        if self.values[(0x605E, 0)] == 0:
            self.set_state(FAULT, 14, "fault reaction 0x605E = 0: torque off")

    def abort_connection(self, cause: str) -> None:
        """The 0x6007 action on a lost connection (CiA 402: 1 fault signal, 2 disable voltage, 3 quick stop)."""
        option = self.values[(0x6007, 0)]
        self.bus.event(self.node, "abort_connection", option=option, cause=cause)
        if option == 1:
            self.fault(EMCY_HEARTBEAT if cause == "heartbeat" else 0x8100, f"abort connection (0x6007 = 1): {cause}")
        elif option in (2, 3):
            command = "disable_voltage" if option == 2 else "quick_stop"
            new, transition = next_state(self.state, command, self.values[(0x605A, 0)])
            if transition is not None:
                self.set_state(new, transition, f"abort connection (0x6007 = {option})")

    def emcy(self, code: int) -> None:
        if self.nmt in (PRE_OPERATIONAL, OPERATIONAL):
            self.bus.send(0x80 + self.node, struct.pack("<HB5s", code, self.values[(0x1001, 0)], b""))
        self.bus.event(self.node, "emcy", code=code)

    # -- NMT, heartbeat consumer, SYNC, PDOs -----------------------------------------------------------------
    def set_nmt(self, new: int, cause: str) -> None:
        if new == self.nmt:
            return
        was_watching = self.nmt in (PRE_OPERATIONAL, OPERATIONAL)
        old, self.nmt = self.nmt, new
        self.bus.event(self.node, "nmt", **{"from": NMT_NAMES[old], "to": NMT_NAMES[new], "cause": cause})
        if was_watching != (new in (PRE_OPERATIONAL, OPERATIONAL)):
            self._arm_consumer()  # CANopenNode: leaving or entering (pre-)operational resets the consumer

    def boot(self, cause: str) -> None:
        self.set_nmt(INITIALISING, cause)
        if self.state == NOT_READY:
            self.set_state(SOD, 1, "initialisation done")
        self.bus.send(0x700 + self.node, b"\x00")  # boot-up
        self.set_nmt(PRE_OPERATIONAL, "boot-up")

    def on_nmt(self, data: bytes) -> None:
        if len(data) != 2:
            self.bus.event(self.node, "nmt_malformed", length=len(data))
            return
        command, target = data
        if target not in (0, self.node):
            return
        if command == 0x01 and self.nmt in (PRE_OPERATIONAL, STOPPED):
            self.set_nmt(OPERATIONAL, "NMT start")
        elif command == 0x02:
            self.abort_connection("NMT stop")
            self.set_nmt(STOPPED, "NMT stop")
        elif command == 0x80 and self.nmt in (OPERATIONAL, STOPPED):
            self.set_nmt(PRE_OPERATIONAL, "NMT enter pre-operational")
        elif command in (0x81, 0x82):
            self.abort_connection("NMT reset")
            if command == 0x81:  # reset node: the application too
                self._restore(lambda index: True)
                self.set_state(SOD, None, "NMT reset node")
                self.cw, self.fault_cause = 0, None
            else:
                self._restore(lambda index: index < 0x2000)
            self.boot("NMT reset node" if command == 0x81 else "NMT reset communication")

    def _arm_consumer(self) -> None:
        entry = self.values.get((0x1016, 1), 0)
        self.consumer = "unknown" if (entry >> 16) & 0xFF and entry & 0xFFFF else "unconfigured"

    def on_heartbeat(self, producer: int, data: bytes, now: float) -> None:
        entry = self.values[(0x1016, 1)]
        if self.nmt not in (PRE_OPERATIONAL, OPERATIONAL) or producer != (entry >> 16) & 0xFF:
            return
        if len(data) != 1:
            self.bus.event(self.node, "heartbeat_malformed", producer=producer, length=len(data))
            return
        self.heartbeats += 1
        if self.consumer == "unconfigured":
            return
        if data[0] == 0:
            self.consumer = "unknown"  # boot-up: monitoring restarts at its next heartbeat
        else:
            self.consumer, self.last_heartbeat = "active", now

    def _check_consumer(self, now: float) -> None:
        entry = self.values[(0x1016, 1)]
        timeout = (entry & 0xFFFF) / 1000.0
        if self.consumer != "active" or now - self.last_heartbeat < timeout:
            return
        self.consumer = "timeout"
        self.bus.event(self.node, "heartbeat_expired", since_last=now - self.last_heartbeat,
                       consumer_ms=entry & 0xFFFF, producer=(entry >> 16) & 0xFF)
        self.values[(0x1001, 0)] |= error_register_bits(EMCY_HEARTBEAT)
        self.emcy(EMCY_HEARTBEAT)
        self.abort_connection("heartbeat")
        behaviour = self.values[(0x1029, 1)]
        if self.nmt == OPERATIONAL and behaviour == 0:
            self.set_nmt(PRE_OPERATIONAL, "communication error (0x1029:1 = 0)")
        elif behaviour == 2:
            self.set_nmt(STOPPED, "communication error (0x1029:1 = 2)")

    def on_sdo(self, data: bytes) -> None:
        if self.nmt not in (PRE_OPERATIONAL, OPERATIONAL):
            return
        if len(data) != 8:  # CiA 301: every SDO frame has 8 bytes
            self.bus.event(self.node, "sdo_malformed", length=len(data))
            return
        self.sdo.on_request(0x600 + self.node, bytearray(data), 0.0)

    def on_sync(self) -> None:
        if self.nmt != OPERATIONAL:
            return
        self.syncs += 1
        for k, data in sorted(self.pending_rpdo.items()):
            self._apply_rpdo(k, data)
        self.pending_rpdo.clear()
        for k in range(4):
            valid, cob, ttype, entries = self._pdo(0x1800 + k)
            if valid and 1 <= ttype <= 240:
                self.sync_count[k] += 1
                if self.sync_count[k] >= ttype:
                    self.sync_count[k] = 0
                    self._transmit(k, cob, entries)

    def on_rpdo(self, can_id: int, data: bytes) -> bool:
        for k in range(4):
            valid, cob, ttype, entries = self._pdo(0x1400 + k)
            if not valid or cob != can_id:
                continue
            if self.nmt != OPERATIONAL:
                return True
            size = sum(bits for _, _, bits in entries) // 8
            if len(data) != size:
                self.bus.event(self.node, "rpdo_length_error", pdo=k + 1, length=len(data), mapped=size)
                self.emcy(EMCY_PDO_LENGTH if len(data) < size else EMCY_PDO_TOO_LONG)
                return True
            self.rpdos += 1
            if ttype <= 240:
                self.pending_rpdo[k] = data  # synchronous: acts at the next SYNC
            else:
                self._apply_rpdo(k, data)
            return True
        return False

    def _apply_rpdo(self, k: int, data: bytes) -> None:
        offset = 0
        for index, sub, bits in self._pdo(0x1400 + k)[3]:
            var = self._variable(index, sub)
            raw = data[offset:offset + bits // 8]
            offset += bits // 8
            with contextlib.suppress(SdoAbortedError):  # a refused value (mode not supported) is not applied
                self.write(index, sub, var.decode_raw(raw), via="rpdo")

    def _tpdo_data(self, entries: list[tuple[int, int, int]]) -> bytes:
        return b"".join(self._variable(i, s).encode_raw(self.value(i, s)) for i, s, _ in entries)

    def _transmit(self, k: int, cob: int, entries: list[tuple[int, int, int]], now: float | None = None) -> None:
        data = self._tpdo_data(entries)
        self.bus.send(cob, data)
        self.tpdo_last[k] = (data, time.monotonic() if now is None else now)

    def _event_tpdos(self, now: float) -> None:
        for k in range(4):
            valid, cob, ttype, entries = self._pdo(0x1800 + k)
            if not valid or ttype < 254 or not entries:
                continue
            last, at = self.tpdo_last.get(k, (b"", -math.inf))
            inhibit = self.values[(0x1800 + k, 3)] / 10000.0
            timer = self.values[(0x1800 + k, 5)] / 1000.0
            data = self._tpdo_data(entries)
            if (data != last and now - at >= inhibit) or (timer and now - at >= timer):
                self._transmit(k, cob, entries, now)

    # -- the plant ------------------------------------------------------------------------------------------
    def _goal(self) -> float | None:
        if self.values[(0x6060, 0)] == PP:
            return self.pp_goal
        if self.values[(0x6060, 0)] == CSP:
            return float(self.values[(0x607A, 0)])
        return None

    def step(self, now: float, dt: float) -> None:
        self._check_consumer(now)
        if self.nmt == OPERATIONAL:
            self._event_tpdos(now)
        self._producer_heartbeat(now)
        if not self.torque:
            self.accel = 0.0
            self.velocity *= math.exp(-dt / 0.05)  # power stage off: the joint coasts to rest
            self.position += 0.0 if self.blocked else self.velocity * dt
            return
        if self.blocked:  # held where it is; under power the drive pushes with its full current toward the goal
            goal = self._goal() if self.state == OE else None
            self.velocity = 0.0
            self.accel = 0.0 if goal is None else math.copysign(self.cfg.max_accel, goal - self.position)
            if self.state != OE:
                self._ramp_down(dt)  # at rest already: a quick stop or fault reaction completes
            return
        if self.state == OE:
            self._follow(dt)
        else:
            self._ramp_down(dt)

    def _follow(self, dt: float) -> None:
        goal = self._goal()
        lo, hi = self.values[(0x607D, 1)], self.values[(0x607D, 2)]
        self.limited = goal is not None and not lo <= goal <= hi
        if goal is None:
            desired = 0.0
        else:
            vmax = self.values[(0x6081, 0)] if self.values[(0x6060, 0)] == PP else self.cfg.max_velocity
            desired = max(-vmax, min(vmax, 50.0 * (min(hi, max(lo, goal)) - self.position)))
        self.accel = max(-self.cfg.max_accel, min(self.cfg.max_accel, (desired - self.velocity) / dt))
        self.velocity += self.accel * dt
        self.position += self.velocity * dt

    def _ramp_down(self, dt: float) -> None:
        option = self.values[(0x605A, 0)] if self.state == QSA else 2
        decel = {1: self.values[(0x6083, 0)], 5: self.values[(0x6083, 0)], 3: self.cfg.max_accel,
                 4: self.cfg.max_accel, 7: self.cfg.max_accel, 8: self.cfg.max_accel}.get(
            option, self.values[(0x6085, 0)])
        step = min(abs(self.velocity), decel * dt)
        self.accel = -math.copysign(step / dt, self.velocity) if self.velocity else 0.0
        self.velocity += self.accel * dt
        self.position += self.velocity * dt
        if self.velocity != 0.0:
            return
        if self.state == FRA:
            self.set_state(FAULT, 14, "fault reaction ramp done")
        elif 1 <= option <= 4:
            self.set_state(SOD, 12, f"quick stop completed (0x605A = {option})")

    def _producer_heartbeat(self, now: float) -> None:
        period = self.values[(0x1017, 0)] / 1000.0
        if period and self.nmt != INITIALISING and now >= self.next_producer_beat:
            self.bus.send(0x700 + self.node, bytes([self.nmt]))
            self.next_producer_beat = now + period


# -- the bus -------------------------------------------------------------------------------------------------------
class _StandardFrames(can.Listener):
    """CANopen (CiA 301) uses 11-bit classic frames: extended-id, FD, remote and error frames are dropped."""

    def __init__(self, dispatch: Any) -> None:
        self.dispatch = dispatch

    def on_message_received(self, msg: can.Message) -> None:
        if msg.is_extended_id or msg.is_fd or msg.is_remote_frame or msg.is_error_frame:
            return
        self.dispatch(msg.arbitration_id, bytes(msg.data))

    def stop(self) -> None:
        pass


class DriveBus:
    """Drives on one python-can bus. open() connects and boots them, start() runs the 1 ms tick; every public
    method is thread-safe. `interface` is any python-can interface: udp_multicast (its own process; `channel` is
    the multicast group, `udp_port` its port), virtual (the same process only), or socketcan on a vcan."""

    def __init__(self, drives: Iterable[DriveConfig], *, interface: str = "udp_multicast",
                 channel: str = DEFAULT_GROUP, udp_port: int | None = None, tick_s: float = 0.001) -> None:
        self.interface, self.channel, self.udp_port, self.tick_s = interface, channel, udp_port, tick_s
        self.events: list[common.Event] = []
        self._cond = threading.Condition(threading.RLock())
        self.drives = {cfg.node: EmulatedDrive(cfg, self) for cfg in drives}
        self.network: canopen.Network | None = None
        self._thread: threading.Thread | None = None
        self._running = False
        self.frames_seen = 0
        self.cut = False  # the bus is cut between host and drives (cut_bus): frames are lost both ways
        self.frames_cut = 0

    @property
    def port(self) -> str:
        return f"{self.interface}/{self.channel}"

    def open(self) -> str:
        kw: dict[str, Any] = {"interface": self.interface, "channel": self.channel}
        if self.udp_port is not None:
            kw["port"] = self.udp_port
        network = canopen.Network(can.Bus(**kw))
        network.NOTIFIER_CYCLE = 0.05  # close() waits at most this long for the receive thread
        network.listeners = [_StandardFrames(self.dispatch)]
        for drive in self.drives.values():
            drive.sdo.network = network
        self.network = network.connect()
        with self._cond:  # boot before the port is handed out: a host may talk at once
            for drive in self.drives.values():
                drive.boot("power on")
        return self.port

    def start(self) -> DriveBus:
        if self.network is None:
            self.open()
        self._running = True
        self._thread = threading.Thread(target=self._run, name="cia402-emulator", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._running = False
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None
        if self.network is not None:
            with contextlib.suppress(Exception):
                self.network.disconnect()
            self.network = None

    def __enter__(self) -> DriveBus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        last = time.monotonic()
        while self._running:
            time.sleep(self.tick_s)
            now = time.monotonic()
            dt = min(max(now - last, 1e-4), 0.05)
            last = now
            with self._cond:
                for drive in self.drives.values():
                    drive.step(now, dt)
                self._cond.notify_all()

    # -- frames --------------------------------------------------------------------------------------------
    def dispatch(self, can_id: int, data: bytes) -> None:
        now = time.monotonic()
        with self._cond:
            if self.cut:  # reached this end of a cut bus: no drive hears it (no heartbeat feeds a consumer)
                self.frames_cut += 1
                return
            self.frames_seen += 1
            for drive in self.drives.values():
                if can_id == 0:
                    drive.on_nmt(data)
                elif can_id == 0x80:
                    drive.on_sync()
                elif 0x701 <= can_id <= 0x77F:
                    drive.on_heartbeat(can_id - 0x700, data, now)
                elif can_id == 0x600 + drive.node:
                    drive.on_sdo(data)
                else:
                    drive.on_rpdo(can_id, data)

    def send(self, can_id: int, data: bytes) -> None:
        if self.cut:
            return
        if self.network is not None:
            with contextlib.suppress(can.CanError, OSError, RuntimeError):  # a full socket buffer: a lost frame
                self.network.send_message(can_id, data)

    def event(self, node: int, kind: str, **detail: object) -> None:
        with self._cond:
            self.events.append(common.Event(time.monotonic(), node, kind, dict(detail)))
            self._cond.notify_all()

    # -- inspection and fault injection (thread-safe) -------------------------------------------------------
    def events_of(self, kind: str, node: int | None = None) -> list[common.Event]:
        with self._cond:
            return [e for e in self.events if e.kind == kind and (node is None or e.servo_id == node)]

    def wait_for(self, predicate: Any, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def drive(self, node: int) -> EmulatedDrive:
        return self.drives[node]

    @property
    def lock(self) -> threading.Condition:
        return self._cond

    def inject_fault(self, node: int, code: int = 0x4310, persistent: bool = False) -> None:
        with self._cond:
            drive = self.drives[node]
            drive.fault_cause = code if persistent else None
            self.event(node, "fault_injected", code=code, persistent=persistent)
            drive.fault(code, f"injected fault 0x{code:04X}")

    def clear_cause(self, node: int) -> None:
        with self._cond:
            self.drives[node].fault_cause = None

    def block_joint(self, node: int, blocked: bool = True) -> None:
        """The joint cannot move (a collision): it stays where it is; under power the drive pushes at full
        current."""
        with self._cond:
            drive = self.drives[node]
            drive.blocked = blocked
            if blocked:
                drive.velocity = 0.0
            self.event(node, "block_joint", blocked=blocked)

    def cut_bus(self, cut: bool = True) -> None:
        """The bus between host and drives is cut (a severed cable, the host's CAN interface down): no drive hears
        a frame and nothing a drive sends arrives, while every drive's own timers run on."""
        with self._cond:
            self.cut = cut
            self.event(0, "bus_cut", cut=cut)

    def counters(self) -> dict[str, int]:
        with self._cond:
            return {"frames": self.frames_seen, "cut": self.frames_cut}

    def set_object(self, node: int, index: int, sub: int, value: int, read_only: bool = False) -> None:
        """Set an object from outside the bus (the drive as commissioned); read_only: SDO writes are refused."""
        with self._cond:
            drive = self.drives[node]
            drive.values[(index, sub)] = value
            if read_only:
                drive.read_only.add((index, sub))

    def set_position(self, node: int, position: float) -> None:
        with self._cond:
            drive = self.drives[node]
            drive.position, drive.velocity = float(position), 0.0


def snapshot(bus: DriveBus, node: int) -> dict[str, Any]:
    """A drive's state as plain data (picklable across the process pipe)."""
    with bus.lock:
        d = bus.drives[node]
        return {
            "state": d.state, "statusword": d.statusword(), "nmt": NMT_NAMES[d.nmt], "torque": d.torque,
            "position": round(d.position), "velocity": round(d.velocity), "target": d.values[(0x607A, 0)],
            "controlword": d.cw, "consumer": d.consumer, "heartbeats": d.heartbeats, "rpdos": d.rpdos,
            "syncs": d.syncs, "rpdo": d.pdo_summary(0x1400), "tpdo": d.pdo_summary(0x1800),
            "objects": {
                "1016:1": d.values[(0x1016, 1)], "6007": d.values[(0x6007, 0)], "605A": d.values[(0x605A, 0)],
                "605E": d.values[(0x605E, 0)], "6060": d.values[(0x6060, 0)], "6061": d.value(0x6061),
                "603F": d.values[(0x603F, 0)], "1001": d.values[(0x1001, 0)], "1029:1": d.values[(0x1029, 1)],
            },
        }


def unique_channel() -> tuple[str, int]:
    """A multicast group and UDP port no other test is likely to use (Linux delivers a group's datagrams to
    every socket bound to the port, whichever group it joined: the port keeps tests apart)."""
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    return f"239.74.{rng.randrange(1, 255)}.{rng.randrange(1, 255)}", rng.randrange(20000, 60000)


class EmulatorProcess(common.BusProcess):
    """A DriveBus in its own process on python-can's udp_multicast interface (python-can's virtual bus is per
    process), driven over a pipe. Inspection: snapshot(node), events_of(kind, node); injection: inject_fault,
    clear_cause, set_object, set_position. `url(nodes, **params)` is the cia402:// URL a host opens."""

    bus_type = DriveBus  # type: ignore[assignment]
    snapshot_of = staticmethod(snapshot)
    process_name = "cia402-emulator"
    vendor = "CiA 402"

    def __init__(self, drives: Iterable[DriveConfig], *, group: str | None = None, udp_port: int | None = None,
                 **kw: object) -> None:
        drives = list(drives)
        default_group, default_port = unique_channel()
        self.group, self.udp_port = group or default_group, udp_port or default_port
        self.nodes = [d.node for d in drives]
        super().__init__(drives, interface="udp_multicast", channel=self.group, udp_port=self.udp_port, **kw)

    def url(self, nodes: str | None = None, **params: object) -> str:
        query = {"node": nodes or ",".join(map(str, self.nodes)), "udp_port": self.udp_port, **params}
        return f"cia402://{self.port}?" + "&".join(f"{k}={v}" for k, v in query.items())

    def snapshot(self, node: int) -> dict:  # type: ignore[override]
        return self._call("snapshot", node)  # type: ignore[return-value]

    def inject_fault(self, node: int, code: int = 0x4310, persistent: bool = False) -> None:
        self._call("inject_fault", node, code, persistent)

    def clear_cause(self, node: int) -> None:
        self._call("clear_cause", node)

    def cut_bus(self, cut: bool = True) -> None:
        self._call("cut_bus", cut)

    def counters(self) -> dict[str, int]:
        return self._call("counters")  # type: ignore[return-value]

    def set_object(self, node: int, index: int, sub: int, value: int, read_only: bool = False) -> None:
        self._call("set_object", node, index, sub, value, read_only)

    def set_position(self, node: int, position: float) -> None:
        self._call("set_position", node, position)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Emulated CiA 402 drives on a python-can bus")
    parser.add_argument("--nodes", default="1-6")
    parser.add_argument("--interface", default="udp_multicast", help="python-can interface (socketcan for a vcan)")
    parser.add_argument("--channel", default=None, help="multicast group (udp_multicast) or interface name")
    parser.add_argument("--udp-port", type=int, default=None)
    parser.add_argument("--limit", type=int, default=None, help="software position limits +-COUNTS (0x607D)")
    parser.add_argument("--no-csp", action="store_true", help="profile position only (0x6502 without CSP)")
    parser.add_argument("--print-url", action="store_true", help="print the cia402:// URL on stdout, then serve")
    args = parser.parse_args(argv)
    group, port = unique_channel()
    channel = args.channel or (group if args.interface == "udp_multicast" else "vcan0")
    udp_port = (args.udp_port or port) if args.interface == "udp_multicast" else None
    limits = (-args.limit, args.limit) if args.limit else DriveConfig.soft_limits
    modes = SUPPORTS_PP if args.no_csp else SUPPORTS_PP | SUPPORTS_CSP
    nodes = common.parse_ids(args.nodes)
    bus = DriveBus([DriveConfig(node=n, soft_limits=limits, supported_modes=modes) for n in nodes],
                   interface=args.interface, channel=channel, udp_port=udp_port)
    extra = f"&udp_port={udp_port}" if udp_port else ""
    return common.serve_until_stopped(bus, args.print_url, lambda b: f"cia402://{b.port}?node={args.nodes}{extra}")


if __name__ == "__main__":
    sys.exit(main())
