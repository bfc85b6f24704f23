"""Runtime fixtures: a bundle whose step graph takes the scalar t (any step count), beside the default
time-table bundle from tests/conftest.py."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_bundle_scalar_t(tmp_path_factory, tiny_model) -> Path:
    from edge_vla.export.exporter import ExportOptions, export_model

    out = tmp_path_factory.mktemp("bundle_scalar_t") / "bundle"
    return export_model(tiny_model, out, ExportOptions(calib_count=8, numerics_count=2, time_input="scalar")).bundle
