"""A failed inference is counted with its reason and the worker keeps serving; the real Policy path.

The bundle is a real export whose graph weights are then made NaN (manifest hashes updated), so the
runtime Policy itself raises PolicyOutputError, the path a robot would take."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from onboard_helpers import events, start_emulator, wait_for

from edge_vla.onboard.cameras import SimCamera
from edge_vla.onboard.control import ControlConfig
from edge_vla.onboard.drill import SceneHolder, load_source
from edge_vla.onboard.runner import OnboardRunner, bus_state_fn
from edge_vla.onboard.shared import STATUS_RUNNING, SharedBus
from edge_vla.onboard.worker import InferenceWorker
from edge_vla.sim.env import ReachEnv

onnx = pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def nan_bundle(tiny_bundle, tmp_path_factory) -> Path:
    from onnx import numpy_helper

    from edge_vla.atomic import atomic_write
    from edge_vla.bundle import MANIFEST, sha256_file

    out = tmp_path_factory.mktemp("nan") / "bundle"
    shutil.copytree(tiny_bundle, out)
    manifest = json.loads((out / MANIFEST).read_text())
    for rel in manifest["files"]:
        if not rel.endswith(".onnx"):
            continue
        model = onnx.load(str(out / rel))
        for init in model.graph.initializer:
            arr = numpy_helper.to_array(init)
            if arr.dtype == np.float32 and arr.size > 1:
                init.CopyFrom(numpy_helper.from_array(np.full_like(arr, np.nan), init.name))
        onnx.save(model, str(out / rel))
        manifest["files"][rel] = sha256_file(out / rel)
    with atomic_write(out / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=2)
    return out


def test_policy_error_is_counted_and_the_worker_keeps_serving(nan_bundle) -> None:
    holder = SceneHolder()
    source, space, size, cams = load_source(nan_bundle, holder)
    env = ReachEnv(image_size=size, num_cameras=cams)
    env.reset(3)
    holder.scene = env.scene
    bus = SharedBus(space.dim)
    bus.write_state(np.asarray(env.q), np.zeros(space.dim), time.monotonic())
    bus.set("status", STATUS_RUNNING)
    worker = InferenceWorker(source, SimCamera(holder, bus_state_fn(bus), size, cams), bus, env.scene.instruction,
                             size, min_interval_s=0.0)
    stop = threading.Event()
    for _ in range(3):
        assert worker.step(stop) is False  # the old worker let PolicyOutputError escape and died here
    assert worker.stats.errors == 3 and worker.stats.chunks == 0
    assert worker.stats.error_reasons == {"PolicyOutputError": 3}
    assert "non-finite" in worker.stats.last_error
    assert bus.chunk_seq() == 0  # nothing was published


def test_nan_policy_over_the_emulator_trips_on_stale_chunks_with_a_live_worker(nan_bundle) -> None:
    holder = SceneHolder()
    source, space, size, cams = load_source(nan_bundle, holder)
    env = ReachEnv(image_size=size, num_cameras=cams)
    env.reset(4)
    holder.scene = env.scene
    with start_emulator() as emu:
        cfg = ControlConfig(link_url=f"serial://{emu.port}", action_space=space, rate_hz=100.0,
                            arm_on_start=True, first_chunk_timeout_s=1.0)
        run = OnboardRunner(cfg, source, lambda bus: SimCamera(holder, bus_state_fn(bus), size, cams),
                            env.scene.instruction, image_size=size)
        with run:
            wait_for(lambda: events(emu, "armed"), 30, "bench-mode arm")
            wait_for(lambda: events(emu, "torque_off"), 10, "the watchdog's stop")
            errors_at_stop = run.worker.stats.errors
            # the worker keeps serving after the error: another error comes (polled: a loaded box may take
            # longer than one fixed nap to run the next inference)
            wait_for(lambda: run.worker.stats.errors > errors_at_stop, 10, "another inference after the stop")
    s = run.summary
    assert s is not None
    trip = next(t for t in s["trips"] if t["kind"] != "operator_stop")
    assert trip["kind"] == "chunk_stale" and trip["category"] == 1
    assert s["worker"]["errors"] >= 2 and "PolicyOutputError" in s["worker"]["error_reasons"]
    assert "error" not in s["worker"]  # the worker thread never died
