"""LeRobot v3.0 / v2.1 layout, frame-exact read-back, chunking and resampling, splits and statistics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from lerobot_data import FPS, LENGTHS, TASKS

from edge_vla.export.lerobot import load_dataset, open_meta, parse_source, write_dataset
from edge_vla.export.lerobot.layout import DEFAULT_DATA_PATH, DEFAULT_VIDEO_PATH, LEGACY_DATA_PATH, LEGACY_VIDEO_PATH
from edge_vla.export.lerobot.reader import action_chunks, split_episodes
from edge_vla.export.lerobot.video import decode_segment
from edge_vla.onboard.cameras import resize_nearest

CAMS = ["observation.images.main", "observation.images.wrist"]
STARTS = np.cumsum((0, *LENGTHS))


def test_v30_layout_is_lerobots(v30: Path) -> None:
    info = json.loads((v30 / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["fps"] == FPS and info["total_episodes"] == 3
    assert info["data_path"] == "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    assert info["video_path"] == "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
    assert info["features"]["observation.state"] == {"dtype": "float32", "shape": [3], "names": ["j0", "j1", "j2"]}
    assert info["features"][CAMS[0]]["shape"] == [48, 64, 3]
    assert info["features"][CAMS[0]]["info"]["video.codec"] == "h264"
    # Two episodes per file: file-000 holds episodes 0 and 1, file-001 episode 2.
    assert sorted(p.relative_to(v30).as_posix() for p in (v30 / "data").rglob("*.parquet")) == [
        DEFAULT_DATA_PATH.format(chunk_index=0, file_index=i) for i in (0, 1)]
    assert (v30 / DEFAULT_VIDEO_PATH.format(video_key=CAMS[1], chunk_index=0, file_index=1)).is_file()
    eps = pq.read_table(v30 / "meta/episodes/chunk-000/file-000.parquet").to_pydict()
    assert eps["length"] == list(LENGTHS) and eps["dataset_from_index"] == STARTS[:-1].tolist()
    assert eps[f"videos/{CAMS[0]}/from_timestamp"] == pytest.approx([0.0, LENGTHS[0] / FPS, 0.0])
    assert eps[f"videos/{CAMS[0]}/to_timestamp"] == pytest.approx([LENGTHS[0] / FPS, sum(LENGTHS[:2]) / FPS,
                                                                   LENGTHS[2] / FPS])
    assert eps["tasks"][1] == [TASKS[1]] and "stats/action/q99" in eps
    tasks = pq.read_table(v30 / "meta/tasks.parquet")
    assert json.loads(tasks.schema.metadata[b"pandas"])["index_columns"] == ["task"]  # pandas restores the index
    stats = json.loads((v30 / "meta/stats.json").read_text())
    assert set(stats["action"]) == {"min", "max", "mean", "std", "count", "q01", "q10", "q50", "q90", "q99"}
    assert np.asarray(stats[CAMS[0]]["mean"]).shape == (3, 1, 1)  # per channel in [0, 1], as LeRobot's
    data = pq.read_table(v30 / DEFAULT_DATA_PATH.format(chunk_index=0, file_index=0))
    assert data.schema.field("action").type.list_size == 4 and data.num_rows == LENGTHS[0] + LENGTHS[1]


def test_v21_layout_is_lerobots(v21: Path) -> None:
    info = json.loads((v21 / "meta/info.json").read_text())
    assert info["codebase_version"] == "v2.1" and info["total_chunks"] == 1
    for e in range(3):
        assert (v21 / LEGACY_DATA_PATH.format(episode_chunk=0, episode_index=e)).is_file()
        assert (v21 / LEGACY_VIDEO_PATH.format(episode_chunk=0, video_key=CAMS[0], episode_index=e)).is_file()
    lines = (v21 / "meta/episodes.jsonl").read_text().splitlines()
    assert json.loads(lines[1]) == {"episode_index": 1, "tasks": [TASKS[1]], "length": LENGTHS[1]}
    assert [json.loads(x)["task"] for x in (v21 / "meta/tasks.jsonl").read_text().splitlines()] == list(TASKS[:2])
    assert len((v21 / "meta/episodes_stats.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize("version", ["v30", "v21"])
def test_frames_read_back_exactly(request: pytest.FixtureRequest, recording, version: str) -> None:
    root = request.getfixturevalue(version)
    meta = open_meta(root)
    for ep in meta.episodes:
        a, b = STARTS[ep.index], STARTS[ep.index + 1]
        for c, cam in enumerate(CAMS):
            ts = (np.arange(b - a) / FPS).tolist()
            frames = decode_segment(ep.videos[cam], ts, cam, ep.index)
            assert np.array_equal(frames, recording.images[a:b, c])  # lossless: bit-exact
    ds = load_dataset(f"lerobot:{root}?val=0", image_size=32, num_cameras=2, chunk_len=5, split="all")
    want = np.stack([[resize_nearest(img, 32) for img in frame] for frame in recording.images])
    assert np.array_equal(ds.images, want)
    assert np.array_equal(ds.states, recording.states)
    assert ds.instructions.tolist() == recording.instructions.tolist()
    assert ds.episodes.tolist() == np.repeat([0, 1, 2], LENGTHS).tolist()
    assert np.array_equal(ds.actions[:, 0], recording.actions)


def test_chunks_at_the_models_period(v30: Path, recording) -> None:
    a = recording.actions[: LENGTHS[0]]
    frames = np.arange(LENGTHS[0])
    same = action_chunks(a, frames, 4, 1.0)
    assert np.array_equal(same[3], a[3:7]) and np.array_equal(same[-1], np.repeat(a[-1:], 4, 0))  # held at the end
    assert np.array_equal(action_chunks(a, frames, 4, 2.0)[2], a[[2, 4, 6, 8]])
    half = action_chunks(a, frames, 4, 1.5)  # a 20 Hz model on 30 fps data: interpolated
    t = np.arange(LENGTHS[0])
    want = np.stack([np.interp(5 + 1.5 * np.arange(4), t, a[:, d]) for d in range(4)], 1)
    assert np.allclose(half[5], want, atol=1e-6)
    ds = load_dataset(f"lerobot:{v30}?val=0&period={1.5 / FPS}&stride=3", 64, 1, 4, split="all")
    assert ds.meta["action_period_s"] == pytest.approx(0.05) and len(ds) == sum((n + 2) // 3 for n in LENGTHS)
    assert np.allclose(ds.actions[1], action_chunks(a, np.array([3]), 4, 1.5)[0], atol=1e-6)  # frame 3


def test_split_is_by_episode_and_reproducible(v30: Path) -> None:
    train, val = split_episodes(list(range(20)), 0.1, seed=3)
    assert len(val) == 2 and not set(train) & set(val) and sorted(train + val) == list(range(20))
    assert split_episodes(list(range(20)), 0.1, seed=3) == (train, val)
    tr = load_dataset(f"lerobot:{v30}?val=0.34", 64, 1, 8, split="train")
    va = load_dataset(f"lerobot:{v30}?val=0.34", 64, 1, 8, split="val")
    assert set(tr.episodes.tolist()).isdisjoint(va.episodes.tolist())
    assert len(tr) + len(va) == sum(LENGTHS) and va.meta["episodes"] == tr.meta["val_episodes"]


def test_statistics_come_from_the_dataset(v30: Path, v21: Path, recording) -> None:
    stats = json.loads((v30 / "meta/stats.json").read_text())
    ds = load_dataset(f"lerobot:{v30}?val=0.34", 64, 1, 8, split="val")  # one episode, but dataset-wide stats
    assert np.allclose(ds.action_stats()["mean"], stats["action"]["mean"])
    assert np.allclose(ds.action_stats()["mean"], recording.actions.mean(0))
    assert np.allclose(ds.state_stats()["std"], recording.states.std(0) + 1e-6, atol=1e-6)
    assert ds.normalization["action"]["q99"] == stats["action"]["q99"]
    old = load_dataset(f"lerobot:{v21}?val=0.34", 64, 1, 8, split="val")  # pooled from episodes_stats.jsonl
    assert np.allclose(old.action_stats()["std"], ds.action_stats()["std"], atol=1e-6)
    space = ds.action_space
    assert space.names == ("a0", "a1", "a2", "gripper") and space.action_period_s == pytest.approx(1 / FPS)
    assert np.all(space.lower < recording.actions.min(0)) and np.all(space.upper > recording.actions.max(0))


def test_sim_demonstrations_take_the_same_path(tmp_path: Path) -> None:
    from edge_vla.sim import dataset

    sim = dataset.generate(range(2), image_size=64, chunk_len=8)
    root = write_dataset(sim, tmp_path / "sim", version="v3.0")
    ds = load_dataset(f"lerobot:{root}?val=0", 64, 1, 8, split="all")
    assert open_meta(root).fps == 10  # the sim's 0.1 s action period
    assert np.array_equal(ds.images, sim.images) and np.array_equal(ds.states, sim.states)
    assert np.array_equal(ds.actions[:, 0], sim.actions[:, 0])
    assert ds.instructions.tolist() == sim.instructions.tolist()


def test_av1_video_decodes_within_codec_loss(tmp_path: Path) -> None:
    """LeRobot's default encoding (AV1, 4:2:0, crf 30): lossy, so within the codec's loss on smooth sim frames."""
    from edge_vla.sim import dataset

    sim = dataset.generate(range(1), image_size=64, chunk_len=8)
    root = write_dataset(sim, tmp_path / "av1", version="v3.0", encoder="av1")
    assert json.loads((root / "meta/info.json").read_text())["features"]["observation.images.main"]["info"][
        "video.codec"] == "av1"
    ds = load_dataset(f"lerobot:{root}?val=0", 64, 1, 8, split="all")
    err = np.abs(ds.images.astype(int) - sim.images.astype(int))
    assert err.mean() < 4.0 and ds.images.shape == sim.images.shape


def test_source_options_parse() -> None:
    spec = parse_source("lerobot:~/data/x?cameras=a,b&val=0.2&stride=2&period=0.05&episodes=0,3")
    assert spec.cameras == ("a", "b") and spec.val_fraction == 0.2 and spec.stride == 2 and spec.episodes == (0, 3)
    assert spec.root == Path("~/data/x").expanduser() and spec.period == 0.05
