"""Start the real server (python main.py ...) on a free 127.0.0.1 port and wait until it is healthy."""

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager

import httpx

from tests.conftest import ROOT, TINY_CONFIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *args: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "main.py", "--config-path", str(TINY_CONFIG), "--port", str(self.port), *args]
        self.log = open(os.devnull, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not become healthy in 120 s")

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=5).json()

    def post(self, path: str, timeout: float = 120, **kwargs) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", timeout=timeout, **kwargs)

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        return self.proc.returncode


@contextmanager
def running_server(*args: str, env: dict | None = None):
    server = Server(*args, env=env)
    try:
        yield server
    finally:
        server.stop()
