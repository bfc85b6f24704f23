"""`edge-vla export X -o OUT` where X is not a training checkpoint: a newcomer's two commonest slips.

- X is a bundle (runs/demo/bundle_fp32 is at hand after `make demo`): the error said "not a checkpoint
  directory (no config.json); train one with `edge-vla train`", advice that sends them to a 40-minute training.
- X does not exist (the README's `export/assets/tiny-reach` typed outside the clone): the same "no config.json"
  line, as if a directory were there, with no word about the directory the relative path was read from.

Each is one line that says what X is and what to do. Control: the shipped checkpoint passes this check and
the command goes on to its next check (an unknown --calib source), so the check tells the cases apart.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_vla import cli
from edge_vla.export.assets import shipped_checkpoint


def _one_line_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert cli.main(["export", *argv]) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1, err
    return err[0]


def test_a_bundle_given_as_the_checkpoint_is_named_a_bundle(tiny_bundle: Path, tmp_path: Path, capsys) -> None:
    line = _one_line_error(capsys, str(tiny_bundle), "-o", str(tmp_path / "out"))
    assert f"{tiny_bundle} is an exported bundle, not a training checkpoint" in line, line
    assert "train one" not in line, line
    source = json.loads((tiny_bundle / "manifest.json").read_text())["provenance"].get("source_checkpoint")
    if source:
        assert source in line, line
    assert not (tmp_path / "out").exists()


def test_a_missing_relative_checkpoint_names_the_directory_it_was_read_from(tmp_path: Path, monkeypatch,
                                                                             capsys) -> None:
    monkeypatch.chdir(tmp_path)
    line = _one_line_error(capsys, "export/assets/tiny-reach", "-o", "out")
    assert "export/assets/tiny-reach does not exist" in line and str(tmp_path) in line, line
    assert "no config.json" not in line, line


def test_control_a_real_checkpoint_passes_on_to_the_next_check(tmp_path: Path, capsys) -> None:
    line = _one_line_error(capsys, str(shipped_checkpoint()), "-o", str(tmp_path / "out"),
                           "--calib", str(tmp_path / "no-such-calib.npz"))
    assert line.startswith("edge-vla export: error: --calib"), line
