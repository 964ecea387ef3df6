"""The container and the multi-GPU deployment, read as an operator would (Docker cannot run here): the
Dockerfile installs the project the README's way, runs as a non-root user, keeps its caches in volumes, checks a
route the app serves, and defaults to the tiny demo; compose.yaml and deploy/nginx.conf agree; and the nginx
config, pointed at two real tiny servers on 127.0.0.1, spreads requests over both with a real nginx."""

import concurrent.futures
import re

import httpx
import yaml

import util
from api import create_app
from tests.helpers import ROOT, SMALL, nginx_front, running_server

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
    with running_server() as first, running_server() as second, nginx_front(tmp_path, [first.port, second.port]) as url:
        # four concurrent requests: least connections sends them to both replicas
        with httpx.Client(timeout=120) as client, concurrent.futures.ThreadPoolExecutor(4) as pool:
            codes = list(pool.map(lambda _: client.post(f"{url}/generate", json=SMALL).status_code, range(4)))
        assert codes == [200] * 4
        served = [s.health()["completed"] for s in (first, second)]
        assert all(n >= 1 for n in served) and sum(served) >= 4, served
