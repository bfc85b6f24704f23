"""benchmarks/gpu_check.sh: valid bash (shellcheck-clean where shellcheck is installed), and its dry mode
resolves every step, collects every GPU test and sees each one skip, on a machine without a GPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def test_script_parses_and_is_shellcheck_clean() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if shellcheck:
        out = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout


def test_dry_run_resolves_steps_and_gpu_tests_skip(tmp_path: Path) -> None:
    from edge_vla.kernels import loader

    if loader.gpu_status()[0]:
        pytest.skip("a GPU is present: run the script for real")
    env = {**os.environ, "GPU_CHECK_DRY": "1", "GPU_CHECK_DRY_BUILD": "0", "PYTHON": sys.executable,
           "OUT": str(tmp_path / "out"), "TMPDIR": str(tmp_path)}
    env.pop("EDGE_VLA_KERNEL_DIR", None)
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert proc.returncode == 0, log[-4000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["ok"] and summary["dry_run"]
    assert [p["phase"] for p in summary["phases"]] == ["resolve", "env", "install", "standalone", "pytest", "bench"]
    counts = summary["pytest"]
    assert counts["tests"] >= 60 and counts["skipped"] == counts["tests"] and not counts["failed"]
    assert "bench_kernels: skipped," in log
    assert not any(tmp_path.glob("gpu_check.*")), "the scratch directory was left behind"


def test_dry_run_fails_when_a_command_does_not_resolve(tmp_path: Path) -> None:
    env = {**os.environ, "GPU_CHECK_DRY": "1", "GPU_CHECK_DRY_BUILD": "0", "PYTHON": str(tmp_path / "no-python"),
           "OUT": str(tmp_path / "out"), "TMPDIR": str(tmp_path)}
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert f"command not found: {tmp_path / 'no-python'}" in log or f"missing file: {tmp_path / 'no-python'}" in log
    assert "gpu_check: FAILED" in log
