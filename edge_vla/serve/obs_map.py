"""Map a client's observation dict onto the bundle's cameras, state and instruction.

Each robot family's client sends its own keys (openpi's examples):

    aloha   state [14], images/{cam_high, cam_low, cam_left_wrist, cam_right_wrist} (uint8 CHW), prompt
    libero  observation/image, observation/wrist_image, observation/state [8], prompt
    droid   observation/exterior_image_1_left, observation/wrist_image_left,
            observation/joint_position [7] + observation/gripper_position [1], prompt

Nested dicts are addressed with "/" (openpi's flatten_dict convention), so ALOHA's
`{"images": {"cam_high": ...}}` is `images/cam_high`; a flat key that contains "/" (LIBERO) matches too.

`--obs-map` is a preset name, `KEY=ROLE,...`, or a preset followed by overrides. Roles: `cameraN` (the
bundle's N-th camera), `state` (given several times: the values are concatenated in map order),
`instruction`. `state_fit=exact|pad|cut|pad_or_cut` says what to do when the client's state length differs
from the bundle's: `exact` (the default) refuses, `cut` keeps the first values, `pad` appends zeros.
Nothing is padded or cut unless the map says so.

Images may be HxWx3 or 3xHxW uint8 RGB; they are resized to the bundle's square input with the same
nearest-neighbour resize the onboard camera path uses (`edge_vla.onboard.cameras.resize_nearest`), so a
policy sees the same pixels served or onboard.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from edge_vla.config import VLAConfig
from edge_vla.onboard.cameras import resize_nearest
from edge_vla.runtime.types import Observation
from edge_vla.serve.errors import RequestError, ServeError, clip, clip_repr

STATE_FITS = ("exact", "pad", "cut", "pad_or_cut")
MAX_DEPTH = 8


@dataclass(frozen=True)
class ObsMap:
    """Client keys for each bundle input. `cameras[i]` feeds the bundle's camera i."""

    name: str
    cameras: tuple[str, ...]
    state: tuple[str, ...]
    instruction: str = "prompt"
    state_fit: str = "exact"

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "cameras": list(self.cameras), "state": list(self.state),
                "instruction": self.instruction, "state_fit": self.state_fit}


PRESETS: dict[str, ObsMap] = {
    "aloha": ObsMap("aloha", ("images/cam_high", "images/cam_low", "images/cam_left_wrist", "images/cam_right_wrist"),
                    ("state",)),
    "libero": ObsMap("libero", ("observation/image", "observation/wrist_image"), ("observation/state",)),
    "droid": ObsMap("droid", ("observation/exterior_image_1_left", "observation/wrist_image_left"),
                    ("observation/joint_position", "observation/gripper_position")),
}


def native_map(num_cameras: int) -> ObsMap:
    """The default when no --obs-map is given: images/cam0..camN-1, state, prompt."""
    return ObsMap("native", tuple(f"images/cam{i}" for i in range(num_cameras)), ("state",))


def parse_obs_map(spec: str | None, num_cameras: int) -> ObsMap:
    """`aloha`, `libero,state_fit=cut`, `observation/image=camera0,observation/state=state,prompt=instruction`."""
    items = [s.strip() for s in (spec or "").split(",") if s.strip()]
    base = native_map(num_cameras)
    if items and "=" not in items[0]:
        name = items.pop(0).lower()
        if name == "native":
            pass
        elif name in PRESETS:
            base = PRESETS[name]
        else:
            raise ServeError(f"unknown --obs-map preset {name!r}; choose one of {['native', *PRESETS]} "
                             "or give KEY=ROLE pairs")
    elif items:
        base = ObsMap("custom", (), ())  # a fully explicit map starts empty
    cameras = dict(enumerate(base.cameras))
    state: list[str] = []
    instruction, fit = base.instruction, base.state_fit
    for item in items:
        key, eq, role = item.rpartition("=")
        key, role = key.strip(), role.strip().lower()
        if not eq or not key:
            raise ServeError(f"--obs-map entry {item!r} is not KEY=ROLE (roles: cameraN, state, instruction)")
        if key == "state_fit":
            if role not in STATE_FITS:
                raise ServeError(f"state_fit={role!r}: choose one of {STATE_FITS}")
            fit = role
        elif role == "state":
            state.append(key)
        elif role == "instruction":
            instruction = key
        elif m := re.fullmatch(r"camera(\d+)", role):
            cameras[int(m.group(1))] = key
        else:
            raise ServeError(f"--obs-map entry {item!r}: unknown role {role!r}; roles are cameraN, state, instruction")
    if sorted(cameras) != list(range(len(cameras))):
        raise ServeError(f"--obs-map cameras must be camera0..cameraN-1 without gaps, got {sorted(cameras)}")
    name = base.name if not items or base.name == "custom" else f"{base.name}+overrides"
    return replace(base, name=name, cameras=tuple(cameras[i] for i in range(len(cameras))),
                   state=tuple(state) or base.state, instruction=instruction, state_fit=fit)


class ObservationMapper:
    """Checks a decoded request and turns it into the Observation the bundle expects."""

    def __init__(self, obs_map: ObsMap, config: VLAConfig, default_prompt: str | None = None) -> None:
        if len(obs_map.cameras) != config.num_cameras:
            hint = ",".join([f"{k}=camera{i}" for i, k in enumerate(obs_map.cameras[: config.num_cameras])]
                            + [f"{k}=state" for k in obs_map.state] + [f"{obs_map.instruction}=instruction"])
            raise ServeError(
                f"obs map {obs_map.name!r} names {len(obs_map.cameras)} camera(s) {list(obs_map.cameras)} but the "
                f"bundle takes {config.num_cameras}; map the ones it was trained on explicitly, e.g. --obs-map {hint}"
            )
        if not obs_map.state:
            raise ServeError("the obs map names no state key; add KEY=state")
        self.map = obs_map
        self.image_size = config.image_size
        self.state_dim = config.state_dim
        self.default_prompt = default_prompt

    def describe(self) -> dict[str, Any]:
        return self.map.describe() | {"image_size": self.image_size, "image_layouts": ["HWC", "CHW"],
                                      "image_dtype": "uint8", "state_dim": self.state_dim}

    def to_observation(self, request: dict[str, Any]) -> Observation:
        flat: dict[str, Any] = {}
        _flatten(request, "", flat, 0)
        images = [self._image(key, self._get(flat, key, f"camera{i}")) for i, key in enumerate(self.map.cameras)]
        return Observation(images=images, instruction=self._instruction(flat), state=self._state(flat),
                           timestamp=time.monotonic())

    # --- one input each ----------------------------------------------------------------------------
    def _get(self, flat: dict[str, Any], key: str, role: str) -> Any:
        if key not in flat:
            have = sorted(flat)
            shown = ", ".join(clip(k) for k in have[:20]) + (f", ... ({len(have)} keys)" if len(have) > 20 else "")
            raise RequestError(f"observation has no key {key!r} (the bundle's {role} under obs map "
                               f"{self.map.name!r}); it has: {shown or 'no keys'}. Fix the client or --obs-map")
        return flat[key]

    def _image(self, key: str, value: Any) -> np.ndarray:
        ok = isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 3 and (
            value.shape[-1] == 3 or value.shape[0] == 3) and min(value.shape) > 0
        if not ok:
            raise RequestError(f"{key}: expected a uint8 RGB image, HxWx3 or 3xHxW, got {_describe(value)}; "
                               "convert with openpi_client.image_tools.convert_to_uint8")
        hwc = value if value.shape[-1] == 3 else value.transpose(1, 2, 0)
        return np.ascontiguousarray(resize_nearest(hwc, self.image_size))

    def _state(self, flat: dict[str, Any]) -> np.ndarray:
        parts = [_state_part(key, self._get(flat, key, "state")) for key in self.map.state]
        with np.errstate(over="ignore"):  # a value past float32's range becomes inf and is refused just below
            state = np.concatenate(parts).astype(np.float32)
        bad = np.flatnonzero(~np.isfinite(state))
        if bad.size:  # count and place, never the values: the state may be millions of numbers long
            raise RequestError(f"state ({' + '.join(self.map.state)}) contains {bad.size} NaN or Inf value(s) as "
                               f"float32, first at index {bad[0]} of {state.size}; check the joint encoder feed")
        n, want, fit = len(state), self.state_dim, self.map.state_fit
        if n > want and fit in ("cut", "pad_or_cut"):
            return state[:want]
        if n < want and fit in ("pad", "pad_or_cut"):
            return np.concatenate([state, np.zeros(want - n, dtype=np.float32)])
        if n != want:
            allow = "cut" if n > want else "pad"
            raise RequestError(f"state ({' + '.join(self.map.state)}) has {n} values but the bundle takes {want}; "
                               f"if {'dropping the trailing values' if n > want else 'zero-padding'} is right for "
                               f"this robot, start the server with state_fit={allow} in --obs-map")
        return state

    def _instruction(self, flat: dict[str, Any]) -> str:
        value = flat.get(self.map.instruction)
        if value is None:
            if self.default_prompt is None:
                raise RequestError(f"observation has no instruction under {self.map.instruction!r}; send one or "
                                   "start the server with --prompt TEXT")
            return self.default_prompt
        if not isinstance(value, str):
            raise RequestError(f"{self.map.instruction}: the instruction must be a string, got {_describe(value)}")
        return value


def _state_part(key: str, value: Any) -> np.ndarray:
    """One state key's value as a 1-D array: a number, a 1-D integer or float array, or a flat list of
    numbers. Anything else (a ragged or nested list, bools, strings, None) is the client's error."""
    if isinstance(value, list):
        # np.asarray would raise on a ragged list, and silently turn True into 1.0 or a nested list into 2-D.
        if not all(type(v) in (int, float) for v in value):
            raise RequestError(f"{key}: expected a flat list of numbers for the state, got {_describe(value)}")
        return np.array(value, dtype=np.float64)  # msgpack ints are 64-bit: each fits a float64
    if isinstance(value, np.ndarray | np.generic) or type(value) in (int, float):
        arr = np.asarray(value)
        if arr.dtype.kind in "iuf" and arr.ndim <= 1:
            return arr.reshape(-1)
    raise RequestError(f"{key}: expected a number or a 1-D numeric array for the state, got {_describe(value)}")


def _flatten(d: dict[Any, Any], prefix: str, out: dict[str, Any], depth: int) -> None:
    if depth > MAX_DEPTH:
        raise RequestError(f"observation nested deeper than {MAX_DEPTH} levels at {clip_repr(prefix)}")
    for key, value in d.items():
        if not isinstance(key, str):
            raise RequestError(f"observation keys must be strings, got {clip_repr(key)} under "
                               f"{clip_repr(prefix) if prefix else 'the top level'}")
        path = f"{prefix}/{key}" if prefix else key
        if isinstance(value, dict):
            _flatten(value, path, out, depth + 1)
        else:
            out[path] = value


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array of shape {value.shape}"
    if isinstance(value, list):
        kinds = sorted({type(v).__name__ for v in value})
        return f"a list of {len(value)} item(s) of type {', '.join(kinds)}" if value else "an empty list"
    return type(value).__name__
