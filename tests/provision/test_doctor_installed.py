"""`edge-vla doctor` (no argument) on a half-installed robot, run as the service user.

With no argument doctor checks the installed release, /opt/edge-vla/current. On a robot that release
must be complete for edge-vla.service to start: `current` points at a release that exists, its
package.json reads, and its venv (made by edge-vla-firstboot.service, which the service Requires=)
is there. Each half-installed state must be a FAIL line with its fix, never a pass and never a
traceback. The script points doctor at a test rootfs instead of / (INSTALLED, CONFIG_PATH).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from service_user import needs_service_user, python_as_service_user

from edge_vla.provision import install

DOCTOR_INSTALLED = r"""
import argparse, sys
from pathlib import Path
from edge_vla.provision import doctor
doctor.INSTALLED, doctor.CONFIG_PATH = Path(sys.argv[1]), sys.argv[2]
sys.exit(doctor.main(argparse.Namespace(target=None, json=True)))
"""


def _doctor_as_service_user(root: Path) -> dict:
    proc = python_as_service_user(DOCTOR_INSTALLED, str(root / "opt/edge-vla/current"),
                                  str(root / "etc/edge-vla/robot.env"))
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    report["rc"] = proc.returncode
    report["by_name"] = {c["name"]: c for c in report["checks"]}
    return report


@pytest.fixture
def installed(build, bundle: Path, rootfs: Path, tmp_path: Path) -> Path:
    pkg = build(bundle, tmp_path / "robot-pkg.tar.gz", "x86-cpu").path
    assert install.install_rootfs(pkg, rootfs).changed
    return rootfs


@needs_service_user
def test_an_installed_release_whose_venv_was_never_made_fails(installed: Path):
    """install.sh installed it, but first boot did not run (or failed): the service cannot start."""
    report = _doctor_as_service_user(installed)
    assert report["source"].startswith("installed release")  # control: doctor found and read the release
    lock = report["by_name"]["lock"]
    assert lock["status"] == "fail", lock
    assert "venv" in lock["detail"] and "edge-vla-firstboot" in lock["fix"], lock
    assert report["rc"] == 1


@needs_service_user
@pytest.mark.parametrize("damage", ["release removed", "package.json truncated"])
def test_a_broken_current_release_is_a_fail_line_not_a_pass(installed: Path, damage: str):
    release = installed / "opt/edge-vla/current"
    real = release.resolve()
    if damage == "release removed":
        shutil.rmtree(real)  # `current` now dangles: edge-vla.service has nothing to run
    else:
        os.chmod(real / "package.json", 0o644)
        (real / "package.json").write_text('{"format": "edge-vla-package", "platf')
    report = _doctor_as_service_user(installed)
    check = report["by_name"].get("install")
    assert check is not None and check["status"] == "fail", report["checks"]
    assert str(release) in check["detail"] and "--rollback" in check["fix"], check
    assert report["rc"] == 1


@needs_service_user
def test_an_unreadable_robot_env_is_a_fail_line_and_the_other_checks_still_run(installed: Path):
    """The operator's robot.env saved as Latin-1 (or holding a value that is not a number): one FAIL line naming
    the file, with the rest of the report (which then uses the package's copy of the config), not one error line
    instead of the report."""
    env = installed / "etc/edge-vla/robot.env"
    good = env.read_bytes()
    report = _doctor_as_service_user(installed)  # control: the installed robot.env reads
    assert "config" not in report["by_name"] and "link" in report["by_name"], report["checks"]
    env.write_bytes(good + "# réglé par l'intégrateur\n".encode("latin-1"))
    report = _doctor_as_service_user(installed)
    check = report["by_name"].get("config")
    assert check is not None and check["status"] == "fail", report["checks"]
    assert str(env) in check["detail"] and "UTF-8" in check["detail"], check
    assert "link" in report["by_name"] and "install" in report["by_name"]
    assert report["rc"] == 1
