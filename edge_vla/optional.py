"""The one chokepoint for heavy optional imports (LeRobot's `require_package` habit)."""

from __future__ import annotations

import importlib
from types import ModuleType

from edge_vla.errors import MissingDependencyError

# import name -> (pip extra, why it is needed)
_EXTRAS: dict[str, tuple[str, str]] = {
    "torch": ("export", "training, distillation and ONNX export"),
    "onnx": ("export", "ONNX graph export and linting"),
    "onnxscript": ("export", "ONNX graph export"),
    "safetensors": ("export", "reading and writing checkpoints"),
    "tqdm": ("export", "progress bars"),
    "pyarrow": ("export", "reading and writing LeRobot datasets (parquet)"),
    "av": ("export", "decoding and encoding LeRobot dataset videos"),
    "tensorrt": ("tensorrt", "the TensorRT backend and engine builds"),
    "cuda": ("tensorrt", "CUDA memory, streams and kernels"),
    "openvino": ("openvino", "the OpenVINO CPU backend (backend='openvino', edge-vla tune)"),
    "pyrealsense2": ("realsense", "Intel RealSense cameras"),
    "mcap": ("telemetry", "MCAP telemetry logs"),
    "cryptography": ("provision", "bundle signing"),
    "packaging": ("provision", "resolving robot packages"),
    "matplotlib": ("plot", "latency plots"),
    "websockets": ("serve", "the openpi-protocol policy server (edge-vla serve)"),
    "msgpack": ("serve", "the openpi-protocol policy server (edge-vla serve)"),
    "metaworld": ("metaworld", "the MetaWorld benchmark (--env metaworld:TASKS)"),
    "mujoco": ("metaworld", "rendering MetaWorld cameras (--env metaworld:TASKS)"),
    "gymnasium": ("metaworld", "the MetaWorld benchmark (--env metaworld:TASKS)"),
    # firmware_bridge.motors imports these itself and names the extra the same way (firmware_bridge never imports
    # edge_vla); listed here so the robot-package lock check knows which extra brings them.
    "dynamixel_sdk": ("dynamixel", "dynamixel:// motor links (Dynamixel X servos, Protocol 2.0)"),
    "scservo_sdk": ("feetech", "feetech:// motor links (Feetech STS servos)"),
    "canopen": ("cia402", "cia402:// motor links (CiA 402 drives over CANopen)"),
}


def require(module: str) -> ModuleType:
    """Import `module` or raise an error that names the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        extra, why = _EXTRAS.get(top, (None, "this feature"))
        hint = f"pip install 'edge-vla[{extra}]'" if extra else f"pip install {top}"
        raise MissingDependencyError(
            f"{module!r} is needed for {why} but could not be imported ({exc}). Install it with: {hint}"
        ) from exc


def available(module: str) -> bool:
    """True when `module` imports (without raising for any reason)."""
    try:
        importlib.import_module(module)
    except Exception:
        return False
    return True
