"""The fault campaign (issue 12): every fault, injected into the real host process over a real pty against
the emulator (the C firmware core), repeated; prints the README's table (p99 and max over repetitions).

    .venv/bin/pytest benchmarks/bench_faults.py -s            # EDGE_VLA_FAULT_REPS=5 by default
    .venv/bin/python benchmarks/bench_faults.py --reps 5      # the same, without pytest

Times are on time.monotonic() (one clock for every process): detection -> STOP frame written by the host
(bound: one control period + 1 ms), -> STOP received by the firmware, and STOP (for a dead host: its last
heartbeat + the firmware's timeout) -> torque off, on the firmware's clock (bound: the ramp + one tick for
category 1, one tick for category 0). "moved without arm" must read NEVER in every row.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
from collections import defaultdict

import pytest

from edge_vla.onboard.campaign import Campaign, FaultRow, format_table

REPS = int(os.environ.get("EDGE_VLA_FAULT_REPS", "5"))


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


def test_fault_campaign(benchmark) -> None:
    pytest.importorskip("firmware_bridge.emulator_process")
    out: dict[str, list[FaultRow]] = {}
    benchmark.pedantic(lambda: out.update(run_campaign(REPS)), rounds=1, iterations=1)
    print("\n" + report(out, REPS, 100.0))
    assert not any(r.moved_without_arm for rows in out.values() for r in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=REPS)
    parser.add_argument("--rate-hz", type=float, default=100.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    print(report(run_campaign(args.reps, args.rate_hz), args.reps, args.rate_hz))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
