"""Camera sources. Every source returns a `Frame` with a monotonic capture timestamp.

    realsense[:SERIAL]   Intel RealSense via pyrealsense2 (colour, optional aligned depth, hardware time)
    video:PATH           a folder of images (.png/.jpg via matplotlib, .npy), an .npy array [N, H, W, 3],
                         or a video file (needs OpenCV)
    sim                  the edge_vla.sim scene rendered at the joint angles the motor controller reports

`open_camera(spec, ...)` parses the spec; missing devices and packages raise `CameraError` / a
`MissingDependencyError` that say what to install or plug in.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from edge_vla.onboard.errors import CameraError
from edge_vla.optional import require

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".npy")


@dataclass
class Frame:
    images: list[np.ndarray]  # HxWx3 uint8 RGB, one per camera
    timestamp: float  # time.monotonic() at capture (oldest image)
    hw_timestamp_ms: float | None = None  # the device's own clock, where it has one
    depth: list[np.ndarray] = field(default_factory=list)  # aligned depth (metres), where enabled


class CameraSource(Protocol):
    def read(self) -> Frame: ...
    def close(self) -> None: ...


def camera_name(camera: object) -> str:
    """How messages name `camera`: its `name` (the --camera spec it was opened from), else its type."""
    name = getattr(camera, "name", None)
    return name if isinstance(name, str) and name else type(camera).__name__


FUTURE_STAMP_S = 1.0  # a capture time this far past time.monotonic() is on another clock


def frame_problem(frame: object, images: int | None = None) -> str | None:
    """None if `frame` is one a policy can use (a Frame of HxWx3 uint8 images with a finite capture time on
    time.monotonic()'s clock, and `images` of them where given), else what is wrong with it, for a one-line
    message. A capture time in the future would hide a stale camera from the watchdog (its age would read 0)."""
    if frame is None:
        return "no frame (None)"
    got, stamp = getattr(frame, "images", None), getattr(frame, "timestamp", None)
    if not isinstance(got, (list, tuple)) or not isinstance(stamp, (int, float)):
        return f"a {type(frame).__name__}, not a Frame"
    if not got:
        return "a frame with no images"
    if images is not None and len(got) != images:
        return f"a frame of {len(got)} images, not the {images} it started with"
    for img in got:
        if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3 \
                or 0 in img.shape:
            what = f"shape {tuple(np.shape(img))} {getattr(img, 'dtype', type(img).__name__)}"
            return f"an image of {what}, not HxWx3 uint8"
    if not np.isfinite(stamp):
        return f"a frame with capture time {stamp}"
    ahead = float(stamp) - time.monotonic()
    if ahead > FUTURE_STAMP_S:
        return f"a frame stamped {ahead:.1f} s in the future (capture times must be time.monotonic())"
    return None


def resize_nearest(img: np.ndarray, size: int) -> np.ndarray:
    """Square nearest-neighbour resize (no OpenCV on the robot); a no-op at the right size."""
    h, w = img.shape[:2]
    if h == size and w == size:
        return img
    rows = (np.arange(size) * h // size).clip(0, h - 1)
    cols = (np.arange(size) * w // size).clip(0, w - 1)
    return img[rows][:, cols]


FRAME_FORMAT = ("frames are [N, H, W, 3] (or one [H, W, 3] / [H, W] image), uint8 0-255 or float 0-1; "
                "a grayscale stack [N, H, W] needs its channel: np.repeat(a[..., None], 3, axis=-1)")


def _image_to_rgb_u8(img: np.ndarray, origin: str) -> np.ndarray:
    """One HxW, HxWx1, HxWx3 or HxWx4 image as HxWx3 uint8 RGB. Anything else is refused (CameraError naming
    `origin`): a frame the camera misreads would reach the policy as a picture of nothing, with no error."""
    a = np.asarray(img)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4) or a.shape[0] == 0 or a.shape[1] == 0:
        raise CameraError(f"{origin}: shape {tuple(np.shape(img))} is not an image; {FRAME_FORMAT}")
    a = a[:, :, :3]
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return np.ascontiguousarray(_pixels_u8(a, origin))


def _pixels_u8(a: np.ndarray, origin: str) -> np.ndarray:
    """uint8 as is, integers within 0-255, floats within 0-1 (what image readers return); nothing is clipped or
    wrapped silently (0-255 floats clipped to 0-1 are a white image; 16-bit values wrapped are noise)."""
    if a.dtype == np.uint8:
        return a
    if a.dtype.kind in "ui":
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 255:
            raise CameraError(f"{origin}: {a.dtype} values {'down to ' + str(lo) if lo < 0 else 'up to ' + str(hi)} "
                              f"are outside 0-255; {FRAME_FORMAT}")
        return a.astype(np.uint8)
    if a.dtype.kind == "f":
        if not np.isfinite(a).all():
            raise CameraError(f"{origin}: pixel values not finite (NaN or inf); {FRAME_FORMAT}")
        lo, hi = float(a.min()), float(a.max())
        if lo < 0.0 or hi > 1.0:
            raise CameraError(f"{origin}: float values {f'down to {lo:g}' if lo < 0.0 else f'up to {hi:g}'} are "
                              f"outside 0-1; divide 0-255 floats by 255, or save uint8; {FRAME_FORMAT}")
        return np.rint(a * 255.0).astype(np.uint8)
    raise CameraError(f"{origin}: dtype {a.dtype} is not pixels; {FRAME_FORMAT}")


def _load_array(f: Path) -> np.ndarray:
    """An .npy file's array; any failure (not .npy, cut short, pickled objects) as a CameraError naming it."""
    try:
        with open(f, "rb") as fh:
            if fh.read(6) != b"\x93NUMPY":  # else numpy tries it as a pickle and says to allow that: never here
                raise CameraError(f"cannot read {f} as an .npy array (no .npy header: not saved with np.save); "
                                  f"{FRAME_FORMAT}")
        return np.load(f, allow_pickle=False)
    except CameraError:
        raise
    except Exception as exc:  # numpy raises ValueError, OSError, EOFError, UnpicklingError for a bad file
        raise CameraError(f"cannot read {f} as an .npy array ({error_line(exc)}); {FRAME_FORMAT}") from None


def _read_image(f: Path) -> np.ndarray:
    """A .png/.jpg file's pixels (matplotlib, which returns float 0-1 for PNG and uint8 for JPEG)."""
    plt = require("matplotlib.pyplot")
    try:
        return plt.imread(f)
    except Exception as exc:  # Pillow raises SyntaxError, OSError, UnidentifiedImageError for a bad file
        raise CameraError(f"cannot read {f} as an image ({error_line(exc)}); replace or remove it") from None


def _require_regular(p: Path) -> None:
    """A folder or a regular file: opening a FIFO to read waits for a writer (the run would hang before its first
    frame), and a device is not a recording."""
    if not (p.is_dir() or p.is_file()):
        raise CameraError(f"{p} is not a regular file (a FIFO or a device?); video: reads a folder of images, an .npy "
                          "file or a video file; a live camera is realsense[:SERIAL]")


def error_line(exc: BaseException) -> str:
    """`Type: first line of the message`: an error as a one-line message can quote it."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else 'no detail'}"


class SimCamera:
    """Renders the sim scene at the joint angles `state_fn()` returns (the emulator's, over the link)."""

    def __init__(self, scene: object, state_fn: Callable[[], tuple[np.ndarray, float] | None], size: int,
                 num_cameras: int = 1) -> None:
        self.scene = scene
        self.state_fn = state_fn
        self.name = "sim"
        self.size, self.num_cameras = size, num_cameras

    def read(self, timeout: float = 0.05) -> Frame:
        # Like a real camera, wait a little for a frame: the shared-memory state read gives up (None) while the
        # control process is preempted mid-write, which on a loaded (or single) core lasts a scheduler tick.
        deadline = time.monotonic() + timeout
        got = self.state_fn()
        while got is None and time.monotonic() < deadline:
            time.sleep(0.0005)
            got = self.state_fn()
        if got is None:
            raise CameraError("sim camera: no joint state yet from the control loop; it renders the arm at the "
                              "motor controller's joint angles, so the link must be up first")
        q, t = got
        images = self.scene.cameras(np.asarray(q), self.size, self.num_cameras)  # type: ignore[attr-defined]
        return Frame(images=images, timestamp=t)

    def close(self) -> None:
        pass


class FolderCamera:
    """Replays frames from a folder, an .npy stack or a video at `fps`, looping; timestamps are replay times."""

    def __init__(self, path: str | Path, size: int | None = None, fps: float = 30.0, loop: bool = True,
                 num_cameras: int = 1) -> None:
        p = Path(path)
        if not p.exists():
            raise CameraError(f"video source {p} does not exist; give a folder of images, an .npy file or a video")
        _require_regular(p)
        self.frames = self._load(p)
        if not self.frames:
            raise CameraError(f"no frames in {p}; supported: {', '.join(IMAGE_SUFFIXES)} files, [N,H,W,3] .npy")
        self.size, self.fps, self.loop, self.num_cameras = size, fps, loop, num_cameras
        self.name = f"video:{p}"
        self._n = 0  # frames delivered, over every pass: the index into the recording is _n % len(frames)
        self._t0 = time.monotonic()  # when frame _n is due: _t0 + _n / fps (moved on when the reader is late)

    @staticmethod
    def _load(p: Path) -> list[np.ndarray]:
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            for f in files:
                _require_regular(f)
            return [_image_to_rgb_u8(_load_array(f) if f.suffix.lower() == ".npy" else _read_image(f), str(f))
                    for f in files]
        if p.suffix.lower() == ".npy":
            arr = _load_array(p)
            if arr.ndim == 4:  # a stack [N, H, W, C]; anything else must be one image
                return [_image_to_rgb_u8(a, f"{p} (shape {arr.shape}), frame {i}") for i, a in enumerate(arr)]
            return [_image_to_rgb_u8(arr, str(p))]
        cv2 = require("cv2")
        cap = cv2.VideoCapture(str(p))
        out = []
        ok, img = cap.read()
        while ok:
            out.append(img[:, :, ::-1].copy())  # BGR -> RGB
            ok, img = cap.read()
        cap.release()
        return out

    def read(self) -> Frame:
        if not self.loop and self._n >= len(self.frames):
            raise CameraError(f"video source ended after {len(self.frames)} frames")
        self._wait_due()
        img = self.frames[self._n % len(self.frames)]
        self._n += 1
        if self.size:
            img = resize_nearest(img, self.size)
        return Frame(images=[img] * self.num_cameras, timestamp=time.monotonic())

    def _wait_due(self) -> None:
        """Pace like a camera, on every pass of the loop: frame n is due at t0 + n / fps (n counts on across the
        wrap, so a later pass is paced as the first). A reader that comes later than one period past the due time
        moves the schedule to now: a camera skips the frames it missed rather than storing them for a burst."""
        due = self._t0 + self._n / self.fps
        now = time.monotonic()
        if due > now:
            time.sleep(due - now)
        elif now - due > 1.0 / self.fps:
            self._t0 = now - self._n / self.fps

    def close(self) -> None:
        pass


class RealSenseCamera:
    """One RealSense device: colour (and optionally depth aligned to colour), by serial number."""

    def __init__(self, serial: str | None = None, width: int = 640, height: int = 480, fps: int = 30,
                 depth: bool = False, size: int | None = None, timeout_ms: int = 1000) -> None:
        rs = require("pyrealsense2")
        self.rs = rs
        devices = [d.get_info(rs.camera_info.serial_number) for d in rs.context().query_devices()]
        if not devices:
            raise CameraError("no RealSense camera found: check the USB 3 cable and `rs-enumerate-devices`")
        if serial is not None and serial not in devices:
            raise CameraError(f"RealSense with serial {serial} not found; connected: {', '.join(devices)}")
        self.pipeline = rs.pipeline()
        cfg = rs.config()
        if serial:
            cfg.enable_device(serial)
        cfg.enable_stream(rs.stream.color, width, height, rs.format.rgb8, fps)
        if depth:
            cfg.enable_stream(rs.stream.depth, width, height, rs.format.z16, fps)
        profile = self.pipeline.start(cfg)
        self.align = rs.align(rs.stream.color) if depth else None
        self.depth_scale = profile.get_device().first_depth_sensor().get_depth_scale() if depth else 1.0
        self.size, self.timeout_ms = size, timeout_ms
        self.serial = serial or devices[0]
        self.name = f"realsense:{self.serial}"
        log.info("RealSense %s streaming %dx%d@%d%s", self.serial, width, height, fps, " + depth" if depth else "")

    def read(self) -> Frame:
        try:
            frames = self.pipeline.wait_for_frames(self.timeout_ms)
        except RuntimeError as exc:
            raise CameraError(f"RealSense {self.serial} delivered no frame within {self.timeout_ms} ms ({exc})") from exc
        now = time.monotonic()
        if self.align is not None:
            frames = self.align.process(frames)
        color = frames.get_color_frame()
        img = np.asanyarray(color.get_data())
        if self.size:
            img = resize_nearest(img, self.size)
        depth = []
        if self.align is not None:
            d = frames.get_depth_frame()
            depth.append(np.asanyarray(d.get_data()).astype(np.float32) * self.depth_scale)
        # Host receive time as the monotonic stamp; the device clock travels alongside for drift analysis.
        return Frame(images=[img], timestamp=now, hw_timestamp_ms=float(color.get_timestamp()), depth=depth)

    def close(self) -> None:
        self.pipeline.stop()


def open_camera(spec: str, size: int, num_cameras: int = 1, scene: object = None,
                state_fn: Callable[[], tuple[np.ndarray, float] | None] | None = None,
                depth: bool = False) -> CameraSource:
    """realsense[:SERIAL] | video:PATH | sim (needs `scene` and `state_fn`)."""
    kind, _, arg = spec.partition(":")
    if kind == "realsense":
        return RealSenseCamera(serial=arg or None, size=size, depth=depth)
    if kind == "video":
        if not arg:
            raise CameraError("video: needs a path, e.g. --camera video:/data/frames")
        return FolderCamera(arg, size=size, num_cameras=num_cameras)
    if kind == "sim":
        if scene is None or state_fn is None:
            raise CameraError("the sim camera needs a sim scene and the control loop's joint state")
        return SimCamera(scene, state_fn, size, num_cameras)
    raise CameraError(f"unknown camera {spec!r}; use realsense[:SERIAL], video:PATH or sim")
