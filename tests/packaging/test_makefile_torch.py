"""`make demo` / `make test` install PyTorch's CPU build explicitly (issue 23, item 14).

An unpinned-index `pip install torch==2.13.0` resolves to the CUDA build on a machine that only sees
PyPI (several GB of nvidia-* wheels). The Makefile's torch step asks PyTorch's CPU wheel index first,
with a short timeout and no retries (it must not hang where that index cannot be reached), then
falls back to the plain pin with a warning. Here the real Makefile runs against a stub interpreter
that records every call, so the test needs no network and installs nothing.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"

# The stub venv's python: `-c "import torch"` fails unless HAVE_TORCH=1; `-m pip ...` is logged and
# fails when it names the CPU index and CPU_INDEX_DOWN=1 (what pip does when the index is unreachable).
STUB_PYTHON = f"""#!/bin/sh
printf '%s\\n' "$*" >> "$STUB_LOG"
case "$*" in
    "-c import torch") [ "${{HAVE_TORCH:-0}}" = 1 ] && exit 0; exit 1 ;;
    *"--index-url {CPU_INDEX}"*) [ "${{CPU_INDEX_DOWN:-0}}" = 1 ] && exit 1; exit 0 ;;
esac
exit 0
"""

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def _make_torch(tmp_path: Path, **env: str) -> tuple[list[list[str]], subprocess.CompletedProcess[str]]:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin/python"
    python.write_text(STUB_PYTHON)
    python.chmod(0o755)
    log = tmp_path / "calls.log"
    log.write_text("")
    run_env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS"))}
    run_env.update(STUB_LOG=str(log), **env)
    # `make venv`, the step `make demo` and `make test` start with (pip and the stamp file hit the stub).
    proc = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), "venv", f"VENV={venv}"],
                          capture_output=True, text=True, env=run_env, timeout=60)
    calls = [shlex.split(line) for line in log.read_text().splitlines()]
    return calls, proc


def _pip_installs(calls: list[list[str]]) -> list[list[str]]:
    """The `pip install` calls that install torch (not pip's own upgrade, not edge-vla's)."""
    return [c[3:] for c in calls if c[:3] == ["-m", "pip", "install"] and c[-1].startswith("torch")]


def test_cpu_index_is_tried_first_with_a_short_timeout(tmp_path: Path):
    calls, proc = _make_torch(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    installs = _pip_installs(calls)
    assert len(installs) == 1, calls  # reachable: no fallback
    args = installs[0]
    assert args[args.index("--index-url") + 1] == CPU_INDEX
    assert args[args.index("--timeout") + 1] == "10" and args[args.index("--retries") + 1] == "0"
    assert args[-1] == "torch==2.13.0"


def test_unreachable_cpu_index_falls_back_to_the_plain_pin_with_a_warning(tmp_path: Path):
    calls, proc = _make_torch(tmp_path, CPU_INDEX_DOWN="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    first, fallback = _pip_installs(calls)
    assert "--index-url" in first and "--retries" in first
    assert fallback[-1] == "torch==2.13.0" and "--index-url" not in fallback and "--timeout" not in fallback
    assert f"PyTorch's CPU index {CPU_INDEX} did not answer" in proc.stderr, proc.stderr


def test_an_installed_torch_is_kept(tmp_path: Path):
    calls, proc = _make_torch(tmp_path, HAVE_TORCH="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ["-c", "import", "torch"] in calls and _pip_installs(calls) == []
    assert calls[-1][:3] == ["-m", "pip", "install"] and "-e" in calls[-1]  # then edge-vla itself
