"""Camera sources (timestamps, clear errors) and telemetry files (MCAP and the JSON-lines fallback)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from edge_vla.errors import MissingDependencyError
from edge_vla.onboard.cameras import FolderCamera, SimCamera, open_camera, resize_nearest
from edge_vla.onboard.errors import CameraError
from edge_vla.onboard.rt import DeadlineClock
from edge_vla.onboard.shared import SharedBus
from edge_vla.onboard.telemetry import CycleStats, Telemetry, format_summary, read_records, summarize
from edge_vla.optional import available
from edge_vla.sim.env import ReachEnv


def test_sim_camera_renders_at_the_reported_joint_angles() -> None:
    env = ReachEnv()
    env.reset(5)
    q = np.array([1.0, 0.5])
    cam = SimCamera(env.scene, lambda: (q, 42.0), 64)
    f = cam.read()
    assert f.timestamp == 42.0 and np.array_equal(f.images[0], env.scene.render(q, 64))
    with pytest.raises(CameraError, match="no joint state"):
        SimCamera(env.scene, lambda: None, 64).read()


def test_folder_camera_npy_and_png(tmp_path) -> None:
    frames = np.random.default_rng(0).integers(0, 255, size=(3, 32, 48, 3), dtype=np.uint8)
    np.save(tmp_path / "stack.npy", frames)
    cam = open_camera(f"video:{tmp_path / 'stack.npy'}", size=16)
    t0 = time.monotonic()
    got = [cam.read() for _ in range(4)]
    assert all(f.images[0].shape == (16, 16, 3) for f in got)
    assert [f.timestamp for f in got] == sorted(f.timestamp for f in got) and got[0].timestamp >= t0
    if available("matplotlib"):
        import matplotlib.pyplot as plt

        folder = tmp_path / "pngs"
        folder.mkdir()
        plt.imsave(folder / "000.png", frames[0])
        img = FolderCamera(folder).read().images[0]
        assert img.dtype == np.uint8 and img.shape == (32, 48, 3) and np.abs(img.astype(int) - frames[0]).max() <= 1


def test_missing_sources_say_what_to_do(tmp_path) -> None:
    with pytest.raises(CameraError, match="does not exist"):
        open_camera(f"video:{tmp_path}/nothing", size=64)
    with pytest.raises(CameraError, match="realsense"):
        open_camera("webcam", size=64)
    if not available("pyrealsense2"):
        with pytest.raises(MissingDependencyError, match=r"edge-vla\[realsense\]"):
            open_camera("realsense:123", size=64)


def test_resize_nearest() -> None:
    img = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    assert resize_nearest(img, 2).shape == (2, 2, 3) and resize_nearest(img, 4) is img


@pytest.mark.parametrize("suffix", [".mcap", ".jsonl"])
def test_telemetry_roundtrip(tmp_path, suffix) -> None:
    if suffix == ".mcap" and not available("mcap"):
        pytest.skip("mcap not installed")
    tel = Telemetry(tmp_path / f"run{suffix}")
    for i in range(100):
        tel.record("/control/cycle", 1.0 + i * 0.01, {"n": i, "sent": [0.1, 0.2]})
    tel.record("/watchdog/event", 2.0, {"event": "armed"})
    tel.drain(1.0)
    tel.close()
    recs = read_records(tel.path)
    assert len(recs) == 101 and recs[0]["n"] == 0 and recs[-1]["event"] == "armed"


def test_summary_fits_one_screen() -> None:
    stats = CycleStats(0.01)
    for i in range(100):
        stats.add(i * 0.01 + (0.0002 if i % 10 == 0 else 0.0), 0.0001, 0.0005, 0)
    s = summarize(stats, missed=2, clamps={"velocity": 3, "position": 0},
                  trips=[{"kind": "link_stale", "category": 0, "reason": "no state", "t": 1.0}])
    text = format_summary(s)
    assert s["period_error"]["max_ms"] == pytest.approx(0.2, abs=1e-6)
    assert "velocity 3" in text and "cat 0 link_stale" in text and len(text.splitlines()) < 25


class _FakeTime:
    """rt's clock, stepped by the test: a descheduled test process cannot make a deadline late by itself."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        self.now += 1e-6  # every reading takes a microsecond, so the clock's spin loop ends
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_deadline_clock_skips_missed_deadlines_instead_of_replaying(monkeypatch) -> None:
    import edge_vla.onboard.rt as rt

    fake = _FakeTime()
    monkeypatch.setattr(rt, "time", fake)
    clock = DeadlineClock(0.01, spin_s=0.0)
    clock.wait()
    fake.sleep(0.055)  # a long cycle: 5+ deadlines pass
    clock.wait()
    assert clock.missed >= 4 and clock.consecutive == 1
    # The next deadline is in the future again: no burst of catch-up cycles.
    assert clock.slack() > -0.001
    clock.wait()
    assert clock.consecutive == 0


def test_shared_bus_records() -> None:
    # Across processes it is exercised by every emulator test (the control loop runs in a spawned child).
    bus = SharedBus(2, max_chunk_len=8)
    assert bus.read_state() is None and bus.read_chunk() is None
    bus.write_state(np.array([0.1, 0.2]), np.zeros(2), 5.0)
    seq = bus.publish_chunk(np.ones((8, 2)), 0.1, 4.9, np.array([0.1, 0.2]))
    assert bus.read_state().time == 5.0
    chunk, _ = bus.read_chunk()
    assert chunk.seq == seq == 1 and chunk.actions.shape == (8, 2) and chunk.obs_timestamp == 4.9
    with pytest.raises(ValueError, match="does not fit"):
        bus.publish_chunk(np.ones((9, 2)), 0.1, 0.0, np.zeros(2))
