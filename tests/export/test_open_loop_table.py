"""The table `edge-vla evaluate BUNDLE --data lerobot:PATH` prints (OpenLoopReport's text).

Its columns had fixed widths (22 and 26 characters) and the per-dimension errors ran inline as "name value" pairs,
so a long row name, a number in exponent notation or long action names ran the columns together and the rows no
longer lined up. Now every column is as wide as its widest cell: each row's cells sit at the same column boundaries.
"""

from __future__ import annotations

import re

import pytest

from edge_vla.export.lerobot.open_loop import OpenLoopReport, PairError

LONG_NAME = "bundle runs/so100_pick_place_int8_calibrated_on_recorded_frames (int8) vs recorded"
ACTION_NAMES = ["main_shoulder_pan.pos", "g", "elbow_flex.pos"]
STEPS = 4


def _report() -> OpenLoopReport:
    pairs = [PairError(LONG_NAME, 1.234e-05, (1.1e-05, 1.36e-05), [12345.678, 0.5, 7.0e-07],
                       [1.0e-05, 2.0, 3.5, 123456.0]),
             PairError("teacher vs recorded", 0.5, (0.25, 0.75), [1.0, 22.25, 3.0], [0.1, 0.2, 0.3, 0.4]),
             PairError("model vs teacher", 123.5, (100.0, 150.0), [0.001, 0.002, 0.003], [9.0, 8.0, 7.0, 6.0])]
    return OpenLoopReport(target="bundle runs/x (int8)", teacher="checkpoint runs/t", source="lerobot:/data/so100",
                          codebase_version="v3.0", episodes=[7, 8], samples=12, chunk_len=STEPS,
                          action_period_s=0.033, action_names=ACTION_NAMES, bootstrap_unit="chunks", pairs=pairs)


def _blocks(text: str) -> list[list[str]]:
    """The report's tables: runs of consecutive lines with cells two or more spaces apart."""
    tables, current = [], []
    for line in text.splitlines()[1:]:  # the first line is the report's title
        if re.search(r"\S {2,}\S", line):  # a table row: cells separated by two or more spaces
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    if current:
        tables.append(current)
    return tables


def _column_spans(rows: list[str]) -> list[tuple[int, int]]:
    """Columns as [start, end) character spans: runs of positions where some row has a character, separated by
    at least two positions blank in every row (a cell may hold single spaces, as "[0.25, 0.75]" does)."""
    width = max(len(r) for r in rows)
    used = [any(i < len(r) and r[i] != " " for r in rows) for i in range(width)]
    spans, start, blank = [], None, 0
    for i, u in enumerate([*used, False, False]):
        if u:
            if start is None:
                start = i
            blank = 0
            end = i + 1
        elif start is not None:
            blank += 1
            if blank == 2:
                spans.append((start, end))
                start, blank = None, 0
    return spans


def _cells(row: str, spans: list[tuple[int, int]]) -> list[str]:
    return [row[a:b].strip() for a, b in spans]


def test_every_row_of_the_error_table_has_the_same_column_boundaries() -> None:
    report = _report()
    tables = _blocks(str(report))
    assert len(tables) == 2, str(report)
    errors = tables[0]
    spans = _column_spans(errors)
    # name, RMSE/std, 95% CI, then one column per action dimension
    assert len(spans) == 3 + len(ACTION_NAMES), "\n".join(errors)
    header = _cells(errors[0], spans)
    assert header[3:] == ACTION_NAMES, header
    for pair, row in zip(report.pairs, errors[1:], strict=True):
        cells = _cells(row, spans)
        assert cells[0] == pair.name, cells
        assert float(cells[1]) == pytest.approx(pair.rmse_std, rel=1e-3)
        lo, hi = (float(x) for x in cells[2].strip("[]").split(","))
        assert (lo, hi) == pytest.approx(pair.ci95, rel=1e-3)
        assert [float(c) for c in cells[3:]] == pytest.approx(pair.rmse_per_dim, rel=1e-3)


def test_every_row_of_the_per_step_table_has_the_same_column_boundaries() -> None:
    report = _report()
    steps = _blocks(str(report))[1]
    spans = _column_spans(steps)
    assert len(spans) == 1 + STEPS, "\n".join(steps)
    assert "per chunk step" in steps[0]
    assert _cells(steps[0], spans)[1:] == [str(k) for k in range(1, STEPS + 1)]
    for pair, row in zip(report.pairs, steps[1:], strict=True):
        cells = _cells(row, spans)
        assert cells[0] == pair.name
        assert [float(c) for c in cells[1:]] == pytest.approx(pair.rmse_std_per_step, rel=1e-2)


def test_the_title_names_the_teacher_compared_against() -> None:
    assert "teacher checkpoint runs/t" in str(_report()).splitlines()[0]
