"""A server started with an API key, a queue of one and a LoRA directory: the key, the queue limit, disconnects,
and the same server under attack: a bounded mix of hostile clients (unauthenticated floods of large bodies, bodies
that trickle or never come, a many-key body, oversized images, broken LoRA files) while a normal client keeps
getting its images and /health stays fast, after which the fixed-seed image is byte-identical and the loaded
LoRAs are what they were."""

import io
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from main import parse_args
from serving.connections import HEADER_SECONDS
from tests.helpers import ROOT, SLOW, SMALL, running_server
from tests.hostile_mix import declared_png


@pytest.fixture(scope="module")
def strict_server(tmp_path_factory):
    """A server started with an API key, a queue of one, and a LoRA directory holding a broken file."""
    loras = tmp_path_factory.mktemp("loras")
    (loras / "broken.safetensors").write_bytes(b"\x00" * 64)
    with running_server("--api-key", "s3cret", "--max-queue-size", "1", "--lora-dir", str(loras)) as s:
        yield s


AUTH = {"Authorization": "Bearer s3cret"}


def test_queue_full_is_429_and_running_jobs_finish(strict_server):
    s = strict_server
    results = {}

    def call(i):
        results[i] = s.post("/generate", json=dict(SLOW, seed=i), headers=AUTH)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    threads[0].start()
    deadline = time.monotonic() + 30
    while s.health()["running"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    threads[1].start()
    while s.health()["queued"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    r = s.post("/generate", json=SMALL, headers=AUTH)
    assert r.status_code == 429 and r.headers["retry-after"].isdigit()
    assert r.json()["error"]["type"] == "queue_full" or "queue" in r.json()["error"]["message"]
    for t in threads:
        t.join(120)
    assert [results[i].status_code for i in range(2)] == [200, 200]


def test_client_disconnect_cancels_its_job(strict_server):
    s = strict_server
    before = s.health()["cancelled"]
    with pytest.raises(httpx.ReadTimeout):
        s.post("/generate", json=dict(SLOW, num_steps=100), headers=AUTH, timeout=1.0)
    deadline = time.monotonic() + 30
    while s.health()["cancelled"] == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert s.health()["cancelled"] == before + 1
    start = time.monotonic()
    assert s.post("/generate", json=SMALL, headers=AUTH).status_code == 200
    assert time.monotonic() - start < 10  # the worker is free again


def test_api_key(strict_server, monkeypatch):
    s = strict_server
    assert s.post("/generate", json=SMALL).status_code == 401
    assert s.post("/generate", json=SMALL, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{s.url}/lora").status_code == 401
    assert s.post("/lora", json={"path": "x.safetensors"}).status_code == 401
    ok = s.post("/generate", json=SMALL, headers=AUTH)
    assert ok.status_code == 200 and "s3cret" not in json.dumps(dict(ok.headers))
    assert httpx.get(f"{s.url}/health").status_code == 200
    assert httpx.get(f"{s.url}/metrics").status_code == 401  # without --public-metrics
    assert "flux_requests_total" in httpx.get(f"{s.url}/metrics", headers=AUTH).text
    assert httpx.get(f"{s.url}/health/ready").status_code == 200  # probes need no key
    # the key may come from the environment instead of the command line (kept out of `ps`)
    monkeypatch.setenv("FLUX_API_KEY", "from-env")
    assert parse_args([]).api_key == "from-env"
    assert parse_args(["--api-key", "flag"]).api_key == "flag"


# ---- a server under attack ---------------------------------------------------------------------------------

SECONDS = 8.0  # how long the attack runs; every loop below stops by then


def test_the_key_is_checked_before_the_body_is_read(strict_server):
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", strict_server.port), timeout=10) as sock:
        # announces 30 MB and sends none of it: the answer must not wait for the body
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 30000000\r\n\r\n")  # fmt: skip
        reply = sock.recv(4096).decode("latin-1")
    assert reply.startswith("HTTP/1.1 401") and time.monotonic() - start < 5
    lower = {"Authorization": "bearer s3cret"}  # the scheme in any case
    assert strict_server.post("/generate", json=SMALL, headers=lower).status_code == 200
    assert httpx.get(f"{strict_server.url}/openapi.json").status_code == 401  # the docs too, without --public-docs
    assert httpx.get(f"{strict_server.url}/openapi.json", headers=AUTH).status_code == 200


def test_kept_alive_answers_are_not_delayed(strict_server):
    # with Nagle's algorithm on the server's sockets, each answer on a reused connection waits ~40 ms for the
    # client's delayed ACK
    times = []
    with httpx.Client() as client:
        for _ in range(21):
            start = time.monotonic()
            assert client.get(f"{strict_server.url}/health").status_code == 200
            times.append(time.monotonic() - start)
    assert statistics.median(times[1:]) < 0.02, times


def test_a_connection_must_send_its_headers_in_time(strict_server):
    silent = socket.create_connection(("127.0.0.1", strict_server.port))
    trickling = socket.create_connection(("127.0.0.1", strict_server.port))
    kept_alive = socket.create_connection(("127.0.0.1", strict_server.port))
    kept_alive.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert kept_alive.recv(4096).startswith(b"HTTP/1.1 200")
    kept_alive.sendall(b"GET /health HTTP/1.1\r\n")  # the next request's headers begin, and never end
    start = time.monotonic()
    for sock in (silent, trickling, kept_alive):
        sock.settimeout(HEADER_SECONDS + 10)
    closed = {}
    while len(closed) < 3 and time.monotonic() - start < HEADER_SECONDS + 10:
        for name, sock in (("silent", silent), ("trickling", trickling), ("kept alive", kept_alive)):
            if name in closed:
                continue
            try:
                if name == "trickling":
                    sock.sendall(b"G" if time.monotonic() - start < 0.5 else b"x")  # a header byte now and then
                sock.settimeout(0.5)
                if sock.recv(4096) == b"":
                    closed[name] = time.monotonic() - start
            except TimeoutError:
                pass
            except OSError:
                closed[name] = time.monotonic() - start
        assert httpx.get(f"{strict_server.url}/health", timeout=5).status_code == 200  # others are served meanwhile
    for sock in (silent, trickling, kept_alive):
        sock.close()
    assert set(closed) == {"silent", "trickling", "kept alive"}, closed
    assert all(HEADER_SECONDS - 1 < t < HEADER_SECONDS + 5 for t in closed.values()), closed


def test_errors_are_bounded_and_documented(strict_server):
    many = {"prompt": "x", **{f"k{i}": i for i in range(200_000)}}
    r = strict_server.post("/generate", content=json.dumps(many), headers=AUTH)
    assert r.status_code == 422 and len(r.content) < 4096 and "more" in r.json()["error"]["message"]
    r = strict_server.post("/generate", json=dict(SMALL, init_image=declared_png(8192, 8192)), headers=AUTH)
    assert r.status_code == 422 and "init_image" in r.json()["error"]["message"]
    paths = httpx.get(f"{strict_server.url}/openapi.json", headers=AUTH).json()["paths"]
    documented = set(paths["/generate"]["post"]["responses"])
    assert {"200", "401", "413", "422", "429", "500", "503"} <= documented


def test_a_request_id_on_every_answer(strict_server):
    r = strict_server.post("/generate", json=SMALL, headers={**AUTH, "X-Request-Id": "mine-1"})
    assert r.headers["x-request-id"] == "mine-1"
    assert httpx.get(f"{strict_server.url}/nope").headers["x-request-id"]  # errors too, made up when not sent


def _image(client: httpx.Client, url: str) -> int:
    """A normal client's request: the queue of one may be taken by an attacker's LoRA request (they wait their turn
    like any job), so a 429 is retried, a few times."""
    for _ in range(10):
        code = client.post(f"{url}/generate", json=SMALL, headers=AUTH).status_code
        if code != 429:
            return code
        time.sleep(0.3)
    return code


def server_rss(server) -> int:
    """The server process's resident memory in bytes (Linux)."""
    status = (Path("/proc") / str(server.proc.pid) / "status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) * 1024


def test_a_hostile_mix_leaves_the_server_serving_and_the_model_unchanged(strict_server):
    before = strict_server.post("/generate", json=SMALL, headers=AUTH)
    assert before.status_code == 200
    rss_before = server_rss(strict_server)
    args = [strict_server.url, str(strict_server.port), "s3cret", str(SECONDS)]
    # the attackers run in a process of their own: their work must not delay this process's probes
    attack = subprocess.Popen([sys.executable, "-m", "tests.hostile_mix", *args], cwd=ROOT, stdout=subprocess.PIPE)
    health, images, peak = [], [], rss_before
    stop = time.monotonic() + SECONDS
    with httpx.Client(timeout=30) as client:
        while time.monotonic() < stop:
            t0 = time.monotonic()
            assert client.get(f"{strict_server.url}/health").status_code == 200
            health.append(time.monotonic() - t0)
            peak = max(peak, server_rss(strict_server))
            if len(health) % 20 == 0:
                images.append(_image(client, strict_server.url))
            time.sleep(0.02)
    out, _ = attack.communicate(timeout=120)
    counts = json.loads(out)
    # refused (401, or the connection closed under a body still being sent), never run, never a server error
    assert counts.get("flood 401", 0) + counts.get("flood dropped", 0) > 0
    assert not any(key.endswith((" 200", " 500")) for key in counts if not key.startswith("flood dropped")), counts
    assert counts.get("bad 422", 0) > 0 and counts.get("bad 400", 0) > 0 and counts.get("expensive 422", 0) > 0
    assert images and all(code == 200 for code in images)  # the normal client was served throughout
    health.sort()
    p99 = health[int(0.99 * (len(health) - 1))]
    assert statistics.median(health) < 0.05 and p99 < 0.1, (statistics.median(health), p99)
    # memory: bodies are bounded and refused ones are not kept; what grows is the bodies in flight at once
    assert peak - rss_before < 1.5 * 2**30, (rss_before, peak)
    after = strict_server.post("/generate", json=SMALL, headers=AUTH)
    assert after.content == before.content  # same seed, same bytes: nothing changed the model
    assert httpx.get(f"{strict_server.url}/lora", headers=AUTH).json() == {"loras": []}
    Image.open(io.BytesIO(after.content)).verify()
    assert server_rss(strict_server) - rss_before < 512 * 2**20, (rss_before, server_rss(strict_server))
