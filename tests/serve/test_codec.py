"""msgpack-numpy decoding with limits: what openpi-client sends decodes; anything else is a clear RequestError."""

from __future__ import annotations

import pickle

import msgpack
import numpy as np
import pytest

from edge_vla.serve import codec
from edge_vla.serve.codec import Limits
from edge_vla.serve.errors import RequestError

LIMITS = Limits()


def nd(dtype: str, shape: list[int], data: bytes) -> dict[bytes, object]:
    return {b"__ndarray__": True, b"data": data, b"dtype": dtype, b"shape": shape}


def test_round_trip_of_arrays_and_numpy_scalars() -> None:
    obs = {"images": {"cam": np.arange(24, dtype=np.uint8).reshape(2, 4, 3)}, "state": np.linspace(0, 1, 7),
           "gripper": np.float32(0.25), "step": np.int64(-3), "flag": np.bool_(True), "prompt": "pick up the cup"}
    out = codec.decode(codec.packb(obs), LIMITS)
    np.testing.assert_array_equal(out["images"]["cam"], obs["images"]["cam"])
    assert out["images"]["cam"].dtype == np.uint8 and out["state"].dtype == np.float64
    assert type(out["gripper"]) is np.float32 and out["gripper"] == np.float32(0.25)
    assert type(out["step"]) is np.int64 and out["step"] == -3
    assert type(out["flag"]) is np.bool_ and out["prompt"] == "pick up the cup"


def test_big_endian_arrays_decode_to_the_right_values() -> None:
    a = np.array([1.5, -2.0], dtype=">f4")
    out = codec.decode(msgpack.packb({"s": nd(">f4", [2], a.tobytes())}), LIMITS)
    np.testing.assert_array_equal(out["s"], [1.5, -2.0])


@pytest.mark.parametrize("dtype", ["|O", "<c8", "|V4", "(2,)<f4", "<U3", "not-a-dtype"])
def test_refused_dtypes(dtype: str) -> None:
    with pytest.raises(RequestError, match="dtype .* is not accepted"):
        codec.decode(msgpack.packb({"x": nd(dtype, [1], b"\0" * 16)}), LIMITS)


@pytest.mark.parametrize(("entry", "needle"), [
    (nd("<f4", [3], b"\0" * 8), "declares shape \\(3,\\) of <f4 \\(12 bytes\\) but carries 8 bytes"),
    (nd("<f4", [-1], b""), "invalid shape"),
    (nd("<f4", [1.5], b"\0" * 4), "invalid shape"),
    (nd("|u1", [1, 1, 1, 1, 1], b"\0"), "rank 5 refused"),
    ({b"__ndarray__": True, b"data": "text", b"dtype": "|u1", b"shape": [4]}, "no bytes"),
    ({b"__npgeneric__": True, b"data": "1.0", b"dtype": "<f8"}, "expected a number"),
    ({b"__npgeneric__": True, b"data": 300, b"dtype": "|u1"}, "does not fit"),
])
def test_malformed_entries(entry: dict, needle: str) -> None:
    with pytest.raises(RequestError, match=needle):
        codec.decode(msgpack.packb({"x": entry}), LIMITS)


def test_caps_on_array_bytes_keys_and_strings() -> None:
    small = Limits(max_array_bytes=1000, max_keys=4, max_str_len=10)
    with pytest.raises(RequestError, match="not a valid msgpack"):
        codec.decode(codec.packb({"img": np.zeros(2000, np.uint8)}), small)
    with pytest.raises(RequestError, match="not a valid msgpack"):
        codec.decode(codec.packb({str(i): i for i in range(5)}), small)
    with pytest.raises(RequestError, match="not a valid msgpack"):
        codec.decode(codec.packb({"prompt": "x" * 11}), small)


@pytest.mark.parametrize(("message", "needle"), [
    (pickle.dumps({"state": [1.0]}), "not a valid msgpack"),  # a pickle is never unpickled
    (msgpack.packb({"x": msgpack.ExtType(1, b"abc")}), "not a valid msgpack"),  # no extension types
    (msgpack.packb([1, 2]), "must be a packed dict"),
    (b"\xc1", "not a valid msgpack"),
    (b"", "not a valid msgpack"),
    ("a text frame", "expected a binary msgpack frame"),
])
def test_non_observation_messages(message: bytes | str, needle: str) -> None:
    with pytest.raises(RequestError, match=needle):
        codec.decode(message, LIMITS)  # type: ignore[arg-type]


def test_reply_packing_matches_openpi_format() -> None:
    packed = codec.packb({"actions": np.ones((2, 3), np.float32)})
    raw = msgpack.unpackb(packed)
    assert raw["actions"] == {b"__ndarray__": True, b"data": np.ones((2, 3), np.float32).tobytes(),
                              b"dtype": "<f4", b"shape": [2, 3]}
