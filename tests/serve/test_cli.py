"""Server options: the bind policy and the API key file."""

from __future__ import annotations

import logging

import pytest

from edge_vla.serve.cli import read_api_key
from edge_vla.serve.errors import ServeError
from edge_vla.serve.server import ServeOptions, check_bind


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_needs_no_key(host: str) -> None:
    check_bind(ServeOptions(host=host))


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "robot.local"])
def test_other_addresses_need_a_key_or_an_explicit_flag(host: str) -> None:
    with pytest.raises(ServeError, match="without an API key"):
        check_bind(ServeOptions(host=host))
    check_bind(ServeOptions(host=host, api_key="x" * 32))
    check_bind(ServeOptions(host=host, allow_remote_without_key=True))


def test_api_key_file(tmp_path, caplog) -> None:
    f = tmp_path / "key"
    for bad in ("short", "has a space in the middle of it", ""):
        f.write_text(bad)
        with pytest.raises(ServeError, match="at least 16 characters"):
            read_api_key(f)
    with pytest.raises(ServeError, match="cannot read the API key file"):
        read_api_key(tmp_path / "missing")
    f.write_text("0123456789abcdef-key\n")
    f.chmod(0o600)
    with caplog.at_level(logging.WARNING):
        assert read_api_key(f) == "0123456789abcdef-key"
    assert not caplog.records
    f.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        read_api_key(f)
    assert "readable by other users" in caplog.text
