"""Observation key maps: presets, explicit maps, CHW/HWC, resizing, and state fitting only where the map says."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from edge_vla.config import preset
from edge_vla.onboard.cameras import resize_nearest
from edge_vla.serve.errors import RequestError, ServeError
from edge_vla.serve.obs_map import PRESETS, ObservationMapper, parse_obs_map

CFG2 = preset("tiny", num_cameras=2)
RNG = np.random.default_rng(0)


def libero(state: np.ndarray | None = None, **extra: object) -> dict[str, object]:
    return {"observation/image": RNG.integers(0, 256, (224, 224, 3), dtype=np.uint8),
            "observation/wrist_image": RNG.integers(0, 256, (224, 224, 3), dtype=np.uint8),
            "observation/state": np.zeros(2, np.float32) if state is None else state, "prompt": "reach"} | extra


def test_presets_and_overrides_parse() -> None:
    assert parse_obs_map("aloha", 4) == PRESETS["aloha"]
    m = parse_obs_map("libero, state_fit=cut", 2)
    assert m.cameras == PRESETS["libero"].cameras and m.state_fit == "cut" and m.name == "libero+overrides"
    m = parse_obs_map("droid,observation/exterior_image_2_left=camera0", 2)
    assert m.cameras == ("observation/exterior_image_2_left", "observation/wrist_image_left")
    m = parse_obs_map("top=camera0,j=state,g=state,task=instruction,state_fit=pad", 1)
    assert (m.name, m.cameras, m.state, m.instruction, m.state_fit) == ("custom", ("top",), ("j", "g"), "task", "pad")
    assert parse_obs_map(None, 2).cameras == ("images/cam0", "images/cam1")


@pytest.mark.parametrize(("spec", "needle"), [
    ("kuka", "unknown --obs-map preset"),
    ("a=camera0,b=camera2,s=state", "without gaps"),
    ("a=camera0,s=torque", "unknown role"),
    ("a=camera0,s=state,state_fit=trim", "state_fit='trim'"),
    ("aloha,images/cam_high", "not KEY=ROLE"),
])
def test_bad_maps_are_refused(spec: str, needle: str) -> None:
    with pytest.raises(ServeError, match=needle):
        parse_obs_map(spec, 2)


def test_map_must_fit_the_bundle_cameras() -> None:
    with pytest.raises(ServeError, match=r"names 4 camera\(s\).*bundle takes 2.*--obs-map images/cam_high=camera0"):
        ObservationMapper(parse_obs_map("aloha", 2), CFG2)


def test_chw_and_hwc_give_the_same_observation_resized_like_the_onboard_camera() -> None:
    mapper = ObservationMapper(parse_obs_map("libero", 2), CFG2)
    req = libero()
    hwc = mapper.to_observation(req)
    chw = mapper.to_observation(req | {"observation/image": req["observation/image"].transpose(2, 0, 1).copy()})
    np.testing.assert_array_equal(hwc.images[0], chw.images[0])
    np.testing.assert_array_equal(hwc.images[0], resize_nearest(req["observation/image"], 64))
    wide = mapper.to_observation(req | {"observation/image": np.zeros((180, 320, 3), np.uint8)})
    assert wide.images[0].shape == (64, 64, 3) and wide.images[0].flags.c_contiguous


def test_nested_dicts_are_addressed_with_slashes() -> None:
    mapper = ObservationMapper(parse_obs_map("cams/top=camera0,robot/q=state", 1), preset("tiny"), "go")
    obs = mapper.to_observation({"cams": {"top": np.zeros((64, 64, 3), np.uint8)}, "robot": {"q": [0.5, 1]}})
    assert obs.instruction == "go" and obs.state.dtype == np.float32 and obs.state.tolist() == [0.5, 1.0]


def test_state_is_fitted_only_where_the_map_says() -> None:
    long, short = np.arange(8, dtype=np.float64), np.array([0.5])
    exact = ObservationMapper(parse_obs_map("libero", 2), CFG2)
    with pytest.raises(RequestError, match=r"has 8 values but the bundle takes 2.*state_fit=cut"):
        exact.to_observation(libero(long))
    with pytest.raises(RequestError, match=r"has 1 values but the bundle takes 2.*state_fit=pad"):
        exact.to_observation(libero(short))
    cut = ObservationMapper(parse_obs_map("libero,state_fit=cut", 2), CFG2)
    assert cut.to_observation(libero(long)).state.tolist() == [0.0, 1.0]
    with pytest.raises(RequestError, match="state_fit=pad"):
        cut.to_observation(libero(short))
    pad = ObservationMapper(parse_obs_map("libero,state_fit=pad_or_cut", 2), CFG2)
    assert pad.to_observation(libero(short)).state.tolist() == [0.5, 0.0]


def test_state_parts_are_concatenated_in_map_order() -> None:
    mapper = ObservationMapper(parse_obs_map("droid,state_fit=cut", 2), CFG2)
    img = np.zeros((180, 320, 3), np.uint8)
    obs = mapper.to_observation({"observation/exterior_image_1_left": img, "observation/wrist_image_left": img,
                                 "observation/joint_position": np.array([0.1]), "observation/gripper_position":
                                 np.float64(0.9), "prompt": "x"})
    np.testing.assert_allclose(obs.state, [0.1, 0.9])


@pytest.mark.parametrize(("change", "needle"), [
    ({"prompt": None}, "no instruction under 'prompt'"),
    ({"prompt": b"bytes"}, "must be a string"),
    ({"observation/state": np.array(["a", "b"])}, "numeric array"),
    ({"observation/state": np.zeros((2, 1))}, "1-D numeric array"),
    ({"observation/state": np.array([np.inf, 0])}, "NaN or Inf"),
    ({"observation/image": np.zeros((224, 224, 4), np.uint8)}, "observation/image: expected a uint8 RGB image"),
    ({"observation/wrist_image": np.zeros((0, 224, 3), np.uint8)}, "observation/wrist_image: expected"),
    ({1: "int key"}, "keys must be strings"),
])
def test_bad_requests(change: dict, needle: str) -> None:
    mapper = ObservationMapper(parse_obs_map("libero", 2), CFG2)
    req = {k: v for k, v in (libero() | change).items() if v is not None}
    with pytest.raises(RequestError, match=needle):
        mapper.to_observation(req)


def test_missing_key_lists_what_came() -> None:
    mapper = ObservationMapper(parse_obs_map("libero", 2), CFG2)
    req = libero()
    del req["observation/wrist_image"]
    with pytest.raises(RequestError, match=r"no key 'observation/wrist_image' \(the bundle's camera1.*it has: "
                                           r"observation/image, observation/state, prompt"):
        mapper.to_observation(req)


# --- hostile state values: every one is the client's error, answered in one bounded line ---------------
@pytest.mark.parametrize(("state", "needle"), [
    ([[1.0], [2.0, 3.0]], "a flat list of numbers"),  # ragged: np.asarray raised ValueError here
    ([1.0, [2.0]], "a flat list of numbers"),
    ([[1.0, 2.0]], "a flat list of numbers"),
    ([True, 1.0], "a flat list of numbers"),  # a bool is not a joint reading, even inside a list
    ([1.0, None], "a flat list of numbers"),
    ([1.0, "2"], "a flat list of numbers"),
    ([{}, {}], "a flat list of numbers"),
    ([1e300, 1.0], "NaN or Inf"),  # finite in float64, infinite as the bundle's float32
    (np.array([[1.0], [2.0]]), "1-D numeric array"),
    (np.array([1, 2], dtype=np.complex64), "1-D numeric array"),
    ("1.0, 2.0", "1-D numeric array"),
])
def test_malformed_state_is_a_request_error(state: object, needle: str) -> None:
    mapper = ObservationMapper(parse_obs_map("libero", 2), CFG2)
    with pytest.raises(RequestError, match=f"observation/state.*({needle})|({needle}).*observation/state"):
        mapper.to_observation(libero() | {"observation/state": state})


def test_a_non_finite_state_error_stays_one_short_line() -> None:
    mapper = ObservationMapper(parse_obs_map("libero,state_fit=cut", 2), CFG2)
    state = np.zeros(4_000_000, np.float32)  # 16 MB, the largest array a request may carry
    state[[5, 7, 3_999_999]] = np.nan
    with pytest.raises(RequestError, match=r"3 NaN or Inf value\(s\) as float32, first at index 5 of 4000000") as err:
        mapper.to_observation(libero(state))
    assert len(str(err.value)) < 400 and "\n" not in str(err.value)


def test_missing_key_error_stays_short_whatever_the_client_sent() -> None:
    mapper = ObservationMapper(parse_obs_map("libero", 2), CFG2)
    req = {f"{'k' * 4000}{i}": 0 for i in range(200)}
    with pytest.raises(RequestError, match="no key 'observation/image'") as err:
        mapper.to_observation(req)
    assert len(str(err.value)) < 3000


# Anything msgpack can carry, through the real decoder and the mapper: a RequestError or an Observation,
# never another exception (which the server would have to treat as its own fault).
_leaf = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8)
         | st.binary(max_size=8))
_tree = st.recursive(_leaf, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=4), kids,
                                                                                        max_size=4), max_leaves=12)
_ndarray = st.fixed_dictionaries({b"__ndarray__": st.just(True), b"data": st.binary(max_size=16),
                                  b"dtype": st.sampled_from(["|u1", "<f4", "<f8", ">i2", "|b1", "<c8", "O", "x"]),
                                  b"shape": st.lists(st.integers(-2, 2**64 - 1) | st.integers(0, 8), max_size=5)})


@settings(max_examples=150, deadline=None)
@example(state=[[1.0], [2.0, 3.0]], image=None)
@example(state=[1, [2]], image=None)
@given(state=_tree | _ndarray, image=st.none() | _tree | _ndarray)
def test_any_msgpack_value_is_answered_not_raised(state: object, image: object) -> None:
    from edge_vla.serve import codec

    mapper = ObservationMapper(parse_obs_map("libero,state_fit=pad_or_cut", 2), CFG2)
    request = {"observation/image": np.zeros((8, 8, 3), np.uint8) if image is None else image,
               "observation/wrist_image": np.zeros((8, 8, 3), np.uint8), "observation/state": state, "prompt": "go"}
    with contextlib.suppress(RequestError):
        mapper.to_observation(codec.decode(codec.packb(request), codec.Limits()))
