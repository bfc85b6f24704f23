"""`edge-vla train --data PATH` with a PATH that does not exist (a newcomer's typo).

It used to generate 300 fresh sim episodes into the misspelt path and train on them, so a 40-minute run
on the wrong data looked like a success. A path the user named must exist; only the default path (what
`--data` left out means, and what docs/DISTILL.md's teacher command names) is still made when missing.
Through `edge_vla.cli.main`, in a scratch working directory, as a user types it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_vla import cli
from edge_vla.sim import dataset


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _train(*args: str) -> int:
    return cli.main(["train", "--preset", "tiny", "--train-steps", "1", "--batch-size", "4", "--threads", "1",
                     "--checkpoint-every", "1", *args])


def test_a_misspelt_data_path_is_refused_in_one_line_and_nothing_is_written(workdir, capsys):
    dataset.save(dataset.generate(range(2)), workdir / "reach.npz")  # what the user meant
    assert _train("--data", "reach.np", "-o", "ck", "--episodes", "2") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "reach.np" in err[0] and "edge-vla make-data -o reach.np" in err[0], err[0]
    assert not (workdir / "reach.np").exists(), "a dataset was generated into the misspelt path"
    assert not (workdir / "ck").exists()


def test_control_the_default_path_is_still_made_when_missing(workdir, capsys):
    """docs/DISTILL.md's `edge-vla train --preset small --data runs/data/reach.npz` on a fresh clone."""
    assert _train("--data", "runs/data/reach.npz", "-o", "ck", "--episodes", "2") == 0
    assert "runs/data/reach.npz not found: generating 2 expert episodes" in capsys.readouterr().out
    assert (workdir / "runs/data/reach.npz").is_file() and (workdir / "ck/config.json").is_file()
