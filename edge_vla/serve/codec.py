"""msgpack-numpy exactly as openpi-client 0.1.2 packs it (`openpi_client/msgpack_numpy.py`), with limits.

Wire format (msgpack maps whose keys are bytes):
    numpy array   {b"__ndarray__": True, b"data": <raw bytes>, b"dtype": "<f4", b"shape": [H, W, 3]}
    numpy scalar  {b"__npgeneric__": True, b"data": <python number>, b"dtype": "<f8"}

Decoding never trusts the sender: the message size is capped by the websocket layer, every array's size,
rank and dtype here (bool, integers and floats only: object, void and complex arrays are refused, so nothing
can smuggle a pickle), and a declared shape must match the bytes that came with it.

Memory: msgpack's own limits (max_array_len, max_map_len, ...) apply to one container at a time, so a
message of nothing but small containers decodes to ~72 bytes of Python objects per byte on the wire (a
31 MiB message of empty maps took 2.2 GB and 10-20 s of the one worker). So before msgpack builds anything,
`check_structure` walks the bytes once (each value's header says how long it is, so the walk is linear and
allocates nothing per value) and refuses a message that holds more than `max_values` values in all or nests
deeper than `max_depth`, or that is truncated or has bytes after its end. What decoding then allocates is
bounded by the message's own payload bytes plus about 100 bytes per value: a few MiB at most, whatever
the message cap.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_vla.optional import require
from edge_vla.serve.errors import RequestError, clip, clip_repr

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
    # Across the whole message, checked before decoding. A real observation holds a few dozen values (a
    # state sent as a plain list: up to max_list_len more) and nests ~4 deep; obs_map allows 8 levels of
    # dicts, plus an __ndarray__ entry and its shape list.
    max_values: int = 16384  # every key, value and list item, in every container
    max_depth: int = 12  # containers inside containers, the message's own dict counting as 1


def decode(message: bytes, limits: Limits) -> dict[str, Any]:
    """One packed observation -> a dict of numpy arrays, scalars and strings. Raises RequestError."""
    if not isinstance(message, bytes | bytearray | memoryview):
        raise RequestError("expected a binary msgpack frame (openpi-client's msgpack_numpy.packb), got text")
    check_structure(message, limits)  # before msgpack allocates anything
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
        raise _malformed(f"{type(exc).__name__}: {clip(str(exc), 200)}") from exc
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


# --- the structure walk ------------------------------------------------------------------------------
# What each msgpack lead byte starts (https://github.com/msgpack/msgpack/blob/master/spec.md#formats):
# (kind, width of its length field in bytes, fixed value). The fixed value is a scalar's whole size, or
# the length / item count of a fixstr, fixarray or fixmap (whose length field is in the lead byte).
_SCALAR, _STR, _BIN, _ARRAY, _MAP, _EXT, _UNUSED = range(7)


def _lead_bytes() -> tuple[tuple[int, int, int], ...]:
    table = [(_UNUSED, 0, 0)] * 256
    for b in [*range(0x00, 0x80), *range(0xE0, 0x100), 0xC0, 0xC2, 0xC3]:  # fixints, nil, false, true
        table[b] = (_SCALAR, 0, 1)
    for b in range(0x80, 0x90):
        table[b] = (_MAP, 0, b & 0x0F)
    for b in range(0x90, 0xA0):
        table[b] = (_ARRAY, 0, b & 0x0F)
    for b in range(0xA0, 0xC0):
        table[b] = (_STR, 0, b & 0x1F)
    sized = {0xCA: 5, 0xCB: 9, 0xCC: 2, 0xCD: 3, 0xCE: 5, 0xCF: 9, 0xD0: 2, 0xD1: 3, 0xD2: 5, 0xD3: 9}
    for b, size in sized.items():  # float32/64, uint8..64, int8..64
        table[b] = (_SCALAR, 0, size)
    for b, kind, width in [(0xC4, _BIN, 1), (0xC5, _BIN, 2), (0xC6, _BIN, 4), (0xD9, _STR, 1), (0xDA, _STR, 2),
                           (0xDB, _STR, 4), (0xDC, _ARRAY, 2), (0xDD, _ARRAY, 4), (0xDE, _MAP, 2), (0xDF, _MAP, 4),
                           (0xC7, _EXT, 1), (0xC8, _EXT, 2), (0xC9, _EXT, 4)]:
        table[b] = (kind, width, 0)
    for b in range(0xD4, 0xD9):  # fixext 1..16
        table[b] = (_EXT, 0, 0)
    return tuple(table)


_LEAD_BYTES = _lead_bytes()
_HINT = "; pack observations with openpi_client.msgpack_numpy.packb"


def _malformed(detail: str) -> RequestError:
    return RequestError(f"the message is not a valid msgpack-numpy packed dict ({detail}){_HINT}")


def _too_big(detail: str) -> RequestError:
    return RequestError(f"the message is refused: {detail}; send only the observation (images, state, prompt){_HINT}")


def check_structure(message: bytes | bytearray | memoryview, limits: Limits) -> None:
    """Walk the msgpack bytes once, without decoding: exactly one value, nothing after it, no extension
    types, each string, binary, list and map within its limit, at most `max_values` values in all and
    `max_depth` levels of nesting. Costs O(values), at most max_values steps, so a hostile message is
    refused in milliseconds. Raises RequestError."""
    size, pos, values = len(message), 0, 0
    unread = [1]  # values still to read in each open container; the bottom entry is the message itself
    while unread:
        if pos >= size:
            raise _malformed(f"truncated: it ends at byte {size} inside a value")
        lead = message[pos]
        kind, width, fixed = _LEAD_BYTES[lead]
        unread[-1] -= 1
        if kind == _SCALAR:
            pos += fixed
        elif kind == _UNUSED:
            raise _malformed(f"byte 0x{lead:02x} at offset {pos} starts no msgpack value")
        elif kind == _EXT:
            raise _malformed(f"msgpack extension type 0x{lead:02x} at byte {pos}; none is accepted")
        else:
            if pos + 1 + width > size:
                raise _malformed(f"truncated: it ends at byte {size} inside a length field")
            n = int.from_bytes(message[pos + 1 : pos + 1 + width], "big") if width else fixed
            pos += 1 + width
            if kind in (_STR, _BIN):
                cap, what = (limits.max_str_len, "string") if kind == _STR else (limits.max_array_bytes, "binary")
                if n > cap:
                    raise _too_big(f"a {what} of {n} bytes at byte {pos} (at most {cap})")
                pos += n
            else:
                values += _container(kind, n, len(unread), pos, limits)
                if values > limits.max_values:
                    raise _too_big(f"it holds more than {limits.max_values} values (keys, values and list items)")
                if n:
                    unread.append(n if kind == _ARRAY else 2 * n)
        while unread and unread[-1] == 0:
            unread.pop()
    if pos > size:
        raise _malformed(f"truncated: its last value needs {pos - size} more byte(s)")
    if pos < size:
        raise _malformed(f"{size - pos} byte{'s' if size - pos > 1 else ''} after the end of the packed value")


def _container(kind: int, n: int, depth: int, pos: int, limits: Limits) -> int:
    """Check one list or map header; returns how many values it holds (a map: its keys and its values)."""
    if depth > limits.max_depth:
        raise _too_big(f"it is nested deeper than {limits.max_depth} levels (at byte {pos})")
    if kind == _ARRAY and n > limits.max_list_len:
        raise _too_big(f"a list of {n} values at byte {pos} (at most {limits.max_list_len})")
    if kind == _MAP and n > limits.max_keys:
        raise _too_big(f"a map of {n} keys at byte {pos} (at most {limits.max_keys})")
    return n if kind == _ARRAY else 2 * n


# --- numpy entries -----------------------------------------------------------------------------------
def _dtype(spec: Any) -> np.dtype:
    try:
        dtype = np.dtype(spec) if isinstance(spec, str) else None
    except (TypeError, ValueError, SyntaxError):  # numpy parses the string; any failure is the client's
        dtype = None
    if dtype is None or dtype.kind not in ALLOWED_KINDS or dtype.hasobject or dtype.subdtype is not None:
        raise RequestError(f"array dtype {clip_repr(spec)} is not accepted; send bool, integer or float arrays")
    return dtype


def _decode_array(obj: dict[Any, Any], limits: Limits) -> np.ndarray:
    data, shape = obj.get(b"data"), obj.get(b"shape")
    dtype = _dtype(obj.get(b"dtype"))
    if not isinstance(data, bytes):
        raise RequestError("an __ndarray__ entry has no bytes under b'data'")
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise RequestError(f"an __ndarray__ entry has an invalid shape {clip_repr(shape)}")
    if len(shape) > limits.max_ndim:
        raise RequestError(f"array of rank {len(shape)} refused (at most {limits.max_ndim} dimensions)")
    # A zero dimension makes any other dimension "fit" the bytes (0 x 2**62 = 0), and numpy then refuses
    # the shape: so each dimension, and their product with zeros left out, must fit the array cap.
    most = limits.max_array_bytes // dtype.itemsize
    if math.prod(n for n in shape if n) > most:
        raise RequestError(f"an __ndarray__ entry has an invalid shape {clip_repr(shape)}: each dimension at most "
                           f"{most} {dtype.str} elements, and so their product (zeros aside), in a "
                           f"{limits.max_array_bytes}-byte array")
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
        with np.errstate(over="ignore"):  # 1e300 as float16 is inf: refused later where a value must be finite
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
