"""A camera's decoded frames must have the size meta/info.json declares for it (features[key]["shape"]): a video
re-encoded at another size, or a shape that does not describe the video, is one LeRobotDatasetError naming the
camera, the declared shape, the decoded one, the episode and the file, never silently resized into training
data. A video feature's shape that is not three positive whole numbers is refused when the metadata is read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import torch
from lerobot_data import FPS, error_line, make_recording

from edge_vla.cli import main
from edge_vla.export.lerobot import LeRobotDatasetError, load_dataset, open_meta
from edge_vla.export.lerobot.layout import DEFAULT_VIDEO_PATH, LEGACY_VIDEO_PATH
from edge_vla.export.lerobot.video import VideoWriter
from edge_vla.onboard.cameras import resize_nearest

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
MAIN = "observation.images.main"


def _read(root: Path) -> Any:
    return load_dataset(f"lerobot:{root}?val=0", 64, 1, 8, split="all")


def _copy(source: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(source, tmp_path / "ds"))


def _reencode(path: Path, height: int, width: int) -> None:
    """The same frames at the same times, at height x width (nearest neighbour), losslessly re-encoded."""
    with av.open(str(path)) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    rows = np.arange(height) * frames.shape[1] // height
    cols = np.arange(width) * frames.shape[2] // width
    tmp = path.with_name("resized.mp4")
    writer = VideoWriter(tmp, FPS, width, height)
    writer.append(frames[:, rows][:, :, cols])
    writer.close()
    tmp.replace(path)


def _set_feature(root: Path, **fields: Any) -> Path:
    path = root / "meta/info.json"
    doc = json.loads(path.read_text())
    doc["features"][MAIN].update(fields)
    path.write_text(json.dumps(doc))
    return path


def _one_line(err: pytest.ExceptionInfo[LeRobotDatasetError], *named: str) -> str:
    msg = str(err.value)
    assert len(msg.splitlines()) == 1 and all(n in msg for n in named), msg
    return msg


# Episode 2 of v3.0 is alone in file-001 (two episodes per file); episode 1 of v2.1 has its own file.
@pytest.mark.parametrize(("version", "episode", "rel"), [
    ("v30", 2, DEFAULT_VIDEO_PATH.format(video_key=MAIN, chunk_index=0, file_index=1)),
    ("v21", 1, LEGACY_VIDEO_PATH.format(episode_chunk=0, video_key=MAIN, episode_index=1)),
])
def test_a_video_of_another_size_is_named(request: pytest.FixtureRequest, tmp_path: Path, version: str,
                                          episode: int, rel: str) -> None:
    """320x240 where 480x640 is declared, in small: 24x32 where info.json says [48, 64, 3]. It was resized to the
    model's input like any other frame and trained on, with no word."""
    root = _copy(request.getfixturevalue(version), tmp_path)
    _reencode(root / rel, 24, 32)
    with pytest.raises(LeRobotDatasetError) as err:
        _read(root)
    _one_line(err, f"episode {episode}, camera {MAIN!r}", str(root / rel), "24x32x3",
              "declares shape [48, 64, 3]")


def test_a_declared_channel_count_other_than_the_videos_is_named(v30: Path, tmp_path: Path) -> None:
    """Frames decode as 3-channel RGB: a feature declaring 1 channel does not describe this video."""
    root = _copy(v30, tmp_path)
    _set_feature(root, shape=[48, 64, 1])
    with pytest.raises(LeRobotDatasetError) as err:
        _read(root)
    _one_line(err, f"episode 0, camera {MAIN!r}", "48x64x3", "declares shape [48, 64, 1]", "file-000.mp4")


def test_a_declared_size_with_height_and_width_swapped_is_named(v21: Path, tmp_path: Path) -> None:
    root = _copy(v21, tmp_path)
    _set_feature(root, shape=[64, 48, 3])
    with pytest.raises(LeRobotDatasetError) as err:
        _read(root)
    _one_line(err, f"episode 0, camera {MAIN!r}", "48x64x3", "declares shape [64, 48, 3]", "episode_000000.mp4")


@pytest.mark.parametrize("shape", [[48, 64], [48, 64, 3, 1], [3], [48, "64", 3], [48, 64, 3.0], [48, 0, 3],
                                   [48, -64, 3], [True, 64, 3], "48x64x3", {"h": 48}])
def test_a_video_shape_that_is_not_three_positive_integers_is_refused_at_metadata_load(
        v30: Path, tmp_path: Path, shape: Any) -> None:
    root = _copy(v30, tmp_path)
    path = _set_feature(root, shape=shape)
    with pytest.raises(LeRobotDatasetError) as err:
        open_meta(root)  # the metadata alone: no frame is decoded
    _one_line(err, str(path), f"feature {MAIN!r}", repr(shape))


def test_cli_train_names_the_wrong_size_in_one_line(v30: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    root = _copy(v30, tmp_path)
    _reencode(root / DEFAULT_VIDEO_PATH.format(video_key=MAIN, chunk_index=0, file_index=0), 24, 32)
    out = tmp_path / "ckpt"
    threads = torch.get_num_threads()
    try:
        assert main(["train", "--data", f"lerobot:{root}?val=0", "--steps", "2", "--batch-size", "4", "--threads",
                     "1", "-o", str(out)]) == 1
    finally:
        torch.set_num_threads(threads)
    err = error_line(capsys.readouterr().err)
    assert f"camera {MAIN!r}" in err and "24x32x3" in err and "[48, 64, 3]" in err, err
    assert not out.exists()


def test_control_matching_datasets_read_and_their_frames_are_the_recordings(v30: Path, v21: Path,
                                                                            tmp_path: Path) -> None:
    """The same copies, undamaged, read, and every frame is the recorded one (lossless video, resized as on the
    robot); the channel-first spelling LeRobot also reads ([3, H, W] with names channels, height, width: older
    conversions such as lerobot/pusht) describes the same video and reads too."""
    rec = make_recording()
    want = np.stack([resize_nearest(img, 64) for img in rec.images[:, 0]])
    for name, source in (("v30", v30), ("v21", v21)):
        ds = _read(_copy(source, tmp_path / name))
        assert ds.images.shape == (74, 1, 64, 64, 3)
        np.testing.assert_array_equal(ds.images[:, 0], want)
    root = _copy(v30, tmp_path / "chw")
    _set_feature(root, shape=[3, 48, 64], names=["channels", "height", "width"])
    np.testing.assert_array_equal(_read(root).images[:, 0], want)
