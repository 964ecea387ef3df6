import concurrent.futures
import os
import signal
import socket
import subprocess
import sys

import httpx

from replicas import replica_commands
from tests.helpers import ROOT, SLOW, SMALL, TINY_CONFIG, free_port, nginx_front, wait_healthy


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


def test_nginx_front_over_supervised_replicas(tmp_path):
    """Both replicas serve through the real nginx front, a full queue's 429 reaches the client with Retry-After, and
    a replica killed outright leaves the other serving while the launcher starts it again."""
    base = free_port()
    while not all(_free(base + i) for i in range(2)):
        base = free_port()
    cmd = [sys.executable, "replicas.py", "--devices", "cpu,cpu", "--base-port", str(base), "--max-restarts", "2",
           "--", "--config-path", str(TINY_CONFIG), "--max-queue-size", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    replicas = [f"http://127.0.0.1:{base + i}" for i in range(2)]
    try:
        ready = proc.stdout.readline()
        assert "2 replicas ready" in ready
        pids = [int(p) for p in ready.split("pids ")[1].rstrip(")\n").split()]
        with nginx_front(tmp_path, [base, base + 1]) as url:
            # eight slow requests at once, four places (a running job and a queued one per replica)
            with httpx.Client(timeout=120) as client, concurrent.futures.ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(lambda i: client.post(f"{url}/generate", json=dict(SLOW, seed=i)), range(8)))
            codes = [a.status_code for a in answers]
            assert codes.count(200) >= 2 and 429 in codes, codes
            assert all(a.headers.get("retry-after", "").isdigit() for a in answers if a.status_code == 429)
            served = [httpx.get(f"{r}/health").json()["completed"] for r in replicas]
            assert all(n >= 1 for n in served), served  # both replicas did work
            os.kill(pids[0], signal.SIGKILL)
            for i in range(4):  # the other serves meanwhile
                assert httpx.post(f"{url}/generate", json=dict(SMALL, seed=i), timeout=120).status_code == 200
            assert wait_healthy(replicas[0], 120)  # and the launcher starts the killed one again
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0
