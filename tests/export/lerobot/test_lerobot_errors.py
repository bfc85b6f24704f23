"""Bad input: each failure says what is wrong and what to do."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from lerobot_data import FPS, error_line

from edge_vla.export.lerobot import LeRobotDatasetError, load_dataset
from edge_vla.export.lerobot.layout import LEGACY_VIDEO_PATH
from edge_vla.export.lerobot.video import VideoWriter

MAIN = "observation.images.main"
EPISODES = "meta/episodes/chunk-000/file-000.parquet"


@pytest.fixture
def copy_v30(v30: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(v30, tmp_path / "ds"))


def read(root: Path, query: str = "val=0", **kw) -> None:
    load_dataset(f"lerobot:{root}?{query}", kw.pop("image_size", 64), kw.pop("num_cameras", 1), 8, split="all", **kw)


def test_missing_video(copy_v30: Path) -> None:
    (copy_v30 / f"videos/{MAIN}/chunk-000/file-001.mp4").unlink()
    with pytest.raises(LeRobotDatasetError, match=r"video for camera 'observation.images.main' is missing: .*"
                       r"file-001.mp4. Download the dataset's videos"):
        read(copy_v30)


def test_timestamp_outside_its_segment(copy_v30: Path) -> None:
    path = copy_v30 / EPISODES
    table = pq.read_table(path)
    col = f"videos/{MAIN}/to_timestamp"
    ends = table[col].to_pylist()
    ends[1] = ends[1] - 0.2  # episode 1's span now ends 6 frames before its last frame
    pq.write_table(table.set_column(table.schema.get_field_index(col), col, pa.array(ends)), path)
    with pytest.raises(LeRobotDatasetError, match=r"episode 1, camera 'observation.images.main': frame timestamp "
                       r"0.4\d+ s lies outside its video segment .* re-run LeRobot's conversion"):
        read(copy_v30)


def test_video_shorter_than_its_episode(v21: Path, recording, tmp_path: Path) -> None:
    root = Path(shutil.copytree(v21, tmp_path / "ds"))
    path = root / LEGACY_VIDEO_PATH.format(episode_chunk=0, video_key=MAIN, episode_index=0)
    writer = VideoWriter(path, FPS, 64, 48)
    writer.append(recording.images[:10, 0])  # 10 of the episode's 25 frames
    writer.close()
    with pytest.raises(LeRobotDatasetError, match=r"episode 0, camera 'observation.images.main': the video "
                       r".*episode_000000.mp4 is damaged or shorter than the episode: its frames end at 0.3000 s but "
                       r"the episode needs frames up to 0.8000 s \(15 of 25 frames missing\)"):
        read(root)


def faststart(path: Path) -> None:
    """Rewrite an mp4 with its index (moov) in front, as many published datasets are: a file cut short then
    still opens, and decoding simply stops where the data ends."""
    av = pytest.importorskip("av")
    tmp = path.with_suffix(".fast.mp4")
    with av.open(str(path)) as src, av.open(str(tmp), "w", format="mp4", options={"movflags": "faststart"}) as dst:
        stream = dst.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                dst.mux(packet)
    tmp.replace(path)


def test_truncated_video_is_reported_as_damaged(copy_v30: Path) -> None:
    """A download cut short: not a timestamp outside the video, not a re-timed file, but this file, damaged."""
    path = copy_v30 / f"videos/{MAIN}/chunk-000/file-000.mp4"
    faststart(path)
    read(copy_v30)  # control: the rewritten file is whole and reads
    blob = path.read_bytes()
    path.write_bytes(blob[: int(len(blob) * 0.6)])
    with pytest.raises(LeRobotDatasetError) as info:
        read(copy_v30)
    msg = str(info.value)
    assert f"the video {path} is damaged or shorter than the episode" in msg, msg
    assert "the file declares" in msg and "cut short" in msg and "re-download" in msg.lower(), msg
    assert "None" not in msg and "re-timed" not in msg and len(msg.splitlines()) == 1, msg


def test_retimed_video_is_still_reported_as_retimed(v21: Path, recording, tmp_path: Path) -> None:
    """Control for the damaged-file message: a whole video at the wrong rate (25 fps for 30 fps data) has frames
    past every wanted timestamp, so it is the timing that is wrong, not the file."""
    root = Path(shutil.copytree(v21, tmp_path / "ds"))
    path = root / LEGACY_VIDEO_PATH.format(episode_chunk=0, video_key=MAIN, episode_index=0)
    path.unlink()
    writer = VideoWriter(path, 25, 64, 48)
    writer.append(recording.images[:25, 0])
    writer.close()
    with pytest.raises(LeRobotDatasetError, match=r"episode 0, camera 'observation.images.main': no frame within "
                       r"0.0001 s of 0.0333 s .*The video was re-timed or its timestamps are offset"):
        read(root)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edge_vla.config import preset
    from edge_vla.export.checkpoint import save_checkpoint
    from edge_vla.export.model import VLA

    return save_checkpoint(VLA(preset("tiny")), tmp_path_factory.mktemp("calib") / "ckpt")


@pytest.mark.parametrize("calib", ["{tmp}/missing.npz", "{tmp}/empty", "lerobot:{tmp}/missing", "{tmp}/not_npz.txt"])
def test_export_checks_calib_before_any_export_work(checkpoint: Path, tmp_path: Path, calib: str,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from edge_vla.cli import main
    from edge_vla.export import exporter

    (tmp_path / "empty").mkdir()
    (tmp_path / "not_npz.txt").write_text("frames\n")
    graphs = []  # a spy on the ONNX export: it must not start for a bad --calib
    monkeypatch.setattr(exporter, "export_graphs", lambda *a, **k: graphs.append(a))
    source = calib.format(tmp=tmp_path)
    out = tmp_path / "bundle"
    assert main(["export", str(checkpoint), "-o", str(out), "--precision", "int8", "--calib", source]) == 1
    err = error_line(capsys.readouterr().err)
    assert "--calib" in err and str(tmp_path) in err, err
    assert graphs == [] and not out.exists()


def test_export_calib_check_passes_a_good_source(checkpoint: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Control for the spy above: with a readable --calib the export does reach the ONNX export."""
    from edge_vla.cli import main
    from edge_vla.export import exporter
    from edge_vla.sim import dataset

    dataset.save(dataset.generate(range(1)), tmp_path / "calib.npz")

    class Reached(Exception):
        pass

    def stop(*_a: object, **_k: object) -> None:
        raise Reached

    monkeypatch.setattr(exporter, "export_graphs", stop)
    with pytest.raises(Reached):
        main(["export", str(checkpoint), "-o", str(tmp_path / "bundle"), "--precision", "int8",
              "--calib", str(tmp_path / "calib.npz")])


def test_feature_the_model_needs(v30: Path) -> None:
    with pytest.raises(LeRobotDatasetError, match=r"needs the state but the dataset has no feature "
                       r"'observation.velocity' .*name the right one with \?state=KEY"):
        read(v30, "state=observation.velocity")
    with pytest.raises(LeRobotDatasetError, match=r"feature 'action' has 4 dimension\(s\) but the model's action has 2"):
        read(v30, action_dim=2)
    with pytest.raises(LeRobotDatasetError, match=r"the model needs 3 camera\(s\) but the dataset has video features "
                       r"\['observation.images.main', 'observation.images.wrist'\]"):
        read(v30, num_cameras=3)
    with pytest.raises(LeRobotDatasetError, match=r"camera\(s\) \['top'\] not in the dataset"):
        read(v30, "cameras=top")


def test_unsupported_codec(copy_v30: Path) -> None:
    """A video whose codec FFmpeg has no decoder for: the H.264 sample entry renamed to an unknown fourcc."""
    path = copy_v30 / f"videos/{MAIN}/chunk-000/file-000.mp4"
    blob = bytearray(path.read_bytes())
    entry = blob.index(b"avc1", blob.index(b"stsd"))  # the sample entry, not the ftyp brand
    blob[entry:entry + 4] = b"zzz9"
    path.write_bytes(bytes(blob))
    with pytest.raises(LeRobotDatasetError, match=r"video codec .* cannot be decoded by this PyAV/FFmpeg build. "
                       r"Re-encode the dataset's videos to H.264 or AV1"):
        read(copy_v30)


def test_not_a_dataset_and_unsupported_version(copy_v30: Path, tmp_path: Path) -> None:
    with pytest.raises(LeRobotDatasetError, match=r"is not a LeRobot dataset: meta/info.json is missing"):
        read(tmp_path / "nothing")
    info = json.loads((copy_v30 / "meta/info.json").read_text())
    (copy_v30 / "meta/info.json").write_text(json.dumps(info | {"codebase_version": "v1.6"}))
    with pytest.raises(LeRobotDatasetError, match=r"codebase_version 'v1.6' is not supported .* convert it"):
        read(copy_v30)


def test_bad_source_options(v30: Path) -> None:
    with pytest.raises(LeRobotDatasetError, match=r"unknown option\(s\) \['camera'\]"):
        read(v30, "camera=x")
    with pytest.raises(LeRobotDatasetError, match=r"the 'val' split is empty"):
        load_dataset(f"lerobot:{v30}?val=0", 64, 1, 8, split="val")
