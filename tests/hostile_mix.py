"""A bounded mix of hostile clients, run as its own process (`python -m tests.hostile_mix URL PORT KEY SECONDS`) so
that its work never delays the probes of the test that watches the server: unauthenticated floods of large bodies,
bodies that trickle or never come, headers that never end, bodies that are expensive to parse, oversized images and
broken LoRA files. Every loop stops after SECONDS; the status codes seen are printed as one JSON object."""

import base64
import collections
import json
import os
import socket
import struct
import sys
import threading
import time
import zlib

import httpx

SMALL = {"prompt": "a lighthouse", "width": 128, "height": 128, "num_steps": 3, "seed": 7}


def declared_png(width: int, height: int) -> str:
    """A PNG header that declares width x height and holds no pixels."""
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    raw = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr))
    return base64.b64encode(raw).decode()


def unauthenticated_floods(url: str, stop: float, counts: collections.Counter) -> None:
    body = b"x" * (8 * 2**20)
    with httpx.Client(timeout=10) as client:
        while time.monotonic() < stop:
            try:
                counts[f"flood {client.post(f'{url}/generate', content=body).status_code}"] += 1
            except httpx.HTTPError:
                counts["flood dropped"] += 1


def tricklers(port: int, key: str, stop: float) -> None:
    socks = []
    for _ in range(10):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(f"POST /generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n".encode()
                  + b"Content-Length: 30000000\r\n\r\n{")  # fmt: skip
        socks.append(s)
    chunked = socket.create_connection(("127.0.0.1", port), timeout=5)
    chunked.sendall(f"POST /generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n".encode()
                    + b"Transfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFF\r\nabc")  # fmt: skip
    socks.append(chunked)
    for _ in range(5):  # headers that never end, and connections that never say anything
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        socks += [s, socket.create_connection(("127.0.0.1", port), timeout=5)]
    while time.monotonic() < stop:
        for s in socks[:10]:
            try:
                s.sendall(b" ")  # one byte now and then
            except OSError:
                pass
        time.sleep(0.5)
    for s in socks:
        s.close()


def expensive_bodies(url: str, key: str, stop: float, counts: collections.Counter) -> None:
    """Bodies whose parsing would hold the interpreter lock for long if parsed naively: a large array of numbers,
    deep nesting, and a 20 MB init_image of random base64 (decoded, then refused as not an image)."""
    bodies = [
        b'{"prompt": [' + b"1," * (4 * 2**20) + b"1]}",
        b"[" * 100_000 + b"]" * 100_000,
        json.dumps(dict(SMALL, init_image=base64.b64encode(os.urandom(20 * 2**20 - 256)).decode())).encode(),
    ]
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    with httpx.Client(timeout=30, headers=headers) as client:
        while time.monotonic() < stop:
            for body in bodies:
                counts[f"expensive {client.post(f'{url}/generate', content=body).status_code}"] += 1


def bad_inputs(url: str, key: str, stop: float, counts: collections.Counter) -> None:
    bad = [
        ("/generate", {"prompt": "x", **{f"k{i}": i for i in range(50_000)}}),
        ("/generate", dict(SMALL, init_image=declared_png(8192, 8192))),
        ("/generate", dict(SMALL, num_steps=True)),
        ("/lora", {"path": "broken.safetensors"}),
        ("/lora", {"path": "x" * 300 + ".safetensors"}),
    ]
    bad = [(path, json.dumps(body).encode()) for path, body in bad]
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    with httpx.Client(timeout=30, headers=headers) as client:
        while time.monotonic() < stop:
            for path, body in bad:
                counts[f"bad {client.post(f'{url}{path}', content=body).status_code}"] += 1


def main() -> None:
    url, port, key, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    stop = time.monotonic() + seconds
    counts = [collections.Counter() for _ in range(6)]  # one each: a shared counter could lose an increment
    attackers = [threading.Thread(target=unauthenticated_floods, args=(url, stop, counts[i])) for i in range(3)]
    attackers += [threading.Thread(target=expensive_bodies, args=(url, key, stop, counts[i])) for i in (3, 4)]
    attackers += [threading.Thread(target=bad_inputs, args=(url, key, stop, counts[5]))]
    attackers += [threading.Thread(target=tricklers, args=(port, key, stop))]
    for t in attackers:
        t.start()
    for t in attackers:
        t.join(seconds + 60)
    print(json.dumps(sum(counts, collections.Counter())))


if __name__ == "__main__":
    main()
