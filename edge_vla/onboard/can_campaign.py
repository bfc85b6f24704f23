"""The fault campaign for the CAN motor backends (issue 25): the real `edge-vla run` against the Damiao and CiA 402
emulators.

`CanCampaign`: the same real `edge-vla run --expert`, as the service user, against the
Damiao or CiA 402 emulator (its own process; two devices, one per joint of the sim arm, as `edge-vla run --emulate`
starts them) on python-can's udp_multicast bus, which has no bit timing. `CanProbe` reads each emulator as the
ground truth: power and motion per device in radians, when each went torque off and whose act did it (a host
disable, damping or quick stop frame; the device's own watchdog; a device fault), and its watchdog's expiries. The
device watchdog (Damiao TIMEOUT, register 9; CiA 402 heartbeat consumer, 0x1016) is armed at two URL periods
(period_ms 50: 100 ms, for the same loaded 2-core box). The faults: host kill -9 and SIGTERM as above; the CAN bus
down (`bus_down`: what it models and what not is in its docstring); stalled inference; a blocked joint (the
emulators model no device-side protection for it); a device fault (a Damiao error status in its replies, a CiA 402
statusword fault with its EMCY); frames from a foreign node id (a fault report the host must ignore, and frames
that would feed the device watchdog after a kill, which the devices must ignore), each with its control: the same
frames from the configured id are taken. Columns as above, in device terms: detection -> the first stop from the
host a device acted on; for a device watchdog, its lateness (last frame that fed it -> expiry, minus the watchdog
period) and each device's own expiry -> torque off (a Damiao motor disables at once, the table's chosen T2 row; a
CiA 402 drive quick-stops on its ramp, then Switch On Disabled). "Moved without an operator arm": torque back on
(an enable accepted, Operation Enabled entered) or a powered joint moving; a joint without torque coasts (a
disabled motor is not held), which the row notes.

The servo-bus campaign, the host plumbing and the row format are in `edge_vla.onboard.motor_campaign`.
"""

from __future__ import annotations

import logging
import math
import signal
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import can

from edge_vla.onboard.campaign import TICK_S
from edge_vla.onboard.motor_campaign import (
    CAN_SCHEMES,
    IDS,
    STOP_TIMEOUT_S,
    TX_MS,
    MotorFaultRow,
    _Control,
    _HostedCampaign,
    prioritize_threads,
    wait_until,
)
from firmware_bridge.motors.damiao import MASTER_OFFSET, RID_TIMEOUT, TIMEOUT_UNIT_S, MitRanges, encode_mit

log = logging.getLogger(__name__)

MOVING_RAD_S = 0.06  # a joint turning at least this fast is in motion (the servo rows' 40 ticks/s)
FAST_RAD_S = 0.3  # the blocked-joint row waits for this much speed (the servo rows' 200 ticks/s)
MOVED_RAD = 0.008  # a powered joint moving more than this (5 servo ticks) in the watch window has moved
FEED_PERIOD_S = 0.01  # a third node's frames, every 10 ms: five per device watchdog period at the 50 ms default
FED_FOR = 5  # the right-id frames must keep the devices' watchdogs fed for this many watchdog periods
FOREIGN_FRAMES = 3  # a foreign (or spoofed) frame is sent this many times, one control period apart


class _Feeder:
    """A third node on the bus sending `frames` every FEED_PERIOD_S from its own thread, until closed; `last` is
    when its last frame went out."""

    def __init__(self, bus: can.BusABC, frames: list[tuple[int, bytes]]) -> None:
        self.bus, self.frames = bus, frames
        self.last = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="foreign-node", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for can_id, data in self.frames:
                send_frame(self.bus, can_id, data)
            self.last = time.monotonic()
            self._stop.wait(FEED_PERIOD_S)

    def __enter__(self) -> _Feeder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)


def send_frame(bus: can.BusABC, can_id: int, data: bytes) -> None:
    bus.send(can.Message(arbitration_id=can_id, data=data, is_extended_id=False))


class CanProbe:
    """What the CAN rows read from one backend's emulator (its own process; its events carry time.monotonic(), the
    clock of every process here): each device's power and motion in radians, when it went torque off and whose act
    did it, its watchdog's expiries, and the frames a third node sends. Subclasses: DamiaoProbe, Cia402Probe."""

    scheme: ClassVar[str]
    devices: ClassVar[str]  # what the row calls them
    watchdog: ClassVar[str]  # the device watchdog's name
    fault: ClassVar[str]  # the injected device fault
    foreign_fault: ClassVar[str]  # the fault frames a foreign node sends
    foreign_feed: ClassVar[str]  # the frames a foreign node sends that would feed the watchdog if taken
    right_feed: ClassVar[str]  # the same from the configured ids
    foreign_answers: ClassVar[str]  # state frames a foreign node sends that would feed the host if taken
    right_answers: ClassVar[str]  # the same from the configured ids
    read_back: ClassVar[str]  # the backend's log line once every device's stop was read back
    FOREIGN: ClassVar[int]  # an id no configured device has

    def __init__(self, emu: Any, period_ms: int) -> None:
        self.emu, self.period_ms = emu, period_ms
        self.watchdog_s = 2 * period_ms / 1e3  # both backends arm their device watchdog at two periods

    def url(self) -> str:
        raise NotImplementedError

    def snap(self, i: int) -> dict[str, Any]:
        """{"on": torque applied, "position": rad, "velocity": rad/s, "raw": the emulator's snapshot}."""
        raise NotImplementedError

    def snaps(self) -> dict[int, dict]:
        return {i: self.snap(i) for i in IDS}

    def events(self, kind: str, since: float) -> list[Any]:
        return [e for e in self.emu.events_of(kind) if e.t >= since]

    def off_times(self, since: float) -> dict[int, tuple[float, str]]:
        """Per device: the first time after `since` it went torque off, and whose act did it."""
        raise NotImplementedError

    def host_stops(self, since: float) -> list[float]:
        """When a device first acted on a stop the host sent after `since` (a damping or disable frame, a quick
        stop or disable voltage controlword)."""
        raise NotImplementedError

    def powered(self, since: float) -> list[float]:
        """When a device got torque on after `since` (an enable it accepted, Operation Enabled entered)."""
        raise NotImplementedError

    def expiries(self, since: float) -> dict[int, tuple[float, float]]:
        """Per device: its first watchdog expiry after `since`, and how long after the last frame that fed it."""
        raise NotImplementedError

    def watchdog_armed(self) -> tuple[bool, str]:
        """Whether every device's watchdog is armed as the backend writes it and running, in words."""
        raise NotImplementedError

    def inject_fault(self, i: int) -> None:
        raise NotImplementedError

    def fault_frame(self, i: int) -> tuple[int, bytes]:
        """A frame reporting a device fault as if from device `i`."""
        raise NotImplementedError

    def foreign_fault_frames(self) -> list[tuple[int, bytes]]:
        """Frames reporting a device fault from a node id no configured device has."""
        raise NotImplementedError

    def feed_frames(self, ids: tuple[int, ...]) -> list[tuple[int, bytes]]:
        """Frames that feed the watchdog of the devices `ids` name (a foreign id feeds nothing)."""
        raise NotImplementedError

    def answer_frames(self, ids: tuple[int, ...], positions: dict[int, float]) -> list[tuple[int, bytes]]:
        """Healthy-looking state frames as if from the devices `ids` name (at `positions`, rad; 0 for others):
        what would feed the host's link watchdog if it took them."""
        raise NotImplementedError

    def frames_heard(self) -> int:
        """Frames the emulator's end of the bus received: proof a third node's frame was on the bus."""
        raise NotImplementedError

    def describe_after(self, snaps: dict[int, dict]) -> str:
        raise NotImplementedError

    def third_node(self) -> can.BusABC:
        """Another node on the same bus (python-can's udp_multicast group and port)."""
        raise NotImplementedError

    expiry_to_off_ms: ClassVar[float]  # watchdog expiry -> torque off, the device's own reaction
    controlled_off_ms: ClassVar[float]  # a category-1 stop from its first frame to torque off, at most


class DamiaoProbe(CanProbe):
    scheme = "damiao"
    devices = "motors"
    watchdog = "TIMEOUT (register 9)"
    fault = "MOS over-temperature, status 0xB in its replies"
    foreign_fault = ("state frames with status 0xB from ESC_ID 9 (no such motor), on its reply id 0x19 and on "
                     "motor 1's reply id 0x11")
    foreign_feed = "MIT damping frames to ESC_ID 9 (no such motor)"
    right_feed = "MIT damping frames to the motors' own ESC_IDs"
    foreign_answers = "state frames with status 1 (enabled) from ESC_ID 9 on reply ids 0x19 and 0x11"
    right_answers = "state frames with status 1 from each motor's ESC_ID on its reply id"
    read_back = "every motor disabled (read back)"
    FOREIGN = 9
    FAULT_STATUS = 0xB
    expiry_to_off_ms = TICK_S * 1e3  # it disables itself at expiry (T2's chosen row)
    controlled_off_ms = STOP_TIMEOUT_S * 1e3 + TX_MS  # damping until at rest, at most stop_timeout_s, then disable

    def url(self) -> str:
        return f"damiao://{self.emu.port}?ids={IDS[0]}-{IDS[-1]}&period_ms={self.period_ms}"

    def snap(self, i: int) -> dict[str, Any]:
        raw = self.emu.snapshot(i)
        return {"on": bool(raw["enabled"] or raw["damping"]), "position": float(raw["position"]),
                "velocity": float(raw["velocity"]), "raw": raw}

    def off_times(self, since: float) -> dict[int, tuple[float, str]]:
        out: dict[int, tuple[float, str]] = {}
        for kind, how in (("disable", "host disable"), ("timeout_expired", "TIMEOUT"), ("fault", "fault")):
            for e in self.events(kind, since):
                if e.servo_id in IDS and (e.servo_id not in out or e.t < out[e.servo_id][0]):
                    out[e.servo_id] = (e.t, how)
        return out

    def host_stops(self, since: float) -> list[float]:
        damping = [f["t"] for i in IDS for f in self.emu.snapshot(i)["recent"]
                   if f["t"] >= since and f["applied"] and f["kp"] == 0.0]
        return sorted(damping + [e.t for e in self.events("disable", since)])

    def powered(self, since: float) -> list[float]:
        return [e.t for e in self.events("enable", since)]

    def expiries(self, since: float) -> dict[int, tuple[float, float]]:
        out: dict[int, tuple[float, float]] = {}
        for e in self.events("timeout_expired", since):
            out.setdefault(e.servo_id, (e.t, e.detail["since_last_command"]))
        return out

    def watchdog_armed(self) -> tuple[bool, str]:
        want = round(self.watchdog_s / TIMEOUT_UNIT_S)
        got = [int(self.emu.register(i, RID_TIMEOUT)) for i in IDS]
        running = all(self.emu.snapshot(i)["status"] == 1 for i in IDS)
        ok = got == [want] * len(IDS) and running
        return ok, (f"TIMEOUT armed ({want} x 50 us = {self.watchdog_s * 1e3:.0f} ms) in every motor, enabled, not "
                    "expired" if ok else f"TIMEOUT NOT as armed: registers {got}, want {want}; enabled {running}")

    def inject_fault(self, i: int) -> None:
        self.emu.inject_fault(i, self.FAULT_STATUS)

    def fault_frame(self, i: int) -> tuple[int, bytes]:
        from firmware_bridge.motors.damiao_emulator import encode_reply_word

        return i + MASTER_OFFSET, encode_reply_word(self.FAULT_STATUS, i & 0xF, 0x8000, 0x800, 0x800, 125, 60)

    def foreign_fault_frames(self) -> list[tuple[int, bytes]]:
        foreign = self.fault_frame(self.FOREIGN)  # F6: the low 4 bits of byte 0 name the ESC_ID that answers
        return [foreign, (IDS[0] + MASTER_OFFSET, foreign[1])]  # a shared reply id: told apart by that nibble

    def feed_frames(self, ids: tuple[int, ...]) -> list[tuple[int, bytes]]:
        damping = encode_mit(0.0, 0.0, 0.0, 1.0, 0.0, MitRanges(12.5, 30.0, 10.0))  # kp 0, kd 1: no position pull
        return [(i, damping) for i in ids]

    def answer_frames(self, ids: tuple[int, ...], positions: dict[int, float]) -> list[tuple[int, bytes]]:
        from firmware_bridge.motors.damiao_emulator import encode_reply_word

        def state(i: int, reply_id: int) -> tuple[int, bytes]:
            p = round((max(-12.5, min(12.5, positions.get(i, 0.0))) + 12.5) / 25.0 * 0xFFFF)
            return reply_id, encode_reply_word(1, i & 0xF, p, 0x7FF, 0x7FF, 40, 40)  # enabled, at rest, no torque

        if ids == IDS:
            return [state(i, i + MASTER_OFFSET) for i in ids]
        return [state(i, i + MASTER_OFFSET) for i in ids] + [state(i, IDS[0] + MASTER_OFFSET) for i in ids]

    def frames_heard(self) -> int:
        counts = self.emu.counters()
        return int(counts["frames"] + counts["cut"])

    def describe_after(self, snaps: dict[int, dict]) -> str:
        on = [i for i in IDS if snaps[i]["on"]]
        if on:
            return f"ENABLED: motor ids {on}"
        status = "/".join(sorted({f"0x{snaps[i]['raw']['status']:X}" for i in IDS}))
        return f"disabled in every motor (status {status})"

    def third_node(self) -> can.BusABC:
        group, _, port = self.emu.port.partition("/")[2].rpartition(":")
        return can.Bus(interface="udp_multicast", channel=group, port=int(port))


class Cia402Probe(CanProbe):
    scheme = "cia402"
    devices = "drives"
    watchdog = "heartbeat consumer (0x1016)"
    fault = "statusword Fault and EMCY 0x4310 (excess temperature)"
    foreign_fault = "EMCY 0x4310 and a TPDO1 with statusword Fault from node 5 (no such drive)"
    foreign_feed = "heartbeats from node 126 (the drives watch the host's node 127)"
    right_feed = "heartbeats from node 127 (the host's id)"
    foreign_answers = "TPDO1 (statusword Operation Enabled) and TPDO2 from node 5"
    right_answers = "TPDO1 (statusword Operation Enabled) and TPDO2 from each drive's node id"
    OE_STATUSWORD = 0x1237  # Operation Enabled, voltage enabled, remote, following the target (bit 12)
    read_back = "drives disabled, read back"
    FOREIGN = 5
    HOST_NODE = 127
    FAULT_CODE = 0x4310
    OFF_STATES = frozenset({"SWITCH ON DISABLED", "FAULT", "READY TO SWITCH ON", "SWITCHED ON",
                            "NOT READY TO SWITCH ON"})
    # Quick stop on the drive's ramp (0x6085 = 655360 counts/s^2 from at most 65536 counts/s: 100 ms), then off.
    expiry_to_off_ms = 100.0 + 2 * TICK_S * 1e3
    controlled_off_ms = 100.0 + TX_MS

    def __init__(self, emu: Any, period_ms: int) -> None:
        super().__init__(emu, period_ms)
        self.rad_per_count = 2 * math.pi / 65536  # the emulated drives' feed constant 0x6092 (--emulate's default)

    def url(self) -> str:
        return (f"cia402://{self.emu.port}?node={IDS[0]}-{IDS[-1]}&udp_port={self.emu.udp_port}"
                f"&period_ms={self.period_ms}")

    def snap(self, i: int) -> dict[str, Any]:
        raw = self.emu.snapshot(i)
        return {"on": bool(raw["torque"]), "position": raw["position"] * self.rad_per_count,
                "velocity": raw["velocity"] * self.rad_per_count, "raw": raw}

    def _cause(self, node: int, e: Any, states: list[Any]) -> str:
        cause = str(e.detail["cause"])
        if cause.startswith("controlword"):
            return "host"
        if cause.startswith("quick stop completed"):  # whose quick stop: the last entry into Quick Stop Active
            entry = [s for s in states if s.servo_id == node and s.t <= e.t and s.detail["to"] == "QUICK STOP ACTIVE"]
            return "host quick stop" if entry and entry[-1].detail["cause"].startswith("controlword") else \
                "heartbeat consumer quick stop"
        if cause.startswith("fault reaction"):
            return "fault"
        if cause.startswith("abort connection"):
            return "heartbeat consumer"
        return cause

    def off_times(self, since: float) -> dict[int, tuple[float, str]]:
        states = self.emu.events_of("state")
        out: dict[int, tuple[float, str]] = {}
        for e in states:
            if e.t >= since and e.servo_id in IDS and e.servo_id not in out and e.detail["to"] in self.OFF_STATES:
                out[e.servo_id] = (e.t, self._cause(e.servo_id, e, states))
        return out

    def host_stops(self, since: float) -> list[float]:
        return [e.t for e in self.events("state", since)
                if e.detail["from"] == "OPERATION ENABLED" and str(e.detail["cause"]).startswith("controlword")]

    def powered(self, since: float) -> list[float]:
        return [e.t for e in self.events("state", since) if e.detail["to"] == "OPERATION ENABLED"]

    def expiries(self, since: float) -> dict[int, tuple[float, float]]:
        out: dict[int, tuple[float, float]] = {}
        for e in self.events("heartbeat_expired", since):
            out.setdefault(e.servo_id, (e.t, e.detail["since_last"]))
        return out

    def watchdog_armed(self) -> tuple[bool, str]:
        want = (self.HOST_NODE << 16) | round(self.watchdog_s * 1e3)
        raws = [self.emu.snapshot(i) for i in IDS]
        ok = all(r["objects"]["1016:1"] == want and r["consumer"] == "active" and r["objects"]["6007"] == 3
                 and r["objects"]["605A"] == 2 for r in raws)
        return ok, (f"heartbeat consumer armed (0x1016:1 = 0x{want:06X}: node {self.HOST_NODE}, "
                    f"{self.watchdog_s * 1e3:.0f} ms) and active in every drive, 0x6007 = 3, 0x605A = 2, not expired"
                    if ok else "heartbeat consumer NOT as armed: " + "; ".join(
                        f"0x1016:1 = 0x{r['objects']['1016:1']:06X} {r['consumer']}, 0x6007 = {r['objects']['6007']}, "
                        f"0x605A = {r['objects']['605A']}" for r in raws))

    def inject_fault(self, i: int) -> None:
        self.emu.inject_fault(i, self.FAULT_CODE)

    def fault_frame(self, i: int) -> tuple[int, bytes]:
        return 0x80 + i, struct.pack("<HB5s", self.FAULT_CODE, 0x09, b"")  # EMCY: code, error register (temp.)

    def foreign_fault_frames(self) -> list[tuple[int, bytes]]:
        tpdo1 = struct.pack("<Hi", 0x0008, 0)  # statusword Fault, position actual 0: the host's TPDO1 mapping
        return [self.fault_frame(self.FOREIGN), (0x180 + self.FOREIGN, tpdo1)]

    def feed_frames(self, ids: tuple[int, ...]) -> list[tuple[int, bytes]]:
        node = self.HOST_NODE if ids == IDS else self.HOST_NODE - 1  # the drives consume node 127's heartbeat
        return [(0x700 + node, b"\x05")]

    def answer_frames(self, ids: tuple[int, ...], positions: dict[int, float]) -> list[tuple[int, bytes]]:
        frames = []
        for node in ids:
            counts = round(positions.get(node, 0.0) / self.rad_per_count)
            frames += [(0x180 + node, struct.pack("<Hi", self.OE_STATUSWORD, counts)),
                       (0x280 + node, struct.pack("<ih", 0, 0))]
        return frames

    def frames_heard(self) -> int:
        counts = self.emu.counters()
        return int(counts["frames"] + counts["cut"])

    def describe_after(self, snaps: dict[int, dict]) -> str:
        on = [i for i in IDS if snaps[i]["on"]]
        if on:
            return f"torque ON in nodes {on}"
        states = "/".join(sorted({snaps[i]["raw"]["state"] for i in IDS}))
        nmt = "/".join(sorted({snaps[i]["raw"]["nmt"] for i in IDS}))
        return f"torque off in every drive ({states}, NMT {nmt})"

    def third_node(self) -> can.BusABC:
        return can.Bus(interface="udp_multicast", channel=self.emu.group, port=self.emu.udp_port)


PROBES: dict[str, type[CanProbe]] = {"damiao": DamiaoProbe, "cia402": Cia402Probe}


@dataclass
class CanCampaign(_HostedCampaign):
    """The rows for one CAN backend (damiao, cia402) against its emulator (two devices, its own process) through
    the real `edge-vla run`: `run_all()` (the benchmark) or `run_ci()` (kill -9, bus down, a device fault)."""

    def __post_init__(self) -> None:
        if self.scheme not in CAN_SCHEMES:
            raise ValueError(f"unknown CAN motor backend {self.scheme!r}; use one of {', '.join(CAN_SCHEMES)}")
        super().__post_init__()
        self.probe: CanProbe | None = None

    def __enter__(self) -> CanCampaign:
        from edge_vla.onboard.cli import _motor_emulator, motor_id_param
        from edge_vla.onboard.drill import sim_action_space

        url = f"{self.scheme}://emulated?{motor_id_param(self.scheme + '://')}={IDS[0]}-{IDS[-1]}"
        self.emu = _motor_emulator(url, sim_action_space())  # one device per joint, limits inside the bundle's
        self.probe = PROBES[self.scheme](self.emu, self.period_ms)
        if self.realtime:
            prioritize_threads(self.emu._proc.pid)
        return self

    @property
    def p(self) -> CanProbe:
        assert self.probe is not None, "use the campaign as a context manager"
        return self.probe

    @property
    def url(self) -> str:
        return self.p.url()

    def snaps(self) -> dict[int, dict]:
        return self.p.snaps()

    # -- the control case ------------------------------------------------------------------------------
    def arm_and_move(self, min_speed: float = MOVING_RAD_S, tries: int = 3) -> _Control:
        """The operator's arm, then wait until a joint turns at `min_speed` with torque on in every device and no
        trip: the control case."""
        return self._arm_until(lambda t_arm, start: self._moving(min_speed, t_arm, start),
                               f"a joint turning at {min_speed:g} rad/s, torque on in every {self.p.devices[:-1]}",
                               tries)

    def _moving(self, min_speed: float, t_arm: float, start: dict[int, dict]) -> _Control | None:
        snaps, now = self.snaps(), time.monotonic()
        status = self._raise_if_tripped_since(t_arm)
        fastest = max(IDS, key=lambda i: abs(snaps[i]["velocity"]))
        if (not all(s["on"] for s in snaps.values()) or abs(snaps[fastest]["velocity"]) < min_speed
                or status.get("phase") not in ("homing", "running")):
            return None
        return _Control(now, fastest, snaps[fastest]["velocity"], snaps, start, self.p.devices, "rad/s")

    # -- the verdict -----------------------------------------------------------------------------------
    def _wait_stopped(self, since: float, timeout: float = 5.0) -> dict[int, tuple[float, str]]:
        return self._wait_off(since, timeout)

    def _wait_off(self, since: float, timeout: float = 5.0) -> dict[int, tuple[float, str]]:
        """Every device's torque-off time and cause once all are off, or what is off when `timeout` runs out."""
        def every_device() -> dict[int, tuple[float, str]] | None:
            off = self.p.off_times(since)
            return off if len(off) == len(IDS) else None

        try:
            return wait_until(every_device, timeout, f"torque off in every {self.p.devices[:-1]}")
        except TimeoutError:
            return self.p.off_times(since)

    def _timed_row(self, fault: str, t_fault: float, ctl: _Control, trip: dict | None, *,
                   detected_by: str | None = None, device_latched: bool = False) -> MotorFaultRow:
        """Detection -> the first stop the host sent that a device acted on, and -> every device torque off. A
        fault the device itself reports (`device_latched`) is timed from the fault: the host acts on the reply or
        EMCY that carries it."""
        off = self._wait_off(t_fault)
        t_stop = min(self.p.host_stops(t_fault), default=None)
        row = MotorFaultRow(fault, detected_by or (f"host: {trip['kind']}" if trip else "-"), backend=self.scheme,
                            control=ctl.describe())
        row.category, row.kind = (trip["category"], trip["kind"]) if trip else (None, None)
        if trip is not None:
            row.fault_to_detect_ms = (trip["t"] - t_fault) * 1e3
        p_ms = self.period * 1e3
        if t_stop is not None and (device_latched or trip is not None):
            start = t_fault if device_latched else trip["t"]  # type: ignore[index]
            row.fault_to_stop_ms = (t_stop - start) * 1e3
            row.bound_stop_ms = (2 * p_ms if device_latched else p_ms) + TX_MS
        if len(off) == len(IDS) and t_stop is not None:
            row.stop_to_off_ms = max(0.0, (max(t for t, _ in off.values()) - t_stop) * 1e3)
            row.bound_off_ms = self.p.controlled_off_ms if row.category == 1 else (len(IDS) - 1) * TX_MS + 1.0
        row.notes = self._off_notes(off, t_fault)
        return row

    def _off_notes(self, off: dict[int, tuple[float, str]], t_fault: float) -> str:
        notes = "torque off after the fault: " + (", ".join(
            f"id {i} {how} +{(t - t_fault) * 1e3:.1f} ms" for i, (t, how) in sorted(off.items())) or "none")
        missing = [i for i in IDS if i not in off]
        return notes + (f"; ids {missing} NOT torque off" if missing else "")

    def _device_watchdog_row(self, fault: str, t: float, ctl: _Control, armed: tuple[bool, str]) -> MotorFaultRow:
        """Nothing from the host reaches the devices after `t`: each device's own watchdog expires (its lateness:
        time since the last frame that fed it minus the watchdog period, bound one emulator tick) and it stops
        (Damiao: disabled at once; CiA 402: quick stop on its ramp, then Switch On Disabled)."""
        row = MotorFaultRow(fault, f"device: {self.p.watchdog}", backend=self.scheme,
                            control=f"{ctl.describe()}; {armed[1]}")
        try:
            wait_until(lambda: len(self.p.expiries(t)) == len(IDS), 5.0, f"every device's {self.p.watchdog} to expire")
        except TimeoutError:
            row.notes = f"{self.p.watchdog} did NOT expire in every {self.p.devices[:-1]}"
            return row
        expired = self.p.expiries(t)
        first, last = min(e for e, _ in expired.values()), max(e for e, _ in expired.values())
        row.fault_to_stop_ms = max(since * 1e3 - self.p.watchdog_s * 1e3 for _, since in expired.values())
        row.bound_stop_ms = TICK_S * 1e3
        off = self._wait_off(t)
        if len(off) == len(IDS):  # each device's own reaction: its expiry -> its torque off
            row.stop_to_off_ms = max((off[i][0] - expired[i][0]) * 1e3 for i in IDS)
            row.bound_off_ms = self.p.expiry_to_off_ms
        # The devices' expiries are as far apart as the host's last frames to them were (one frame per device).
        spread = f"{(first - t) * 1e3:.0f}" + (f"-{(last - t) * 1e3:.0f}" if last - first >= 0.5e-3 else "")
        row.notes = (f"last frame -> expiry {max(s for _, s in expired.values()) * 1e3:.1f} ms (watchdog "
                     f"{self.p.watchdog_s * 1e3:.0f} ms); fault -> expiry {spread} ms; " + self._off_notes(off, t))
        return row

    def _watch(self, row: MotorFaultRow, t_fault: float) -> MotorFaultRow:
        """After the stop: no device may get torque back without an operator arm, and a powered joint may not move.
        A joint without torque coasts (a disabled Damiao motor or a drive in Switch On Disabled is not held): its
        travel is noted, it is no motion under power."""
        start, t0 = self.snaps(), time.monotonic()
        powered_motion, coast = 0.0, 0.0
        while time.monotonic() - t0 < self.watch_s:
            now = self.snaps()
            for i in IDS:
                travel = abs(now[i]["position"] - start[i]["position"])
                if now[i]["on"]:
                    powered_motion = max(powered_motion, travel)
                else:
                    coast = max(coast, travel)
            time.sleep(0.02)
        end = self.snaps()
        torque_on = self.p.powered(t_fault)
        row.moved_without_arm = bool(torque_on) or powered_motion > MOVED_RAD
        row.after = self.p.describe_after(end)
        if coast > MOVED_RAD:
            row.notes += f"; coasted {coast:.3f} rad without torque in the watch window (not held)"
        if row.moved_without_arm:
            row.notes += (f"; after the stop: torque on {len(torque_on)} times, largest powered motion "
                          f"{powered_motion:.3f} rad")
        self.rows.append(row)
        log.info("%s %s: %s", self.scheme, row.fault, row.as_dict())
        return row

    def _note_host_trip(self, row: MotorFaultRow, t: float) -> None:
        """The host's own detection of a bus it cannot hear (its trip, if any within 5 s), into the row."""
        try:
            trip = wait_until(lambda: self._trip_since(t), 5.0, "the host to trip")
        except TimeoutError:
            row.notes += "; the host did NOT trip within 5 s"
            return
        row.fault_to_detect_ms = (trip["t"] - t) * 1e3
        row.category, row.kind = trip["category"], trip["kind"]
        row.detected_by += f"; host: {trip['kind']}"
        row.notes += f"; the host tripped {trip['kind']} (cat {trip['category']}) {row.fault_to_detect_ms:.0f} ms after"

    def _stopped_with_cat0_trip(self, host: str) -> bool:
        """A host that lost its bus stays up, reports a category-0 trip and has finished its stop."""
        return host.startswith("still running: phase stopped") and host.endswith("(cat 0)")

    # -- the faults ------------------------------------------------------------------------------------
    def host_kill(self) -> MotorFaultRow:
        """kill -9 of every process of the run, mid-motion: each device's own watchdog must stop it."""
        ctl = self.arm_and_move()
        armed = self.p.watchdog_armed()
        assert self.run is not None
        t = time.monotonic()
        self.run.signal_group(signal.SIGKILL)
        row = self._device_watchdog_row("host kill -9 mid-motion", t, ctl, armed)
        row.host = self._host_outcome(t, expect_exit=True)
        return self._watch(row, t)

    def bus_down(self) -> MotorFaultRow:
        """The bus between host and devices gone mid-motion (`cut_bus`: the emulator's end hears and sends nothing,
        the devices' timers run on). It models what the devices see when the host's CAN interface goes down, its
        adapter is unplugged or the cable is cut: no frame arrives, so each device's watchdog expires; and for the
        host, frames that nobody answers. What it does not model: on SocketCAN `ip link set can0 down` makes the
        host's every send fail at once (ENETDOWN), error frames and bus-off; here the host's frames go out and
        are lost, so it finds the loss by missing answers (Damiao: 3 unanswered commands; CiA 402: no TPDO, then
        an SDO read that times out). The host must stay up and report a category-0 trip."""
        ctl = self.arm_and_move()
        armed = self.p.watchdog_armed()
        t = time.monotonic()
        self.emu.cut_bus(True)
        try:
            row = self._device_watchdog_row("CAN bus down (host and devices cut apart)", t, ctl, armed)
            self._note_host_trip(row, t)
            row.host = self._host_outcome(t, expect_exit=False, settle_s=15.0)  # observed with the bus still down
            row.host_ok = self._stopped_with_cat0_trip(row.host)
            return self._watch(row, t)
        finally:
            self.emu.cut_bus(False)

    def device_fault(self) -> MotorFaultRow:
        """The moving device reports a fault (Damiao: an error status in its replies; CiA 402: statusword Fault
        and an EMCY): the host stops every device, category 0."""
        ctl = self.arm_and_move()
        sid = ctl.moving_id
        t = time.monotonic()
        self.p.inject_fault(sid)
        trip = wait_until(lambda: self._trip_since(t), 5.0, "the host to trip")
        row = self._timed_row(f"device fault ({self.p.fault})", t, ctl, trip,
                              detected_by=f"device report -> host: {trip['kind']}", device_latched=True)
        row.notes += f"; injected in id {sid}"
        return self._watch(row, t)

    def blocked_joint(self) -> MotorFaultRow:
        """The fastest joint stops moving (a collision): the host's following-error (or effort) check trips. The
        emulators model no device-side protection for it (the sources give none for these devices)."""
        ctl = self.arm_and_move(FAST_RAD_S)
        sid = ctl.moving_id
        t = time.monotonic()
        self.emu.block_joint(sid, True)
        try:
            trip = wait_until(lambda: self._trip_since(t), 5.0, "the host to trip")
        except TimeoutError:
            trip = None
        finally:
            self.emu.block_joint(sid, False)
        if trip is None:
            return self._undetected("blocked joint", t, ctl, f"id {sid} blocked")
        row = self._timed_row("blocked joint", t, ctl, trip)
        row.notes += f"; id {sid} blocked"
        return self._watch(row, t)

    def _undetected(self, fault: str, t: float, ctl: _Control, what: str) -> MotorFaultRow:
        assert self.run is not None
        status = self.run.status()
        row = MotorFaultRow(fault, "NOT detected", backend=self.scheme, control=ctl.describe())
        row.host = f"{time.monotonic() - t:.1f} s after the fault: phase {status.get('phase')}, no trip"
        row.notes = f"{what}; stopped by the operator"
        self.run.op("stop")
        return self._watch(row, t)

    def host_sigterm(self) -> MotorFaultRow:
        """SIGTERM to every process of the run (a control-group stop): a controlled stop, read back, and exit."""
        ctl = self.arm_and_move()
        assert self.run is not None
        t = time.monotonic()
        self.run.signal_group(signal.SIGTERM)
        self._wait_off(t)
        self.run.wait_exit(15.0)
        summary = self.run.summary() or {}
        trips = [tr for tr in summary.get("trips", []) if tr["t"] >= t - 1e-3]
        row = self._timed_row("host SIGTERM (process group)", t, ctl, min(trips, key=lambda tr: tr["t"]) if trips
                              else None)
        row.host = self._host_outcome(t)
        read_back = self.p.read_back in self.run.stderr()
        row.host_ok = self.run.returncode in (0, 3) and bool(summary) and not summary.get("error") and read_back
        row.notes += f"; the host logged {self.p.read_back!r}" if read_back else "; NO read-back line in the log"
        return self._watch(row, t)

    def restart_after_kill(self) -> MotorFaultRow:
        """After the kill, a new run starts as systemd would restart it: it must stay disarmed, every device
        without torque, until the operator arms."""
        t = time.monotonic()
        before = self.snaps()
        self.start_host()
        assert self.run is not None
        row = MotorFaultRow("host restart after kill -9", "-", backend=self.scheme, expect_stop=False,
                            control=f"the killed host's devices: {self.p.describe_after(before)}")
        row.notes = f"watched {self.watch_s:g} s after the new run came up, before any operator arm"
        row = self._watch(row, t)
        status = self.run.status()
        trip = status.get("trip") or {}
        bits = int((status.get("firmware") or {}).get("fault_bits", 0))
        row.host = (f"phase {status.get('phase')}, armed {status.get('armed')}"
                    + (f", trip {trip['kind']} (cat {trip['category']})" if trip else "")
                    + (f", device fault latched (bits 0x{bits:04x}): the operator's arm clears it first" if bits else ""))
        row.host_ok = status.get("phase") in ("disarmed", "stopped") and status.get("armed") is False
        return row

    def foreign_fault_frame(self) -> MotorFaultRow:
        """A fault report from a node id no configured device has must be ignored by the host (no trip, the
        devices keep running); control: the same frame from the moving device's own id is taken (a category-0
        trip and every device torque off). CAN has no sender authentication: the control is also the residual
        risk (any node may speak with a device's id)."""
        ctl = self.arm_and_move()
        sid = ctl.moving_id
        bus = self.p.third_node()
        try:
            heard, foreign = self.p.frames_heard(), self.p.foreign_fault_frames()
            t_foreign = time.monotonic()
            for _ in range(FOREIGN_FRAMES):
                for frame in foreign:
                    send_frame(bus, *frame)
                time.sleep(self.period)
            time.sleep(5 * self.period)  # eight control periods in all
            on_bus = self.p.frames_heard() - heard >= FOREIGN_FRAMES * len(foreign)
            status = self.run.status()  # type: ignore[union-attr]
            ignored = (self._trip_since(t_foreign) is None and status.get("phase") in ("homing", "running")
                       and all(s["on"] for s in self.snaps().values()))
            t = time.monotonic()
            for _ in range(FOREIGN_FRAMES):  # the control: the same frame from the configured id
                send_frame(bus, *self.p.fault_frame(sid))
                time.sleep(self.period)
        finally:
            bus.shutdown()
        try:
            trip = wait_until(lambda: self._trip_since(t), 3.0, "the host to take the frame from the right id")
        except TimeoutError:
            trip = None
        fault = "foreign node id: a fault frame"
        if trip is None:
            row = MotorFaultRow(fault, "NOT taken from the configured id either", backend=self.scheme,
                                control=ctl.describe(), control_ok=False)
        else:
            row = self._timed_row(fault, t, ctl, trip, detected_by=f"spoofed report -> host: {trip['kind']}",
                                  device_latched=True)
            row.control_ok = trip["kind"] == "firmware_fault"
        row.control += (f"; {self.p.foreign_fault}, {FOREIGN_FRAMES} times"
                        + (" (on the bus: the emulator heard them)" if on_bus else " (NOT heard on the bus)")
                        + (": ignored, no trip and every device on for 8 periods" if ignored else ": TAKEN"))
        row.host_ok = ignored and on_bus
        row.notes = (f"the same frame from id {sid} (the control) -> {trip['kind'] if trip else 'no trip'}; "
                     + row.notes)
        return self._watch(row, t)

    def foreign_answers_row(self) -> MotorFaultRow:
        """The devices fall silent (the bus cut at the emulator's end) while a third node keeps answering as devices
        would, from a foreign id: the host must not take those answers (its link watchdog is fed only by its own
        devices' answers) and trips as on a silent bus, category 0. Control: the same answers from the configured
        ids are taken (CAN has no sender authentication: the residual risk): the host runs on, no trip, for FED_FOR
        device-watchdog periods, and trips once they stop."""
        ctl = self.arm_and_move()
        armed = self.p.watchdog_armed()
        bus = self.p.third_node()
        try:
            positions = {i: s["position"] for i, s in self.snaps().items()}
            with _Feeder(bus, self.p.answer_frames((self.p.FOREIGN,), positions)):
                t = time.monotonic()
                self.emu.cut_bus(True)
                try:
                    row = self._device_watchdog_row("foreign node id: answers while the devices are silent", t, ctl,
                                                    armed)
                    self._note_host_trip(row, t)
                    row.host = self._host_outcome(t, expect_exit=False, settle_s=15.0)
                finally:
                    self.emu.cut_bus(False)
            row.host_ok = row.fault_to_detect_ms is not None and self._stopped_with_cat0_trip(row.host)
            row.control += f"; {self.p.foreign_answers} every {FEED_PERIOD_S * 1e3:.0f} ms from the cut on"
            self._watch(row, t)
            row.control_ok, taken = self._right_id_answers(bus)
            row.control += f"; control: {taken}"
        finally:
            bus.shutdown()
        return row

    def _right_id_answers(self, bus: can.BusABC) -> tuple[bool, str]:
        """Re-armed, the devices cut off again while the same answers come from the configured ids."""
        self.arm_and_move()
        positions = {i: s["position"] for i, s in self.snaps().items()}
        hold = FED_FOR * self.p.watchdog_s
        try:
            with _Feeder(bus, self.p.answer_frames(IDS, positions)) as feeder:
                t = time.monotonic()
                self.emu.cut_bus(True)
                while time.monotonic() - t < hold and self._trip_since(t) is None:
                    time.sleep(0.02)
                fed = self._trip_since(t) is None
            try:
                trip = wait_until(lambda: self._trip_since(t), 5.0, "the host to trip once the answers stop")
            except TimeoutError:
                return False, f"{self.p.right_answers}: the host did NOT trip after they stopped"
            self._host_outcome(t, expect_exit=False, settle_s=15.0)  # its stop finished before the bus comes back
        finally:
            self.emu.cut_bus(False)
        return fed, (f"{self.p.right_answers} kept the host running {'with no trip' if fed else 'but it TRIPPED'} "
                     f"for {hold:g} s with its devices cut off, and it tripped ({trip['kind']}) "
                     f"{(trip['t'] - feeder.last) * 1e3:.0f} ms after they stopped")

    def foreign_watchdog_frames(self) -> MotorFaultRow:
        """After kill -9, a third node keeps sending frames that would feed the devices' watchdogs if they came
        from the right id (Damiao: MIT frames to a foreign ESC_ID; CiA 402: heartbeats of a foreign node): each
        device's watchdog must expire as if the bus were silent. Control: the same frames from the configured ids
        keep every watchdog fed (the devices stay on) until they stop, then it expires."""
        ctl = self.arm_and_move()
        armed = self.p.watchdog_armed()
        assert self.run is not None
        bus = self.p.third_node()
        try:
            with _Feeder(bus, self.p.feed_frames((self.p.FOREIGN,))):
                t = time.monotonic()
                self.run.signal_group(signal.SIGKILL)
                row = self._device_watchdog_row("foreign node id: watchdog frames after kill -9", t, ctl, armed)
            row.host = self._host_outcome(t, expect_exit=True)
            row.control += f"; {self.p.foreign_feed} every {FEED_PERIOD_S * 1e3:.0f} ms from the kill on"
            self._watch(row, t)
            row.control_ok, fed = self._right_ids_feed(bus)
            row.control += f"; control: {fed}"
        finally:
            bus.shutdown()
        return row

    def _right_ids_feed(self, bus: can.BusABC) -> tuple[bool, str]:
        """A fresh run armed and killed while the same frames come from the configured ids: every device stays on,
        its watchdog fed, for FED_FOR watchdog periods; it expires once they stop."""
        self.start_host()
        self.arm_and_move()
        assert self.run is not None
        with _Feeder(bus, self.p.feed_frames(IDS)) as feeder:
            t = time.monotonic()
            self.run.signal_group(signal.SIGKILL)
            hold = FED_FOR * self.p.watchdog_s
            while time.monotonic() - t < hold and not self.p.expiries(t):
                time.sleep(0.01)
            fed = not self.p.expiries(t) and all(s["on"] for s in self.snaps().values())
        try:
            wait_until(lambda: len(self.p.expiries(t)) == len(IDS), 5.0, "the watchdogs to expire once fed no more")
        except TimeoutError:
            return False, f"{self.p.right_feed}: the watchdogs did NOT expire after they stopped"
        late = max(e - feeder.last for e, _ in self.p.expiries(t).values()) * 1e3
        return fed, (f"{self.p.right_feed} kept every {self.p.watchdog} {'fed' if fed else 'NOT fed'} for {hold:g} s "
                     f"after a kill -9, and it expired {late:.0f} ms after they stopped")

    # -- campaigns -------------------------------------------------------------------------------------
    def run_all(self) -> list[MotorFaultRow]:
        self.start_host()
        for scenario in (self.stalled_inference, self.blocked_joint, self.device_fault, self.bus_down,
                         self.foreign_fault_frame, self.foreign_answers_row, self.host_sigterm):
            scenario()
        self.start_host()
        self.host_kill()
        self.restart_after_kill()
        self.foreign_watchdog_frames()
        self.close_host()
        return self.rows

    def run_bundle(self) -> list[MotorFaultRow]:
        """With a bundle's policy driving (`bundle`): a device fault, then kill -9; the rows are named so."""
        assert self.bundle, "run_bundle needs CanCampaign(bundle=...)"
        self.start_host()
        rows = [self.device_fault(), self.host_kill()]
        self.close_host()
        for row in rows:
            row.fault += f" [bundle {Path(self.bundle).name}]"
        return self.rows

    def run_ci(self) -> list[MotorFaultRow]:
        """The CI subset, in one run: a device fault, the bus down (then back), kill -9."""
        self.start_host()
        self.device_fault()
        self.bus_down()
        self.host_kill()
        self.close_host()
        return self.rows
