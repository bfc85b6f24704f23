"""msgpack-numpy decoding with limits: what openpi-client sends decodes; anything else is a clear RequestError."""

from __future__ import annotations

import contextlib
import pickle
import tracemalloc

import msgpack
import numpy as np
import pytest
from hostile_msgpack import deep_lists, empty_map_bomb, many_values, worst_accepted
from hypothesis import example, given, settings
from hypothesis import strategies as st

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
    with pytest.raises(RequestError, match=r"refused: a binary of 2000 bytes at byte \d+ \(at most 1000\)"):
        codec.decode(codec.packb({"img": np.zeros(2000, np.uint8)}), small)
    with pytest.raises(RequestError, match=r"refused: a map of 5 keys at byte 1 \(at most 4\)"):
        codec.decode(codec.packb({str(i): i for i in range(5)}), small)
    with pytest.raises(RequestError, match=r"refused: a string of 11 bytes at byte \d+ \(at most 10\)"):
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


# --- hostile messages: total size of the decoded structure, depth, truncation -------------------------
def traced_decode(message: bytes, limits: Limits = LIMITS) -> tuple[int, object]:
    """(peak bytes Python allocated while decoding, the result or the RequestError)."""
    tracemalloc.start()
    try:
        result: object = codec.decode(message, limits)
    except RequestError as exc:
        result = exc
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak, result


def test_decode_memory_is_bounded_by_the_message_size() -> None:
    bomb = empty_map_bomb(128 * 1024)  # a 128 KiB message of empty maps, every list within max_list_len
    peak, result = traced_decode(bomb)
    assert peak <= 2 * len(bomb), f"decoding {len(bomb)} bytes peaked at {peak} bytes ({peak / len(bomb):.0f}x)"
    assert isinstance(result, RequestError) and "more than 16384 values" in str(result), result
    # Control: the same measure on msgpack's per-container limits alone (the old decode) sees the bomb go off.
    tracemalloc.start()
    msgpack.unpackb(bomb, max_array_len=LIMITS.max_list_len, max_map_len=LIMITS.max_keys)
    unbounded = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert unbounded > 20 * len(bomb)


def test_a_large_honest_message_decodes_within_the_same_bound() -> None:
    obs = {"images": {"cam": np.ones((3, 512, 512), np.uint8), "wrist": np.ones((512, 512, 3), np.uint8)},
           "state": [0.5] * 1024, "prompt": "x" * 4096}
    message = codec.packb(obs)
    peak, result = traced_decode(message)
    assert isinstance(result, dict) and result["images"]["cam"].shape == (3, 512, 512), result
    assert peak <= 2 * len(message)


def test_the_costliest_accepted_message_stays_within_its_payload_plus_a_constant() -> None:
    # As many empty maps as the value budget allows (~72 bytes of Python objects each, the most per value)
    # plus 512 KiB of binary payload (copied once): what decoding may cost is the payload plus ~2 MiB.
    message = worst_accepted(512 * 1024)
    peak, result = traced_decode(message)
    assert isinstance(result, dict) and len(result["fill"]) == 16, result
    assert peak <= len(message) + 128 * LIMITS.max_values, f"{len(message)} bytes peaked at {peak} bytes"


def test_total_values_are_counted_across_containers() -> None:
    nils = LIMITS.max_values - 2 - 16  # the top map's key and value, and the 16 lists that hold the nils
    assert len(codec.decode(many_values(nils), LIMITS)["junk"]) == 16
    with pytest.raises(RequestError, match="more than 16384 values"):
        codec.decode(many_values(nils + 1), LIMITS)


def test_nesting_depth_is_refused_before_decoding() -> None:
    assert codec.decode(deep_lists(LIMITS.max_depth - 1), LIMITS)["state"]
    with pytest.raises(RequestError, match=f"nested deeper than {LIMITS.max_depth} levels"):
        codec.decode(deep_lists(LIMITS.max_depth), LIMITS)
    with pytest.raises(RequestError, match="nested deeper than"):
        codec.decode(deep_lists(1_000_000), LIMITS)  # far past msgpack's own stack: still one clear line


def test_every_truncation_of_a_message_is_refused() -> None:
    message = codec.packb({"images": {"cam": np.ones((2, 2, 3), np.uint8)}, "state": [1.5, -2, None, True],
                           "gripper": np.float32(0.5), "prompt": "reach"})
    for cut in range(len(message)):
        with pytest.raises(RequestError, match="truncated"):
            codec.decode(message[:cut], LIMITS)
    with pytest.raises(RequestError, match="1 byte after the end"):
        codec.decode(message + b"\xc0", LIMITS)


@pytest.mark.parametrize(("message", "needle"), [
    (b"\x81\xa1x\xdd\xff\xff\xff\xff", "list of 4294967295 values"),  # a header claiming 4 G items, no data
    (b"\x81\xa1x\xdf\xff\xff\xff\xff", "map of 4294967295 keys"),
    (b"\x81\xa1x\xc6\xff\xff\xff\xff", "binary of 4294967295 bytes"),
    (b"\x81\xa1x\xdb\x00\x10\x00\x00", "string of 1048576 bytes"),
])
def test_headers_claiming_huge_sizes_are_refused_from_the_header(message: bytes, needle: str) -> None:
    with pytest.raises(RequestError, match=needle):
        codec.decode(message, LIMITS)


@pytest.mark.parametrize("shape", [[2**62, 2**62, 0], [2**64 - 1, 0], [0, 2**40]])
def test_zero_size_arrays_with_absurd_dimensions_are_refused_clearly(shape: list[int]) -> None:
    with pytest.raises(RequestError, match="invalid shape .* each dimension at most"):
        codec.decode(msgpack.packb({"x": nd("<f4", shape, b"")}), LIMITS)


# The walk is hand-written, so check it against msgpack itself: on anything msgpack packs, it accepts
# exactly the messages within the limits, counting values and depth the way the decoded structure does.
def _count(obj: object, depth: int = 1) -> tuple[int, int]:
    """(values inside, deepest container level) of a decoded structure, the top-level value not counted."""
    if isinstance(obj, dict):
        items = [x for kv in obj.items() for x in kv]
    elif isinstance(obj, list):
        items = list(obj)
    else:
        return 0, depth - 1
    inner = [_count(x, depth + 1) for x in items]
    return len(items) + sum(n for n, _ in inner), max([depth, *(d for _, d in inner)])


_scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(width=32)
            | st.integers(0, 300).map(lambda n: "é" * n) | st.integers(0, 300).map(bytes))  # str8/16, bin8/16
_structures = st.recursive(_scalars, lambda kids: st.lists(kids, max_size=20)
                           | st.dictionaries(st.text(max_size=3), kids, max_size=20), max_leaves=60)


@settings(max_examples=100, deadline=None)
@example(obj=[[[]]], single_float=False)  # at the limits, and one past each
@example(obj=[[[[]]]], single_float=False)
@example(obj={"k": [None] * 38}, single_float=False)
@example(obj={"k": [None] * 39}, single_float=False)
@given(obj=_structures, single_float=st.booleans())
def test_the_structure_walk_agrees_with_msgpack(obj: object, single_float: bool) -> None:
    small = Limits(max_values=40, max_depth=3)
    message = msgpack.packb(obj, use_single_float=single_float)
    values, depth = _count(msgpack.unpackb(message, strict_map_key=False))
    try:
        codec.check_structure(message, small)
        accepted = True
    except RequestError as exc:
        accepted = False
        assert ("more than 40 values" in str(exc)) or ("deeper than 3" in str(exc)), exc
    assert accepted == (values <= 40 and depth <= 3), (values, depth)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_damaged_messages_are_refused_or_decoded_never_raised(data: st.DataObject) -> None:
    message = bytearray(codec.packb({"images": {"cam": np.ones((2, 2, 3), np.uint8)}, "state": [1.5, -2, 3],
                                     "gripper": np.float32(0.5), "prompt": "reach"}))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(message) - 1))
        message[at] = data.draw(st.integers(0, 255))
    with contextlib.suppress(RequestError):
        assert isinstance(codec.decode(bytes(message), LIMITS), dict)
