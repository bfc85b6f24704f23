"""A checkpoint directory's config.json is bytes from outside (downloaded, hand-edited, written by another tool):
every command that reads one (export, evaluate, train --init, distill --teacher/--student-init) refuses a wrong
one in one line naming the field, and never builds a model the tensors do not describe (a width of 10**9 must not
allocate before it is refused)."""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from edge_vla.config import preset
from edge_vla.errors import CheckpointError
from edge_vla.export.checkpoint import load_checkpoint, save_checkpoint
from edge_vla.export.model import VLA


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(VLA(preset("tiny")), tmp_path_factory.mktemp("ck") / "good", meta={"step": 1})


@pytest.fixture
def ckpt(good: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(good, tmp_path / "ckpt"))


def _edit(**fields: Any) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        doc = json.loads(path.read_text())
        doc["config"].update(fields)
        path.write_text(json.dumps(doc))
    return apply


def _doc(doc: Any) -> Callable[[Path], None]:
    return lambda path: path.write_text(json.dumps(doc))


def _raw(data: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(data)


BAD = {
    "deeply nested": (_raw(b'{"config": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"), "nested too deeply"),
    "not UTF-8": (_raw(b'{"config": {"vision": "\xff"}}'), "utf-8"),
    "oversize": (_raw(b'{"config": {}, "meta": {"pad": "' + b"x" * (2 << 20) + b'"}}'), "larger than"),
    "a list": (_doc([1]), "not a JSON object"),
    "config null": (_doc({"config": None}), "'config' must be a JSON object"),
    "meta a list": (lambda p: _doc({"config": json.loads(p.read_text())["config"], "meta": [1]})(p),
                    "'meta' must be a JSON object"),
    "float width": (_edit(width=128.0), "width must be a whole number, got 128.0"),
    "string depth": (_edit(depth="2"), "depth must be a whole number, got '2'"),
    "string bool": (_edit(goal_head="no"), "goal_head must be true or false, got 'no'"),
    "int bool": (_edit(text_film=1), "text_film must be true or false, got 1"),
    "bool int": (_edit(num_cameras=True), "num_cameras must be a whole number, got True"),
    "zero heads": (_edit(heads=0), "heads must be 1.."),
    "zero patch": (_edit(patch_size=0), "patch_size must be 1.."),
    "negative width": (_edit(width=-128, heads=-4), "width must be 1.."),
    "huge steps": (_edit(num_steps=10**30), "num_steps must be 1.."),
    "huge depth": (_edit(depth=10**9), "depth must be 1.."),
}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_config_is_one_checkpoint_error_naming_it(ckpt: Path, case: str) -> None:
    damage, named = BAD[case]
    damage(ckpt / "config.json")
    with pytest.raises(CheckpointError, match="not a valid checkpoint config") as err:
        load_checkpoint(ckpt)
    assert named in str(err.value) and "\n" not in str(err.value), err.value


def test_the_good_checkpoint_still_loads(good: Path) -> None:
    """Control: the same loader takes the untouched checkpoint (so the refusals above are about the damage)."""
    model, meta = load_checkpoint(good)
    assert meta == {"step": 1} and model.config == preset("tiny")


def _limit_memory() -> None:  # the old code allocated the config's model first: keep that off the machine
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))


def test_huge_dims_are_refused_against_the_tensors_before_any_allocation(ckpt: Path, tmp_path: Path) -> None:
    """width 16384 builds ~25 GB of parameters; the tensors in the file say 128. The shapes are compared from the
    safetensors header on a model that holds no memory, so the refusal costs nothing (here: under a 3 GB
    address-space limit, through the CLI a user runs)."""
    _edit(width=16384, heads=1)(ckpt / "config.json")
    out = tmp_path / "bundle"
    proc = subprocess.run([sys.executable, "-m", "edge_vla.cli", "export", str(ckpt), "-o", str(out)],
                          capture_output=True, text=True, timeout=120, preexec_fn=_limit_memory, cwd=tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-3000:]
    assert "its config (preset 'tiny') and tensors disagree" in lines[0], lines[0]
    assert "camera_emb: checkpoint (1, 1, 128) vs config (1, 1, 16384)" in lines[0], lines[0]
    assert not out.exists()


@pytest.mark.parametrize(("damage", "named"), [
    (_edit(heads=0), "heads must be 1..1024, got 0"),
    # The family registry reads config.json first (is it a π0 checkpoint?): these were tracebacks there.
    (_raw(b'{"config": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"), "nested too deeply"),
    (_doc([1]), "not a JSON object"),
])
def test_cli_export_of_a_bad_config_is_one_line_and_writes_nothing(ckpt: Path, tmp_path: Path,
                                                                   damage: Callable[[Path], None], named: str,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from edge_vla.cli import main

    damage(ckpt / "config.json")
    out = tmp_path / "bundle"
    assert main(["export", str(ckpt), "-o", str(out)]) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and named in lines[0] and "not a valid checkpoint config" in lines[0], lines
    assert not out.exists()
