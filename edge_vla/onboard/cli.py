"""`edge-vla run`: run the robot standalone: cameras -> policy -> chunk scheduler -> safety -> motor controller."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import stat
import sys
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np

from edge_vla.action_space import ActionSpace, require_executable
from edge_vla.cli_flags import with_epilog
from edge_vla.errors import ConfigError, EdgeVlaError
from edge_vla.onboard.cameras import open_camera
from edge_vla.onboard.control import EXECUTABLE_ACTION_KINDS, EXECUTES_BECAUSE, ControlConfig
from edge_vla.onboard.drill import EMULATOR_LIMITS, SceneHolder, load_source, prioritize_emulator
from edge_vla.onboard.errors import CameraError
from edge_vla.onboard.operator import (
    SOCKET_ENV,
    check_bench_mode,
    default_socket_path,
    not_a_socket,
    prepare_socket_dir,
    socket_in_use,
    under_systemd,
)
from edge_vla.onboard.rt import AUTO, RealtimeConfig, plan_threads, resolve_fifo
from edge_vla.onboard.runner import OnboardRunner, bus_state_fn
from edge_vla.onboard.scheduler import INTERPOLATIONS, RUN_STRATEGIES
from edge_vla.onboard.telemetry import format_summary
from edge_vla.onboard.watchdog import PLANNED_STOPS, WatchdogConfig
from edge_vla.provision.robot_config import CONFIG_PATH, RobotConfig

log = logging.getLogger(__name__)


RATE_HZ = (50.0, 500.0)  # the documented control rates: below, chunks outlast the watchdog; above, the loop misses
# deadlines on the supported computers (docs/SAFETY.md: 500 Hz needs SCHED_FIFO)

CAN_NODE_IDS = range(64)
FEETECH_HOMING_MAX = 2047  # STS Homing Offset (31): sign-magnitude, sign in bit 11

EXIT_STATUSES = """exit status:
  0  the loop ran and stopped without a safety trip (its --duration ended, a signal, or an operator stop)
  1  could not start or failed: bad arguments or link, unusable bundle, another run on the control socket,
     a control-loop error, a camera that failed while nothing moved (one line on stderr)
  2  command-line usage error
  3  stopped by a safety trip (watchdog, firmware fault, link loss, tracking error, a camera that failed
     mid-run: the robot is stopped, then the run ends); the summary says which, a failed camera in one line
  130 interrupted before the loop started"""


def motor_schemes() -> dict[str, str]:
    """Motor-device URL schemes (firmware_bridge.motors.registry), driven through firmware_bridge.motors.link_adapter."""
    try:
        from firmware_bridge.motors.registry import schemes
    except ImportError:  # the registry is optional here: the firmware link works without it
        return {}
    return schemes()


def accepted_links() -> str:
    """One example URL per scheme the link registry accepts (firmware_bridge.schemes), as a user should write it."""
    from firmware_bridge.schemes import schemes

    return "; ".join(desc.rsplit(": ", 1)[-1] for desc in schemes().values())


def link_help() -> str:
    """`--link` help: every scheme of the link registry with what it drives."""
    from firmware_bridge.schemes import schemes

    return "motor controller link URL, one of: " + "; ".join(f"{s}:// {desc}" for s, desc in schemes().items())


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", nargs="?", help="bundle directory (omit with --expert)")
    parser.add_argument("--expert", action="store_true",
                        help="drive with the sim's scripted expert instead of a policy (bring-up; needs --camera sim)")
    parser.add_argument("--link", metavar="URL", help=link_help())
    parser.add_argument("--emulate", action="store_true",
                        help="start the firmware emulator on a pty and use it as the link (no hardware); with a motor "
                             "--link (dynamixel://emulated?ids=1-6, feetech://...) that scheme's servo emulator")
    parser.add_argument("--camera", default="sim", help="realsense[:SERIAL] | video:PATH | sim (default %(default)s)")
    parser.add_argument("--depth", action="store_true", help="RealSense: also stream depth aligned to colour")
    parser.add_argument("--rate-hz", type=float, default=50.0,
                        help=f"control rate in Hz, {RATE_HZ[0]:g}-{RATE_HZ[1]:g} (default %(default)g Hz)")
    parser.add_argument("--duration", type=float, help="seconds, then a controlled stop (default: until stopped)")
    parser.add_argument("--instruction", help="language instruction (sim default: the scene's own)")
    parser.add_argument("--seed", type=int, default=1_000_000, help="sim scene seed (default %(default)s)")
    parser.add_argument("--strategy", choices=RUN_STRATEGIES, default="receding",
                        help="chunk scheduling (default %(default)s; rtc: real-time chunking, for a bundle trained "
                             "with --rtc-max-delay)")
    parser.add_argument("--blend-s", type=float, default=0.1,
                        help="hand-over cross-fade between chunks, s (default %(default)s s)")
    parser.add_argument("--execute", type=int, help="sync: actions played per chunk")
    parser.add_argument("--interp", choices=INTERPOLATIONS, default="cubic", help="(default %(default)s)")
    parser.add_argument("--max-step", type=float, help="max change per cycle (rad) on top of the velocity limit")
    parser.add_argument("--home", help="comma-separated joint pose to move to before the policy starts")
    parser.add_argument("--backend", default="auto", choices=("auto", "onnxruntime", "tensorrt", "openvino"),
                        help="default auto: what `edge-vla tune` recorded for this bundle on this machine, else "
                             "TensorRT engines where built, else onnxruntime")
    parser.add_argument("--ov-precision", choices=("f32", "bf16"),
                        help="--backend openvino only: its arithmetic, f32 (default) or bf16 (where the CPU has it; "
                             "edge-vla tune checks it against the FP16 numerics gate)")
    parser.add_argument("--steps", type=int, help="ODE steps (default: the bundle's)")
    parser.add_argument("--telemetry", help="telemetry file: .mcap (needs the mcap package) or .jsonl")
    op = parser.add_argument_group("operator (arming is an operator act: the loop starts disarmed)")
    op.add_argument("--control-socket", metavar="PATH",
                    help=f"serve arm/stop/status on this Unix socket ('none' to disable). Default: ${SOCKET_ENV} if "
                         "set; under systemd $RUNTIME_DIRECTORY/control.sock, i.e. /run/edge-vla/control.sock; else "
                         "$XDG_RUNTIME_DIR/edge-vla/control.sock, or /tmp/edge-vla-UID/control.sock (mode 0700). "
                         "`edge-vla arm/stop/status` look in the same places")
    op.add_argument("--arm-on-start", action="store_true",
                    help="bench mode: arm once at start without an operator (refused under systemd unless the unit "
                         "sets EDGE_VLA_ALLOW_ARM_ON_START=1)")
    op.add_argument("--robot-config", default=None,
                    help=f"robot configuration with following-error limits and the link-loss category "
                         f"(default {CONFIG_PATH} if it exists)")
    wd = parser.add_argument_group("watchdog thresholds (a breach stops the robot: exit status 3)")
    defaults = WatchdogConfig()
    wd.add_argument("--camera-max-age", type=float, default=defaults.camera_max_age_s, metavar="S",
                    help="trip when the newest camera frame is older than this, s (default %(default)s s)")
    wd.add_argument("--chunk-max-age", type=float, default=defaults.chunk_max_age_s, metavar="S",
                    help="trip when the newest chunk's observation is older than this, s (default %(default)s s)")
    wd.add_argument("--exhausted-max", type=float, metavar="S",
                    help="holding past the last chunk's end, s (default 0.3 s; 2 s with --strategy sync)")
    wd.add_argument("--max-overruns", type=int, default=defaults.max_consecutive_overruns, metavar="N",
                    help="trip after this many missed cycle deadlines in a row, cycles (default %(default)s cycles)")
    wd.add_argument("--link-max-age", type=float, default=defaults.link_max_age_s, metavar="S",
                    help="trip when the newest motor-controller state is older than this, s (default %(default)s s)")
    wd.add_argument("--max-link-errors", type=int, default=defaults.max_link_errors, metavar="N",
                    help="trip after this many link errors (CRC, framing, NACK) within 1 s, frames (default %(default)s frames)")
    wd.add_argument("--worker-max-age", type=float, default=defaults.worker_max_age_s, metavar="S",
                    help="trip when the inference worker's heartbeat is older than this, s (default %(default)s s)")
    from firmware_bridge.motors.units import ActionUnits

    cal = parser.add_argument_group("servo calibration (dynamixel:// and feetech:// links)")
    cal.add_argument("--calibration", metavar="PATH",
                     help="the arm's LeRobot calibration file (SO-100/101, Koch: LeRobot's calibrate writes it under "
                          "~/.cache/huggingface/lerobot/calibration/robots/): the servo ids, ranges and homing "
                          "offsets; bundle joints map to its motors by name (shoulder_pan.pos -> shoulder_pan)")
    cal.add_argument("--action-units", choices=[u.value for u in ActionUnits],
                     help="what the bundle's actions are measured in, when its manifest does not say (a bundle "
                          "read from a LeRobot dataset declares 'as recorded'): lerobot-range (LeRobot's default: "
                          "-100..100 body joints, 0..100 gripper), degrees (LeRobot's use_degrees=True; gripper "
                          "0..100) or rad. Default: the units the bundle declares")
    rt = parser.add_argument_group("real time")
    rt.add_argument("--rt-priority", default=AUTO, metavar="N",
                    help="SCHED_FIFO priority for the control process, 1-99; auto: 50 where this user may (the "
                         "service's LimitRTPRIO, CAP_SYS_NICE), else SCHED_OTHER, and never with a servo link; none: "
                         "SCHED_OTHER (default %(default)s)")
    rt.add_argument("--cpus", default=AUTO, metavar="CPUS",
                    help="the control process's CPUs, e.g. 1, 2,3 or 2-3; auto: the last CPU this process may use, "
                         "where it may use 2 or more (its hyperthread siblings left idle); none: not pinned "
                         "(default %(default)s)")
    rt.add_argument("--inference-cpus", default=AUTO, metavar="CPUS",
                    help="the inference worker's CPUs (with its onnxruntime threads, one per CPU, and the rest of the "
                         "main process); auto: those --cpus leaves; none: not pinned (default %(default)s)")
    rt.add_argument("--mlock", action="store_true", help="mlockall the control process")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    with_epilog(parser, EXIT_STATUSES)


def inference_engine(source: Any) -> str:
    """What computes inference, for the start line: onnxruntime's intra-op threads and spinning, read back from the
    session, or the backend's name (TensorRT), or the sim expert."""
    backend = getattr(getattr(source, "policy", source), "backend", None)  # run's adapter, or a Policy itself
    session = getattr(backend, "prefix_sess", None)
    if session is None:
        if backend is None:
            return "the sim expert"
        threads = getattr(backend, "threads", None)
        return f"{backend.name}" + (f", {threads} threads" if threads else "")
    opts = session.get_session_options()
    try:
        spinning = "off" if opts.get_session_config_entry("session.intra_op.allow_spinning") == "0" else "on"
    except RuntimeError:  # not set: onnxruntime's default
        spinning = "on"
    n = opts.intra_op_num_threads
    return f"{n} onnxruntime intra-op thread{'s' if n != 1 else ''}, spinning {spinning}"


def _is_motor(link_url: str) -> bool:
    return link_url.partition("://")[0].lower() in motor_schemes()


def check_rate(rate_hz: float) -> None:
    if not RATE_HZ[0] <= rate_hz <= RATE_HZ[1]:  # also refuses nan
        raise ConfigError(f"--rate-hz {rate_hz:g} is out of range; use {RATE_HZ[0]:g}-{RATE_HZ[1]:g} Hz")


def check_link(url: str, emulate: bool = False) -> None:
    """Refuse a link URL the control process could not open, in one line and before anything loads.

    Parsed as firmware_bridge.schemes.open_link parses it (which it then calls, without opening), plus the checks
    that otherwise fail deep in the control process: the query values, a serial port that is missing or that this
    user may not open, a CAN interface that does not exist. A motor-device URL is parsed by the motor registry
    (its backend built, not opened); with `emulate` its port is the emulator's, so it is not looked for."""
    forms = accepted_links()
    if "://" not in url:
        path = url.split(":", 1)[1] if url.startswith(("serial:", "tty:")) else url
        hint = f"write serial://{path}" if path.startswith("/") else "write SCHEME://..."
        raise ConfigError(f"--link {url!r} is not a link URL ({hint}); accepted forms: {forms}")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in motor_schemes():
        _check_motor_link(url, emulate, forms)
        return
    if emulate:
        raise ConfigError(f"--link {url!r} with --emulate: --emulate starts the firmware emulator by itself (give no "
                          "--link), or a motor-device emulator for a motor URL (" +
                          ", ".join(f"{s}://" for s in motor_schemes()) + ")")
    if scheme not in ("serial", "can"):
        raise ConfigError(f"--link {url!r}: unknown link scheme {parts.scheme!r}; accepted forms: {forms}")
    query = parse_qs(url.partition("?")[2])
    checks = {"serial": {"baud": range(1, 1 << 31), "baudrate": range(1, 1 << 31)},
              "can": {"node": CAN_NODE_IDS, "bitrate": range(1, 1 << 31)}}[scheme]
    for key, allowed in checks.items():
        for value in query.get(key, []):
            if not value.isdigit() or int(value) not in allowed:
                raise ConfigError(f"--link {url!r}: {key}={value!r} must be an integer in {allowed.start}.."
                                  f"{allowed.stop - 1}; accepted forms: {forms}")
    if scheme == "can" and any(v not in ("0", "1", "true", "false") for v in query.get("fd", [])):
        raise ConfigError(f"--link {url!r}: fd must be 0 or 1; accepted forms: {forms}")
    from firmware_bridge.schemes import open_link

    try:
        open_link(url)  # constructs the link without opening it: the same parse the control process makes
    except ValueError as exc:  # UrlError is one
        raise ConfigError(f"--link {url!r}: {str(exc).split('; accepted forms')[0]}; accepted forms: {forms}") from None
    _check_device(scheme, parts, url)


CAN_MOTOR_SCHEMES = ("damiao", "cia402")  # motor URLs whose port is a python-can INTERFACE/CHANNEL, not a tty


def _check_motor_link(url: str, emulate: bool, forms: str, **device_kw: Any) -> None:
    """A dynamixel:// or feetech:// URL: the registry's own parse and the backend's checks, without opening."""
    from firmware_bridge.motors.calibration import CalibrationError
    from firmware_bridge.schemes import open_link

    can_bus = url.partition("://")[0].lower() in CAN_MOTOR_SCHEMES
    # The emulator's port is not known yet: a stand-in of its kind (the CAN emulators sit on python-can's
    # udp_multicast bus, python-can's default group here; nothing is opened).
    placeholder = "udp_multicast/239.74.163.2" if can_bus else "/dev/null"
    try:
        open_link(emulated_motor_url(url, placeholder, 1) if emulate else url, **device_kw)
    except CalibrationError as exc:  # the bundle against the calibration (--calibration): not the URL's form
        raise ConfigError(f"--calibration: {exc}") from None
    except ValueError as exc:  # MotorUrlError is one
        raise ConfigError(f"--link {url!r}: {exc}; accepted forms: {forms}") from None
    except ImportError as exc:  # MissingDependencyError: the backend's SDK
        raise ConfigError(f"--link {url!r}: {exc}") from None
    if emulate:
        return
    if can_bus:
        _check_device("can", urlsplit(url), url)
    else:
        _check_device("serial", None, "serial://" + url.partition("://")[2], shown=url)


def motor_id_param(url: str) -> str:
    """The query key that lists a motor URL's devices in joint order: node= for CiA 402 drives, ids= otherwise."""
    return "node" if url.partition("://")[0].lower() == "cia402" else "ids"


def emulated_motor_url(url: str, port: str, joints: int | None = None, params: dict[str, str] | None = None) -> str:
    """The motor URL with its port replaced by the emulator's (a pty, or a python-can INTERFACE/CHANNEL), ids=1-N
    (node=1-N for cia402) added when the URL lists none, and the emulator's own `params` (cia402: the udp_port of
    its bus) replacing any the URL gave."""
    scheme, _, rest = url.partition("://")
    key, extra = motor_id_param(url), dict(params or {})
    parts = [q for q in rest.partition("?")[2].split("&") if q and q.partition("=")[0] not in extra]  # as written
    if joints is not None and key not in {q.partition("=")[0] for q in parts}:
        parts.append(f"{key}=1-{joints}")
    query = "&".join([*parts, *(f"{k}={v}" for k, v in extra.items())])
    return f"{scheme}://{port}" + (f"?{query}" if query else "")


def emulator_url_params(emulator: Any) -> dict[str, str]:
    """What a host needs besides the emulator's port to reach it: the UDP port of a CiA 402 emulator's bus (the
    damiao emulator's port already carries GROUP:PORT; a pty needs nothing)."""
    udp_port = getattr(emulator, "udp_port", None)
    return {"udp_port": str(udp_port)} if udp_port else {}


def motor_link_kwargs(space: Any, rate_hz: float, units: Any = None) -> dict[str, Any]:
    """What a motor device needs from the run: the bundle's joint names and limits, the control period, and with
    a calibration the unit layer's spec (`firmware_bridge.motors.units.UnitSpec`: the limits are then in the
    bundle's units and the link converts them)."""
    kw = {"joint_limits": [(float(lo), float(hi)) for lo, hi in zip(space.lower, space.upper, strict=True)],
          "names": list(space.names), "period_s": 1.0 / rate_hz}
    if units is not None:
        kw["units"] = units
    return kw


# -- the servo calibration (--calibration, --action-units) ---------------------------------------------------

def check_servo_flags(args: argparse.Namespace, motor: bool) -> None:
    """--calibration and --action-units map a bundle's units to servo ticks: they need a motor --link."""
    flag = "--calibration" if args.calibration else "--action-units" if args.action_units else None
    if flag and not motor:
        raise ConfigError(f"{flag} needs a motor --link ({', '.join(f'{s}://...' for s in motor_schemes())}): it maps "
                          "the bundle's units to servo ticks; the firmware link (serial://, can://, or --emulate "
                          "without --link) takes the bundle's units as they are")
    if flag and args.link.partition("://")[0].lower() in CAN_MOTOR_SCHEMES:
        raise ConfigError(f"{flag} is for servo buses with a LeRobot calibration file (dynamixel://, feetech://); "
                          f"{args.link.partition(':')[0]}:// motors take radians directly")


def calibration_spec(motors: dict[str, Any], space: ActionSpace, action_units: str | None, source: str) -> Any:
    """The unit layer's spec: the units (the bundle's, or --action-units where it declares none we know) and each
    bundle joint's calibration motor and LeRobot norm mode; one-line ConfigError otherwise."""
    from firmware_bridge.motors.calibration import CalibrationError
    from firmware_bridge.motors.units import ActionUnits, UnitSpec, choose_units

    try:
        units = choose_units(space.units, action_units, list(ActionUnits))
        return UnitSpec.build(motors, space.names, space.dim_roles, units, f"the calibration {source}")
    except CalibrationError as exc:
        raise ConfigError(str(exc)) from None


def motor_units(args: argparse.Namespace, space: ActionSpace) -> Any:
    """The unit spec for a motor link, or None without --calibration (radians under the default calibration: a
    bundle declaring other units is refused, unless it declares none we know and --action-units says rad)."""
    from firmware_bridge.motors.calibration import CalibrationError, load_lerobot_calibration
    from firmware_bridge.motors.units import UNCALIBRATED_UNITS, choose_units

    try:
        if not args.calibration:
            choose_units(space.units, args.action_units, UNCALIBRATED_UNITS)
            return None
        motors = load_lerobot_calibration(args.calibration)
    except CalibrationError as exc:
        raise ConfigError(f"--calibration: {exc}" if args.calibration else str(exc)) from None
    return calibration_spec(motors, space, args.action_units, args.calibration)


def url_with_calibrated_ids(url: str, units: Any, source: str) -> str:
    """The motor URL with the calibration's ids in the bundle's joint order; ids the URL gives must agree."""
    if units is None:
        return url
    from firmware_bridge.motors.registry import ID_SPACES, parse_ids, parse_url

    ids = ",".join(map(str, units.ids))
    parsed = parse_url(url)
    space = ID_SPACES.get(parsed.scheme)
    for joint, motor_id in zip(units.joints, units.ids, strict=True):
        problem = space.problem(motor_id) if space is not None else None
        if problem:  # a calibration names no bus family: check its ids against this link's before they enter the URL
            raise ConfigError(f"--calibration {source} (correct its id or the link): joint {joint!r} on a "
                              f"{parsed.scheme}:// link: {problem}")
    given = parsed.params.get("ids")
    if given is None:
        base, _, query = url.partition("?")
        return f"{base}?{'&'.join(q for q in (query, f'ids={ids}') if q)}"
    named = parse_ids(given, scheme=parsed.scheme)  # the scheme's own id range (Feetech 0..253, Dynamixel 0..252)
    if named != tuple(units.ids):
        raise ConfigError(f"--link {url!r} names servo ids {', '.join(map(str, named))} but the calibration "
                          f"{source} gives ids {ids.replace(',', ', ')} for the bundle's joints "
                          f"({', '.join(units.joints)}); drop ids= from the URL (the calibration's are used) or "
                          "correct it")
    return url


def _declared_space(args: argparse.Namespace) -> ActionSpace | None:
    """The bundle's action space from its manifest alone (no model), or None where the manifest cannot be read:
    loading the bundle then says why."""
    from edge_vla.action_space import sim_action_space
    from edge_vla.bundle import read_manifest

    if args.expert:
        return sim_action_space()
    try:
        return ActionSpace.from_dict(read_manifest(Path(args.bundle))["action_space"])
    except (EdgeVlaError, OSError, TypeError, KeyError):
        return None


def check_motor_units(args: argparse.Namespace) -> None:
    """Before the model loads: the units, the calibration, its joints and ids, and the bundle's limits against
    the calibrated range (the link is built, not opened, so its own checks run too)."""
    space = _declared_space(args)
    if space is None:
        return
    units = motor_units(args, space)
    if units is not None:
        url = url_with_calibrated_ids(args.link, units, args.calibration)
        _check_motor_link(url, args.emulate, accepted_links(), **motor_link_kwargs(space, args.rate_hz, units))


def _motor_emulator(url: str, space: Any, units: Any = None) -> Any:
    """The scheme's emulator (its own process) with one servo per joint, its position limits inside the bundle's
    action-space limits (the device refuses to arm when its own limits are wider) and each joint starting at
    0 rad, or mid-range when 0 is outside the limits. With a calibration (`units`), the servos carry its ids,
    homing offsets and range_min..range_max narrowed to the bundle's limits, and start mid-range."""
    starts = [0.0 if lo <= 0.0 <= hi else (lo + hi) / 2 for lo, hi in zip(space.lower, space.upper, strict=True)]
    if url.lower().startswith("damiao"):  # CAN motors: no ticks; each starts at 0 rad, or mid-range
        from firmware_bridge.motors import damiao_emulator as dme

        return dme.EmulatorProcess([dme.MotorConfig(esc_id=i, position=float(p))
                                    for i, p in zip(_motor_ids(url, space.dim), starts, strict=True)],
                                   interface="udp_multicast", channel=dme.unique_udp_channel())
    if url.lower().startswith("cia402"):
        return _cia402_emulator(url, space, starts)
    if units is not None:
        servos = _calibrated_servos(url, space, units)
    else:
        from firmware_bridge.motors.calibration import JointCalibration

        cal = JointCalibration()  # the calibration the backend uses when none is given
        servos = []
        for servo_id, lo, hi in zip(_motor_ids(url, space.dim), space.lower, space.upper, strict=True):
            t_lo, t_hi = sorted((cal.to_ticks(float(lo)), cal.to_ticks(float(hi))))
            t_lo, t_hi = max(0, t_lo + 2), min(4095, t_hi - 2)  # 2 ticks inside: rounding of the radians
            start = cal.to_ticks(0.0) if t_lo <= cal.to_ticks(0.0) <= t_hi else (t_lo + t_hi) // 2
            servos.append((servo_id, t_lo, t_hi, start, 0))
    if url.lower().startswith("dynamixel"):
        from firmware_bridge.motors import dynamixel_emulator as dxl

        return dxl.EmulatorProcess([dxl.ServoConfig(dxl_id=i, min_position=lo, max_position=hi, initial_position=st,
                                                    homing_offset=h, return_delay=0) for i, lo, hi, st, h in servos])
    from firmware_bridge.motors import feetech_emulator as ft

    return ft.EmulatorProcess([ft.ServoConfig(servo_id=i, min_angle=lo, max_angle=hi, initial_position=st,
                                              homing_offset=h, return_delay=0) for i, lo, hi, st, h in servos])


CIA402_LIMIT_MARGIN = 2  # counts inside the bundle's limits: the backend's check allows 1 count of rounding


def _cia402_emulator(url: str, space: Any, starts: list[float]) -> Any:
    """CiA 402 drives, one per joint (node ids from node=, else 1..N), each with its software position limits
    0x607D just inside the bundle's limits (the backend refuses to arm a drive whose 0x607D is wider) and its feed
    constant 0x6092 = the URL's counts_per_turn (default 65536), so counts and radians agree with the host's."""
    from firmware_bridge.motors import cia402_emulator as cia
    from firmware_bridge.motors.calibration import JointCalibration
    from firmware_bridge.motors.registry import parse_url

    params = parse_url(emulated_motor_url(url, "emulated/x", space.dim)).params
    try:
        per_turn = round(float(params.get("counts_per_turn", cia.DriveConfig.counts_per_turn)))
    except ValueError:
        raise ConfigError(f"--link {url!r}: counts_per_turn={params['counts_per_turn']!r} is not a number") from None
    cal = JointCalibration(offset=0.0, direction=1, ticks_per_turn=per_turn)  # the backend's, from 0x6092
    drives = []
    for node, lo, hi, start in zip(_motor_ids(url, space.dim), space.lower, space.upper, starts, strict=True):
        c_lo, c_hi = sorted((cal.to_ticks(float(lo)), cal.to_ticks(float(hi))))
        limits = (c_lo + CIA402_LIMIT_MARGIN, c_hi - CIA402_LIMIT_MARGIN)
        position = min(max(cal.to_ticks(start), limits[0]), limits[1])  # inside the drive's own limits too
        drives.append(cia.DriveConfig(node=node, position=position, counts_per_turn=per_turn, soft_limits=limits))
    return cia.EmulatorProcess(drives)


def _calibrated_servos(url: str, space: Any, units: Any) -> list[tuple[int, int, int, int, int]]:
    """(id, min, max, start, homing offset) per joint: the calibration's servo, limited to where both the
    calibrated range and the bundle's limits (in ticks, through the unit layer) allow."""
    from firmware_bridge.motors.calibration import CalibrationError
    from firmware_bridge.motors.registry import load_backend, parse_url
    from firmware_bridge.motors.units import UnitMap

    umap = UnitMap.for_backend(units, load_backend(parse_url(url).scheme))
    try:
        ticks = umap.tick_limits(list(zip(space.lower, space.upper, strict=True)))
    except CalibrationError as exc:
        raise ConfigError(str(exc)) from None
    feetech = parse_url(url).scheme == "feetech"
    servos = []
    for joint, (t_lo, t_hi) in zip(umap.joints, ticks, strict=True):
        m = joint.motor
        if feetech and abs(m.homing_offset) > FEETECH_HOMING_MAX:  # the register's 11-bit magnitude
            raise ConfigError(f"--calibration: motor {m.name!r} has homing_offset {m.homing_offset}, which no Feetech "
                              f"STS servo holds (Homing Offset is -{FEETECH_HOMING_MAX}..{FEETECH_HOMING_MAX}); is "
                              "this the calibration of a Dynamixel arm?")
        lo, hi = max(m.range_min, math.ceil(t_lo - 1e-6)), min(m.range_max, math.floor(t_hi + 1e-6))
        servos.append((m.id, lo, hi, (lo + hi) // 2, m.homing_offset))
    return servos


def _motor_ids(url: str, joints: int) -> list[int]:
    from firmware_bridge.motors.registry import parse_ids, parse_url

    key, parsed = motor_id_param(url), parse_url(emulated_motor_url(url, "emulated", joints))
    ids = list(parse_ids(parsed.params[key], key, scheme=parsed.scheme))
    if len(ids) != joints:
        raise ConfigError(f"--link {url!r} names {len(ids)} device ids but the bundle's action space has {joints} "
                          f"joints ({', '.join(map(str, ids))}); give one id per joint, e.g. {key}=1-{joints}")
    return ids


def _check_device(scheme: str, parts: Any, url: str, shown: str | None = None) -> None:
    shown = shown or url
    if scheme == "serial":
        port = url[len("serial://"):].partition("?")[0]
        if "://" in port:
            return  # a pyserial URL (socket://, rfc2217://): pyserial reaches it when the loop starts
        if not os.path.exists(port):
            # A relative path (the README's serial://$PWD/... without $PWD) is opened from here: say where.
            where = "" if port.startswith("/") else f" (relative to {os.getcwd()}; an absolute path is safer)"
            raise ConfigError(f"--link {shown!r}: no serial port {port}{where}: check the motor controller's cable "
                              f"and power and the device name (ls -l {port}; /dev/edge-vla-motor with the package's "
                              "udev rule)")
        mode = os.stat(port).st_mode  # follows the udev symlink to the device
        if not stat.S_ISCHR(mode):  # a tty, USB serial adapter or pty is a character device; nothing else opens as one
            kind = "a regular file" if stat.S_ISREG(mode) else "a directory" if stat.S_ISDIR(mode) else "not a tty"
            raise ConfigError(f"--link {shown!r}: {port} is not a serial device ({kind}); give the motor "
                              "controller's port (ls -l /dev/ttyACM* /dev/ttyUSB* /dev/edge-vla-motor) or the pty "
                              "`edge-vla emulate` printed")
        if not os.access(port, os.R_OK | os.W_OK):
            raise ConfigError(f"--link {shown!r}: no permission to open {port} as this user: add it to the port's "
                              "group (dialout, or the udev rule's) and log in again")
    elif parts is not None and parts.netloc == "socketcan":
        channel = parts.path.lstrip("/")
        if not os.path.exists(f"/sys/class/net/{channel}"):
            raise ConfigError(f"--link {url!r}: no CAN interface {channel} on this machine: `ip link show {channel}`; "
                              f"bring it up with `sudo ip link set {channel} up type can bitrate 1000000`")


def control_socket_path(requested: str | None) -> str | None:
    """The socket `run` serves, checked before anything loads: None for 'none'; refused if another run is live."""
    if requested == "none":
        return None
    path = requested or default_socket_path()
    if not requested and not os.environ.get(SOCKET_ENV) and not os.environ.get("RUNTIME_DIRECTORY"):
        prepare_socket_dir(path)  # the bench default: a private directory of this user's
    if why := not_a_socket(path):
        raise ConfigError(why)
    if socket_in_use(path):
        raise ConfigError(f"another edge-vla is serving {path}; stop it first (one robot, one loop), or give this "
                          "run another --control-socket")
    return path


def _robot_config(args: argparse.Namespace) -> RobotConfig:
    path = args.robot_config or (CONFIG_PATH if os.path.isfile(CONFIG_PATH) else None)
    return RobotConfig.load(path).validate() if path else RobotConfig()


def _control_config(args: argparse.Namespace, link_url: str, space: Any,
                    bundle_tracking: dict[str, Any] | None = None, units: Any = None) -> ControlConfig:
    check_rate(args.rate_hz)
    robot = _robot_config(args)
    tracking = robot.tracking_limits(space.names)
    if units is not None:  # the robot's limits are radians; the loop compares positions in the bundle's units
        tracking = _tracking_in_units(tracking, link_url, units)
    if bundle_tracking:  # a bundle may narrow the robot's limits, never widen them
        tracking = tracking.narrowed(bundle_tracking.get("max_position_error"), bundle_tracking.get("max_effort"))
    exhausted = args.exhausted_max if args.exhausted_max is not None else (2.0 if args.strategy == "sync" else 0.3)
    watchdog = WatchdogConfig(
        camera_max_age_s=args.camera_max_age, chunk_max_age_s=args.chunk_max_age, chunk_exhausted_max_s=exhausted,
        max_consecutive_overruns=args.max_overruns, link_max_age_s=args.link_max_age,
        max_link_errors=args.max_link_errors, worker_max_age_s=args.worker_max_age,
        link_loss_category=robot.link_loss_category,
    ).validate()
    home = tuple(float(x) for x in args.home.split(",")) if args.home else None
    if home is not None and len(home) != space.dim:
        raise ConfigError(f"--home has {len(home)} values; the action space has {space.dim} joints")
    cpus = plan_threads(args.cpus, args.inference_cpus).loop_cpus
    return ControlConfig(
        link_url=link_url, action_space=space, rate_hz=args.rate_hz, duration_s=args.duration,
        strategy=args.strategy, interp=args.interp, blend_s=args.blend_s, execute=args.execute,
        max_step=args.max_step, watchdog=watchdog, home=home, telemetry_path=args.telemetry,
        realtime=RealtimeConfig(fifo_priority=resolve_fifo(args.rt_priority, _is_motor(link_url))[0], cpus=cpus,
                                lock_memory=args.mlock),
        arm_on_start=args.arm_on_start, tracking=tracking,
    )


def _tracking_in_units(tracking: Any, link_url: str, units: Any) -> Any:
    """The robot configuration's following-error limits (rad) in the bundle's units: each joint's by the unit
    layer's slope (0.5 rad is ~32 units of LeRobot's -100..100 over half a turn, 28.6 degrees)."""
    from edge_vla.onboard.following import TrackingLimits
    from firmware_bridge.motors.registry import load_backend, parse_url
    from firmware_bridge.motors.units import UnitMap

    slopes = np.abs(UnitMap.for_backend(units, load_backend(parse_url(link_url).scheme)).slopes())
    return TrackingLimits(tracking.max_position_error * slopes, tracking.max_effort, tracking.debounce).validate()


def main(args: argparse.Namespace) -> int:
    if args.expert == bool(args.bundle):
        raise ConfigError("give either a BUNDLE directory or --expert (the sim's scripted expert)")
    if args.expert and args.camera != "sim":
        raise ConfigError("--expert plans from the sim scene, so it needs --camera sim")
    if not args.link and not args.emulate:
        raise ConfigError("give either --link URL (the motor controller) or --emulate (the firmware emulator)")
    if args.arm_on_start:
        check_bench_mode()
    # Every input that needs no model is checked before the model loads (seconds to minutes).
    check_rate(args.rate_hz)
    motor = bool(args.link) and args.link.partition("://")[0].lower() in motor_schemes()
    if args.link:
        check_link(args.link, emulate=args.emulate)
    check_servo_flags(args, motor)
    if motor:
        check_motor_units(args)
    if motor and 1.0 / args.rate_hz < 0.010:
        raise ConfigError(f"--rate-hz {args.rate_hz:g} is above what {args.link.partition(':')[0]}:// servos are "
                          "specified for (100 Hz: 6 servos at 1 Mbaud); use --rate-hz 100 or less")
    fifo, sched = resolve_fifo(args.rt_priority, motor)
    if motor and fifo is not None:
        # The vendor SDKs busy-poll the port for replies: a SCHED_FIFO poller starves the kernel work that moves
        # the tty's bytes, so the bus never answers (measured over the emulator's pty: 12 of 12 opens timed out).
        raise ConfigError(f"--rt-priority with {args.link.partition(':')[0]}:// servos: their SDK busy-polls the "
                          "serial port, and a real-time poller starves the tty it waits on; run without --rt-priority "
                          "(--cpus still pins the control process)")
    # A CPU list this process may not use is refused here, before the model loads.
    threads = replace(plan_threads(args.cpus, args.inference_cpus), loop_sched=sched)
    socket_path = control_socket_path(args.control_socket)
    if socket_path is not None and not under_systemd(os.environ) and not args.arm_on_start:
        log.info("operator control socket: %s (arm with `edge-vla arm%s`)", socket_path,
                 "" if args.control_socket is None else f" --control-socket {socket_path}")
    holder = SceneHolder()
    source, space, size, cams = load_source(args.bundle, holder, backend=args.backend, steps=args.steps,
                                            expert_delay_s=0.0, strategy=args.strategy,
                                            threads=threads.inference_threads, precision=args.ov_precision)
    # Before anything moves or starts: a policy whose actions this robot cannot execute is refused here.
    require_executable(space, EXECUTABLE_ACTION_KINDS, f"bundle {args.bundle}", "this robot configuration",
                       EXECUTES_BECAUSE)
    units = motor_units(args, space) if motor else None  # again, on the action space the policy loaded
    if args.camera == "sim":
        from edge_vla.sim.env import ReachEnv

        env = ReachEnv(image_size=size, num_cameras=cams)
        env.reset(args.seed)
        holder.scene = env.scene
        if args.home is None:
            args.home = ",".join(f"{x:.4f}" for x in env.q)
    instruction = args.instruction or (holder.scene.instruction if holder.scene is not None else None)
    if not instruction:
        raise ConfigError("--instruction is required with a real camera (what should the robot do?)")

    with ExitStack() as stack:
        link_url = args.link
        link_kwargs: dict[str, Any] = {}
        if motor:
            link_kwargs = motor_link_kwargs(space, args.rate_hz, units)
            link_url = url_with_calibrated_ids(args.link, units, args.calibration)
            if args.emulate:
                emu_motor = stack.enter_context(_motor_emulator(link_url, space, units))
                link_url = emulated_motor_url(link_url, emu_motor.port, space.dim, emulator_url_params(emu_motor))
                log.info("motor emulator on %s: %s", emu_motor.port, link_url)
            _check_motor_link(link_url, False, accepted_links(), **link_kwargs)
        elif args.emulate:
            from firmware_bridge.emulator_process import EmulatorProcess

            emu = stack.enter_context(EmulatorProcess(joints=space.dim, limits=EMULATOR_LIMITS))
            link_url = f"serial://{emu.port}"
            if fifo:
                prioritize_emulator(emu.proc.pid, max(1, fifo - 10))
        policy = getattr(source, "policy", None)
        tracking = policy.bundle.manifest["action_space"].get("tracking") if policy is not None else None
        config = _control_config(args, link_url, space, tracking, units)
        if link_kwargs:
            config = replace(config, link_kwargs=link_kwargs)

        def camera_factory(bus: Any) -> Any:
            return open_camera(args.camera, size, cams, scene=holder, state_fn=bus_state_fn(bus), depth=args.depth)

        level = logging.getLogger().getEffectiveLevel()
        runner = OnboardRunner(config, source, camera_factory, instruction, image_size=size, log_level=level,
                               control_socket=socket_path, threads=threads, engine=inference_engine(source),
                               camera_label=args.camera)
        previous = {}

        def on_signal(signum: int, _frame: Any) -> None:
            log.warning("%s: controlled stop requested", signal.Signals(signum).name)
            runner.request_stop()

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
        try:
            runner.start()
            if args.arm_on_start and not runner.wait_ready(60.0):
                log.error("the control loop did not become ready")
            runner.wait(None)
        finally:
            summary = runner.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    if summary is None:
        print("edge-vla run: the control process exited without a summary (killed?)", file=sys.stderr)
        return 1
    if holder.scene is not None and args.camera == "sim":
        rec = runner.bus.read_state()
        summary["sim_success"] = bool(rec is not None and holder.scene.reached(np.asarray(rec.positions)))
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print(format_summary(summary))
        if summary.get("end"):
            print(f"{'ended':<14} {end_text(summary['end'], args.duration)}")
        if "sim_success" in summary:
            print(f"sim task       {'reached' if summary['sim_success'] else 'not reached'}: {instruction!r}")
    return exit_status(summary, runner.worker_failure, isinstance(runner.worker_error, CameraError))


def end_text(end: dict[str, Any], duration_s: float | None) -> str:
    """The summary's `end` as the text summary says it."""
    if end["kind"] == "duration" and duration_s is not None:
        return f"the planned --duration of {duration_s:g} s (a controlled stop, not a trip)"
    return f"{end['kind']}: {end['reason']}"


def exit_status(summary: dict[str, Any], worker_failure: str | None, camera: bool = False) -> int:
    """The run's exit status (EXIT_STATUSES), with its one line on stderr where it did not end as planned.
    `worker_failure`: why the inference worker ended, if it did (`camera`: a camera failure)."""
    if "error" in summary:
        print(f"edge-vla run: control loop error: {summary['error']}", file=sys.stderr)
        return 1
    planned = {k.value for k in PLANNED_STOPS}
    faults = [t for t in summary.get("trips", []) if t["kind"] not in planned]
    if worker_failure is not None:
        # The robot was stopped before this process got here (the control process exits only once stopped).
        first = faults[0] if faults else None
        stopped = (f"the robot was stopped ({first['kind']}, category {first['category']})" if first else
                   "nothing was moving")
        todo = ("check the camera (its cable, power, the --camera spec) and start the run again" if camera else
                "run again with -v for the traceback, and report it")
        print(f"edge-vla run: {worker_failure}; {stopped} and the run ended: {todo}", file=sys.stderr)
        return 3 if faults else 1
    return 3 if faults else 0
