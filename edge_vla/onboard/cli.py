"""`edge-vla run`: run the robot standalone: cameras -> policy -> chunk scheduler -> safety -> motor controller."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from contextlib import ExitStack
from typing import Any

import numpy as np

from edge_vla.action_space import require_executable
from edge_vla.errors import ConfigError
from edge_vla.onboard.cameras import open_camera
from edge_vla.onboard.control import EXECUTABLE_ACTION_KINDS, EXECUTES_BECAUSE, ControlConfig
from edge_vla.onboard.drill import EMULATOR_LIMITS, SceneHolder, load_source, prioritize_emulator
from edge_vla.onboard.operator import check_bench_mode, default_socket_path
from edge_vla.onboard.rt import RealtimeConfig
from edge_vla.onboard.runner import OnboardRunner, bus_state_fn
from edge_vla.onboard.scheduler import INTERPOLATIONS, STRATEGIES
from edge_vla.onboard.telemetry import format_summary
from edge_vla.onboard.watchdog import WatchdogConfig
from edge_vla.provision.robot_config import CONFIG_PATH, RobotConfig

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", nargs="?", help="bundle directory (omit with --expert)")
    parser.add_argument("--expert", action="store_true",
                        help="drive with the sim's scripted expert instead of a policy (bring-up; needs --camera sim)")
    parser.add_argument("--link", help="motor controller: serial:///dev/ttyACM0?baud=1000000 | can://socketcan/can0")
    parser.add_argument("--emulate", action="store_true",
                        help="start the firmware emulator on a pty and use it as the link (no hardware)")
    parser.add_argument("--camera", default="sim", help="realsense[:SERIAL] | video:PATH | sim (default sim)")
    parser.add_argument("--depth", action="store_true", help="RealSense: also stream depth aligned to colour")
    parser.add_argument("--rate-hz", type=float, default=50.0, help="control rate, 50-500 Hz (default 50)")
    parser.add_argument("--duration", type=float, help="seconds, then a controlled stop (default: until stopped)")
    parser.add_argument("--instruction", help="language instruction (sim default: the scene's own)")
    parser.add_argument("--seed", type=int, default=1_000_000, help="sim scene seed")
    parser.add_argument("--strategy", choices=STRATEGIES, default="receding", help="chunk scheduling")
    parser.add_argument("--blend-s", type=float, default=0.1, help="hand-over cross-fade between chunks (s)")
    parser.add_argument("--execute", type=int, help="sync: actions played per chunk")
    parser.add_argument("--interp", choices=INTERPOLATIONS, default="cubic")
    parser.add_argument("--max-step", type=float, help="max change per cycle (rad) on top of the velocity limit")
    parser.add_argument("--home", help="comma-separated joint pose to move to before the policy starts")
    parser.add_argument("--backend", default="auto", choices=("auto", "onnxruntime", "tensorrt"))
    parser.add_argument("--steps", type=int, help="ODE steps (default: the bundle's)")
    parser.add_argument("--telemetry", help="telemetry file: .mcap (needs the mcap package) or .jsonl")
    op = parser.add_argument_group("operator (arming is an operator act: the loop starts disarmed)")
    op.add_argument("--control-socket",
                    help="serve arm/stop/status on this Unix socket (default under systemd: "
                         "$RUNTIME_DIRECTORY/control.sock, i.e. /run/edge-vla/control.sock; 'none' to disable)")
    op.add_argument("--arm-on-start", action="store_true",
                    help="bench mode: arm once at start without an operator (refused under systemd unless the unit "
                         "sets EDGE_VLA_ALLOW_ARM_ON_START=1)")
    op.add_argument("--robot-config", default=None,
                    help=f"robot configuration with following-error limits and the link-loss category "
                         f"(default {CONFIG_PATH} if it exists)")
    wd = parser.add_argument_group("watchdog thresholds")
    defaults = WatchdogConfig()
    wd.add_argument("--camera-max-age", type=float, default=defaults.camera_max_age_s)
    wd.add_argument("--chunk-max-age", type=float, default=defaults.chunk_max_age_s)
    wd.add_argument("--exhausted-max", type=float, help="holding past the last chunk (default 0.3 s; sync 2 s)")
    wd.add_argument("--max-overruns", type=int, default=defaults.max_consecutive_overruns)
    wd.add_argument("--link-max-age", type=float, default=defaults.link_max_age_s)
    wd.add_argument("--max-link-errors", type=int, default=defaults.max_link_errors)
    wd.add_argument("--worker-max-age", type=float, default=defaults.worker_max_age_s)
    rt = parser.add_argument_group("real time")
    rt.add_argument("--rt-priority", type=int, help="SCHED_FIFO priority for the control process (1-99)")
    rt.add_argument("--cpus", help="pin the control process to these CPUs, e.g. 1 or 2,3")
    rt.add_argument("--mlock", action="store_true", help="mlockall the control process")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def _robot_config(args: argparse.Namespace) -> RobotConfig:
    path = args.robot_config or (CONFIG_PATH if os.path.isfile(CONFIG_PATH) else None)
    return RobotConfig.load(path).validate() if path else RobotConfig()


def _control_config(args: argparse.Namespace, link_url: str, space: Any,
                    bundle_tracking: dict[str, Any] | None = None) -> ControlConfig:
    if not 1.0 <= args.rate_hz <= 1000.0:
        raise ConfigError(f"--rate-hz {args.rate_hz} is out of range; use 50-500 Hz")
    robot = _robot_config(args)
    tracking = robot.tracking_limits(space.names)
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
    cpus = tuple(int(c) for c in args.cpus.split(",")) if args.cpus else None
    return ControlConfig(
        link_url=link_url, action_space=space, rate_hz=args.rate_hz, duration_s=args.duration,
        strategy=args.strategy, interp=args.interp, blend_s=args.blend_s, execute=args.execute,
        max_step=args.max_step, watchdog=watchdog, home=home, telemetry_path=args.telemetry,
        realtime=RealtimeConfig(fifo_priority=args.rt_priority, cpus=cpus, lock_memory=args.mlock),
        arm_on_start=args.arm_on_start, tracking=tracking,
    )


def main(args: argparse.Namespace) -> int:
    if args.expert == bool(args.bundle):
        raise ConfigError("give either a BUNDLE directory or --expert (the sim's scripted expert)")
    if args.expert and args.camera != "sim":
        raise ConfigError("--expert plans from the sim scene, so it needs --camera sim")
    if bool(args.link) == args.emulate:
        raise ConfigError("give either --link URL (the motor controller) or --emulate (the firmware emulator)")
    if args.arm_on_start:
        check_bench_mode()
    socket_path = None if args.control_socket == "none" else (
        args.control_socket or (default_socket_path() if os.environ.get("RUNTIME_DIRECTORY") else None))
    holder = SceneHolder()
    source, space, size, cams = load_source(args.bundle, holder, backend=args.backend, steps=args.steps,
                                            expert_delay_s=0.0)
    # Before anything moves or starts: a policy whose actions this robot cannot execute is refused here.
    require_executable(space, EXECUTABLE_ACTION_KINDS, f"bundle {args.bundle}", "this robot configuration",
                       EXECUTES_BECAUSE)
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
        if args.emulate:
            from firmware_bridge.emulator_process import EmulatorProcess

            emu = stack.enter_context(EmulatorProcess(joints=space.dim, limits=EMULATOR_LIMITS))
            link_url = f"serial://{emu.port}"
            if args.rt_priority:
                prioritize_emulator(emu.proc.pid, max(1, args.rt_priority - 10))
        policy = getattr(source, "policy", None)
        tracking = policy.bundle.manifest["action_space"].get("tracking") if policy is not None else None
        config = _control_config(args, link_url, space, tracking)

        def camera_factory(bus: Any) -> Any:
            return open_camera(args.camera, size, cams, scene=holder, state_fn=bus_state_fn(bus), depth=args.depth)

        level = logging.getLogger().getEffectiveLevel()
        runner = OnboardRunner(config, source, camera_factory, instruction, image_size=size, log_level=level,
                               control_socket=socket_path)
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
        if "sim_success" in summary:
            print(f"sim task       {'reached' if summary['sim_success'] else 'not reached'}: {instruction!r}")
    if "error" in summary:
        print(f"edge-vla run: control loop error: {summary['error']}", file=sys.stderr)
        return 1
    faults = [t for t in summary.get("trips", []) if t["kind"] != "operator_stop"]
    return 3 if faults else 0
