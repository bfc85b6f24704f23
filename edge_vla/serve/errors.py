"""Errors of the policy server. A `RequestError` is the client's fault and is answered, not fatal."""

from __future__ import annotations

from typing import Any

from edge_vla.errors import EdgeVlaError


class ServeError(EdgeVlaError):
    """Base of the server's errors (bad options, a map that does not fit the bundle)."""


class RequestError(ServeError, ValueError):
    """One request is malformed (not msgpack, wrong dtype or shape, missing key, NaN): the client gets a
    text frame naming the problem and the connection stays open for the next request."""


def clip(text: str, limit: int = 80) -> str:
    """`text` cut to about `limit` characters: error messages echo client values, which may be megabytes."""
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-2:]}"


def clip_repr(value: Any, limit: int = 80) -> str:
    return clip(repr(value), limit)
