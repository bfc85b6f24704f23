"""The C firmware reference under AddressSanitizer + UndefinedBehaviorSanitizer, driven as a process.

`build_driver()` compiles firmware/fw_fuzz_driver.c with fw_core.c and fw_codec.c; `SanitizedFirmware` starts it
and speaks its command protocol (documented at the top of the C file). Every command is answered with a `Snapshot`:
what the plant would see (torque on, the commanded values), the mode, faults, session and counters, and the bytes
the firmware sent. A sanitizer report halts the driver; the next command then raises `SanitizerReport` with it.
"""

from __future__ import annotations

import os
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from firmware_bridge import native
from firmware_bridge.framing import StreamDecoder, decode_raw, encode_raw

FW = native.FIRMWARE_DIR
SANITIZE = ("-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g", "-O1")
STRICT = ("-std=c11", "-Wall", "-Wextra", "-Werror", "-Wshadow", "-Wconversion", "-Wno-sign-conversion")
# halt_on_error: the first report ends the run where the bug is; detect_leaks: the firmware never allocates.
ENV = {"ASAN_OPTIONS": "halt_on_error=1:abort_on_error=0:detect_leaks=1:exitcode=86",
       "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1:exitcode=87"}
STAT_NAMES = ("rx_frames", "rx_crc_errors", "rx_framing_errors", "rx_bad_messages", "rx_duplicates", "rx_gaps",
              "tx_frames", "tx_overflows", "events_lost", "rx_stale", "time_backsteps", "rx_bad_session")


class SanitizerReport(AssertionError):
    """The sanitized driver stopped: a sanitizer report (or a crash); the message holds its stderr."""


def why_no_sanitizer(cc: str, work: Path) -> str | None:
    """None when `cc` builds and runs an ASan+UBSan program here, else why not (the tests then skip)."""
    src = work / "probe.c"
    src.write_text("int main(void) { return 0; }\n")
    try:
        build = subprocess.run([cc, *SANITIZE, str(src), "-o", str(work / "probe")], capture_output=True, text=True,
                               timeout=120)
    except OSError as exc:
        return f"cannot run {cc}: {exc}"
    if build.returncode != 0:
        return f"{cc} cannot link -fsanitize=address,undefined (install libasan/libubsan): {build.stderr.strip()[:300]}"
    run = subprocess.run([str(work / "probe")], capture_output=True, text=True, timeout=60, env={**os.environ, **ENV})
    if run.returncode != 0:
        return f"the ASan runtime does not run here (ptrace/personality limits?): {run.stderr.strip()[:300]}"
    return None


def build_driver(cc: str, out_dir: Path) -> Path:
    exe = out_dir / "fw_fuzz_driver"
    sources = [str(FW / f) for f in ("fw_fuzz_driver.c", "fw_core.c", "fw_codec.c")]
    build = subprocess.run([cc, *STRICT, *SANITIZE, *sources, "-o", str(exe)], capture_output=True, text=True,
                           timeout=300)
    assert build.returncode == 0, build.stderr
    return exe


@dataclass(frozen=True)
class Limits:
    pos_min: int = -3_000_000  # µrad
    pos_max: int = 3_000_000
    vel_max: int = 3_000_000  # µrad/s
    eff_max: int = 20_000  # mN·m
    kp_default: int = 500_000  # 1e-4 SI
    kd_default: int = 20_000

    @property
    def kp_max(self) -> int:  # fw_set_joint's default: 4x the default gain, saturated at the u32 maximum
        return min(4 * self.kp_default, 0xFFFFFFFF)

    @property
    def kd_max(self) -> int:
        return min(4 * self.kd_default, 0xFFFFFFFF)


@dataclass
class Snapshot:
    torque_on: bool
    mode: int
    faults: int
    status: int
    n_joints: int
    stop_latched: bool
    session: int
    last_rx_seq: int
    have_session: bool
    session_span: int  # sequence numbers since the session's HELLO (ARM applies below 32768)
    stats: dict[str, int]
    commands: list[tuple[int, int, int, int, int]]  # per joint: pos, vel, eff, kp, kd (kp/kd as u32)
    max_rss_kib: int
    events: list[tuple[int, int, int]]  # kind, arg, faults
    tx: bytes
    frames: list[tuple[int, int, bytes]] = field(default_factory=list)  # (type, seq, payload) of what was sent


def _parse(body: bytes) -> Snapshot:
    on, mode, faults, status, n, latched, session, last, have, _, span = struct.unpack_from("<BBHHBBIHBBI", body)
    o = 20
    stats = dict(zip(STAT_NAMES, struct.unpack_from(f"<{len(STAT_NAMES)}I", body, o)))
    o += 4 * len(STAT_NAMES)
    flat = struct.unpack_from(f"<{5 * n}i", body, o)
    o += 20 * n
    commands = [(p, v, e, kp & 0xFFFFFFFF, kd & 0xFFFFFFFF) for p, v, e, kp, kd in zip(*[iter(flat)] * 5)]
    rss, n_ev = struct.unpack_from("<IH", body, o)
    o += 6
    events = [struct.unpack_from("<BBH", body, o + 4 * i) for i in range(n_ev)]
    o += 4 * n_ev
    (tx_len,) = struct.unpack_from("<I", body, o)
    tx = body[o + 4 : o + 4 + tx_len]
    frames = []
    for block in StreamDecoder().feed(tx):
        raw = decode_raw(block)  # the firmware's own output must always decode
        frames.append((raw.type, raw.seq, raw.payload))
    return Snapshot(bool(on), mode, faults, status, n, bool(latched), session, last, bool(have), span, stats, commands, rss,
                    events, tx, frames)


class SanitizedFirmware:
    """One sanitized driver process; `init()` resets the firmware in it (a new boot) without a new process."""

    def __init__(self, exe: Path, log: Path) -> None:
        self.log = log
        self._err = open(log, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen([str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err,
                                     env={**os.environ, **ENV}, bufsize=0)
        self.limits = Limits()
        self.n = 1
        self.seq_window = 256

    def close(self) -> int:
        """Quits the driver; its exit status (0: no sanitizer report, no leak)."""
        try:
            self.proc.stdin.write(b"Q")
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        rc = self.proc.wait(timeout=30)
        self.proc.stdout.close()
        self._err.close()
        return rc

    def stderr(self) -> str:
        if not self._err.closed:
            self._err.flush()
        return self.log.read_text(errors="replace")

    def _call(self, request: bytes) -> Snapshot:
        try:
            self.proc.stdin.write(request)
            head = self._read(4)
            return _parse(self._read(struct.unpack("<I", head)[0]))
        except (BrokenPipeError, EOFError):
            rc = self.proc.wait(timeout=30)
            raise SanitizerReport(f"firmware driver exited with {rc}:\n{self.stderr()[-6000:]}") from None

    def _read(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.proc.stdout.read(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf

    def init(self, n_joints: int = 2, *, seq_window: int = 256, link_loss_cat: int = 1, entropy: int = 0x5EED,
             limits: Limits | None = None) -> Snapshot:
        self.limits = lim = limits or Limits()
        self.seq_window = seq_window
        snap = self._call(b"I" + struct.pack("<BHBQiiiiII", n_joints, seq_window, link_loss_cat, entropy, lim.pos_min,
                                             lim.pos_max, lim.vel_max, lim.eff_max, lim.kp_default, lim.kd_default))
        self.n = snap.n_joints  # fw_init caps it at the 16-entry table
        return snap

    def rx(self, data: bytes, now_us: int) -> Snapshot:
        return self._call(b"R" + struct.pack("<QI", now_us, len(data)) + data)

    def flood(self, byte: int, count: int, now_us: int) -> Snapshot:
        return self._call(b"G" + struct.pack("<QIB", now_us, count, byte))

    def tick(self, now_us: int) -> Snapshot:
        return self._call(b"T" + struct.pack("<Q", now_us))

    def set_measured(self, rows: list[tuple[int, int, int]]) -> Snapshot:
        return self._call(b"M" + b"".join(struct.pack("<iii", *r) for r in rows))

    def set_joint_name(self, joint: int, name: bytes) -> Snapshot:
        return self._call(b"J" + struct.pack("<BB", joint, len(name)) + name)

    def control(self, which: bytes) -> Snapshot:
        """b"X" (heap overflow) or b"U" (signed overflow): must end in a SanitizerReport."""
        return self._call(which)


# ---- a host that speaks to the sanitized firmware, and the invariants every step must keep --------------------

HELLO, ARM, DISARM, SETPOINT, STATE, HEARTBEAT, STOP, ACK, NACK, CLEAR_FAULTS, KEEPALIVE = (
    0x01, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x0A, 0x0B, 0x0C, 0x0D)
DISARMED, ARMED, STOPPING, TRIPPED = 0, 1, 2, 3
SETPOINT_CLAMPED, GAINS_CLAMPED = 0x100, 0x200
TRIP_FAULTS = 0xFFFF & ~(SETPOINT_CLAMPED | GAINS_CLAMPED)
NACK_NOT_ARMED, NACK_BAD_LENGTH, NACK_BAD_JOINT_COUNT, NACK_BAD_SESSION = 1, 2, 3, 11
I32_MIN, I32_MAX = -(2**31), 2**31 - 1


def setpoint_payload(rows: list[tuple[int, int, int, int, int]], flags: int = 0x07, n_field: int | None = None) -> bytes:
    """SETPOINT: n_joints (the field, which hostile frames set to anything), flags, then pos/vel/eff:i32 kp/kd:u32."""
    n = len(rows) if n_field is None else n_field
    return struct.pack("<BBH", n, flags, 0) + b"".join(struct.pack("<iiiII", *r) for r in rows)


def expected_command(row: tuple[int, int, int, int, int], flags: int, lim: Limits) -> tuple[int, int, int, int, int]:
    """What the firmware must command for one joint of an applied SETPOINT (PROTOCOL.md: clamped to the limits)."""
    pos, vel, eff, kp, kd = row
    def clamp(v: int, lo: int, hi: int) -> int:
        return min(max(v, lo), hi)
    return (clamp(pos, lim.pos_min, lim.pos_max),
            clamp(vel, -lim.vel_max, lim.vel_max) if flags & 1 else 0,
            clamp(eff, -lim.eff_max, lim.eff_max) if flags & 2 else 0,
            min(kp if flags & 4 else lim.kp_default, lim.kp_max),
            min(kd if flags & 4 else lim.kd_default, lim.kd_max))


class Host:
    """The test's side of the wire: builds frames (Python codec), keeps every one for replays, and checks the
    invariants on the snapshot after each step."""

    def __init__(self, fw: SanitizedFirmware, snap: Snapshot) -> None:
        self.fw = fw
        self.snap = snap
        self.now = 1_000
        self.sent: list[bytes] = []
        self.rss0 = snap.max_rss_kib
        self.own_session = 0  # the nonce answering this host's own HELLO: what it arms with (Link.needs_hello)
        self.measured = [(0, 0, 0)] * fw.n

    def measure(self, rows: list[tuple[int, int, int]]) -> Snapshot:
        self.measured = rows
        self.snap = self.fw.set_measured(rows)
        return self.snap

    def held_commands(self) -> list[tuple[int, int, int, int, int]]:
        """What ARM commands: hold the measured position (clamped to the limits) with the default gains."""
        lim = self.fw.limits
        return [(min(max(p, lim.pos_min), lim.pos_max), 0, 0, lim.kp_default, lim.kd_default) for p, _, _ in
                self.measured]

    @property
    def next_seq(self) -> int:
        return (self.snap.last_rx_seq + 1) & 0xFFFF

    def frame(self, msg_type: int, payload: bytes, seq: int | None = None, version: int = 1) -> bytes:
        """A CRC-valid frame, led by a 0x00: whatever hostile bytes came before it end there as their own (bad)
        frame instead of corrupting this one (zero-length frames are ignored)."""
        return b"\x00" + encode_raw(msg_type, self.next_seq if seq is None else seq, payload, version)

    def wire(self, data: bytes, dt_us: int = 1_000) -> Snapshot:
        """Bytes as they arrive on the wire, `dt_us` after the previous step."""
        self.now += dt_us
        self.sent.append(data)
        self.snap = self.fw.rx(data, self.now)
        return self.snap

    def send(self, msg_type: int, payload: bytes = b"", seq: int | None = None) -> Snapshot:
        return self.wire(self.frame(msg_type, payload, seq))

    def hello(self, seq: int | None = None) -> Snapshot:
        self.send(HELLO, struct.pack("<BBH", 1, 2, 0), seq)
        self.own_session = self.snap.session
        return self.snap

    def arm(self, nonce: int | None = None) -> Snapshot:
        return self.send(ARM, struct.pack("<I", self.own_session if nonce is None else nonce))

    def tick(self, dt_us: int = 1_000) -> Snapshot:
        self.now = max(0, self.now + dt_us)
        self.snap = self.fw.tick(self.now)
        return self.snap

    def answer(self, snap: Snapshot, seq: int) -> tuple[int, int, int] | None:
        """(type ACK/NACK, acked type, code) of the answer to `seq` in this step's output, else None."""
        for typ, _, payload in snap.frames:
            if typ in (ACK, NACK) and struct.unpack_from("<H", payload)[0] == seq:
                return typ, payload[2], payload[3]
        return None


def check_always(host: Host, s: Snapshot) -> None:
    """Invariants of every state: the plant is only ever driven within the limits, torque is on exactly while armed
    or ramping, and memory does not grow with the input (the firmware has fixed buffers only)."""
    lim = host.fw.limits
    assert s.torque_on == (s.mode in (ARMED, STOPPING)), f"torque {s.torque_on} in mode {s.mode}"
    for j, (pos, vel, eff, kp, kd) in enumerate(s.commands):
        assert lim.pos_min <= pos <= lim.pos_max, f"joint {j} commanded position {pos} outside the limits"
        assert abs(vel) <= lim.vel_max and abs(eff) <= lim.eff_max, f"joint {j} commanded vel {vel} / eff {eff}"
        assert kp <= lim.kp_max and kd <= lim.kd_max, f"joint {j} commanded gains {kp}/{kd} above the maxima"
    assert s.max_rss_kib - host.rss0 < 4096, f"driver RSS grew by {s.max_rss_kib - host.rss0} KiB"


def check_no_motion(host: Host, before: Snapshot, after: Snapshot, what: str) -> None:
    """A step that must not command motion: torque never comes on, the commanded values do not change."""
    check_always(host, after)
    assert not (after.torque_on and not before.torque_on), f"{what} turned torque on"
    assert after.mode != ARMED or before.mode == ARMED, f"{what} armed the firmware"
    assert after.commands == before.commands, f"{what} changed the commands: {before.commands} -> {after.commands}"
