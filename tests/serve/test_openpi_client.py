"""The unmodified openpi-client (PyPI, its own venv, a separate process) drives `edge-vla serve`."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from serve_helpers import Obs, healthz, run_client, start_client

from edge_vla.onboard.cameras import resize_nearest
from edge_vla.onboard.telemetry import read_records
from edge_vla.runtime.policy import Policy
from edge_vla.runtime.types import Observation

PROMPT = "reach the red block"
ALOHA_CAMS = ("cam_high", "cam_low", "cam_left_wrist", "cam_right_wrist")


# --- observations as each robot family's client sends them, and what the bundle should see -------------
def aloha_obs(o: Obs, rng: np.random.Generator) -> tuple[dict[str, Any], Observation]:
    images = {c: rng.integers(0, 256, (3, 224, 224), dtype=np.uint8) for c in ALOHA_CAMS}  # CHW, as ALOHA sends
    state = rng.uniform(-1, 1, 14)  # float64, 14 joints: cut to the bundle's 2 by state_fit=cut
    wire = {"state": o.array(state), "images": {c: o.array(a) for c, a in images.items()}, "prompt": PROMPT}
    return wire, Observation([resize_nearest(images[c].transpose(1, 2, 0), 64) for c in ALOHA_CAMS], PROMPT,
                             state[:2].astype(np.float32))


def libero_obs(o: Obs, rng: np.random.Generator) -> tuple[dict[str, Any], Observation]:
    img, wrist = (rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(2))  # HWC
    state = rng.uniform(-1, 1, 8).astype(np.float32)
    wire = {"observation/image": o.array(img), "observation/wrist_image": o.array(wrist),
            "observation/state": o.array(state), "prompt": "touch the blue block"}
    return wire, Observation([resize_nearest(img, 64), resize_nearest(wrist, 64)], "touch the blue block", state[:2])


def droid_obs(o: Obs, rng: np.random.Generator) -> tuple[dict[str, Any], Observation]:
    ext, wrist = (rng.integers(0, 256, (180, 320, 3), dtype=np.uint8) for _ in range(2))  # not square
    joints = rng.uniform(-1, 1, 7)
    gripper = float(rng.uniform(0, 1))
    wire = {"observation/exterior_image_1_left": o.array(ext), "observation/wrist_image_left": o.array(wrist),
            "observation/joint_position": o.array(joints),
            "observation/gripper_position": {"$scalar": ["float64", gripper]},  # numpy scalar: __npgeneric__
            "prompt": PROMPT}
    state = np.concatenate([joints, [gripper]])[:2].astype(np.float32)
    return wire, Observation([resize_nearest(ext, 64), resize_nearest(wrist, 64)], PROMPT, state)


LAYOUTS = {"aloha": (aloha_obs, "bundle4", 100), "libero": (libero_obs, "bundle2", 200),
           "droid": (droid_obs, "bundle2", 300)}


@pytest.fixture(scope="module")
def servers(request, start_server) -> dict[str, Any]:
    """One in-process server per preset, each with its own seed base."""
    return {name: start_server(request.getfixturevalue(bundle), f"{name},state_fit=cut", seed=seed)
            for name, (_, bundle, seed) in LAYOUTS.items()}


_refs: dict[Path, Policy] = {}


def expected(bundle: Path, seed: int, observations: list[Observation]) -> list[np.ndarray]:
    """What Policy.infer returns for these observations, in order, from a fresh noise stream `seed`."""
    if bundle not in _refs:
        _refs[bundle] = Policy.load(bundle, threads=1)
    ref = _refs[bundle]
    ref.reset(seed)
    return [ref.infer(obs).actions for obs in observations]


# --- equality with Policy.infer, per preset ----------------------------------------------------------
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_client_infer_equals_policy_infer(layout, servers, openpi_python, tmp_path, request) -> None:
    make, bundle_name, seed = LAYOUTS[layout]
    bundle = request.getfixturevalue(bundle_name)
    rng, o = np.random.default_rng(7), Obs()
    pairs = [make(o, rng) for _ in range(2)]
    port = servers[layout].port
    out = run_client(openpi_python, port, [{"op": "infer", "obs": wire} for wire, _ in pairs], o.arrays, tmp_path)
    meta = out[0]["metadata"]
    want = expected(bundle, meta["seed"], [obs for _, obs in pairs])
    for line, w in zip(out[1:], want):
        reply = line["reply"]
        np.testing.assert_array_equal(np.asarray(reply["actions"], dtype=np.float32), w)
        assert {"decode_ms", "map_ms", "queue_ms", "infer_ms", "encode_ms", "total_ms"} <= set(reply["server_timing"])
        # the runtime's own stages: prefix + steps, or the whole Euler chunk in one call (onnxruntime's default, TensorRT)
        assert reply["policy_timing"]["infer_ms"] > 0 and {"prefix_ms", "chunk_graph_ms"} & set(reply["policy_timing"])
    assert "prev_total_ms" in out[2]["reply"]["server_timing"]
    # The metadata lets a client check it talks to the right policy.
    assert meta["seed"] == seed + meta["connection"]
    assert meta["chunk_len"] == 8 and meta["action_dim"] == 2 and meta["action_period_s"] == pytest.approx(0.1)
    assert meta["action_space"]["names"] == ["shoulder", "elbow"] and meta["action_space"]["units"] == "rad"
    assert meta["precision"] == "fp32" and meta["model_family"] == "edge-vla-reference"
    assert meta["observation"]["name"] == f"{layout}+overrides" and meta["observation"]["state_fit"] == "cut"


def test_action_chunk_broker_steps_through_chunks(servers, bundle4, openpi_python, tmp_path) -> None:
    o, rng = Obs(), np.random.default_rng(11)
    wire, obs = aloha_obs(o, rng)
    port = servers["aloha"].port
    before = healthz(port)["requests"]
    out = run_client(openpi_python, port, [{"op": "broker", "obs": wire, "horizon": 8, "n": 17}], o.arrays, tmp_path)
    steps = np.asarray(out[1]["actions"], dtype=np.float32)  # [17, 2]: one action per broker step
    chunks = expected(bundle4, out[0]["metadata"]["seed"], [obs] * 3)
    np.testing.assert_array_equal(steps, np.concatenate(chunks)[:17])
    assert healthz(port)["requests"] - before == 3  # a new chunk only when the previous one is used up


# --- bad input: a text frame naming the problem; the connection keeps serving -----------------------
def test_bad_requests_get_clear_errors_and_the_connection_survives(servers, bundle4, openpi_python, tmp_path) -> None:
    o, rng = Obs(), np.random.default_rng(3)
    good, good_obs = aloha_obs(o, rng)
    images = good["images"]
    nan_state = o.array(np.full(14, np.nan))
    cases = [
        ({"state": good["state"], "prompt": PROMPT}, "no key 'images/cam_high'"),
        (good | {"images": images | {"cam_low": o.array(np.zeros((224, 224, 3), np.float32))}},
         "images/cam_low: expected a uint8 RGB image"),
        (good | {"images": images | {"cam_high": o.array(np.zeros((224, 224), np.uint8))}},
         "images/cam_high: expected a uint8 RGB image"),
        (good | {"state": nan_state}, "contains 14 NaN or Inf value(s)"),
        (good | {"state": o.array(np.ones(14, dtype=bool))}, "numeric array for the state"),
        (good | {"prompt": 5}, "must be a string"),
        # Finite but absurd: overflows inside the graph; the NaN action never leaves the server.
        (good | {"state": o.array(np.full(14, 3e38))}, "non-finite action"),
    ]
    steps: list[dict[str, Any]] = [{"op": "infer", "obs": wire} for wire, _ in cases]
    steps += [{"op": "send_raw", "hex": "c1"},  # 0xc1 is never valid msgpack
              {"op": "send_raw", "hex": "920102"},  # a msgpack list, not a dict
              {"op": "infer", "obs": good}]
    out = run_client(openpi_python, servers["aloha"].port, steps, o.arrays, tmp_path)
    for line, (_, needle) in zip(out[1:], cases):
        assert line["error"].startswith("RuntimeError: Error in inference server"), line
        assert needle in line["error"], line
    assert "not a valid msgpack-numpy packed dict" in out[len(cases) + 1]["text"]
    assert "must be a packed dict" in out[len(cases) + 2]["text"]
    # Requests refused before inference draw no noise; the overflow one drew one chunk's noise, so the good
    # request gets the connection's second chunk.
    want = expected(bundle4, out[0]["metadata"]["seed"], [good_obs, good_obs])[1]
    np.testing.assert_array_equal(np.asarray(out[-1]["reply"]["actions"], dtype=np.float32), want)


def test_oversized_message_closes_only_that_connection(servers, bundle4, openpi_python, tmp_path) -> None:
    o, rng = Obs(), np.random.default_rng(5)
    big = {"state": o.array(np.zeros(14)), "prompt": PROMPT,
           "images": {c: o.array(np.zeros((3, 600, 600), np.uint8)) for c in ALOHA_CAMS}}  # 4.3 MB > 2 MiB cap
    port = servers["aloha"].port
    out = run_client(openpi_python, port, [{"op": "infer", "obs": big}], o.arrays, tmp_path)
    assert "ConnectionClosed" in out[1]["error"] and "1009" in out[1]["error"], out[1]
    wire, obs = aloha_obs(o, rng)
    out = run_client(openpi_python, port, [{"op": "infer", "obs": wire}], o.arrays, tmp_path)
    want = expected(bundle4, out[0]["metadata"]["seed"], [obs])[0]
    np.testing.assert_array_equal(np.asarray(out[1]["reply"]["actions"], dtype=np.float32), want)


# --- robustness: killed clients, two clients at once ------------------------------------------------
def _wait_no_connections(port: int, timeout: float = 15.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (h := healthz(port))["connections"] and time.monotonic() < deadline:
        time.sleep(0.05)
    return h


def test_client_killed_mid_request_leaves_no_state(servers, bundle2, openpi_python, tmp_path) -> None:
    o, rng = Obs(), np.random.default_rng(9)
    wire, obs = libero_obs(o, rng)
    port = servers["libero"].port
    proc = start_client(openpi_python, port, [{"op": "pipeline_then_hang", "obs": wire, "n": 3}], o.arrays, tmp_path)
    try:
        assert proc.stdout is not None
        assert "metadata" in proc.stdout.readline()
        assert '"sent": 3' in proc.stdout.readline()  # three requests in flight, replies never read
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    # A raw client that dies in the middle of a frame (the one case no websocket library will produce).
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        key = base64.b64encode(os.urandom(16)).decode()
        s.sendall(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        assert s.recv(12).startswith(b"HTTP/1.1 101")
        s.sendall(bytes([0x82, 0xFE, 0x01, 0x00]) + os.urandom(4) + b"x" * 100)  # 256-byte frame, 100 sent
    assert _wait_no_connections(port)["connections"] == 0
    out = run_client(openpi_python, port, [{"op": "infer", "obs": wire}], o.arrays, tmp_path)
    want = expected(bundle2, out[0]["metadata"]["seed"], [obs])[0]
    np.testing.assert_array_equal(np.asarray(out[1]["reply"]["actions"], dtype=np.float32), want)


def test_two_clients_at_once_each_get_their_own_reproducible_stream(start_server, bundle2, openpi_python,
                                                                    tmp_path) -> None:
    server = start_server(bundle2, "droid,state_fit=cut", seed=1000)  # fresh: peak_connections counts only these
    o, rng = Obs(), np.random.default_rng(21)
    per_client = [[droid_obs(o, rng) for _ in range(12)] for _ in range(2)]
    # Each client waits, connected, for the other before its first request: on a loaded machine one could
    # otherwise finish all its requests before the other even connects (a CI run saw exactly that).
    marks = [tmp_path / "connected0", tmp_path / "connected1"]
    procs = [start_client(openpi_python, server.port,
                          [{"op": "barrier", "mine": str(marks[i]), "wait_for": str(marks[1 - i])}]
                          + [{"op": "infer", "obs": w} for w, _ in pairs], o.arrays, tmp_path / f"c{i}")
             for i, pairs in enumerate(per_client)]
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr[-2000:]
        outs.append([json.loads(line) for line in stdout.splitlines()])
    assert sorted(out[0]["metadata"]["seed"] for out in outs) == [1000, 1001]
    for out, pairs in zip(outs, per_client):
        assert out[1] == {"barrier": "passed"}, out[1]
        want = expected(bundle2, out[0]["metadata"]["seed"], [obs for _, obs in pairs])
        for line, w in zip(out[2:], want, strict=True):
            np.testing.assert_array_equal(np.asarray(line["reply"]["actions"], dtype=np.float32), w)
    h = _wait_no_connections(server.port)
    assert h["requests"] == 24 and h["connections"] == 0
    assert h["peak_connections"] == 2, "the two clients were never connected at the same time"


# --- the CLI: bind policy, API key, /healthz, clean stop ----------------------------------------------
def test_cli_serves_with_api_key(bundle2, openpi_python, tmp_path) -> None:
    cli = [sys.executable, "-m", "edge_vla.cli", "serve", str(bundle2), "--obs-map", "libero,state_fit=cut",
           "--threads", "1", "--seed", "5"]
    refused = subprocess.run([*cli, "--host", "0.0.0.0", "--port", "0"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1
    assert "refusing to serve on '0.0.0.0' without an API key" in refused.stderr and "--api-key-file" in refused.stderr

    key = "k3y-" + base64.urlsafe_b64encode(os.urandom(24)).decode()
    key_file = tmp_path / "api-key"
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    telemetry = tmp_path / "serve.jsonl"
    proc = subprocess.Popen([*cli, "--port", "0", "--api-key-file", str(key_file), "--telemetry", str(telemetry)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(90, proc.kill)  # a server that never starts fails the test, not the suite
    watchdog.start()
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("edge-vla serve: listening on ws://127.0.0.1:"), line + proc.stderr.read()
        port = int(line.rsplit(":", 1)[1])
        assert healthz(port)["status"] == "ok"  # no key needed for the health check
        o, rng = Obs(), np.random.default_rng(1)
        wire, obs = libero_obs(o, rng)
        steps = [{"op": "infer", "obs": wire}]
        assert "401" in run_client(openpi_python, port, steps, o.arrays, tmp_path)[0]["connect_error"]
        # A key one character off (never the same character: a random key ending in "x" made the "wrong" key
        # the right one, 1 run in 64).
        wrong = key[:-1] + ("y" if key.endswith("x") else "x")
        assert "401" in run_client(openpi_python, port, steps, o.arrays, tmp_path,
                                   api_key=wrong)[0]["connect_error"]
        out = run_client(openpi_python, port, steps, o.arrays, tmp_path, api_key=key)
        assert out[0]["metadata"]["seed"] == 5  # the first connection to reach the websocket handler
        want = expected(bundle2, 5, [obs])[0]
        np.testing.assert_array_equal(np.asarray(out[1]["reply"]["actions"], dtype=np.float32), want)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        watchdog.cancel()
    assert proc.returncode == 0, err[-2000:]
    assert "missing or wrong API key" in err and "connection 0 request 1: queue" in err
    records = read_records(telemetry)
    assert [r["topic"] for r in records] == ["/serve/request"]
    assert records[0]["server_timing"]["infer_ms"] > 0 and max(records[0]["policy_timing"].get(k, 0) for k in ("prefix_ms", "chunk_graph_ms")) > 0
