"""Smaller first-hour defects, through the real CLI: export checks its output before any work, evaluate shows
progress, make-data says what --episodes counts, build-engines says what it did and fails when it built nothing,
emulate takes its joint count from a bundle, and a killed `run --emulate` leaves no emulator behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_vla.action_space import sim_action_space
from edge_vla.bundle import write_bundle
from edge_vla.config import preset

REPO = Path(__file__).resolve().parents[2]
EDGE_VLA = [sys.executable, "-m", "edge_vla.cli"]
SHIPPED = REPO / "export" / "assets" / "tiny-reach"


def run(*args: str, timeout: float = 120, cwd: Path | str = "/") -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([*EDGE_VLA, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


def small_bundle(out: Path) -> Path:
    """A hashed bundle with the sim's 2-joint action space and one graph with inputs (enough for trtexec lines)."""
    manifest = {
        "model": preset("tiny").to_dict(), "precision": "fp32",
        "graphs": {"prefix": {"file": "graphs/prefix.onnx", "role": "prefix",
                              "inputs": [{"name": "image", "shape": [1, 3, 64, 64], "dtype": "float32"}],
                              "outputs": [{"name": "kv", "shape": [1, 8], "dtype": "float32"}]}},
        "normalization": {"state_mean": [0.0, 0.0], "state_std": [1.0, 1.0]},
        "action_space": sim_action_space().to_dict(), "sampler": {"solver": "euler", "num_steps": 2},
        "tokenizer": {"kind": "bytes"}, "provenance": {"edge_vla": "0.1.0"},
    }
    return write_bundle(out, manifest, {"graphs/prefix.onnx": b"not onnx\n"})


def test_export_into_an_existing_folder_is_refused_before_any_work(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    # A checkpoint that does not exist: the output check must come first (the old code loaded, then exported).
    proc = run("export", str(tmp_path / "no-checkpoint"), "-o", str(out))
    assert proc.returncode == 1 and "already exists" in proc.stderr and "--overwrite" in proc.stderr, proc.stderr
    assert (out / "keep.txt").read_text() == "mine"
    # control: with --overwrite the same command goes on to the (missing) checkpoint
    proc = run("export", str(tmp_path / "no-checkpoint"), "-o", str(out), "--overwrite")
    assert proc.returncode == 1 and "already exists" not in proc.stderr


def test_evaluate_logs_progress_about_every_tenth_of_the_episodes() -> None:
    proc = run("evaluate", "expert", "--episodes", "10")
    assert proc.returncode == 0, proc.stderr
    progress = re.findall(r"expert: episode (\d+)/10", proc.stderr)
    assert len(progress) >= 5 and progress[-1] == "10", proc.stderr


def test_make_data_says_episodes_counts_layouts_and_how_many_demonstrations_it_wrote(tmp_path: Path) -> None:
    assert "layout" in run("make-data", "--help").stdout
    proc = run("make-data", "-o", str(tmp_path / "d.npz"), "--episodes", "1", "--image-size", "16")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"1 layout\(s\) x \d+ blocks = \d+ demonstrations", proc.stdout), proc.stdout


@pytest.mark.skipif(__import__("importlib").util.find_spec("tensorrt") is not None, reason="TensorRT is installed")
def test_build_engines_without_tensorrt_fails_unless_only_the_trtexec_lines_were_asked_for(tmp_path: Path) -> None:
    bundle = small_bundle(tmp_path / "b")
    proc = run("build-engines", str(bundle))
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 1 and len(lines) == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "no engines built" in lines[0] and "build_engines.sh" in lines[0] and "--script-only" in lines[0]
    script = bundle / "target" / "build_engines.sh"
    assert "trtexec" in script.read_text()
    script.unlink()
    asked = run("build-engines", str(bundle), "--script-only")
    assert asked.returncode == 0 and "no engines built" not in asked.stderr, asked.stderr
    assert "trtexec" in script.read_text() and str(script) in asked.stdout


def test_emulate_takes_the_joint_count_from_a_bundle(tmp_path: Path) -> None:
    bundle = small_bundle(tmp_path / "b")
    given = run("-v", "emulate", str(bundle), "--duration", "0.3")
    assert given.returncode == 0, given.stderr
    assert "emulating 2 joints" in given.stderr
    control = run("-v", "emulate", "--duration", "0.3")
    assert "emulating 7 joints" in control.stderr
    clash = run("emulate", str(bundle), "--joints", "3", "--duration", "0.3")
    assert clash.returncode == 1 and "2 joints" in clash.stderr


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_kill_9_of_run_emulate_takes_its_emulator_with_it() -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("EDGE_VLA_CONTROL_SOCKET", None)
    proc = subprocess.Popen([*EDGE_VLA, "run", "--expert", "--emulate", "--control-socket", "none", "--duration", "60"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd="/")
    try:
        deadline = time.monotonic() + 40
        emulator: list[int] = []
        while time.monotonic() < deadline and not emulator and proc.poll() is None:
            emulator = [c for c in _children(proc.pid) if "firmware_bridge.emulator" in _cmdline(c)]
            time.sleep(0.05)
        assert emulator, "run --emulate started no emulator"
        # Kill only once the emulator serves the loop (its events file fills): earlier, its own startup line to the
        # dead parent's pipe would end it, and the test could not tell that from a parent-death signal.
        events = Path(re.search(r"--events (\S+)", _cmdline(emulator[0])).group(1))
        while time.monotonic() < deadline and not (events.is_file() and events.stat().st_size > 0):
            time.sleep(0.05)
        assert events.stat().st_size > 0, "the emulator never served the loop"
        children = _children(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(emulator[0]):
            time.sleep(0.05)
        assert not _alive(emulator[0]), f"emulator {emulator[0]} outlived its parent"
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in locals().get("children", []):  # the test's own leftovers, whatever the outcome
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
