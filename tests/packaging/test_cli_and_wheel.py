import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from edge_vla.cli import SUBCOMMANDS, main

ROOT = Path(__file__).resolve().parents[2]


def test_help_lists_every_subcommand(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    for sub in SUBCOMMANDS:
        assert sub.name in out


@pytest.mark.parametrize("name", [s.name for s in SUBCOMMANDS])
def test_every_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
    assert f"edge-vla {name}" in capsys.readouterr().out


def test_errors_are_one_clear_line(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope"), "-o", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert "edge-vla export: error:" in err and "Traceback" not in err


def test_runtime_import_does_not_pull_torch():
    code = ("import sys, edge_vla, edge_vla.runtime.policy, edge_vla.bundle, edge_vla.onboard.cli, firmware_bridge.link;"
            "bad = [m for m in ('torch', 'edge_vla.export', 'onnx') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
def test_built_wheel_imports_every_package(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(ROOT)], check=True, capture_output=True)
    wheel = next(dist.glob("edge_vla-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for needed in ("edge_vla/export/model.py", "edge_vla/export/pi0/teacher.py", "edge_vla/kernels/ode_step.cu", "firmware_bridge/firmware/fw_core.c",
                   "firmware_bridge/PROTOCOL.md", "edge_vla/provision/templates/edge-vla.service"):
        assert needed in names, f"{needed} missing from the wheel"
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    code = ("import edge_vla, edge_vla.export.model, edge_vla.kernels.reference, firmware_bridge.link, "
            "edge_vla.onboard.cli, edge_vla.provision.package;"
            f"assert edge_vla.__file__.startswith({str(site)!r}), edge_vla.__file__;"
            f"assert edge_vla.export.model.__file__.startswith({str(site)!r});"
            f"assert edge_vla.kernels.reference.__file__.startswith({str(site)!r})")
    # PYTHONPATH puts the installed wheel ahead of the editable install's import hook.
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
