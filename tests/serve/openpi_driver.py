"""Drive an edge-vla server with the unmodified openpi-client, as a robot would. Runs in openpi-client's own
venv (it pins numpy<2), never imports edge_vla, and talks to the test only through files and stdout.

    python openpi_driver.py SPEC.json

SPEC: {"uri": "ws://127.0.0.1:PORT", "api_key": null | "...", "arrays": "obs.npz",
       "steps": [{"op": "infer", "obs": OBS}, {"op": "broker", "obs": OBS, "horizon": 8, "n": 17},
                 {"op": "send_raw", "hex": "c1"}, {"op": "pipeline_then_hang", "obs": OBS, "n": 3},
                 {"op": "barrier", "mine": PATH, "wait_for": PATH, "timeout": 60}]}
OBS is JSON with leaves {"$array": NAME} (an array from the .npz), {"$scalar": [DTYPE, VALUE]} (a numpy
scalar, packed as __npgeneric__), or plain strings/numbers; dicts nest.
Prints one JSON line first for the connection ({"metadata": ...} or {"connect_error": ...}), then one per step.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from openpi_client import action_chunk_broker, msgpack_numpy, websocket_client_policy


def build(desc, arrays):
    if isinstance(desc, dict):
        if "$array" in desc:
            return arrays[desc["$array"]]
        if "$scalar" in desc:
            dtype, value = desc["$scalar"]
            return np.dtype(dtype).type(value)
        return {k: build(v, arrays) for k, v in desc.items()}
    return desc


def emit(obj) -> None:
    print(json.dumps(obj), flush=True)


def jsonable(reply: dict) -> dict:
    return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in reply.items()}


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    arrays = dict(np.load(spec["arrays"], allow_pickle=False)) if spec.get("arrays") else {}
    try:
        policy = websocket_client_policy.WebsocketClientPolicy(spec["uri"], api_key=spec.get("api_key"))
    except Exception as exc:  # e.g. websockets' InvalidStatus for HTTP 401
        emit({"connect_error": f"{type(exc).__name__}: {exc}"})
        return
    emit({"metadata": policy.get_server_metadata()})
    for step in spec["steps"]:
        op = step["op"]
        try:
            if op == "infer":
                emit({"reply": jsonable(policy.infer(build(step["obs"], arrays)))})
            elif op == "broker":
                broker = action_chunk_broker.ActionChunkBroker(policy, action_horizon=step["horizon"])
                obs = build(step["obs"], arrays)
                emit({"actions": [broker.infer(obs)["actions"].tolist() for _ in range(step["n"])]})
            elif op == "send_raw":
                policy._ws.send(bytes.fromhex(step["hex"]))
                reply = policy._ws.recv()
                emit({"text": reply} if isinstance(reply, str) else {"binary": len(reply)})
            elif op == "pipeline_then_hang":
                # Send requests without reading the replies, say so, and wait to be killed.
                data = msgpack_numpy.Packer().pack(build(step["obs"], arrays))
                for _ in range(step["n"]):
                    policy._ws.send(data)
                emit({"sent": step["n"]})
                time.sleep(600)
            elif op == "barrier":
                # Rendezvous with another driver through files: each is connected when it writes its own, so
                # once both exist two connections are open at the same time, whatever the scheduler did.
                Path(step["mine"]).touch()
                deadline = time.monotonic() + step.get("timeout", 60)
                while not Path(step["wait_for"]).exists():
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"barrier: {step['wait_for']} never appeared")
                    time.sleep(0.01)
                emit({"barrier": "passed"})
            else:
                emit({"error": f"unknown op {op}"})
        except Exception as exc:  # the client raises RuntimeError for a server text frame
            emit({"error": f"{type(exc).__name__}: {exc}"})


if __name__ == "__main__":
    main()
