import signal
import socket
import subprocess
import sys

import httpx

from replicas import replica_commands
from tests.helpers import ROOT, TINY_CONFIG, free_port


def test_each_replica_gets_its_own_device_and_port():
    cmds = replica_commands(["cuda:0", "cuda:1"], 9000, "127.0.0.1", ["-c", "cfg.json"])
    for i, cmd in enumerate(cmds):
        assert cmd[cmd.index("--port") + 1] == str(9000 + i)
        for flag in ("--flux-device", "--text-enc-device", "--autoencoder-device"):
            assert cmd[cmd.index(flag) + 1] == f"cuda:{i}"
        assert cmd[2:4] == ["-c", "cfg.json"]


def test_two_cpu_replicas_serve_and_drain():
    base = free_port()
    while not all(_free(base + i) for i in range(2)):
        base = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "replicas.py",
            "--devices",
            "cpu,cpu",
            "--base-port",
            str(base),
            "--",
            "--config-path",
            str(TINY_CONFIG),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()  # printed once every replica is healthy
        assert "2 replicas ready" in line
        request = {"prompt": "a fox", "width": 128, "height": 128, "num_steps": 2, "seed": 3}
        images = [httpx.post(f"http://127.0.0.1:{base + i}/generate", json=request, timeout=120) for i in range(2)]
        assert [r.status_code for r in images] == [200, 200]
        assert images[0].content == images[1].content  # same seed, same config: same image on every replica
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0


def _free(port: int) -> bool:

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False
