"""A dataset .npz comes from outside (`edge-vla train/distill --data A.npz,B.npz`): a careless or hostile file must be
refused by `dataset.load` in one line naming the file and what is wrong, never loaded half-right (arrays of
different lengths silently cut to the shortest, or failing with an IndexError hours into training) and never a
traceback (bad meta JSON, a huge declared shape, a corrupt zip member).

The files are a real generated dataset with one array changed, written with numpy as any tool would write them."""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from edge_vla.cli import main as cli
from edge_vla.errors import EdgeVlaError
from edge_vla.sim import dataset

Arrays = dict[str, np.ndarray]


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Arrays:
    made = dataset.generate(range(1), image_size=64)  # the tiny preset's size: `edge-vla train` takes it
    path = dataset.save(made, tmp_path_factory.mktemp("data") / "good.npz")
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _changed(good: Arrays, **arrays: np.ndarray | None) -> Arrays:
    out = dict(good) | arrays
    return {k: v for k, v in out.items() if v is not None}


def _short(name: str) -> Callable[[Arrays], Arrays]:
    return lambda g: _changed(g, **{name: g[name][:3]})


# case -> (the arrays to write, words the one-line error must hold besides the file name)
CASES: dict[str, tuple[Callable[[Arrays], Arrays], tuple[str, ...]]] = {
    "meta is not JSON": (lambda g: _changed(g, meta=np.array("{oops")), ("meta",)),
    "meta is a list": (lambda g: _changed(g, meta=np.array("[1, 2]")), ("meta", "object")),
    "meta nested too deep": (lambda g: _changed(g, meta=np.array("[" * 100_000 + "]" * 100_000)), ("meta",)),
    "fewer images than samples": (_short("images"), ("images", "3")),
    "fewer states than samples": (_short("states"), ("states", "3")),
    "fewer actions than samples": (_short("actions"), ("actions", "3")),
    "fewer instructions than samples": (_short("instructions"), ("instructions", "3")),
    "fewer episode ids than samples": (_short("episodes"), ("episodes", "3")),
    "fewer goals than samples": (_short("goals"), ("goals", "3")),
    "no samples": (lambda g: {k: (v if k == "meta" else v[:0]) for k, v in g.items()}, ("no samples",)),
    "float images": (lambda g: _changed(g, images=g["images"].astype(np.float32)), ("images", "uint8")),
    "images without a camera axis": (lambda g: _changed(g, images=g["images"][:, 0]), ("images", "5")),
    "numeric instructions": (lambda g: _changed(g, instructions=np.arange(len(g["instructions"]))),
                             ("instructions", "text")),
    "fractional episode ids": (lambda g: _changed(g, episodes=g["episodes"] + 0.5), ("episodes", "integer")),
    "actions as text": (lambda g: _changed(g, actions=np.full(g["actions"].shape, "a")), ("actions", "number")),
    "one action per sample, no chunk axis": (lambda g: _changed(g, actions=g["actions"][:, 0]), ("actions", "3")),
    "states without a feature axis": (lambda g: _changed(g, states=g["states"][:, 0]), ("states", "2")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_malformed_dataset_is_refused_in_one_line(case: str, good: Arrays, tmp_path: Path) -> None:
    make, words = CASES[case]
    path = tmp_path / "bad.npz"
    np.savez(path, **make(good))
    with pytest.raises(EdgeVlaError) as err:
        dataset.load(path)
    message = str(err.value)
    assert str(path) in message and "\n" not in message and len(message) < 400, message
    for word in words:
        assert word in message, (word, message)


def test_the_unchanged_dataset_loads(good: Arrays, tmp_path: Path) -> None:
    """Control for the cases above: the same arrays, written the same way, load whole and aligned."""
    path = tmp_path / "good.npz"
    np.savez(path, **good)
    ds = dataset.load(path)
    assert len(ds) == len(good["states"]) > 3
    np.testing.assert_array_equal(ds.images, good["images"])
    np.testing.assert_array_equal(ds.actions, good["actions"])


def test_float64_numbers_load_as_float32(good: Arrays, tmp_path: Path) -> None:
    """A converter that wrote float64 (numpy's default) is not refused: the values are the same, in the model's dtype."""
    path = tmp_path / "f64.npz"
    np.savez(path, **_changed(good, states=good["states"].astype(np.float64), actions=good["actions"].astype(float)))
    ds = dataset.load(path)
    assert ds.states.dtype == np.float32 and ds.actions.dtype == np.float32
    np.testing.assert_array_equal(ds.states, good["states"])


def _npy_header(shape: tuple[int, ...]) -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return out.getvalue()


def _zip(path: Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def _members(good: Arrays) -> dict[str, bytes]:
    out = {}
    for name, value in good.items():
        buf = io.BytesIO()
        np.save(buf, value)
        out[f"{name}.npy"] = buf.getvalue()
    return out


def test_a_huge_declared_shape_is_refused_without_allocating_it(good: Arrays, tmp_path: Path) -> None:
    """A 60-byte states member that declares 10^12 x 2 floats (7 TiB): numpy would allocate that before reading."""
    path = tmp_path / "huge.npz"
    _zip(path, _members(good) | {"states.npy": _npy_header((10**12, 2)) + b"\0" * 16})
    with pytest.raises(EdgeVlaError) as err:
        dataset.load(path)
    assert str(path) in str(err.value) and "states" in str(err.value), err.value


def test_a_corrupt_zip_member_is_refused(good: Arrays, tmp_path: Path) -> None:
    """A flipped byte in a stored (uncompressed) member: zipfile's CRC check raises BadZipFile, not OSError."""
    path = tmp_path / "crc.npz"
    np.savez(path, **good)  # np.savez stores members uncompressed: the flipped byte reaches the CRC check
    data = bytearray(path.read_bytes())
    at = data.index(b"\x93NUMPY", data.index(b"actions.npy")) + 200
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(EdgeVlaError) as err:
        dataset.load(path)
    assert str(path) in str(err.value), err.value


def test_train_names_the_bad_file_of_a_list_and_trains_nothing(good: Arrays, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """`edge-vla train --data A.npz,B.npz` with B's arrays of different lengths: one line naming B, no run dir."""
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    np.savez(a, **good)
    np.savez(b, **_short("states")(good))
    assert cli(["train", "--data", f"{a},{b}", "--steps", "1", "--threads", "1", "-o", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(b) in err[0] and "states" in err[0], err
    assert not (tmp_path / "run").exists()
    assert json.loads(str(good["meta"]))["format_version"] == dataset.FORMAT_VERSION
