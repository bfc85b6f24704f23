"""A watchdog drill's ERROR lines say they are expected, in the real command's output.

The drill injects a fault and the control process logs it at ERROR (as it must on a real robot: the loop's
own logging is unchanged). The drill announces each injection first and its summary counts expected and
unexpected trips, so a reader of the output can tell a drill from a failure."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

SAFETY_STOP = re.compile(r" ERROR edge_vla\.onboard\.watchdog\[control\]: SAFETY STOP category (\d)")
ANNOUNCE = re.compile(r"drill stall: .*the ERROR lines that follow are expected")
SUMMARY = re.compile(r"drills: (\d+) injected, (\d+) expected trips? \(their ERROR lines above are expected\), "
                     r"(\d+) missed; (\d+) unexpected trips?")


@pytest.mark.slow  # ~9 s: a 1-episode closed loop, then the stall drill, over the emulator on a pty
def test_stall_drill_announces_its_expected_error_lines() -> None:
    got = subprocess.run([sys.executable, "-m", "edge_vla.onboard.drill", "--duration", "0.5", "--drills", "stall"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    out = got.stdout
    assert got.returncode == 0, out
    lines = out.splitlines()
    announced = [i for i, ln in enumerate(lines) if ANNOUNCE.search(ln)]
    assert len(announced) == 1, out
    stops_before = [ln for ln in lines[:announced[0]] if SAFETY_STOP.search(ln)]  # closed-loop trips: unexpected
    stops_after = [ln for ln in lines[announced[0]:] if SAFETY_STOP.search(ln)]
    # Control: the injected fault really produced the loop's own ERROR line, unchanged, after the announcement.
    assert stops_after and SAFETY_STOP.search(stops_after[0])[1] == "1", out  # type: ignore[index]
    summary = SUMMARY.search(out)
    assert summary is not None, out
    assert summary.groups() == ("1", "1", "0", str(len(stops_before))), (summary[0], out)
    assert "watchdog drills" in out and "stall inference" in out and "corrupt link" not in out, out


def test_a_closed_loop_episode_that_trips_while_homing_ends_and_counts_as_unexpected(emulator) -> None:
    """A trip before the policy takes over (here: the motor controller frozen for 0.4 s while the arm homes)
    left the episode waiting forever for a "running" status that a latched stop never reaches."""
    import os
    import signal
    import threading
    import time

    from onboard_helpers import events, wait_for

    from edge_vla.onboard.drill import SceneHolder, closed_loop, load_source

    holder = SceneHolder()
    source, space, size, cams = load_source(None, holder)

    def freeze_while_homing() -> None:
        wait_for(lambda: events(emulator, "armed"), 30, "the loop to arm")
        time.sleep(0.4)  # homing takes >= 1 s (home_time_s): the stall lands inside it
        os.kill(emulator.proc.pid, signal.SIGSTOP)
        try:
            time.sleep(0.4)  # > the 100 ms link-stale limit
        finally:
            os.kill(emulator.proc.pid, signal.SIGCONT)

    freezer = threading.Thread(target=freeze_while_homing, daemon=True)
    freezer.start()
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(closed_loop(emulator.port, source, holder, space, size,
                                                                       cams, duration_s=0.1, max_episodes=1)),
                              daemon=True)
    runner.start()
    runner.join(45)  # the old code never returned; with the fix it is ~2 s
    freezer.join(5)
    assert not runner.is_alive(), "closed_loop is still waiting for an episode that tripped while homing"
    assert result["unexpected_trips"] == 1 and result["per_episode"][0]["trip"].endswith("link_stale"), result
    assert result["successes"] == 0 and result["all_disarmed"], result
