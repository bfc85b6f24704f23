"""The robot's configuration file (/etc/edge-vla/robot.env): link, camera, rate, safety limits, extra arguments.

Safety keys (read by `edge-vla run`, which loads this file; a bundle may narrow the limits, never widen):
- EDGE_VLA_FOLLOWING_ERROR: per-joint limit on |commanded - measured| position (rad), one value or one
  per joint; over it for a few cycles -> category-1 stop (a collision or a blocked joint). Default 0.5.
- EDGE_VLA_GRIPPER_JOINTS / EDGE_VLA_GRIPPER_EFFORT: joints with the gripper role (names or indices) are
  blocked by design when they grasp, so they get an effort limit (N*m or N; 0 = off) instead.
- EDGE_VLA_LINK_LOSS_CATEGORY: stop category when the motor controller stops answering. Default 0 (torque
  off): a controller we cannot reach cannot be commanded through a ramp, and its own heartbeat watchdog
  runs its stop anyway. Set 1 for arms that fall without torque and have no brakes.

A systemd EnvironmentFile (KEY=VALUE lines), read by edge-vla.service and by `edge-vla doctor`.
Operators edit it on the robot; `edge-vla install` keeps their edits (see install/rootfs).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from edge_vla.errors import ConfigError
from edge_vla.files import read_bounded
from edge_vla.onboard.following import TrackingLimits
from edge_vla.onboard.watchdog import DEFAULT_LINK_LOSS_CATEGORY

CONFIG_PATH = "/etc/edge-vla/robot.env"
DEFAULT_LINK = "serial:///dev/edge-vla-motor"  # the udev symlink the package installs
_KEY = re.compile(r"^[A-Z_][A-Z0-9_]*$")


@dataclass(frozen=True)
class RobotConfig:
    link: str = DEFAULT_LINK
    camera: str = "realsense"
    rate_hz: float = 50.0
    extra_args: str = ""  # appended to `edge-vla run`, split on whitespace by systemd
    following_error: str = "0.5"  # rad; one value or comma-separated per joint
    gripper_joints: str = ""  # comma-separated joint names or indices with the gripper role
    gripper_effort: float = 0.0  # effort limit of gripper-role joints (0: off)
    link_loss_category: int = DEFAULT_LINK_LOSS_CATEGORY

    def following_errors(self) -> list[float]:
        try:
            values = [float(x) for x in self.following_error.split(",") if x.strip()]
        except ValueError as exc:
            raise ConfigError(f"EDGE_VLA_FOLLOWING_ERROR={self.following_error!r} is not a number or a comma-separated "
                              "list of numbers (rad)") from exc
        if not values or any(not v > 0 for v in values):
            raise ConfigError(f"EDGE_VLA_FOLLOWING_ERROR={self.following_error!r}: every limit must be > 0 rad")
        return values

    def tracking_limits(self, names: tuple[str, ...]) -> TrackingLimits:
        """The host's following-error limits for these joints (edge_vla.onboard.following)."""
        values = self.following_errors()
        gripper = tuple(g.strip() for g in self.gripper_joints.split(",") if g.strip())
        return TrackingLimits.from_robot(names, values if len(values) > 1 else values[0], gripper,
                                         self.gripper_effort if self.gripper_effort > 0 else float("inf"))

    def validate(self) -> RobotConfig:
        kind = link_kind(self.link)
        if kind == "serial" and not urlparse(self.link).path:
            raise ConfigError(f"link {self.link!r} names no device; use serial:///dev/ttyACM0")
        if kind == "can" and not urlparse(self.link).netloc:
            raise ConfigError(f"link {self.link!r} names no interface; use can://can0")
        if kind not in FIRMWARE_LINK_KINDS and self.rate_hz > 100:  # what `edge-vla run` accepts for servo buses
            raise ConfigError(f"rate {self.rate_hz:g} Hz is above what {kind}:// servos are specified for (100 Hz: "
                              "6 servos at 1 Mbaud); set EDGE_VLA_RATE_HZ=100 or less")
        if not (self.camera in {"realsense", "sim"} or self.camera.startswith("video:")):
            raise ConfigError(f"camera {self.camera!r}: use realsense, sim or video:PATH")
        if not 1 <= self.rate_hz <= 2000:
            raise ConfigError(f"rate {self.rate_hz} Hz is outside 1..2000")
        self.following_errors()
        if self.link_loss_category not in (0, 1):
            raise ConfigError(f"EDGE_VLA_LINK_LOSS_CATEGORY={self.link_loss_category}: use 0 (torque off, the default) "
                              "or 1 (controlled stop, for arms that fall without torque and have no brakes)")
        if not self.gripper_effort >= 0:  # NaN too: it compares false everywhere, and would turn the limit off
            raise ConfigError(f"EDGE_VLA_GRIPPER_EFFORT={self.gripper_effort} must be a number >= 0 (0: off)")
        for value in (self.link, self.camera, self.extra_args, self.following_error, self.gripper_joints):
            if "\n" in value or '"' in value:
                raise ConfigError(f"config value {value!r} contains a newline or a double quote")
        return self

    def to_env(self) -> str:
        rate = f"{self.rate_hz:g}"
        return (
            "# edge-vla robot configuration, read by edge-vla.service (EnvironmentFile=) and `edge-vla doctor`.\n"
            "# Edit here, then: sudo systemctl restart edge-vla.service\n"
            "# Link: serial:///dev/DEVICE (default: the udev symlink for the motor controller) or can://IFACE\n"
            f'EDGE_VLA_LINK="{self.link}"\n'
            "# Camera: realsense | video:PATH | sim\n"
            f'EDGE_VLA_CAMERA="{self.camera}"\n'
            "# Control rate of the loop (Hz)\n"
            f'EDGE_VLA_RATE_HZ="{rate}"\n'
            "# Extra arguments for `edge-vla run` (whitespace-separated)\n"
            f'EDGE_VLA_EXTRA_ARGS="{self.extra_args}"\n'
            "# Following error: max |commanded - measured| per joint (rad; one value or one per joint) -> stop\n"
            f'EDGE_VLA_FOLLOWING_ERROR="{self.following_error}"\n'
            "# Gripper-role joints (names or indices) get an effort limit instead (N*m; 0 = off)\n"
            f'EDGE_VLA_GRIPPER_JOINTS="{self.gripper_joints}"\n'
            f'EDGE_VLA_GRIPPER_EFFORT="{self.gripper_effort:g}"\n'
            "# Stop category when the motor controller stops answering: 0 = torque off (default), 1 = controlled\n"
            "# stop, for arms that fall without torque and have no brakes\n"
            f'EDGE_VLA_LINK_LOSS_CATEGORY="{self.link_loss_category}"\n'
        )

    @classmethod
    def from_env(cls, text: str) -> RobotConfig:
        env = parse_env(text)
        try:
            return cls(
                link=env.get("EDGE_VLA_LINK", DEFAULT_LINK),
                camera=env.get("EDGE_VLA_CAMERA", "realsense"),
                rate_hz=float(env.get("EDGE_VLA_RATE_HZ", "50")),
                extra_args=env.get("EDGE_VLA_EXTRA_ARGS", ""),
                following_error=env.get("EDGE_VLA_FOLLOWING_ERROR", "0.5"),
                gripper_joints=env.get("EDGE_VLA_GRIPPER_JOINTS", ""),
                gripper_effort=float(env.get("EDGE_VLA_GRIPPER_EFFORT", "0")),
                link_loss_category=int(env.get("EDGE_VLA_LINK_LOSS_CATEGORY", str(DEFAULT_LINK_LOSS_CATEGORY))),
            )
        except ValueError as exc:
            raise ConfigError(f"robot config: EDGE_VLA_RATE_HZ, EDGE_VLA_GRIPPER_EFFORT or EDGE_VLA_LINK_LOSS_CATEGORY "
                              f"is not a number ({exc})") from exc

    @classmethod
    def load(cls, path: str | Path) -> RobotConfig:
        return cls.from_env(_read_config_text(Path(path)))


MAX_CONFIG_BYTES = 1 << 20  # a robot.env is a few hundred bytes; anything near this is not one


def _read_config_text(path: Path) -> str:
    """The file's text, or one ConfigError line. Read by edge_vla.files.read_bounded: a FIFO (or a device) at
    --robot-config is refused at once instead of blocking `edge-vla run` until some writer comes."""
    data = read_bounded(path, MAX_CONFIG_BYTES, "robot config", ConfigError,
                        fix=f"give the path of the KEY=VALUE file (default {CONFIG_PATH})")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"robot config {path} is not UTF-8 text (byte {data[exc.start]:#04x} at offset "
                          f"{exc.start}); save it as UTF-8, as systemd reads it") from exc


def parse_env(text: str) -> dict[str, str]:
    """KEY=VALUE lines as systemd's EnvironmentFile reads them (comments, optional quotes)."""
    out: dict[str, str] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not _KEY.match(key):
            raise ConfigError(f"robot config line {n} is not KEY=VALUE: {raw!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        out[key] = value
    return out


FIRMWARE_LINK_KINDS = ("serial", "can")  # this project's firmware protocol; the servo buses come from the registry


def motor_link_kinds() -> tuple[str, ...]:
    """Servo-bus schemes (dynamixel, feetech): firmware_bridge's motor registry, which imports no backend."""
    from firmware_bridge.motors.registry import schemes

    return tuple(schemes())


def link_kind(link: str) -> str:
    """The link's scheme; ConfigError in one line for one the runtime cannot drive or a malformed motor URL."""
    scheme = urlparse(link).scheme.lower()
    if scheme in FIRMWARE_LINK_KINDS:
        return scheme
    if scheme in motor_link_kinds():
        from firmware_bridge.motors.registry import parse_ids, parse_url

        try:  # the URL's shape and ids; the backend's own checks need its SDK, which a workstation may not have
            parsed = parse_url(link)
            if "ids" in parsed.params:
                parse_ids(parsed.params["ids"], scheme=parsed.scheme)
        except ValueError as exc:
            raise ConfigError(f"link {link!r}: {exc}") from None
        return scheme
    raise ConfigError(f"link {link!r}: use serial:///dev/DEVICE or can://IFACE (an MCU running edge-vla's firmware), "
                      + " or ".join(f"{s}:///dev/DEVICE?ids=1-6" for s in motor_link_kinds()) + " (a servo bus)")


def link_device(link: str) -> str:
    """serial:///dev/ttyACM0 -> /dev/ttyACM0; can://can0 -> can0; feetech:///dev/ttyUSB0?ids=1-6 -> /dev/ttyUSB0."""
    parsed = urlparse(link)
    if parsed.scheme.lower() == "can":
        return parsed.netloc
    if parsed.scheme.lower() == "serial":
        return parsed.path
    return parsed.netloc + parsed.path  # a motor URL's port is everything between :// and ?


def run_command(bundle: str, config: RobotConfig) -> str:
    """The `edge-vla run` line the service executes, for humans (docs, dry runs)."""
    args = ["edge-vla", "run", bundle, "--link", config.link, "--camera", config.camera,
            "--rate-hz", f"{config.rate_hz:g}", *config.extra_args.split()]
    return shlex.join(args)
