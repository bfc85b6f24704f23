"""Shared fixtures: a tiny model with random (non-trivial) weights, and bundles exported from it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

# The test command is the landing gate, so its property tests draw the same examples every run: a
# gate that fails one run in a thousand blocks a good change. `HYPOTHESIS_PROFILE=explore` draws fresh
# random examples (and more of them) for a hunt; any failure found there becomes an @example.
settings.register_profile("gate", derandomize=True)
settings.register_profile("explore", max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "gate"))

torch = pytest.importorskip("torch")


@pytest.fixture(autouse=True)
def _empty_tune_state_dir(tmp_path_factory, monkeypatch):
    """`Policy.load(backend="auto")` follows an `edge-vla tune` record for the bundle on this machine. Neither a
    developer's own record (e.g. in /var/lib/edge-vla) nor one written by an earlier test (`build-engines` ends with
    tune; the session bundles share a manifest hash) may change which backend a test gets: every test, and every
    process it starts, sees its own empty state directory. Tests of tune pass their own."""
    state = tmp_path_factory.mktemp("edge-vla-state")
    state.chmod(0o755)
    monkeypatch.setenv("EDGE_VLA_STATE_DIR", str(state))
    return state


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small models on a shared 2-core machine: a second intra-op thread only waits on a core another process keeps
    busy (measured ~10x slower for the distillation tests, 53 s instead of 3.6 s for the MetaWorld asset test)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomized_tiny_model(seed: int = 0):
    """A tiny VLA whose zero-initialised output layers are randomised, so its actions depend on inputs."""
    from edge_vla.config import preset
    from edge_vla.export.model import untrained_with_live_outputs

    return untrained_with_live_outputs(preset("tiny"), seed)


@pytest.fixture(scope="session")
def tiny_model():
    return randomized_tiny_model()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_model) -> Path:
    from edge_vla.export.checkpoint import save_checkpoint

    return save_checkpoint(tiny_model, tmp_path_factory.mktemp("ckpt") / "tiny")


def _export(tmp_path_factory, model, precision: str, **kw) -> Path:
    from edge_vla.export.exporter import ExportOptions, export_model

    out = tmp_path_factory.mktemp(f"bundle_{precision}") / "bundle"
    opts = ExportOptions(precision=precision, calib_count=8, numerics_count=4, **kw)
    return export_model(model, out, opts).bundle


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_model) -> Path:
    return _export(tmp_path_factory, tiny_model, "fp32", unrolled=True)


@pytest.fixture(scope="session")
def tiny_bundle_fp16(tmp_path_factory, tiny_model) -> Path:
    return _export(tmp_path_factory, tiny_model, "fp16")


@pytest.fixture(scope="session")
def tiny_bundle_int8(tmp_path_factory, tiny_model) -> Path:
    return _export(tmp_path_factory, tiny_model, "int8")


@pytest.fixture(autouse=True)
def _this_process_stays_sched_other(request):
    """No test may leave the pytest process real-time: every process it starts afterwards (emulators, the
    service under test) would inherit SCHED_FIFO and its timing, hiding or causing failures elsewhere."""
    yield
    if os.sched_getscheduler(0) != os.SCHED_OTHER:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        pytest.fail(f"{request.node.nodeid} left the test process SCHED_FIFO/RR; restore SCHED_OTHER in the test")
