"""Hostile msgpack messages for the policy-server tests, and a peak-memory report of decoding them.

Each builder returns raw msgpack bytes that pass msgpack's per-container limits (the server's old only
defence) while costing far more memory to decode than they take on the wire.

    .venv/bin/python tests/serve/hostile_msgpack.py 4 31    # peak RSS of decoding 4 and 31 MiB bombs

prints, for each size, the peak RSS growth and time of a fresh subprocess decoding one message: the bomb
with msgpack's per-container limits alone (what the server did before the total bound), the bomb with
`edge_vla.serve.codec.decode`, and the costliest message that decode accepts; each in its own process so
one does not hide another's peak.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time

MIB = 1024 * 1024
# A msgpack array of 1024 empty maps: 1027 bytes on the wire, ~72 KiB of Python dicts once decoded.
EMPTY_MAP_LEAF = b"\xdc\x04\x00" + b"\x80" * 1024


def array_header(n: int) -> bytes:
    return b"\xdc" + n.to_bytes(2, "big") if n < 1 << 16 else b"\xdd" + n.to_bytes(4, "big")


def empty_map_bomb(target_bytes: int) -> bytes:
    """{"images": [[[{}, {}, ... 1024] ...]], "fill": [[{}, ... 1024], ...]} of about `target_bytes`: every
    byte is one empty dict (64 bytes) plus a list slot (8 bytes) once decoded, and no list or map is longer
    than 1024, so msgpack's max_array_len / max_map_len never trip."""
    block = EMPTY_MAP_LEAF
    while len(block) * 1024 < target_bytes:
        block = array_header(1024) + block * 1024
    blocks = min(1024, target_bytes // len(block)) if len(block) > len(EMPTY_MAP_LEAF) else 0
    leaves = min(1024, max(1, (target_bytes - blocks * len(block)) // len(EMPTY_MAP_LEAF)))
    return (b"\x82\xa6images" + array_header(blocks) + block * blocks
            + b"\xa4fill" + array_header(leaves) + EMPTY_MAP_LEAF * leaves)


def deep_lists(depth: int) -> bytes:
    """{"state": [[[...[1.0]...]]]}: `depth` nested one-element lists."""
    return b"\x81\xa5state" + b"\x91" * depth + b"\xcb" + struct.pack(">d", 1.0)


def many_values(count: int) -> bytes:
    """{"junk": [[nil x 1024] x ...]} holding `count` nils: small on the wire, one list slot each."""
    full, rest = divmod(count, 1024)
    inner = [array_header(1024) + b"\xc0" * 1024] * full + ([array_header(rest) + b"\xc0" * rest] if rest else [])
    return b"\x81\xa4junk" + array_header(len(inner)) + b"".join(inner)


def worst_accepted(target_bytes: int, max_values: int = 16384) -> bytes:
    """The costliest message the bounded decode accepts: as many empty maps as the value budget allows (the
    most Python memory per value) and the rest of `target_bytes` in two binary blobs (copied once)."""
    leaves = max_values - 2 * 2 - 16 - 2  # two top-level keys and values, 16 lists of empty maps, 2 blobs
    filler = [EMPTY_MAP_LEAF] * (leaves // 1024) + [array_header(leaves % 1024) + b"\x80" * (leaves % 1024)]
    head = b"\x82\xa4fill" + array_header(len(filler)) + b"".join(filler) + b"\xa5blobs\x92"
    blob = max(0, (target_bytes - len(head)) // 2 - 5)
    return head + (b"\xc6" + blob.to_bytes(4, "big") + b"\0" * blob) * 2


# --- the report: one subprocess per (message, decoder) ------------------------------------------------
_CHILD = """
import sys, time
import msgpack
from edge_vla.serve import codec
import hostile_msgpack


def status_kib(field):
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field)).split()[1])


message = getattr(hostile_msgpack, sys.argv[3])(int(sys.argv[1]))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # Linux: reset the peak RSS (VmHWM) to the current RSS, after building the message
base = status_kib("VmRSS:")
t = time.perf_counter()
try:
    if sys.argv[2] == "bounded":
        result = codec.decode(message, codec.Limits())
    else:  # msgpack's per-container limits only: the server's decode before the total bound
        lim = codec.Limits()
        result = msgpack.unpackb(message, raw=False, max_str_len=lim.max_str_len, max_bin_len=lim.max_array_bytes,
                                 max_array_len=lim.max_list_len, max_map_len=lim.max_keys, max_ext_len=0)
    outcome = "decoded"
except Exception as exc:
    outcome = f"refused: {str(exc)[:90]}"
took = time.perf_counter() - t
print(len(message), base, status_kib("VmHWM:"), took, outcome, sep="\t")
"""


def measure(target_bytes: int, decoder: str, message: str = "empty_map_bomb") -> dict[str, object]:
    """Peak RSS growth (KiB -> MiB) of a fresh process decoding one `message` of about `target_bytes`."""
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(target_bytes), decoder, message], capture_output=True,
                          text=True,
                          timeout=600, cwd=__file__.rsplit("/", 1)[0])
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    size, base, peak, took, outcome = proc.stdout.strip().split("\t")
    return {"message": message, "decoder": decoder, "message_mib": round(int(size) / MIB, 2),
            "peak_rss_growth_mib": round((int(peak) - int(base)) / 1024, 1), "seconds": round(float(took), 3),
            "outcome": outcome}


def main(sizes_mib: list[float]) -> None:
    for mib in sizes_mib:
        for message, decoder in [("empty_map_bomb", "per-container"), ("empty_map_bomb", "bounded"),
                                 ("worst_accepted", "bounded")]:
            t = time.perf_counter()
            row = measure(int(mib * MIB), decoder, message)
            print(json.dumps(row | {"wall_s": round(time.perf_counter() - t, 1)}), flush=True)


if __name__ == "__main__":
    main([float(a) for a in sys.argv[1:]] or [4.0, 31.0])
