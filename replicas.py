"""Serve one pipeline per GPU on one host: start `main.py` once per device, each on its own port.

    python replicas.py --devices cuda:0,cuda:1 --base-port 8101 -- --config-path configs/config-dev-1-H100.json

Replica i listens on 127.0.0.1:(base-port + i) with every component on device i. Put a load balancer in front
for one address (deploy/nginx.conf: `least_conn`). A replica that dies is started again (at most
`--max-restarts` times each, logged); the others serve meanwhile. SIGTERM/SIGINT are passed on: each replica
drains (finishes its running job) and exits; the launcher exits 0 when all did.
"""

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent


def replica_commands(devices: list[str], base_port: int, host: str, server_args: list[str]) -> list[list[str]]:
    return [
        [sys.executable, str(ROOT / "main.py"), *server_args, "--host", host, "--port", str(base_port + i),
         "--flux-device", device, "--text-enc-device", device, "--autoencoder-device", device]
        for i, device in enumerate(devices)
    ]  # fmt: skip


def wait_healthy(urls: list[str], procs: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = set(urls)
    while pending and time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise SystemExit(f"a replica exited with {proc.returncode} while starting")
        for url in list(pending):
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    pending.discard(url)
            except httpx.HTTPError:
                pass
        time.sleep(0.5)
    if pending:
        raise SystemExit(f"replicas not healthy after {timeout:.0f} s: {sorted(pending)}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, server_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", required=True, help="comma-separated torch devices, one replica each")
    ap.add_argument("--base-port", type=int, default=8101)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--start-timeout", type=float, default=900)
    ap.add_argument("--max-restarts", type=int, default=5, help="restarts of each replica at most")
    args = ap.parse_args(own)
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    commands = replica_commands(devices, args.base_port, args.host, server_args)
    procs = [subprocess.Popen(cmd, stdout=sys.stderr) for cmd in commands]  # our stdout: launcher lines only
    stopping = []

    def forward(sig, frame):
        stopping.append(sig)
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    try:
        wait_healthy(
            [f"http://{args.host}:{args.base_port + i}" for i in range(len(devices))], procs, args.start_timeout
        )
        print(
            f"{len(devices)} replicas ready on ports {args.base_port}-{args.base_port + len(devices) - 1} "
            f"(pids {' '.join(str(p.pid) for p in procs)})",
            flush=True,
        )
    except SystemExit:
        forward(None, None)
        raise
    return supervise(procs, commands, args.max_restarts, stopping)


def supervise(procs: list[subprocess.Popen], commands: list[list[str]], max_restarts: int, stopping: list) -> int:
    """Until a signal stops them: start again each replica that exits (at most `max_restarts` times each, then it
    stays down, logged). Returns the exit status once all replicas have stopped."""
    restarts = [0] * len(procs)
    while not stopping:
        for i, proc in enumerate(procs):
            if proc.poll() is None or stopping:
                continue
            if restarts[i] >= max_restarts:
                continue
            restarts[i] += 1
            print(
                f"replica {i} exited with {proc.returncode}: restart {restarts[i]} of {max_restarts}",
                file=sys.stderr,
                flush=True,
            )
            procs[i] = subprocess.Popen(commands[i], stdout=sys.stderr)
        if all(p.poll() is not None for p in procs) and all(n >= max_restarts for n in restarts):
            break  # every replica is down for good
        time.sleep(0.5)
    codes = [proc.wait() for proc in procs]
    # a replica still loading when the signal came ends by it (-SIGTERM); a serving one drains and exits 0
    return 0 if stopping and all(code in (0, -signal.SIGTERM) for code in codes) else 1


if __name__ == "__main__":
    sys.exit(main())
