"""Log hygiene of real (tiny) runs of `edge-vla train`, `export` and `compare`, in a pipe and on a terminal.

- In a pipe (a log file, CI) progress is a line every 5 % with rate and time left, not a tqdm redraw per step
  (~113 bytes a step: 450 KB for a 4,000-step training).
- On a terminal (a real pty) it is tqdm's bar, with log lines written above it instead of glued to it.
- (`--quiet` after the subcommand: test_logging_cli.py shows it sets WARNING, test_logging_progress.py that
  WARNING hides the bar and the lines on a pty; a third training run here would cost ~5 s more.)
- Nothing is said twice: the training step summary, the numerics line, the row label in `compare`.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("tqdm")
pytestmark = pytest.mark.slow  # ~25 s together: a training, an export and a compare through the real CLI

EDGE_VLA = [sys.executable, "-m", "edge_vla.cli"]
PROGRESS_LINE = re.compile(r"INFO edge_vla\.progress: train tiny: (\d+)/(\d+) step \((\d+)%\), .* (left|done in \S+)")


def _piped(*argv: str, cwd: Path) -> str:
    """stdout and stderr together, as `cmd > log 2>&1` would write them."""
    got = subprocess.run([*EDGE_VLA, *argv], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         timeout=120)
    text = got.stdout.decode()
    assert got.returncode == 0, text
    return text


def _on_a_terminal(*argv: str, cwd: Path, timeout: float = 120) -> str:
    """Run with stdout and stderr on a real pty (120 columns) and return everything it wrote."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen([*EDGE_VLA, *argv], cwd=cwd, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
                            close_fds=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed its side
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        assert proc.wait(timeout=max(1.0, deadline - time.monotonic())) == 0, b"".join(chunks).decode(errors="replace")
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    return b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")  # the tty turns each \n into \r\n


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("logs")
    _piped("make-data", "-o", "d.npz", "--episodes", "6", cwd=d)
    return d


@pytest.fixture(scope="module")
def piped_training(workdir) -> str:
    return _piped("train", "--data", "d.npz", "-o", "ck", "--train-steps", "40", "--checkpoint-every", "20",
                  "--batch-size", "8", "--threads", "1", cwd=workdir)


def test_training_in_a_pipe_logs_a_line_every_5_percent(piped_training) -> None:
    assert "\r" not in piped_training and "█" not in piped_training, piped_training[:2000]
    lines = [m for m in map(PROGRESS_LINE.search, piped_training.splitlines()) if m]
    # 40 steps: a line at every 2 steps (5 %), the last one saying how long it took.
    assert [int(m[1]) for m in lines] == list(range(2, 41, 2)), piped_training
    assert lines[-1][3] == "100" and lines[-1][4].startswith("done in"), lines[-1][0]
    assert all(m[4] == "left" for m in lines[:-1])
    assert "loss " in lines[-1].string  # the running loss rides along, as in the bar's postfix
    # Progress costs at most ~200 bytes per 5 %, whatever the step count (4,000 steps: ~4 KB, not 450 KB).
    progress_bytes = sum(len(line) + 1 for line in piped_training.splitlines() if "edge_vla.progress" in line)
    assert progress_bytes <= 21 * 200, progress_bytes


def test_training_step_summary_is_said_once(piped_training) -> None:
    for step in (20, 40):
        said = [ln for ln in piped_training.splitlines() if f"step {step}: train loss" in ln]
        assert len(said) == 1, said


def test_training_on_a_terminal_draws_the_bar_with_log_lines_above_it(workdir) -> None:
    out = _on_a_terminal("train", "--data", "d.npz", "-o", "ck_tty", "--train-steps", "20", "--checkpoint-every", "10",
                         "--batch-size", "8", "--threads", "1", cwd=workdir)
    assert "\r" in out and re.search(r"train tiny: +\d+%\|", out) and "step/s" in out, out  # tqdm's bar
    assert "edge_vla.progress" not in out, out  # no progress log lines where the bar is drawn
    for step in (10, 20):
        starts = [m.start() for m in re.finditer(rf"\S+ \S+ INFO edge_vla\.export\.train: step {step}: train loss", out)]
        assert len(starts) == 1, (step, out)
        # tqdm.write clears the bar first: the line starts at the left margin, not glued after "…step/s]".
        assert out[starts[0] - 1] in "\r\n", repr(out[max(0, starts[0] - 80):starts[0] + 40])


def test_export_says_the_numerics_line_once(workdir, piped_training) -> None:
    out = _piped("export", "ck", "-o", "bundle", cwd=workdir)
    said = [ln for ln in out.splitlines() if "numerics fp32:" in ln]
    assert len(said) == 1, out


def test_compare_says_each_row_label_once(workdir, piped_training) -> None:
    out = _piped("compare", "--teacher", "ck", "--student", "ck", "--episodes", "1", "--error-obs", "8",
                 "--threads", "1", cwd=workdir)
    logged = [ln for ln in out.splitlines() if " INFO edge_vla.export.compare_cli: " in ln]
    assert len(logged) == 3, out
    table = out[out.index("| model |"):]
    for line in logged:
        said = line.split(" INFO edge_vla.export.compare_cli: ", 1)[1]
        label = re.match(r"(.+?): success ", said)
        assert label is not None and f"| {label[1]} |" in table, line  # the row's name, as in the table
        assert said.count(label[1]) == 1, line  # ... and only once ("teacher …: teacher …: success" before)
