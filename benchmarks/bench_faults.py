"""The fault campaign (issue 12): every fault, injected into the real host process over a real pty against
the emulator (the C firmware core), repeated; prints the README's table (p99 and max over repetitions).

    .venv/bin/pytest benchmarks/bench_faults.py -s            # EDGE_VLA_FAULT_REPS=5 by default
    .venv/bin/python benchmarks/bench_faults.py --reps 5      # the same, without pytest

Per motor backend (issue 24, edge_vla.onboard.motor_campaign): the real `edge-vla run` as the service user against
the Dynamixel and Feetech emulators, every fault of the issue, the emulator's registers and events as the ground
truth (run as root: the service user, and the unplug's TIOCVHANGUP, need it):

    .venv/bin/python benchmarks/bench_faults.py --backend dynamixel,feetech --reps 3
    .venv/bin/pytest benchmarks/bench_faults.py -s -k motor   # EDGE_VLA_MOTOR_FAULT_REPS=3 by default

Per CAN backend (issue 25, edge_vla.onboard.can_campaign.CanCampaign): the real `edge-vla run` as the service user against the
Damiao and CiA 402 emulators on python-can's udp_multicast bus (no bit timing), every fault of the issue (host
kill -9, SIGTERM, the CAN bus down, stalled inference, a blocked joint, a device fault, frames from a foreign node
id, a restart after the kill):

    .venv/bin/python benchmarks/bench_faults.py --backend damiao,cia402 --reps 3

Times are on time.monotonic() (one clock for every process): detection -> STOP frame written by the host
(bound: one control period + 1 ms), -> STOP received by the firmware, and STOP (for a dead host: its last
heartbeat + the firmware's timeout) -> torque off, on the firmware's clock (bound: the ramp + one tick for
category 1, one tick for category 0). "moved without arm" must read NEVER in every row.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

from edge_vla.onboard.campaign import Campaign, FaultRow, format_table
from edge_vla.onboard.motor_campaign import (
    ALL_SCHEMES,
    CAN_SCHEMES,
    SCHEMES,
    MotorFaultRow,
    ServiceUser,
    format_motor_table,
    motor_campaign,
)
from firmware_bridge.motors.dynamixel import watchdog_units

REPS = int(os.environ.get("EDGE_VLA_FAULT_REPS", "5"))
MOTOR_REPS = int(os.environ.get("EDGE_VLA_MOTOR_FAULT_REPS", "3"))
BACKENDS = ("own", *ALL_SCHEMES)  # own: the project's firmware protocol (issue 12's campaign)
EXTRAS = {"dynamixel": "dynamixel_sdk", "feetech": "scservo_sdk", "cia402": "canopen"}  # what each backend imports


def run_campaign(reps: int, rate_hz: float = 100.0) -> dict[str, list[FaultRow]]:
    by_fault: dict[str, list[FaultRow]] = defaultdict(list)
    for _ in range(reps):
        with Campaign(rate_hz=rate_hz, log_level=logging.ERROR) as campaign:
            for row in campaign.run_all():
                by_fault[row.fault].append(row)
    return dict(by_fault)


def report(by_fault: dict[str, list[FaultRow]], reps: int, rate_hz: float) -> str:
    load = os.getloadavg()[0]
    head = (f"fault campaign: {reps} repetitions at {rate_hz:.0f} Hz, firmware heartbeat timeout 300 ms, ramp 200 ms, "
            f"tick 1 ms; control loop and emulator SCHED_FIFO where permitted; {platform.machine()} x{os.cpu_count()}, "
            f"load {load:.1f} (shared machine)")
    out_of_bounds = sum(not r.within_bounds for rows in by_fault.values() for r in rows)
    moved = sum(r.moved_without_arm for rows in by_fault.values() for r in rows)
    return "\n".join([head, format_table(by_fault),
                      f"rows outside their bound: {out_of_bounds}; motion without an operator arm: {moved}"])


def service_user() -> ServiceUser:
    """The robot's service user (uid 65534) as the onboard tests run it (tests/onboard/onboard_helpers.py), or
    this user where it cannot be used."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "onboard"))
    from onboard_helpers import SERVICE_GID, robot_users, service_run_dir

    users = robot_users()
    return ServiceUser(users.service, users.python, users.environ(), SERVICE_GID if users.service else None,
                       service_run_dir)


MotorRows = dict[tuple[str, str], list[MotorFaultRow]]


def run_motor_campaign(backends: list[str], reps: int, rate_hz: float = 50.0, period_ms: int = 50,
                       bundle: str | None = None) -> tuple[MotorRows, list[dict], list[float]]:
    """Every motor row, `reps` times per backend (with `bundle`: also a device error and kill -9 with that policy
    driving, once per repetition): rows by (backend, fault), the spontaneous trips before a fault (re-armed and
    retried), and the 1-minute load average before and after each repetition."""
    user = service_user()
    by_fault: MotorRows = defaultdict(list)
    spurious: list[dict] = []
    loads = [os.getloadavg()[0]]
    for _ in range(reps):
        for backend in backends:
            with motor_campaign(backend, user, rate_hz=rate_hz, period_ms=period_ms) as campaign:
                for row in campaign.run_all():
                    by_fault[(row.backend, row.fault)].append(row)
                spurious += campaign.spurious_trips
            if bundle:
                with motor_campaign(backend, user, rate_hz=rate_hz, period_ms=period_ms, bundle=bundle) as campaign:
                    for row in campaign.run_bundle():
                        by_fault[(row.backend, row.fault)].append(row)
                    spurious += campaign.spurious_trips
            loads.append(os.getloadavg()[0])
    return dict(by_fault), spurious, loads


def motor_report(by_fault: MotorRows, spurious: list[dict], loads: list[float], reps: int, rate_hz: float,
                 period_ms: int, seconds: float) -> str:
    rows = [r for rs in by_fault.values() for r in rs]
    backends = {backend for backend, _ in by_fault}
    buses = []
    if backends & set(SCHEMES):
        buses.append(f"servo buses: 2 servos on a pty paced at 1 Mbaud (Dynamixel Bus Watchdog "
                     f"{watchdog_units(period_ms / 1e3) * 20} ms)")
    if backends & set(CAN_SCHEMES):
        buses.append(f"CAN: 2 motors/drives on python-can's udp_multicast bus between processes, no bit timing "
                     f"(Damiao TIMEOUT and CiA 402 heartbeat consumer {2 * period_ms} ms)")
    head = (f"motor fault campaign: {reps} repetitions per backend at {rate_hz:g} Hz; {'; '.join(buses)}; "
            f"`edge-vla run --expert` as the service user, no SCHED_FIFO for its control loop; emulator SCHED_FIFO "
            f"where permitted; URL period_ms={period_ms}; {platform.machine()} x{os.cpu_count()}, load average "
            f"{min(loads):.1f}-{max(loads):.1f} (shared machine); {seconds:.0f} s")
    details = []
    for (backend, fault), rs in by_fault.items():
        hosts = sorted({r.host for r in rs if r.host})
        details.append(f"- {backend}, {fault}: {rs[0].notes}" + (f"; host: {' | '.join(hosts)}" if hosts else "")
                       + (f"; control: {rs[0].control}" if rs[0].control_ok is not None else ""))
    counts = (f"rows outside their bound: {sum(not r.within_bounds for r in rows)}; motion without an operator arm: "
              f"{sum(r.moved_without_arm for r in rows)}; residual-risk rows (no device watchdog): "
              f"{sum(r.residual_risk for r in rows)}; FAIL rows: {sum(r.verdict.startswith('FAIL') for r in rows)}; "
              f"spontaneous trips before a fault (re-armed): {len(spurious)}")
    return "\n".join([head, format_motor_table(by_fault), counts, "details (first repetition):", *details])


def installed_backends() -> list[str]:
    """The motor backends whose extra is installed here."""
    return [s for s in ALL_SCHEMES if s not in EXTRAS or importlib.util.find_spec(EXTRAS[s]) is not None]


def test_motor_fault_campaign(benchmark) -> None:
    backends = installed_backends()
    if not backends:
        pytest.skip("no motor backend's extra is installed")
    out: list = []
    t0 = time.monotonic()
    benchmark.pedantic(lambda: out.append(run_motor_campaign(backends, MOTOR_REPS)), rounds=1, iterations=1)
    by_fault, spurious, loads = out[0]
    print("\n" + motor_report(by_fault, spurious, loads, MOTOR_REPS, 50.0, 50, time.monotonic() - t0))
    assert not any(r.moved_without_arm for rows in by_fault.values() for r in rows)


def test_fault_campaign(benchmark) -> None:
    pytest.importorskip("firmware_bridge.emulator_process")
    out: dict[str, list[FaultRow]] = {}
    benchmark.pedantic(lambda: out.update(run_campaign(REPS)), rounds=1, iterations=1)
    print("\n" + report(out, REPS, 100.0))
    assert not any(r.moved_without_arm for rows in out.values() for r in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, help=f"repetitions (default {REPS} own protocol, {MOTOR_REPS} motors)")
    parser.add_argument("--rate-hz", type=float, help="control rate (default: 100 Hz own protocol, 50 Hz motors)")
    parser.add_argument("--backend", default="own",
                        help=f"comma-separated: {', '.join(BACKENDS)} (default own: the firmware-protocol campaign)")
    parser.add_argument("--bundle", help="motor backends: also run a device error and kill -9 with this bundle's "
                                         "policy driving (default: the sim expert only)")
    parser.add_argument("--period-ms", type=int, default=50,
                        help="motor backends: the period the device watchdog (Dynamixel Bus Watchdog, Damiao "
                             "TIMEOUT, CiA 402 heartbeat consumer) is sized for, 2 x this (default %(default)s ms)")
    args = parser.parse_args()
    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        parser.error(f"--backend {args.backend!r}: unknown {', '.join(unknown) or 'empty'}; use a comma-separated "
                     f"list of {', '.join(BACKENDS)}")
    missing = [b for b in backends if b in EXTRAS and b not in installed_backends()]
    if missing:
        parser.error(f"--backend {', '.join(missing)}: not installed here; pip install "
                     + " ".join(f"'edge-vla[{b}]'" for b in missing))
    logging.basicConfig(level=logging.ERROR)
    if "own" in backends:
        rate, reps = args.rate_hz or 100.0, args.reps or REPS
        print(report(run_campaign(reps, rate), reps, rate))
    motors = [b for b in backends if b != "own"]
    if motors:
        rate, reps, t0 = args.rate_hz or 50.0, args.reps or MOTOR_REPS, time.monotonic()
        by_fault, spurious, loads = run_motor_campaign(motors, reps, rate, args.period_ms, args.bundle)
        print(motor_report(by_fault, spurious, loads, reps, rate, args.period_ms, time.monotonic() - t0))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
