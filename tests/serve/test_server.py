"""Server behaviour a robot client cannot easily provoke: the client cap, text frames, /healthz contents."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from serve_helpers import healthz
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from edge_vla.serve import codec
from edge_vla.serve.errors import ServeError


def test_client_cap_text_frames_and_healthz(start_server, bundle2) -> None:
    st = start_server(bundle2, "libero,state_fit=cut", seed=7, max_clients=1)
    uri = f"ws://127.0.0.1:{st.port}"
    with connect(uri, compression=None) as ws:
        meta = codec.decode(ws.recv(), codec.Limits())
        assert meta["connection"] == 0 and meta["seed"] == 7
        with pytest.raises(InvalidStatus, match="503"), connect(uri, compression=None):
            pass
        ws.send("a text frame")
        reply = ws.recv()
        assert isinstance(reply, str) and "expected a binary msgpack frame" in reply
        h = healthz(st.port)
        assert (h["status"], h["connections"], h["requests"], h["refused"]) == ("ok", 1, 0, 1)
    with pytest.raises(urllib.error.HTTPError, match="426"):  # plain HTTP on the websocket path
        urllib.request.urlopen(f"http://127.0.0.1:{st.port}/", timeout=5)


def test_a_taken_port_is_a_clear_error(start_server, bundle2) -> None:
    st = start_server(bundle2, "libero,state_fit=cut")
    with pytest.raises(ServeError, match=f"cannot listen on 127.0.0.1:{st.port}.*pick another --port"):
        start_server(bundle2, "libero,state_fit=cut", port=st.port)
