"""A tune record's numbers are untrusted text: a number too large for a float (JSON has no limit; Python parses
up to 4300 digits into an int) must make the record "one that cannot be followed", never an exception out of
`tune.read_record` (which `Policy.load(backend="auto")` calls on the robot before it picks a backend).

Fast: a real `Bundle` over a directory holding just a manifest.json (read_record hashes only that file)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from edge_vla.bundle import MANIFEST, Bundle
from edge_vla.runtime import tune

CPUINFO = "model name\t: Test CPU\nflags\t\t: avx2 fma\n"
HUGE = 10**400  # a 401-digit integer: fine for json, `float()` of it raises OverflowError


@pytest.fixture
def bundle(tmp_path: Path) -> Bundle:
    root = tmp_path / "bundle"
    root.mkdir()
    (root / MANIFEST).write_text('{"format": "edge-vla-bundle"}\n')
    return Bundle(root, {})


def _record(bundle: Bundle, choice_ms: Any, other_ms: Any = 9.0) -> dict[str, Any]:
    return {
        "format": tune.RECORD_FORMAT, "version": tune.RECORD_VERSION,
        "bundle": {"hash": tune.bundle_hash(bundle)}, "machine": tune.machine_fingerprint(CPUINFO),
        "choice": {"backend": "onnxruntime", "precision": "fp32"},
        "candidates": [{"backend": "onnxruntime", "precision": "fp32", "passed": True, "median_ms": choice_ms},
                       {"backend": "openvino", "precision": "f32", "passed": True, "median_ms": other_ms}],
    }


def _lookup(bundle: Bundle, tmp_path: Path, record: dict[str, Any]) -> tune.Lookup:
    state = tmp_path / "state"
    path = tune.record_path(state, tune.bundle_hash(bundle))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return tune.read_record(bundle, CPUINFO, env={tune.STATE_ENV: str(state)})


def test_a_good_record_is_followed(bundle: Bundle, tmp_path: Path) -> None:
    """Control: the same record with ordinary numbers gives a choice, and names the other candidate's time."""
    lookup = _lookup(bundle, tmp_path, _record(bundle, 5.0))
    assert lookup.problem is None and lookup.choice is not None
    assert lookup.choice.backend == "onnxruntime" and lookup.choice.median_ms == 5.0
    assert "openvino f32 9.00 ms" in lookup.choice.summary


def test_a_choice_time_too_large_for_a_float_is_a_problem_not_a_crash(bundle: Bundle, tmp_path: Path) -> None:
    lookup = _lookup(bundle, tmp_path, _record(bundle, HUGE))
    assert lookup.choice is None
    assert lookup.problem is not None and "no valid median time" in lookup.problem, lookup.problem
    assert "\n" not in lookup.problem and len(lookup.problem) < 400


def test_another_candidates_time_too_large_for_a_float_is_left_out(bundle: Bundle, tmp_path: Path) -> None:
    """The choice itself is valid; the other figure only feeds the log line's comparison, so it is dropped."""
    lookup = _lookup(bundle, tmp_path, _record(bundle, 5.0, other_ms=HUGE))
    assert lookup.problem is None and lookup.choice is not None
    assert lookup.choice.median_ms == 5.0 and "openvino" not in lookup.choice.summary
