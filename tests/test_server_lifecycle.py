"""The server's lifecycle and the app's own wiring: SIGTERM draining, a second signal, start-up mistakes,
out-of-memory and unexpected errors, public docs. (The key, the queue and attacks: test_server_under_attack.py;
request-level behaviour: test_server.py.)"""

import io
import socket
import subprocess
import sys
import threading
import time

import httpx
import torch
import uvicorn
from loguru import logger
from PIL import Image

from api import create_app
from serving.auth import authorised
from serving.settings import ServerSettings
from tests.helpers import ROOT, SLOW, SMALL, TINY_CONFIG, free_port, running_server


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

    default_steps = 4

    def __init__(self):
        self.calls = 0

    def generate_batch(self, requests, width, height, *args, **kwargs):
        self.calls += 1
        if self.calls == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        if self.calls == 2:
            raise RuntimeError("something internal at /secret/path/model.py")
        return [([Image.new("RGB", (width, height))], 5) for _ in requests]

    def list_loras(self):
        return []

    def set_loras(self, wanted):
        return 0  # no LoRAs: nothing to change


def test_out_of_memory_is_503_and_the_server_goes_on():
    """...and an unexpected error is a 500 that says its request id, closes its connection, and is logged once."""
    logged = []
    sink = logger.add(lambda m: logged.append(m), level="ERROR")
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
        assert httpx.post(f"{url}/lora", json={"path": "good.safetensors"}).status_code == 403  # no LoRA directory
        r = httpx.post(f"{url}/generate", json=SMALL, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["message"].startswith("out of GPU memory")
        with httpx.Client(timeout=30) as client:  # keep-alive: the client must be told the connection ends
            r = client.post(f"{url}/generate", json=SMALL, headers={"X-Request-Id": "req-500"})
            assert r.status_code == 500 and "secret" not in r.text and "Traceback" not in r.text
            assert r.headers["connection"] == "close" and r.headers["x-request-id"] == "req-500"
            assert "req-500" in r.json()["error"]["message"]
            r = client.post(f"{url}/generate", json=SMALL)  # a new connection, no error
            assert r.status_code == 200 and r.headers["x-seed"] == "5"
        failures = [m for m in logged if "req-500" in m]
        assert len(failures) == 1 and "Traceback" in failures[0] and "/secret/path" in failures[0]
    finally:
        logger.remove(sink)
        server.should_exit = True
        thread.join(30)


def test_public_docs_open_only_the_docs(fp8_pipeline):
    app = create_app(fp8_pipeline, ServerSettings(api_key="s3cret", public_docs=True))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.get(f"{url}/openapi.json").status_code == 200 and httpx.get(f"{url}/docs").status_code == 200
        assert httpx.get(f"{url}/lora").status_code == 401
        assert httpx.get(f"{url}/lora", headers={"Authorization": "BEARER s3cret"}).status_code == 200
    finally:
        server.should_exit = True
        thread.join(30)
    assert (
        authorised("Bearer  s3cret ", "s3cret")
        and not authorised("Basic s3cret", "s3cret")
        and not authorised(None, "s3cret")
    )
