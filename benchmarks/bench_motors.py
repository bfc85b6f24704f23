"""Cycle budget of the dynamixel:// and feetech:// backends (issue 24): `pytest benchmarks/bench_motors.py -s`.

6 emulated XM430 servos at 1 Mbaud on a real pty (the emulator in its own process, pacing the line like a
UART), Return Delay Time 0 (what `motors configure` sets). One cycle = one Sync Read of Present
Current/Velocity/Position (126..135) + one Sync Write of Goal Position (116). Printed: bus time per cycle
(p50/p99/max) next to the wire-time floor (bytes x 10 / baud + return delays) and their ratio; the host CPU
time per cycle (dynamixel-sdk busy-polls the port while it waits); missed deadlines at 100 Hz.

Feetech row: 6 emulated STS3215 servos at 1 Mbaud, Return Delay 0; one cycle = one Sync Read of Present
Position..Present Current (56..70, 15 bytes) + one Sync Write of Goal Position (42, 2 bytes), through
scservo_sdk (it busy-polls the port too). `python benchmarks/bench_motors.py [dynamixel|feetech]`.
"""

from __future__ import annotations

import math
import os
import platform
import time

import numpy as np

from firmware_bridge.motors import MotorError, feetech_emulator, open_device
from firmware_bridge.motors.dynamixel_emulator import EmulatorProcess, ServoConfig

SERVOS, BAUD, RETURN_DELAY = 6, 1_000_000, 0
CYCLES = int(os.environ.get("BENCH_MOTORS_CYCLES", "300"))  # 3 s at 100 Hz
PERIOD_S = 0.010


def wire_floor_s(servos: int, baud: int, return_delay_units: int) -> float:
    sync_read = 14 + servos  # header..instruction, address, length, one id per servo, CRC
    status = servos * (11 + 10)  # one status packet per servo: 11 bytes of framing + 10 data bytes
    sync_write = 14 + servos * (1 + 4)
    return (sync_read + status + sync_write) * 10 / baud + servos * return_delay_units * 2e-6


def wire_floor_feetech_s(servos: int, baud: int, return_delay_units: int) -> float:
    sync_read = 8 + servos  # FF FF FE len 82 addr n ids.. checksum
    status = servos * (6 + 15)  # FF FF id len error 15 data bytes checksum
    sync_write = 8 + servos * (1 + 2)
    return (sync_read + status + sync_write) * 10 / baud + servos * return_delay_units * 2e-6


def measure(backend: str = "dynamixel") -> dict:
    if backend == "feetech":
        cfgs: list = [feetech_emulator.ServoConfig(servo_id=i, return_delay=RETURN_DELAY, min_angle=1, max_angle=4095)
                      for i in range(1, SERVOS + 1)]
        emulator_cls: type = feetech_emulator.EmulatorProcess
        url, limits = "feetech://{port}?ids=1-{n}&baud={baud}", [(-3.2, 3.2)] * SERVOS
    else:
        cfgs, emulator_cls = [ServoConfig(dxl_id=i, return_delay=RETURN_DELAY) for i in range(1, SERVOS + 1)], \
            EmulatorProcess
        url, limits = "dynamixel://{port}?ids=1-{n}&baud={baud}&period_ms=10", [(-math.pi, math.pi)] * SERVOS
    with emulator_cls(cfgs, baud=BAUD) as emulator, open_device(
            url.format(port=emulator.port, n=SERVOS, baud=BAUD), joint_limits=limits) as dev:
        dev.arm()
        bus, cpu, missed, stopped_by = [], [], 0, ""
        deadline = time.monotonic()
        for k in range(CYCLES):
            deadline += PERIOD_S
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                dev.poll_state()
                dev.write_setpoints(np.full(SERVOS, 0.3 * math.sin(k * PERIOD_S * 2)))
            except MotorError as exc:  # a stalled host trips the 20 ms Bus Watchdog: a result, not a crash
                stopped_by = str(exc)[:160]
                break
            bus.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            slack = deadline - time.monotonic()
            if slack < 0:
                missed += 1
                deadline = time.monotonic()  # overruns are counted and skipped, not replayed
            else:
                time.sleep(slack)
    floor = (wire_floor_feetech_s if backend == "feetech" else wire_floor_s)(SERVOS, BAUD, RETURN_DELAY)
    arr = np.array(bus)
    return {"backend": backend, "p50": float(np.percentile(arr, 50)), "p99": float(np.percentile(arr, 99)), "max": float(arr.max()),
            "floor": floor, "cpu_p50": float(np.percentile(cpu, 50)), "missed": missed, "cycles": len(bus),
            "stopped_by": stopped_by}


def report(r: dict) -> str:
    ms = 1000
    return (f"{r['backend']}:// {SERVOS} servos @ {BAUD} baud, return delay {RETURN_DELAY}, {CYCLES} cycles at 100 Hz "
            f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f})\n"
            f"  bus time per cycle  p50 {r['p50'] * ms:.2f} ms  p99 {r['p99'] * ms:.2f} ms  max {r['max'] * ms:.2f} ms\n"
            f"  wire-time floor     {r['floor'] * ms:.2f} ms  -> ratio p50/floor {r['p50'] / r['floor']:.2f}\n"
            f"  host CPU per cycle  p50 {r['cpu_p50'] * ms:.2f} ms (the vendor SDK busy-polls while it waits)\n"
            f"  missed 10 ms deadlines: {r['missed']} of {r['cycles']} cycles run"
            + (f"\n  STOPPED EARLY: {r['stopped_by']}" if r["stopped_by"] else ""))


def test_cycle_budget() -> None:
    r = measure()
    print("\n" + report(r))
    assert r["p50"] >= r["floor"] * 0.9  # the emulator paces the wire: faster than the floor would be a bug


def test_cycle_budget_feetech() -> None:
    r = measure("feetech")
    print("\n" + report(r))
    assert r["p50"] >= r["floor"] * 0.9


if __name__ == "__main__":
    import sys

    for name in sys.argv[1:] or ["dynamixel", "feetech"]:
        print(report(measure(name)))
