"""edge_vla.progress: a tqdm bar on a terminal, a log line every 5 % elsewhere, and importable without tqdm
(robot installs have none). Each case runs a fresh interpreter with its stderr on a pipe or a real pty."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios

import pytest

# 200 items with the logging set up as `edge-vla` sets it; a log line in the middle, as a checkpoint would write.
LOOP = """
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
from edge_vla.progress import progress
bar = progress(range(200), desc="work", unit="item")
for i in bar:
    if i == 99:
        logging.getLogger("edge_vla.x").info("halfway note")
        bar.set_postfix(loss=0.5)
print("MODE", "bar" if bar.drawing_bar else "lines", "tqdm imported" if sys.modules.get("tqdm") else "no tqdm")
"""
NO_TQDM = "import sys; sys.modules['tqdm'] = None\n"  # `import tqdm` raises ImportError, as on a robot


def _run(code: str, terminal: bool) -> str:
    if not terminal:
        got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert got.returncode == 0, got.stderr
        return got.stdout + got.stderr
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a 120-column terminal
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=slave, stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    out = b""
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO once the child has exited and closed its side
            break
        if not data:
            break
        out += data
    os.close(master)
    assert proc.wait(timeout=60) == 0, out
    return out.decode(errors="replace").replace("\r\n", "\n")  # the tty turns each \n into \r\n


def test_in_a_pipe_a_line_every_5_percent_and_no_tqdm() -> None:
    out = _run(LOOP, terminal=False)
    lines = [ln for ln in out.splitlines() if ln.startswith("INFO edge_vla.progress: work: ")]
    assert len(lines) == 20, out
    assert lines[0].startswith("INFO edge_vla.progress: work: 10/200 item (5%), ") and lines[0].endswith(" left")
    assert "200/200 item (100%)" in lines[-1] and "done in" in lines[-1] and lines[-1].endswith(", loss 0.5")
    assert "item/s" in lines[-1] or "s/item" in lines[-1]
    assert "\r" not in out and "MODE lines no tqdm" in out, out  # the line logger does not even import tqdm


def test_on_a_terminal_a_tqdm_bar_with_log_lines_above_it() -> None:
    out = _run(LOOP, terminal=True)
    assert "MODE bar tqdm imported" in out and "\r" in out and "200/200" in out and "item/s" in out, out
    assert "edge_vla.progress" not in out, out
    at = out.index("INFO edge_vla.x: halfway note")
    assert out[at - 1] in "\r\n", repr(out[at - 60:at + 20])  # written above the bar, not glued to it


def test_on_a_terminal_without_tqdm_it_falls_back_to_lines() -> None:
    out = _run(NO_TQDM + LOOP, terminal=True)
    assert "MODE lines no tqdm" in out and sum("edge_vla.progress: work:" in ln for ln in out.splitlines()) == 20, out


@pytest.mark.parametrize("terminal", [False, True])
def test_a_warning_level_silences_progress(terminal: bool) -> None:
    """What `edge-vla --quiet` sets: neither the bar nor the lines."""
    out = _run(LOOP.replace("level=logging.INFO", "level=logging.WARNING"), terminal=terminal)
    assert "work" not in out and "\r" not in out and "halfway" not in out, out


def test_importing_the_helper_does_not_import_tqdm() -> None:
    code = "import sys, edge_vla.progress; print('tqdm' in sys.modules)"
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert got.stdout.strip() == "False", got
