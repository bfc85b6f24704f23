"""msgpack-numpy exactly as openpi-client 0.1.2 packs it (`openpi_client/msgpack_numpy.py`), with limits.

Wire format (msgpack maps whose keys are bytes):
    numpy array   {b"__ndarray__": True, b"data": <raw bytes>, b"dtype": "<f4", b"shape": [H, W, 3]}
    numpy scalar  {b"__npgeneric__": True, b"data": <python number>, b"dtype": "<f8"}

Decoding never trusts the sender: the message size is capped by the websocket layer, every array's size,
rank and dtype here (bool, integers and floats only: object, void and complex arrays are refused, so nothing
can smuggle a pickle), and a declared shape must match the bytes that came with it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_vla.optional import require
from edge_vla.serve.errors import RequestError

msgpack = require("msgpack")

NDARRAY = b"__ndarray__"
NPGENERIC = b"__npgeneric__"
ALLOWED_KINDS = "biuf"  # bool, signed and unsigned integers, floats


@dataclass(frozen=True)
class Limits:
    """What one request may hold. A message over `max_message_bytes` is refused by the websocket layer
    (close code 1009); the rest are checked while decoding and answered with a text-frame error."""

    max_message_bytes: int = 32 * 1024 * 1024
    max_array_bytes: int = 16 * 1024 * 1024
    max_ndim: int = 4
    max_keys: int = 256  # per map, and observation keys in all
    max_str_len: int = 4096  # the prompt is the only string that matters
    max_list_len: int = 1024  # msgpack arrays: array shapes, or a state sent as a plain list


def decode(message: bytes, limits: Limits) -> dict[str, Any]:
    """One packed observation -> a dict of numpy arrays, scalars and strings. Raises RequestError."""
    if not isinstance(message, bytes | bytearray | memoryview):
        raise RequestError("expected a binary msgpack frame (openpi-client's msgpack_numpy.packb), got text")
    try:
        obj = msgpack.unpackb(
            message,
            object_hook=_object_hook(limits),
            raw=False,
            max_str_len=limits.max_str_len,
            max_bin_len=limits.max_array_bytes,
            max_array_len=limits.max_list_len,
            max_map_len=limits.max_keys,
            max_ext_len=0,  # no extension types (msgpack's Timestamp or anything else)
        )
    except RequestError:
        raise
    except Exception as exc:  # msgpack raises ExtraData, FormatError, StackError, ValueError, ...
        raise RequestError(f"the message is not a valid msgpack-numpy packed dict ({type(exc).__name__}: {exc}); "
                           "pack observations with openpi_client.msgpack_numpy.packb") from exc
    if not isinstance(obj, dict):
        raise RequestError(f"the message must be a packed dict of observation keys, got {type(obj).__name__}")
    return obj


def _object_hook(limits: Limits) -> Callable[[dict[Any, Any]], Any]:
    def hook(obj: dict[Any, Any]) -> Any:
        if NDARRAY in obj:
            return _decode_array(obj, limits)
        if NPGENERIC in obj:
            return _decode_scalar(obj)
        return obj

    return hook


def _dtype(spec: Any) -> np.dtype:
    try:
        dtype = np.dtype(spec) if isinstance(spec, str) else None
    except TypeError:
        dtype = None
    if dtype is None or dtype.kind not in ALLOWED_KINDS or dtype.hasobject or dtype.subdtype is not None:
        raise RequestError(f"array dtype {spec!r} is not accepted; send bool, integer or float arrays")
    return dtype


def _decode_array(obj: dict[Any, Any], limits: Limits) -> np.ndarray:
    data, shape = obj.get(b"data"), obj.get(b"shape")
    dtype = _dtype(obj.get(b"dtype"))
    if not isinstance(data, bytes):
        raise RequestError("an __ndarray__ entry has no bytes under b'data'")
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise RequestError(f"an __ndarray__ entry has an invalid shape {shape!r}")
    if len(shape) > limits.max_ndim:
        raise RequestError(f"array of rank {len(shape)} refused (at most {limits.max_ndim} dimensions)")
    want = math.prod(shape) * dtype.itemsize
    if want != len(data):
        raise RequestError(f"array declares shape {tuple(shape)} of {dtype.str} ({want} bytes) but carries "
                           f"{len(data)} bytes")
    return np.frombuffer(data, dtype=dtype).reshape(shape)  # read-only view; copied when mapped


def _decode_scalar(obj: dict[Any, Any]) -> np.generic:
    dtype, data = _dtype(obj.get(b"dtype")), obj.get(b"data")
    if type(data) not in (bool, int, float):
        raise RequestError(f"an __npgeneric__ entry holds {type(data).__name__}, expected a number")
    try:
        return dtype.type(data)
    except (OverflowError, ValueError) as exc:
        raise RequestError(f"numpy scalar {data!r} does not fit dtype {dtype.str}: {exc}") from exc


def _pack_default(obj: Any) -> Any:
    """openpi-client's `pack_array`: the reply side of the same format."""
    if isinstance(obj, np.ndarray):
        return {NDARRAY: True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": obj.shape}
    if isinstance(obj, np.generic):
        return {NPGENERIC: True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot pack {type(obj).__name__}")


def packer() -> Any:
    """A msgpack Packer that encodes numpy arrays and scalars like openpi-client."""
    return msgpack.Packer(default=_pack_default)


def packb(obj: Any) -> bytes:
    return msgpack.packb(obj, default=_pack_default)
