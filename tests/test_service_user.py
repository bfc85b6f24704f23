"""tests/service_user.py: how the tests' robot-side steps reach this checkout as the service user (uid 65534) on
any test machine. A clone under a private directory (`git clone . "$(mktemp -d)"`, whose directory is 0700) once
failed every such step with "No module named ..."; the test below is that clone, made cheaply."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import service_user
from service_user import needs_service_user

# Where the service user's interpreter finds the packages a robot-side step imports (edge_vla.export lives in
# the checkout's export/ directory, found only through the editable install's finder).
WHERE = ("import importlib.util as u\n"
         "for name in ('edge_vla', 'edge_vla.export', 'firmware_bridge'):\n"
         "    spec = u.find_spec(name)\n"
         "    assert spec is not None, f'No module named {name!r}'\n"
         "    print(spec.origin)\n")


@needs_service_user
def test_a_clone_under_a_private_directory_runs_as_the_service_user_from_a_staged_mirror() -> None:
    private = Path(tempfile.mkdtemp(prefix="edge-vla-private-clone-"))  # 0700, as `mktemp -d` makes it
    try:
        # The clone and its venv's packages (editable finder included, pointing at the clone), under `private`.
        clone, sites = service_user.link_checkout(service_user.REPO, service_user._site_dirs(), private)
        clone.chmod(0o700)  # `git clone . "$(mktemp -d)"`: the clone's own directory is the 0700 one
        system = service_user._system_pythons()
        assert system, "no system python to run the service user's steps with"
        # Control: directly, the service user reaches neither the clone nor its packages.
        direct = service_user.as_service_user([system[0], "-c", WHERE],
                                              env=service_user.system_environ(PYTHONPATH=":".join([str(clone), *sites])))
        assert direct.returncode != 0 and "No module named 'edge_vla'" in direct.stderr, direct.stderr[-2000:]
        found = service_user._find_service_python(clone, sites, venv_python=str(private / "venv" / "bin" / "python"))
        assert isinstance(found, service_user.ServicePython), found
        assert private not in found.repo.parents
        staged = service_user.as_service_user([found.python, "-c", WHERE], env=found.environ())
        assert staged.returncode == 0, staged.stderr[-2000:]
        origins = staged.stdout.split()
        assert len(origins) == 3 and all(o.startswith(f"{found.repo}/") for o in origins), origins
        assert origins[1] == f"{found.repo}/export/__init__.py"
    finally:
        shutil.rmtree(private, ignore_errors=True)
