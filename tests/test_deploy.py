"""The container and the multi-GPU deployment, read as an operator would (Docker cannot run here): the
Dockerfile installs the project the README's way, runs as a non-root user, keeps its caches in volumes, checks a
route the app serves, and defaults to the tiny demo; compose.yaml and deploy/nginx.conf agree; and the nginx
config, pointed at two real tiny servers on 127.0.0.1, spreads requests over both with a real nginx."""

import concurrent.futures
import re
import shutil
import subprocess
import time

import httpx
import yaml

import util
from api import create_app
from tests.helpers import ROOT, SMALL, free_port, running_server

DOCKERFILE = (ROOT / "Dockerfile").read_text()
NGINX_CONF = (ROOT / "deploy" / "nginx.conf").read_text()


def instructions(name: str) -> list[str]:
    text = DOCKERFILE.replace("\\\n", " ")
    return [line.split(None, 1)[1] for line in text.splitlines() if line.startswith(name + " ")]


def test_the_dockerfile_installs_the_project_and_runs_the_demo_by_default():
    assert instructions("FROM")[0].startswith("nvidia/cuda:") and "runtime" in instructions("FROM")[0]
    assert any(re.search(r"pip install [\"']?\.(\[|[\"']|\s|$)", run) for run in instructions("RUN"))
    user = instructions("USER")
    assert user and user[-1] not in ("root", "0")
    assert DOCKERFILE.index("USER") < DOCKERFILE.index("ENTRYPOINT")
    assert instructions("EXPOSE") == ["8088"]
    entry = yaml.safe_load(instructions("ENTRYPOINT")[0]) + yaml.safe_load(instructions("CMD")[-1])
    assert entry[0] == "flux-fp8-api" and entry[entry.index("--port") + 1] == "8088"
    config = entry[entry.index("--config-path") + 1]
    assert util.load_config(ROOT / config).flux_device == "cpu"  # the demo: no GPU needed
    volumes = yaml.safe_load(instructions("VOLUME")[0])
    env = dict(pair.split("=") for pair in " ".join(instructions("ENV")).split() if "=" in pair)
    assert {env["HF_HOME"], env["FLUX_CACHE_DIR"]} <= set(volumes)
    probe = re.search(r"http://127\.0\.0\.1:8088(/\S+)", instructions("HEALTHCHECK")[0]).group(1)
    assert probe in create_app().openapi()["paths"]


def test_compose_and_nginx_agree():
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    replicas = {name: s for name, s in compose["services"].items() if name != "nginx"}
    devices = [s["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] for s in replicas.values()]
    assert len(replicas) >= 2 and len({tuple(d) for d in devices}) == len(devices)  # one GPU each
    upstream = set(re.findall(r"server (\S+):8088", NGINX_CONF))
    assert upstream == set(replicas) and "least_conn;" in NGINX_CONF
    assert set(compose["services"]["nginx"]["depends_on"]) == set(replicas)


def test_nginx_spreads_requests_over_the_replicas(tmp_path):
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    with running_server() as first, running_server() as second:
        port = free_port()
        conf = NGINX_CONF.replace("worker_processes auto;", f"worker_processes 1;\npid {tmp_path}/nginx.pid;")
        conf = conf.replace("server flux-gpu0:8088", f"server 127.0.0.1:{first.port}")
        conf = conf.replace("server flux-gpu1:8088", f"server 127.0.0.1:{second.port}")
        conf = conf.replace("listen 8088;", f"listen 127.0.0.1:{port};")
        conf = conf.replace("http {", f"http {{\n    access_log off;\n    client_body_temp_path {tmp_path};", 1)
        (tmp_path / "nginx.conf").write_text(conf)
        (tmp_path / "logs").mkdir()
        cmd = [nginx, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-g", "daemon off; error_log stderr;"]
        assert subprocess.run([*cmd[:-2], "-t"], capture_output=True, text=True).returncode == 0
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(100):
                try:
                    httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                    break
                except httpx.HTTPError:
                    time.sleep(0.1)
            # four concurrent requests: least connections sends them to both replicas
            url = f"http://127.0.0.1:{port}/generate"
            with httpx.Client(timeout=120) as client, concurrent.futures.ThreadPoolExecutor(4) as pool:
                codes = list(pool.map(lambda _: client.post(url, json=SMALL).status_code, range(4)))
            assert codes == [200] * 4
            served = [s.health()["completed"] for s in (first, second)]
            assert all(n >= 1 for n in served) and sum(served) >= 4, served
        finally:
            proc.terminate()
            proc.wait(10)
