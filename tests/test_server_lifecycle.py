"""The server's own settings and lifecycle: API key, queue limit, LoRA loading off, client disconnects, SIGTERM
draining, start-up mistakes, out-of-memory. (The request-level behaviour is in test_server.py.)"""

import io
import json
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
import uvicorn
from PIL import Image

from api import create_app
from main import parse_args
from tests.helpers import ROOT, SLOW, SMALL, TINY_CONFIG, free_port, running_server


@pytest.fixture(scope="module")
def strict_server():
    """A server started with an API key, a queue of one, and no LoRA directory."""
    with running_server("--api-key", "s3cret", "--max-queue-size", "1") as s:
        yield s


AUTH = {"Authorization": "Bearer s3cret"}


def test_lora_endpoint_is_off_without_a_directory(strict_server):
    assert strict_server.post("/lora", json={"path": "good.safetensors"}, headers=AUTH).status_code == 403


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
    # the key may come from the environment instead of the command line (kept out of `ps`)
    monkeypatch.setenv("FLUX_API_KEY", "from-env")
    assert parse_args([]).api_key == "from-env"
    assert parse_args(["--api-key", "flag"]).api_key == "flag"


def _start_slow(s, body: dict) -> tuple[threading.Thread, dict]:
    """A long request in a thread, returned once the server runs it."""
    result = {}
    thread = threading.Thread(target=lambda: result.update(r=s.post("/generate", json=body)))
    thread.start()
    deadline = time.monotonic() + 30
    while s.health()["running"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    return thread, result


def test_sigterm_drains_and_exits_zero():
    with running_server() as s:
        thread, result = _start_slow(s, SLOW)
        s.terminate()
        time.sleep(0.3)
        # while draining the socket stays open: health and new work answer 503, as documented
        assert httpx.get(f"{s.url}/health", timeout=5).status_code == 503
        refused = s.post("/generate", json=SMALL, timeout=10)
        assert refused.status_code == 503 and refused.headers["retry-after"].isdigit()
        thread.join(120)
        assert result["r"].status_code == 200 and Image.open(io.BytesIO(result["r"].content)).size == (512, 512)
        assert s.proc.wait(60) == 0


def test_a_second_sigterm_cancels_the_running_job_and_exits():
    with running_server() as s:
        thread, result = _start_slow(s, dict(SLOW, num_steps=100))
        s.terminate()
        time.sleep(0.3)
        start = time.monotonic()
        s.terminate()
        assert s.proc.wait(60) == 0 and time.monotonic() - start < 30
        thread.join(30)
        assert result["r"].status_code == 503  # stopped between steps, not finished


def test_start_up_mistakes_are_one_line_before_loading(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for args, says in (
            (["--port", str(port)], f"cannot listen on 127.0.0.1:{port}"),
            (["--port", "70000"], "--port"),
            (["--max-queue-size", "0"], "--max-queue-size"),
            (["--lora-dir", str(tmp_path / "missing")], "--lora-dir"),
        ):
            out = subprocess.run(
                [sys.executable, "main.py", "-c", str(TINY_CONFIG), *args],
                cwd=ROOT, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            lines = [line for line in out.stderr.splitlines() if line.strip()]
            assert out.returncode != 0 and len(lines) == 1 and says in lines[0], out.stderr[-2000:]
            assert "loaded" not in out.stderr


class _FailingOnce:
    """A pipeline whose first generation runs out of GPU memory (as a real CUDA OOM would surface)."""

    def __init__(self):
        self.calls = 0

    def generate_images(self, prompt, width, height, *args, **kwargs):
        self.calls += 1
        if self.calls == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        if self.calls == 2:
            raise RuntimeError("something internal at /secret/path/model.py")
        return [Image.new("RGB", (width, height))], 5

    def list_loras(self):
        return []


def test_out_of_memory_is_503_and_the_server_goes_on():

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(_FailingOnce()), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    try:
        r = httpx.post(f"{url}/generate", json=SMALL, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["message"].startswith("out of GPU memory")
        r = httpx.post(f"{url}/generate", json=SMALL, timeout=30)
        assert r.status_code == 500 and "secret" not in r.text and "Traceback" not in r.text
        r = httpx.post(f"{url}/generate", json=SMALL, timeout=30)
        assert r.status_code == 200 and r.headers["x-seed"] == "5"
    finally:
        server.should_exit = True
        thread.join(30)
