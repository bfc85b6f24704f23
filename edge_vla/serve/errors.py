"""Errors of the policy server. A `RequestError` is the client's fault and is answered, not fatal."""

from __future__ import annotations

from edge_vla.errors import EdgeVlaError


class ServeError(EdgeVlaError):
    """Base of the server's errors (bad options, a map that does not fit the bundle)."""


class RequestError(ServeError, ValueError):
    """One request is malformed (not msgpack, wrong dtype or shape, missing key, NaN): the client gets a
    text frame naming the problem and the connection stays open for the next request."""
