"""A bundle's manifest.json comes from outside (copied onto the robot, maybe by hand): a careless or hostile one must be
refused with one BundleError line naming the manifest and what is wrong, never a traceback (AttributeError,
TypeError, RecursionError, ValueError) out of `Bundle.open` or the views `Policy.load` reads next (contract,
config, action space).

Fast: the bundle is written by `write_bundle` (the exporter's own writer) around a minimal, valid manifest for a
scalar-time step graph; the graph files are placeholder bytes (nothing here loads ONNX: every probe is refused, or
for the control accepted, before any graph is read)."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edge_vla.action_space import ActionSpace
from edge_vla.bundle import MANIFEST, Bundle, write_bundle
from edge_vla.config import preset
from edge_vla.errors import BundleError


def _io(name: str, role: str, shape: list[int], dtype: str = "float32") -> dict[str, Any]:
    return {"name": name, "role": role, "shape": shape, "dtype": dtype}


def _manifest() -> dict[str, Any]:
    kv = [1, 4, 9, 32]
    return {
        "family": "edge-vla-reference", "precision": "fp32",
        "model": preset("tiny").to_dict(),
        "graphs": {
            "prefix": {"file": "graphs/prefix.onnx", "role": "prefix", "inputs": [_io("state", "state", [1, 2])],
                       "outputs": [_io("prefix_k_0", "prefix", kv)]},
            "denoise_step": {"file": "graphs/step.onnx", "role": "step",
                             "inputs": [_io("x_t", "x_t", [1, 8, 2]), _io("t", "time", [1]),
                                        _io("prefix_k_0", "prefix", kv)],
                             "outputs": [_io("velocity", "velocity", [1, 8, 2])]},
        },
        "sampler": {"time": {"start": 0.0, "end": 1.0}, "solvers": ["euler"], "solver": "euler", "num_steps": 10,
                    "min_steps": 1, "max_steps": 20, "recommended_min_steps": 1,
                    "time_input": {"kind": "scalar", "input": "t"}},
        "preprocessing": {"kind": "edge-vla-reference"},
        "normalization": {"action": {"mean": [0.0, 0.0], "std": [1.0, 1.0]}},
        "action_space": ActionSpace(names=("shoulder", "elbow"), lower=(0.0, -2.6), upper=(3.1, 2.6),
                                    max_velocity=(2.5, 2.5), max_acceleration=(20.0, 20.0), units="rad",
                                    action_period_s=0.1).to_dict(),
        "tokenizer": {"kind": "bytes", "vocab_size": 258}, "provenance": {"source_checkpoint": "test"},
    }


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_bundle(tmp_path_factory.mktemp("manifest") / "bundle", _manifest(),
                        {"graphs/prefix.onnx": b"prefix graph", "graphs/step.onnx": b"step graph"})


def _everything_policy_load_reads(root: Path) -> None:
    b = Bundle.open(root)
    assert b.contract.num_steps == 10
    assert b.config.preset == "tiny" and b.action_space.dim == 2


def _with(source: Path, tmp_path: Path, text: str) -> Path:
    root = tmp_path / "bundle"
    root.mkdir()
    for rel in json.loads((source / MANIFEST).read_text())["files"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes((source / rel).read_bytes())
    (root / MANIFEST).write_text(text)
    return root


def _set(path: tuple[str, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(m: dict[str, Any]) -> None:
        node = m
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


# case -> an edit of the valid manifest (or the whole text), and a word the one line must hold
CASES: dict[str, tuple[Callable[[dict[str, Any]], None] | str, str]] = {
    "nested too deep": ('{"a": ' * 100_000 + "1" + "}" * 100_000, "not valid JSON"),
    "an integer of 5000 digits": ('{"format": "edge-vla-bundle", "schema_version": ' + "9" * 5000 + "}",
                                  "not valid JSON"),
    "files is a list": (_set(("files",), ["graphs/prefix.onnx"]), "files"),
    "a file's hash is a number": (_set(("files", "graphs/prefix.onnx"), 5), "files"),
    "graphs is a list": (_set(("graphs",), ["prefix"]), "graphs"),
    "a graph is a string": (_set(("graphs", "prefix"), "graphs/prefix.onnx"), "prefix"),
    "a graph's file is a list": (_set(("graphs", "prefix", "file"), ["graphs/prefix.onnx"]), "file"),
    "model is a list": (_set(("model",), [1, 2]), "model"),
    "sampler is a list": (_set(("sampler",), []), "sampler"),
    "time_input is a string": (_set(("sampler", "time_input"), "t"), "time_input"),
    "time tables are a list": (_set(("sampler", "time_input"), {"kind": "table", "input": "t", "tables": ["x"]}),
                               "tables"),
    "the flow's start is text": (_set(("sampler", "time", "start"), "zero"), "sampler.time"),
    "the flow's start is infinite": (_set(("sampler", "time", "start"), 1e400), "sampler.time"),
    "solvers is a number": (_set(("sampler", "solvers"), 5), "solvers"),
    "recommended_min_steps is text": (_set(("sampler", "recommended_min_steps"), "ten"), "recommended_min_steps"),
    "an IO entry is a string": (_set(("graphs", "prefix", "inputs"), ["state"]), "IO entry"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_malformed_manifest_is_refused_in_one_line(case: str, source: Path, tmp_path: Path) -> None:
    edit, word = CASES[case]
    if isinstance(edit, str):
        text = edit
    else:
        m = json.loads((source / MANIFEST).read_text())
        edit(m)
        text = json.dumps(m)  # allow_nan: 1e400 is written as Infinity, which Python's json reads back
    root = _with(source, tmp_path, text)
    with pytest.raises(BundleError) as err:
        _everything_policy_load_reads(root)
    message = str(err.value)
    assert word in message and "\n" not in message and len(message) < 1200, message
    assert str(root) in message or "manifest" in message, message


def test_the_unchanged_manifest_is_accepted(source: Path, tmp_path: Path) -> None:
    """Control for the cases above: the same copy, manifest untouched, opens and parses whole."""
    _everything_policy_load_reads(_with(source, tmp_path, (source / MANIFEST).read_text()))


def test_the_control_manifest_round_trips(source: Path) -> None:
    m = json.loads((source / MANIFEST).read_text())
    assert {k: v for k, v in m.items() if k not in ("files", "schema_version", "format")} == copy.deepcopy(_manifest())
