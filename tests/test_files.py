"""edge_vla.files: the one bounded reader of small files from outside, and the one-line message folder.

read_bounded must never wait (a FIFO without a writer), never read what it refuses (a multi-GB file, /dev/zero
behind a link), and refuse in one line naming what the file was meant to be, its path, and what it is. The call
sites keep their own symlink policy (last tests): tune records refuse links (only tune writes them); the robot
config, keys and signatures, bundle manifests and π0 checkpoint files follow them (the target is checked).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_vla.errors import BundleError, CheckpointError, ConfigError, EdgeVlaError
from edge_vla.files import Wording, file_kind, one_line, read_bounded

DEADLINE_S = 30.0  # a refusal takes microseconds; a read that blocks never returns


def _refusal(path: str | os.PathLike[str], max_bytes: int = 100, what: str = "test file", **kw) -> str:
    with pytest.raises(EdgeVlaError) as caught:
        read_bounded(path, max_bytes, what, **kw)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message, message
    return message


# --- file_kind ------------------------------------------------------------------------------------------------------

def test_file_kind_names_every_kind(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"")
    os.mkfifo(tmp_path / "p")
    (tmp_path / "l").symlink_to("f")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "s"))
        kinds = {name: file_kind(os.lstat(tmp_path / name).st_mode) for name in ("f", "p", "l", "s")}
    assert kinds == {"f": "a regular file", "p": "a fifo", "l": "a symlink", "s": "a socket"}
    assert file_kind(os.stat(tmp_path).st_mode) == "a directory"
    assert file_kind(os.stat("/dev/null").st_mode) == "a character device"
    assert file_kind(stat.S_IFBLK) == "a block device"
    assert file_kind(0) == "a file of type 0o0"  # no kind at all: still a phrase, never an exception


# --- what is read ---------------------------------------------------------------------------------------------------

def test_a_file_exactly_at_the_limit_is_read_and_one_byte_more_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    assert read_bounded(path, 100, "test file") == b"x" * 100
    path.write_bytes(b"x" * 101)
    message = _refusal(path, 100)
    assert "101 bytes" in message and "100 bytes" in message and "too large" in message and "test file" in message


def test_an_empty_file_is_empty_bytes(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"")
    assert read_bounded(path, 0, "test file") == b""
    assert read_bounded(path, 100, "test file") == b""


@given(size=st.integers(0, 70), limit=st.integers(0, 70))
def test_a_file_is_read_whole_exactly_when_it_is_within_the_limit(size: int, limit: int) -> None:
    content = bytes(range(size))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "f"
        path.write_bytes(content)
        if size <= limit:
            assert read_bounded(path, limit, "test file") == content
        else:
            with pytest.raises(EdgeVlaError, match=f"is {size} bytes, too large \\(the limit is {limit} bytes\\)"):
                read_bounded(path, limit, "test file")


def test_a_huge_sparse_file_is_refused_by_its_size_unread(tmp_path: Path) -> None:
    path = tmp_path / "huge"
    with path.open("wb") as f:
        f.truncate(16 << 30)  # 16 GiB that take no disk: a read of it would fill memory
    assert f"is {16 << 30} bytes" in _refusal(path, 1 << 20)


def test_a_file_that_grows_past_the_limit_after_its_check_is_refused(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """fstat said 10 bytes; by the read there are 200: what is read is bounded and refused all the same."""
    path = tmp_path / "f"
    path.write_bytes(b"x" * 10)
    real_fstat = os.fstat

    def fstat_then_grow(fd: int) -> os.stat_result:
        st = real_fstat(fd)
        with path.open("ab") as f:
            f.write(b"y" * 190)
        return st

    monkeypatch.setattr(os, "fstat", fstat_then_grow)
    assert "is 101 bytes" in _refusal(path, 100)  # it read limit + 1 bytes, no more


# --- what is refused ------------------------------------------------------------------------------------------------

def _read_with_deadline(path: Path) -> BaseException | bytes:
    """read_bounded in a thread: a read that blocks (a FIFO waiting for a writer) fails the deadline, and is then
    released by opening the FIFO for writing, so no thread is left behind."""
    out: list[BaseException | bytes] = []

    def read() -> None:
        try:
            out.append(read_bounded(path, 100, "test file"))
        except BaseException as exc:
            out.append(exc)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(DEADLINE_S)
    if t.is_alive():
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))  # a writer comes and goes: the reader sees EOF
        t.join(DEADLINE_S)
        pytest.fail(f"read_bounded({path}) still blocked after {DEADLINE_S} s")
    return out[0]


def test_a_fifo_is_refused_at_once_not_waited_on(tmp_path: Path) -> None:
    fifo = tmp_path / "f.json"
    os.mkfifo(fifo)  # no writer: a plain open for reading blocks forever
    got = _read_with_deadline(fifo)
    assert isinstance(got, EdgeVlaError), got
    assert str(got) == f"test file {fifo} is not a regular file (a fifo)"


def test_a_directory_is_refused_naming_what_it_is(tmp_path: Path) -> None:
    assert _refusal(tmp_path) == f"test file {tmp_path} is not a regular file (a directory)"


def test_a_path_that_cannot_be_opened_is_one_line_from_its_oserror(tmp_path: Path) -> None:
    """As root every file is readable: a missing file and a path through a regular file fail the open instead."""
    (tmp_path / "file").write_bytes(b"")
    cases = ((tmp_path / "missing", errno.ENOENT, FileNotFoundError),
             (tmp_path / "file" / "x", errno.ENOTDIR, NotADirectoryError))
    for path, code, cause in cases:
        with pytest.raises(EdgeVlaError) as caught:
            read_bounded(path, 100, "test file")
        assert str(caught.value) == f"cannot read test file {path} ({os.strerror(code)})", caught.value
        assert isinstance(caught.value.__cause__, cause)  # so a caller can tell a missing file from the others


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_bytes(b"x")
    path.chmod(0)
    assert "Permission denied" in _refusal(path)


def test_a_symlink_is_followed_or_refused_as_asked(tmp_path: Path) -> None:
    (tmp_path / "target").write_bytes(b"data")
    link = tmp_path / "link"
    link.symlink_to("target")
    assert read_bounded(link, 100, "test file") == b"data"  # followed: the target is what is read and checked
    assert _refusal(link, follow_symlinks=False) == f"test file {link} is a symbolic link, not followed here"
    zero = tmp_path / "zero"
    zero.symlink_to("/dev/zero")  # followed, the target is a device: refused unread (it never ends)
    assert _refusal(zero) == f"test file {zero} is not a regular file (a character device)"


def test_no_refusal_leaves_a_descriptor_open(tmp_path: Path) -> None:
    (tmp_path / "big").write_bytes(b"x" * 200)
    (tmp_path / "link").symlink_to("big")
    os.mkfifo(tmp_path / "fifo")
    before = len(os.listdir("/proc/self/fd"))
    for name, kw in (("big", {}), ("fifo", {}), (".", {}), ("link", {"follow_symlinks": False}), ("missing", {})):
        _refusal(tmp_path / name, **kw)
    assert read_bounded(tmp_path / "big", 200, "test file")
    assert len(os.listdir("/proc/self/fd")) == before


# --- the words ------------------------------------------------------------------------------------------------------

def test_a_refusal_is_the_callers_error_with_its_advice(tmp_path: Path) -> None:
    class Bad(Exception):  # not an EdgeVlaError: tune's private "ignore this record" exception is one
        pass

    with pytest.raises(Bad) as caught:
        read_bounded(tmp_path, 100, "robot config", Bad, fix="give the KEY=VALUE file")
    assert str(caught.value) == f"robot config {tmp_path} is not a regular file (a directory); give the KEY=VALUE file"
    with pytest.raises(ConfigError, match=f"^{tmp_path} is not a regular file"):  # no `what`: the path alone
        read_bounded(tmp_path, 100, "", ConfigError)
    with pytest.raises(ConfigError, match=r"^\[x\] is a directory$"):
        read_bounded(tmp_path, 7, "y", ConfigError, wording=Wording(subject="[x]", not_regular="{subject} is {kind}"))
    big = tmp_path / "big"
    big.write_bytes(b"x" * 2000)
    with pytest.raises(ConfigError, match="^2,000 > 1,000 in test file$"):
        read_bounded(big, 1000, "test file", ConfigError, wording=Wording(too_large="{size:,} > {limit:,} in {what}"))


def test_one_line_folds_any_white_space_and_cuts_at_the_limit() -> None:
    assert one_line("a\n  b\tc\r\n") == "a b c"
    assert one_line(ValueError("first\nsecond")) == "first second"
    assert one_line(ValueError()) == ""  # a fallback (the type name) is the caller's
    assert one_line(None) == "None"
    assert one_line("x" * 20, limit=10) == "x" * 7 + "..."
    assert one_line("x" * 10, limit=10) == "x" * 10


# --- each call site's symlink policy, through the site itself --------------------------------------------------------

def _linked(tmp_path: Path, name: str, content: bytes) -> Path:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / name).write_bytes(content)
    (tmp_path / name).symlink_to(tmp_path / "real" / name)
    return tmp_path / name


def test_the_robot_config_follows_a_symlink(tmp_path: Path) -> None:
    from edge_vla.provision.robot_config import RobotConfig

    path = _linked(tmp_path, "robot.env", b"EDGE_VLA_GRIPPER_EFFORT=5\n")
    assert RobotConfig.load(path).gripper_effort == 5.0


def test_a_key_or_signature_file_follows_a_symlink(tmp_path: Path) -> None:
    from edge_vla.provision.signing import read_small_file

    assert read_small_file(_linked(tmp_path, "robot.pub", b"k" * 32), "trusted key") == b"k" * 32


def test_a_bundle_manifest_follows_a_symlink(tmp_path: Path) -> None:
    from edge_vla.bundle import MANIFEST, read_manifest_bytes

    _linked(tmp_path, MANIFEST, b"{")
    with pytest.raises(BundleError, match="not valid JSON"):  # read through the link, then parsed
        read_manifest_bytes(tmp_path)


def test_a_pi0_checkpoint_file_follows_a_symlink(tmp_path: Path) -> None:
    from edge_vla.export.pi0.checkpoint import read_json_file

    assert read_json_file(_linked(tmp_path, "config.json", json.dumps({"a": 1}).encode()), 100) == {"a": 1}
    with pytest.raises(CheckpointError, match=r"π0 checkpoint file .*config\.json is \d+ bytes, too large"):
        read_json_file(tmp_path / "config.json", 4)


def test_a_tune_record_behind_a_symlink_is_refused(tmp_path: Path) -> None:
    from edge_vla.runtime import tune

    path = _linked(tmp_path, "record.json", b"{}")
    with pytest.raises(Exception, match="^it is a symbolic link, not followed here; not a record written by edge-vla "
                                        "tune$"):
        tune._load_json(path)
