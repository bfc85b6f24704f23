"""Video frames in and out with PyAV (FFmpeg): decode an episode's frames from its segment of a file,
and encode frames into an mp4 (several episodes one after the other, as LeRobot v3.0 stores them)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from edge_vla.optional import require

from .errors import LeRobotDatasetError
from .layout import FrameShape, VideoSegment

log = logging.getLogger(__name__)

# LeRobot's default (lerobot_dataset.py: tolerance_s=1e-4): a frame is the one asked for only this close.
TOLERANCE_S = 1e-4
_MAX_PTS = 1 << 62  # a seek target FFmpeg's int64 takes; anything later is past the end of any video
_PAST_END_S = 1.0

# Encoders the writer offers: name -> (PyAV codec, pixel format, options).
ENCODERS: dict[str, tuple[str, str, dict[str, str]]] = {
    # Lossless RGB H.264: decoded frames equal the written ones bit for bit.
    "h264-lossless": ("libx264rgb", "rgb24", {"crf": "0", "preset": "ultrafast"}),
    # What most recorded datasets hold: lossy H.264 4:2:0.
    "h264": ("libx264", "yuv420p", {"crf": "18", "preset": "veryfast"}),
    # LeRobot's own default (VideoEncoderConfig: libsvtav1, yuv420p, crf 30).
    "av1": ("libsvtav1", "yuv420p", {"crf": "30", "preset": "8"}),
}


def check_decodable(path: Path, camera: str) -> None:
    """Fail early, before decoding, when the file is absent or its codec has no decoder in this FFmpeg."""
    av = require("av")
    if not path.is_file():
        raise LeRobotDatasetError(
            f"video for camera {camera!r} is missing: {path}. Download the dataset's videos too (e.g. "
            "`huggingface-cli download --repo-type dataset REPO --include 'videos/*'`), or choose cameras that "
            "are present with ?cameras=KEY1,KEY2")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise LeRobotDatasetError(f"{path} holds no video stream; re-encode the camera {camera!r}")
            stream = container.streams.video[0]
            ctx = stream.codec_context
            name = ctx.name if ctx is not None else None
            if not name or name == "none" or ctx.codec is None or not ctx.codec.is_decoder:
                raise _unsupported(path, name)
    except LeRobotDatasetError:
        raise
    except av.error.FFmpegError as exc:
        raise LeRobotDatasetError(f"{path} cannot be opened as a video ({exc}); the file is damaged or not a "
                                  "video: re-download it") from exc


def _unsupported(path: Path, name: str | None) -> LeRobotDatasetError:
    return LeRobotDatasetError(
        f"{path}: video codec {name or 'unknown to FFmpeg'!r} cannot be decoded by this PyAV/FFmpeg build. "
        "Re-encode the dataset's videos to H.264 or AV1 (e.g. `ffmpeg -i in.mp4 -c:v libx264 -crf 18 -pix_fmt "
        "yuv420p out.mp4` per file) or install a PyAV wheel whose FFmpeg has that decoder")


def decode_segment(segment: VideoSegment, timestamps: Sequence[float], camera: str, episode: int,
                   transform: Callable[[np.ndarray], np.ndarray] | None = None,
                   tolerance_s: float = TOLERANCE_S, frame_shape: FrameShape | None = None) -> np.ndarray:
    """uint8 RGB frames [len(timestamps), H, W, 3] (after `transform`) at the episode's `timestamps`.

    Seeks once to the keyframe before the first wanted frame and decodes forward, as LeRobot's PyAV path
    does; every frame must be found within `tolerance_s` of segment.start + timestamp, and (before `transform`
    resizes it) be the size `frame_shape` declares."""
    av = require("av")
    check_decodable(segment.path, camera)
    want = np.asarray(timestamps, dtype=np.float64) + segment.start
    if not np.isfinite(want).all():
        raise LeRobotDatasetError(f"episode {episode}, camera {camera!r}: a frame time is not finite (segment start "
                                  f"{segment.start}, timestamps from the data); the dataset's timing is damaged")
    if segment.end is not None:
        outside = (want < segment.start - tolerance_s) | (want > segment.end + tolerance_s)
        if outside.any():
            i = int(np.argmax(outside))
            raise LeRobotDatasetError(
                f"episode {episode}, camera {camera!r}: frame timestamp {timestamps[i]:.4f} s lies outside its video "
                f"segment [{segment.start:.4f}, {segment.end:.4f}] s of {segment.path} (at {want[i]:.4f} s). The "
                "episode metadata (meta/episodes: videos/*/from_timestamp, to_timestamp) and the data disagree: "
                "re-run LeRobot's conversion for this dataset or drop the episode")
    out: list[np.ndarray | None] = [None] * len(want)
    order = np.argsort(want)
    k = 0
    last_seen = None
    declared_end = None
    try:
        with av.open(str(segment.path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            tb = stream.time_base
            if stream.duration:
                declared_end = float(stream.duration * tb)
            first = float(want[order[0]])
            # Well past the declared end (a second: a container's duration can be a little off) the timing is wrong,
            # not the file: say so before seeking there.
            if declared_end is not None and first > declared_end + _PAST_END_S:
                raise _past_the_end(segment, camera, episode, first, declared_end)
            # Bounded: a finite time can still be past any int64 pts (1e30 s was an OverflowError in the seek).
            container.seek(min(max(0, int(first / tb) - 1), _MAX_PTS), stream=stream, backward=True, any_frame=False)
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                ts = float(frame.pts * tb)
                last_seen = ts
                while k < len(order) and want[order[k]] < ts - tolerance_s:
                    k += 1  # skipped: reported as missing below
                img = None
                while k < len(order) and abs(want[order[k]] - ts) <= tolerance_s:
                    if img is None:
                        if frame_shape is not None and (frame.height, frame.width, 3) not in frame_shape.accepts:
                            raise _wrong_size(segment.path, camera, episode, frame_shape, frame.height, frame.width)
                        img = frame.to_ndarray(format="rgb24")
                        img = transform(img) if transform else img
                    out[order[k]] = img
                    k += 1
                if k >= len(order):
                    break
    except av.error.FFmpegError as exc:
        raise LeRobotDatasetError(f"{segment.path}: decoding failed ({exc}); the file is damaged: re-download "
                                  "or re-encode it") from exc
    missing = [i for i, f in enumerate(out) if f is None]
    if missing:
        raise _missing_frames(segment.path, camera, episode, want, missing, last_seen, declared_end, tolerance_s)
    return np.stack(out)  # type: ignore[arg-type]


def _wrong_size(path: Path, camera: str, episode: int, declared: FrameShape, height: int,
                width: int) -> LeRobotDatasetError:
    return LeRobotDatasetError(
        f"episode {episode}, camera {camera!r}: {path} decodes to {height}x{width}x3 frames (height x width x RGB "
        f"channels) but meta/info.json declares shape {list(declared.declared)} (names {repr(declared.names)[:80]}) "
        "for this camera; the video was re-encoded or replaced, or the metadata is wrong: re-download the video, or "
        f"correct features[{camera!r}].shape in meta/info.json")


def _past_the_end(segment: VideoSegment, camera: str, episode: int, first: float,
                  declared_end: float) -> LeRobotDatasetError:
    return LeRobotDatasetError(
        f"episode {episode}, camera {camera!r}: frames are wanted from {first:.6g} s but {segment.path} holds "
        f"{declared_end:.4f} s of video; the episode's timestamps (data/) or its videos/*/from_timestamp "
        "(meta/episodes) do not belong to this file: re-run LeRobot's conversion or drop the episode")


def _missing_frames(path: Path, camera: str, episode: int, want: np.ndarray, missing: list[int],
                    last_seen: float | None, declared_end: float | None, tolerance_s: float) -> LeRobotDatasetError:
    """Why wanted frames were not found. Frames wanted past the last one that decodes: the file is damaged
    (cut short: a partial download or copy) or shorter than the episode. Frames missing while the video runs
    on past them: the timing is wrong (a re-timed file, or timestamps offset in the metadata)."""
    where = f"episode {episode}, camera {camera!r}"
    count = f"{len(missing)} of {len(want)} frames missing"
    beyond = [i for i in missing if last_seen is None or want[i] > last_seen + tolerance_s]
    if beyond:
        ends = (f"no frame decodes from {float(want[min(missing, key=lambda i: want[i])]):.4f} s on"
                if last_seen is None else f"its frames end at {last_seen:.4f} s")
        cut = ""
        if declared_end is not None and (last_seen is None or declared_end > last_seen + 2 * _frame_gap(want)):
            cut = f"; the file declares {declared_end:.4f} s of video, so it is cut short"
        return LeRobotDatasetError(
            f"{where}: the video {path} is damaged or shorter than the episode: {ends} but the episode needs frames "
            f"up to {float(want.max()):.4f} s ({count}){cut}. Re-download the file, or re-encode it from the original "
            "recording")
    i = missing[0]
    return LeRobotDatasetError(
        f"{where}: no frame within {tolerance_s:g} s of {float(want[i]):.4f} s in {path} ({count}, though the video "
        f"has frames up to {last_seen:.4f} s). The video was re-timed or its timestamps are offset: check "
        "videos/*/from_timestamp in meta/episodes and the video's fps against info.json's")


def _frame_gap(want: np.ndarray) -> float:
    """The spacing of the wanted frames (one frame period at stride 1), 0 for a single frame."""
    return float(np.min(np.diff(np.sort(want)))) if len(want) > 1 else 0.0


@contextlib.contextmanager
def _scheduler_kept() -> Iterator[None]:
    """SVT-AV1 (libsvtav1, LeRobot's default encoder) switches the thread that drives it to SCHED_FIFO priority 99
    as root (measured with PyAV 14 here: os.sched_getscheduler(0) == SCHED_FIFO after the first frame). A data
    writer must not become a real-time hog, nor hand that policy to every process it starts: restore it."""
    policy, param = os.sched_getscheduler(0), os.sched_getparam(0)
    try:
        yield
    finally:
        if os.sched_getscheduler(0) != policy or os.sched_getparam(0) != param:
            os.sched_setscheduler(0, policy, param)


class VideoWriter:
    """Appends RGB frames to one mp4 at a fixed fps; returns each episode's [start, end) span in seconds."""

    def __init__(self, path: Path, fps: int, width: int, height: int, encoder: str = "h264-lossless",
                 gop: int | None = None) -> None:
        av = require("av")
        if encoder not in ENCODERS:
            raise LeRobotDatasetError(f"unknown video encoder {encoder!r}; choose one of {sorted(ENCODERS)}")
        codec, pix_fmt, options = ENCODERS[encoder]
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.fps = path, fps
        self.container = av.open(str(path), "w")
        opts = dict(options, g=str(gop or fps))
        self.stream = self.container.add_stream(codec, rate=fps, options=opts)
        self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, pix_fmt
        self.stream.time_base = Fraction(1, fps)
        self.frames = 0
        self.codec, self.pix_fmt = codec, pix_fmt

    def append(self, frames: np.ndarray) -> tuple[float, float]:
        av = require("av")
        start = self.frames / self.fps
        with _scheduler_kept():
            for img in frames:
                vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
                vf.pts, vf.time_base = self.frames, Fraction(1, self.fps)
                self.container.mux(self.stream.encode(vf))
                self.frames += 1
        return start, self.frames / self.fps

    def close(self) -> None:
        with _scheduler_kept():
            self.container.mux(self.stream.encode())
            self.container.close()


def video_info(path: Path) -> dict[str, Any]:
    """The `info` block LeRobot keeps per video feature in meta/info.json (video_utils.get_video_info)."""
    av = require("av")
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        return {"video.height": s.height, "video.width": s.width, "video.codec": s.codec.canonical_name,
                "video.pix_fmt": s.pix_fmt, "video.is_depth_map": False, "video.fps": int(s.base_rate),
                "video.channels": 3, "has_audio": bool(c.streams.audio)}
