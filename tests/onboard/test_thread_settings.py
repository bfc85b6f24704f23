"""Thread settings of `edge-vla run` (issue 28): the control loop on a CPU of its own, inference (the worker thread,
its onnxruntime intra-op threads, every other thread of the main process) on the others, as the service user.

Probed from outside the run: Cpus_allowed_list in /proc/PID/task/TID/status, for the control process (its loop
thread is its main thread) and for every thread of the run's main process; the worker is the thread named
edge-vla-worker; the loop's scheduling policy from sched_getscheduler. Each probe has a control case: `--cpus none
--inference-cpus none` (nothing pinned), the service user without CAP_SYS_NICE (SCHED_FIFO not granted). Every run
starts at once in a module fixture: each takes seconds to come up, mostly interpreter imports.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
from onboard_helpers import robot_users, wait_for

from edge_vla.errors import ConfigError
from edge_vla.onboard.rt import ThreadPlan, fifo_permitted, plan_threads, resolve_fifo

TWO_CPUS = len(os.sched_getaffinity(0)) >= 2
needs_two = pytest.mark.skipif(not TWO_CPUS, reason="the split needs a machine with 2 or more CPUs")


def _cpulist(cpus: set[int]) -> str:
    """The kernel's Cpus_allowed_list spelling of a set (ranges: 0-1, 0,2-3)."""
    out, run = [], []
    for c in sorted(cpus):
        if run and c == run[-1] + 1:
            run.append(c)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else f"{run[0]}")
        run = [c]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else f"{run[0]}")
    return ",".join(out)


def _allowed(pid: int, tid: int | None = None) -> str:
    status = Path(f"/proc/{pid}/task/{tid or pid}/status").read_text()
    return next(line.split(":", 1)[1].strip() for line in status.splitlines() if line.startswith("Cpus_allowed_list"))


def _threads(pid: int) -> dict[int, tuple[str, str]]:
    """tid -> (name, Cpus_allowed_list) for every thread of `pid`."""
    out = {}
    for tid in map(int, os.listdir(f"/proc/{pid}/task")):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, StopIteration):  # ended meanwhile
            out[tid] = (Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip(), _allowed(pid, tid))
    return out


class Run:
    """`edge-vla run --expert --emulate` as the service user, its stderr collected line by line."""

    def __init__(self, *extra: str, outside: tuple[str, ...] = (), caps: tuple[str, ...] = ()) -> None:
        """`outside`: a command run around the privilege drop, as root (taskset -c 0); `caps`: setpriv options
        that keep capabilities through it (as a unit's AmbientCapabilities= does)."""
        users = robot_users()
        cmd = [*outside, *users.edge_vla((*users.service, *caps), "run", "--expert", "--emulate", "--duration", "60",
                                         "--control-socket", "none", *extra)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=users.environ(), cwd="/")
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def line(self, pattern: str, timeout: float = 30.0) -> str:
        def found() -> str | None:
            if self.proc.poll() is not None and not self._reader.is_alive():
                raise AssertionError(f"the run exited ({self.proc.returncode}) before logging {pattern!r}:\n"
                                     + "\n".join(self.lines))
            return next((ln for ln in self.lines if re.search(pattern, ln)), None)

        return wait_for(found, timeout, f"a log line matching {pattern!r}")

    def up(self) -> tuple[str, int, int]:
        """(the threads line, the control process's pid, the worker's tid), once the loop is up."""
        threads = self.line(r"threads: ")
        self.line(r"control loop up")  # the control process logs this after applying its own settings
        loop_pid = int(re.search(r"control loop \(pid (\d+)\)", threads).group(1))  # type: ignore[union-attr]
        worker = int(re.search(r"worker tid (\d+)", threads).group(1))  # type: ignore[union-attr]
        return threads, loop_pid, worker

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)


AVAILABLE = os.sched_getaffinity(0)
EVERYTHING = _cpulist(AVAILABLE)
OUTSIDE_MASK = max(AVAILABLE) + 1  # a CPU this process may not use
# SCHED_FIFO granted to the service user as a unit grants it with AmbientCapabilities=CAP_SYS_NICE (LimitRTPRIO=95
# is the other way; raising an rlimit's hard limit needs CAP_SYS_RESOURCE, which a container's root may lack).
SYS_NICE = ("--inh-caps=+sys_nice", "--ambient-caps=+sys_nice")


def _fleet_spec() -> dict[str, dict]:
    """Every run the tests probe; started together (each takes seconds to come up, mostly imports)."""
    spec: dict[str, dict] = {"default": {}, "unpinned": {"extra": ("--cpus", "none", "--inference-cpus", "none")},
                             "one_cpu": {"outside": ("taskset", "-c", str(min(AVAILABLE)))}}
    if os.geteuid() == 0:  # SCHED_FIFO granted, and the flags overriding every default even where it is
        spec["fifo"] = {"caps": SYS_NICE}
        spec["override"] = {"extra": ("--cpus", str(min(AVAILABLE)), "--inference-cpus", str(max(AVAILABLE)),
                                      "--rt-priority", "none"), "caps": SYS_NICE}
    return spec


def _service_python(code: str, outside: tuple[str, ...] = ()) -> subprocess.Popen[str]:
    users = robot_users()
    return subprocess.Popen([*outside, *users.service, users.python, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=users.environ(), cwd="/")


@pytest.fixture(scope="module")
def fleet():
    robot_users()  # skips here, before anything starts, where no interpreter is usable by the service user
    started: dict[str, Any] = {}
    try:
        for name, kw in _fleet_spec().items():
            started[name] = Run(*kw.get("extra", ()), outside=kw.get("outside", ()), caps=kw.get("caps", ()))
        started["ort_probe"] = _service_python(ORT_PROBE)
        refusal = ("from edge_vla.cli import main; raise SystemExit(main(['run', '--expert', '--emulate', '--cpus', "
                   f"'{OUTSIDE_MASK}', '--control-socket', 'none', '--duration', '1']))")  # not refused: ends anyway
        started["refused"] = _service_python(refusal, outside=("taskset", "-c", str(min(AVAILABLE))))
        yield started
    finally:
        runs = [r for r in started.values() if isinstance(r, Run)]
        for run in runs:  # all at once: each makes a controlled stop
            if run.proc.poll() is None:
                run.proc.send_signal(signal.SIGINT)
        for run in runs:
            run.stop()
        for proc in started.values():
            if isinstance(proc, subprocess.Popen):
                if proc.poll() is None:
                    proc.kill()
                proc.wait(timeout=30)  # not communicate(): a child it left may hold its pipes open


def _probe(run: Run) -> tuple[str, str, str, dict[int, tuple[str, str]], int]:
    """(threads line, the loop's CPUs, the worker's CPUs, every main-process thread, the loop's pid) of a run."""
    line, loop_pid, worker = run.up()
    threads = _threads(run.proc.pid)
    assert threads[worker][0] == "edge-vla-worker", threads  # the tid the line names is the worker
    return line, _allowed(loop_pid), threads[worker][1], threads, loop_pid


@needs_two
def test_defaults_split_the_loop_from_inference_as_the_service_user(fleet) -> None:
    """Defaults: the loop on the last CPU, the worker and every other thread of the main process on the rest
    (one line says so); control: --cpus none --inference-cpus none leaves every thread on every CPU."""
    loop_cpu = max(AVAILABLE)
    rest = _cpulist(AVAILABLE - {loop_cpu})
    line, loop, worker, threads, _ = _probe(fleet["default"])
    assert loop == str(loop_cpu), line
    assert worker == rest, line
    assert {cpus for _, cpus in threads.values()} == {rest}, threads  # numpy's BLAS pool, the emulator's reader...
    assert f"on CPU {loop_cpu}" in line and f"on CPU {rest}" in line, line
    assert sum("threads: " in ln for ln in fleet["default"].lines) == 1, fleet["default"].lines

    line, loop, worker, threads, _ = _probe(fleet["unpinned"])
    assert loop == EVERYTHING and worker == EVERYTHING, line
    assert {cpus for _, cpus in threads.values()} == {EVERYTHING}, threads
    assert "not pinned" in line, line


@needs_two
@pytest.mark.skipif(os.geteuid() != 0, reason="granting CAP_SYS_NICE to the service user needs root")
def test_the_flags_override_the_defaults(fleet) -> None:
    """--cpus and --inference-cpus put the loop and inference where they say (here: swapped), and --rt-priority none
    keeps SCHED_OTHER where SCHED_FIFO is permitted (the fifo run: the same permission, the default)."""
    first, last = min(AVAILABLE), max(AVAILABLE)
    line, loop, worker, threads, loop_pid = _probe(fleet["override"])
    assert loop == str(first) and worker == str(last), line
    assert {cpus for _, cpus in threads.values()} == {str(last)}, threads
    assert _policy(loop_pid) == (os.SCHED_OTHER, 0), line
    assert "SCHED_OTHER" in line and "--rt-priority none" in line, line


@pytest.mark.skipif(shutil.which("taskset") is None, reason="taskset (util-linux) is not installed")
def test_one_cpu_degrades_with_one_clear_line(fleet) -> None:
    """Under `taskset -c 0` (one CPU allowed) the run starts unpinned and says why in one line, a warning; an
    explicit --cpus naming a CPU it may not use is refused before anything loads."""
    run = fleet["one_cpu"]
    cpu = str(min(AVAILABLE))
    line, loop, worker, _, _ = _probe(run)
    assert loop == cpu and worker == cpu, line
    assert "1 CPU" in line and "share" in line and "WARNING" in line, line
    assert sum("threads: " in ln for ln in run.lines) == 1, run.lines

    refused = fleet["refused"]  # `edge-vla run --expert --emulate --cpus N` under taskset, N outside the mask
    _, err = refused.communicate(timeout=60)
    assert refused.returncode == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "--cpus" in lines[0] and f"CPU {OUTSIDE_MASK} is not available" in lines[0], err


def _policy(pid: int) -> tuple[int, int]:
    return os.sched_getscheduler(pid), os.sched_getparam(pid).sched_priority


@pytest.mark.skipif(os.geteuid() != 0, reason="granting CAP_SYS_NICE to the service user needs root")
def test_sched_fifo_by_default_where_permitted(fleet) -> None:
    """The loop asks for SCHED_FIFO 50 by default: granted where the service user may (CAP_SYS_NICE; read back from
    the kernel); without it (the control case: no capability, rtprio limit 0) it runs SCHED_OTHER and the line says
    why and how to grant it, with no warning (--rt-priority none where permitted: the override test)."""
    line, _, _, _, loop_pid = _probe(fleet["fifo"])
    assert _policy(loop_pid) == (os.SCHED_FIFO, 50), line
    assert "SCHED_FIFO priority 50" in line, line

    line, _, _, _, loop_pid = _probe(fleet["default"])
    assert _policy(loop_pid) == (os.SCHED_OTHER, 0), line
    assert "SCHED_OTHER" in line and "not permitted" in line and "LimitRTPRIO" in line, line
    assert not any("not permitted (" in ln for ln in fleet["default"].lines), fleet["default"].lines  # no warning



ORT_PROBE = textwrap.dedent("""
    import json, os
    import numpy as np, onnxruntime as ort
    from onnx import TensorProto, helper
    from edge_vla.onboard.rt import pin_threads

    def cpus():
        out = {}
        for tid in os.listdir("/proc/self/task"):
            status = open(f"/proc/self/task/{tid}/status").read()
            out[tid] = next(l.split(":")[1].strip() for l in status.splitlines() if l.startswith("Cpus_allowed_list"))
        return out

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [32, 32])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [32, 32])
    w = helper.make_tensor("w", TensorProto.FLOAT, [32, 32], np.ones(32 * 32, np.float32))
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    before = set(cpus())
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2  # as the backend sets it: a pool of 1 thread besides the caller
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    pool = sorted(set(cpus()) - before)
    unpinned = cpus()
    pin_threads({min(os.sched_getaffinity(0))})
    sess.run(None, {"x": np.ones((32, 32), np.float32)})
    print(json.dumps({"pool": pool, "unpinned": unpinned, "pinned": cpus()}))
""")


@needs_two
def test_onnxruntime_threads_made_before_the_pinning_follow_it(fleet) -> None:
    """onnxruntime's intra-op pool threads are created with the session (in the main thread, before the worker
    exists), on the creating thread's CPUs: pin_threads moves them too. Control: before it, they are on all."""
    out, err = fleet["ort_probe"].communicate(timeout=60)
    assert fleet["ort_probe"].returncode == 0, err
    probe = json.loads(out)
    assert probe["pool"], probe  # the session made threads
    assert all(probe["unpinned"][t] == EVERYTHING for t in probe["pool"]), probe
    assert set(probe["pinned"].values()) == {str(min(AVAILABLE))}, probe


def test_fifo_default_resolution() -> None:
    """auto: SCHED_FIFO 50 where permitted, never for servo links (their SDK busy-polls the tty); a number is
    asked for as given; none never; anything else refused in one line."""
    assert resolve_fifo("auto", motor=False, permitted=lambda p: None)[0] == 50
    prio, why = resolve_fifo("auto", motor=True, permitted=lambda p: None)
    assert prio is None and "busy-polls" in why
    prio, why = resolve_fifo("auto", motor=False, permitted=lambda p: "RLIMIT_RTPRIO 0 and no CAP_SYS_NICE")
    assert prio is None and "RLIMIT_RTPRIO 0" in why and "LimitRTPRIO" in why
    assert resolve_fifo("70", motor=False, permitted=lambda p: "no")[0] == 70
    assert resolve_fifo("none", motor=False, permitted=lambda p: None)[0] is None
    assert fifo_permitted(50, rtprio_limit=95, cap_eff=0) is None  # LimitRTPRIO=95
    assert fifo_permitted(50, rtprio_limit=0, cap_eff=1 << 23) is None  # CAP_SYS_NICE
    why = fifo_permitted(50, rtprio_limit=10, cap_eff=0)
    assert why is not None and "RLIMIT_RTPRIO 10" in why and "CAP_SYS_NICE" in why
    for bad in ("0", "100", "high", ""):
        with pytest.raises(ConfigError, match="--rt-priority") as err:
            resolve_fifo(bad, motor=False, permitted=lambda p: None)
        assert "\n" not in str(err.value)


# -- the plan itself (no processes) ---------------------------------------------------------------------------

def _no_siblings(cpu: int) -> set[int]:
    return {cpu}


def test_plan_defaults_by_cpu_count() -> None:
    two = plan_threads(available={0, 1}, siblings=_no_siblings)
    assert (two.loop_cpus, two.inference_cpus, two.inference_threads) == ((1,), (0,), 1)
    four = plan_threads(available={0, 1, 2, 3}, siblings=_no_siblings)
    assert (four.loop_cpus, four.inference_cpus, four.inference_threads) == ((3,), (0, 1, 2), 3)
    one = plan_threads(available={2}, siblings=_no_siblings)
    assert (one.loop_cpus, one.inference_cpus, one.inference_threads) == (None, None, 1)
    assert "1 CPU" in one.note


def test_plan_leaves_the_loops_hyperthread_sibling_idle() -> None:
    """With SMT, inference on the loop core's other hardware thread would share its execution units."""
    smt = {0: {0, 2}, 2: {0, 2}, 1: {1, 3}, 3: {1, 3}}
    plan = plan_threads(available={0, 1, 2, 3}, siblings=lambda c: smt[c])
    assert plan.loop_cpus == (3,) and plan.inference_cpus == (0, 2) and plan.inference_threads == 2
    # two hardware threads of one core: no other core, so inference keeps the sibling rather than nothing
    tight = plan_threads(available={0, 2}, siblings=lambda c: smt[c])
    assert tight.loop_cpus == (2,) and tight.inference_cpus == (0,)


def test_plan_overrides_and_refusals() -> None:
    plan = plan_threads("0", "1-3", available={0, 1, 2, 3}, siblings=_no_siblings)
    assert (plan.loop_cpus, plan.inference_cpus, plan.inference_threads) == ((0,), (1, 2, 3), 3)
    none = plan_threads("none", "none", available={0, 1}, siblings=_no_siblings)
    assert (none.loop_cpus, none.inference_cpus, none.inference_threads) == (None, None, 2)
    for flag_values, words in [(("5", "auto"), ("--cpus", "CPU 5", "0-1")),
                               (("auto", "0,7"), ("--inference-cpus", "CPU 7")),
                               (("x", "auto"), ("--cpus", "'x'")),
                               (("1-0", "auto"), ("--cpus", "'1-0'")),
                               (("", "auto"), ("--cpus",))]:
        with pytest.raises(ConfigError) as err:
            plan_threads(*flag_values, available={0, 1}, siblings=_no_siblings)
        msg = str(err.value)
        assert "\n" not in msg and all(w in msg for w in words), msg
    assert isinstance(plan, ThreadPlan)

