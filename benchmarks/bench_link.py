"""Motor-controller link figures (issue 5): `pytest benchmarks/bench_link.py -s`.

- round trips/s and latency p50/p99 for a 7-joint arm: setpoint out, STATE (acknowledging it) back,
  over a pty with the emulator pacing both directions like a 1 Mbaud UART, the same unpaced, and over
  python-can's virtual bus;
- corrupted frames accepted out of 10^5 random corruptions (must be 0), Python and C decoders;
- time from the host's last heartbeat until the emulator's firmware has stopped the motors;
- acknowledged stops (issue 12): STOP sent -> ACK back (host clock) and STOP received -> torque off
  (emulator clock) with 0, 1 and 2 STOP frames lost on the way, over a real pty.
"""

from __future__ import annotations

import random
import time
import uuid

import numpy as np
import pytest

from firmware_bridge import canbus, framing
from firmware_bridge import protocol as p
from firmware_bridge.emulator import Emulator, EmulatorConfig, EmulatorProcess, default_limits
from firmware_bridge.errors import FrameError
from firmware_bridge.firmware import c_frame_decode
from firmware_bridge.link import Link
from firmware_bridge.protocol import State
from firmware_bridge.schemes import open_link
from firmware_bridge.transport import CanTransport

JOINTS = 7
ROUND_TRIPS = 2000


def _round_trip(link: Link, target: np.ndarray) -> float:
    t0 = time.perf_counter()
    link.send_setpoints(target)
    seq = (link._seq - 1) & 0xFFFF
    while True:
        for m in link.poll(0.05):
            if isinstance(m, State) and m.ack_seq == seq:
                return time.perf_counter() - t0
        if time.perf_counter() - t0 > 1.0:
            raise TimeoutError("no STATE for a setpoint within 1 s")


def _measure(link: Link, benchmark, label: str, wire_s: float | None = None) -> None:
    link.hello()
    link.arm()
    target = np.linspace(-0.5, 0.5, JOINTS)
    for _ in range(50):
        _round_trip(link, target)
    rtts: list[float] = []
    benchmark.pedantic(lambda: rtts.append(_round_trip(link, target)), rounds=ROUND_TRIPS, iterations=1)
    arr = np.array(rtts)
    line = (f"[link] {label}: {1 / arr.mean():7.0f} round trips/s  p50 {np.percentile(arr, 50) * 1e3:6.3f} ms  "
            f"p99 {np.percentile(arr, 99) * 1e3:6.3f} ms  max {arr.max() * 1e3:6.3f} ms  (n={len(arr)})")
    if wire_s is not None:
        line += f"  wire-time floor {wire_s * 1e3:.3f} ms"
    print(line)
    benchmark.extra_info.update(rt_per_s=1 / arr.mean(), p50_ms=np.percentile(arr, 50) * 1e3,
                                p99_ms=np.percentile(arr, 99) * 1e3)
    link.disarm()


def _frame_sizes() -> tuple[int, int]:
    sp = framing.encode(p.Setpoint(np.zeros(JOINTS)), 0)
    st = framing.encode(State(0, 0, p.Fault.NONE, p.Mode.ARMED, *np.zeros((3, JOINTS))), 0)
    return len(sp), len(st)


@pytest.mark.parametrize("baud", [1_000_000, 0], ids=["1Mbaud", "unpaced"])
def test_pty_round_trips(benchmark, baud: int) -> None:
    sp, st = _frame_sizes()
    with EmulatorProcess(joints=JOINTS, baud=baud, rate_hz=0, heartbeat_timeout_ms=500) as emu, \
            open_link(f"serial://{emu.port}?baud=1000000") as link:
        wire = (sp + st) * 10 / baud if baud else None
        _measure(link, benchmark, f"pty {'1 Mbaud paced' if baud else 'unpaced'} ({sp}+{st} B frames)", wire)


def test_virtual_can_round_trips(benchmark) -> None:
    sp, st = _frame_sizes()
    channel = f"bench-{uuid.uuid4().hex[:8]}"
    n_frames = len(canbus.segment(b"x" * sp)) + len(canbus.segment(b"x" * st))
    bits = sum(canbus.classic_can_bits(len(c)) for c in canbus.segment(b"x" * sp) + canbus.segment(b"x" * st))
    cfg = EmulatorConfig(joints=default_limits(JOINTS), state_rate_hz=0, heartbeat_timeout_ms=500)
    with Emulator(cfg, CanTransport("virtual", channel, side="firmware")), \
            open_link(f"can://virtual/{channel}") as link:
        _measure(link, benchmark, f"virtual CAN, {n_frames} classic frames per round trip")
    print(f"[link] (a real 1 Mbit/s classic CAN bus would need >= {bits / 1e3:.2f} ms per round trip on the wire)")


def test_corrupted_frames_accepted(benchmark) -> None:
    rng = random.Random(2024)
    frames = [framing.encode(p.Setpoint(np.linspace(-1, 1, JOINTS), np.ones(JOINTS), np.zeros(JOINTS)), 1)[:-1],
              framing.encode(State(99, 3, p.Fault.NONE, p.Mode.ARMED, *np.ones((3, JOINTS))), 2)[:-1],
              framing.encode(p.Heartbeat(7), 3)[:-1]]
    trials = 100_000

    def corrupt() -> list[bytes]:
        out: list[bytes] = []
        while len(out) < trials:
            original = rng.choice(frames)
            buf = bytearray(original)
            for _ in range(rng.randint(1, 6)):  # 1-6 random byte substitutions
                i = rng.randrange(len(buf))
                buf[i] ^= rng.randint(1, 255)
            if buf != original:  # two substitutions of one byte can cancel out: that is no corruption
                out.append(bytes(buf))
        return out

    corrupted = corrupt()

    def run() -> tuple[int, int, int]:
        py = c = pieces = 0
        for block in corrupted:
            for piece in block.split(b"\x00"):  # a corruption may create delimiters: every piece is a candidate
                if not piece:
                    continue
                pieces += 1
                try:
                    framing.decode(piece)
                    py += 1
                except FrameError:
                    pass
                if c_frame_decode(piece)[0] == 0:
                    c += 1
        return py, c, pieces

    py, c, pieces = benchmark.pedantic(run, rounds=1, iterations=1)
    print(f"[link] corrupted frames accepted: Python {py}, C {c} out of {trials} corrupted frames "
          f"({pieces} candidate blocks); CRC-32C")
    assert py == 0 and c == 0


def test_heartbeat_loss_to_motors_stopped(benchmark) -> None:
    timeout_ms, ramp_ms, trials = 100, 200, 5
    results: list[tuple[float, float]] = []

    def one() -> None:
        with EmulatorProcess(joints=JOINTS, heartbeat_timeout_ms=timeout_ms, stop_ramp_ms=ramp_ms) as emu, \
                open_link(f"serial://{emu.port}") as link:
            link.hello()
            link.arm()
            end = time.monotonic() + 0.3
            while time.monotonic() < end:  # a live host moving the arm, then it goes silent
                link.send_setpoints(np.full(JOINTS, 0.4 * np.sin(time.monotonic() * 5)))
                link.poll(0.005)
            trip = emu.wait_event("stop_cat1", timeout=5)
            off = emu.wait_event("torque_off", timeout=5)
            results.append((trip["since_last_heartbeat_s"], off["since_last_heartbeat_s"]))

    benchmark.pedantic(one, rounds=trials, iterations=1)
    trip = np.array([r[0] for r in results]) * 1e3
    off = np.array([r[1] for r in results]) * 1e3
    print(f"[link] last heartbeat -> category-1 stop: mean {trip.mean():.1f} ms, max {trip.max():.1f} ms "
          f"(timeout {timeout_ms} ms); -> torque off: mean {off.mean():.1f} ms, max {off.max():.1f} ms "
          f"(timeout + {ramp_ms} ms ramp); n={trials}")
    assert off.max() < timeout_ms + ramp_ms + 50


@pytest.mark.parametrize("lost", [0, 1, 2], ids=["no-loss", "1-lost", "2-lost"])
def test_acknowledged_stop_with_lost_frames(benchmark, lost: int) -> None:
    retry_s, trials = 0.02, 5
    acked: list[float] = []
    off: list[float] = []

    def one() -> None:
        with EmulatorProcess(joints=JOINTS, heartbeat_timeout_ms=200) as emu, \
                open_link(f"serial://{emu.port}") as link:
            link.hello()
            link.arm()
            end = time.monotonic() + 0.2
            while time.monotonic() < end:
                link.send_setpoints(np.full(JOINTS, 0.2))
                link.poll(0.005)
            if lost:
                emu.drop_next("STOP", lost)
            t0 = time.monotonic()
            assert link.stop(0, timeout=retry_s, retries=5)
            acked.append(time.monotonic() - t0)
            torque_off = emu.wait_event("torque_off", timeout=5)["t"]
            off.append(torque_off - t0)

    benchmark.pedantic(one, rounds=trials, iterations=1)
    a, o = np.array(acked) * 1e3, np.array(off) * 1e3
    print(f"[link] category-0 STOP with {lost} frame(s) lost (retry every {retry_s * 1e3:.0f} ms): "
          f"first STOP sent -> ACK p50 {np.median(a):.1f} ms max {a.max():.1f} ms; -> torque off (emulator) "
          f"p50 {np.median(o):.1f} ms max {o.max():.1f} ms; n={trials}")
    assert o.max() < (lost + 1) * retry_s * 1e3 + 100
