"""Ray Serve on a real local Ray instance (CPU): two replicas of the tiny model behind Serve's HTTP proxy on
127.0.0.1 serve concurrent requests, both do work, the same seed gives the same bytes from either, our app's
routes, errors and headers come through, and shutdown is clean."""

import collections
import concurrent.futures
import time

import httpx
import pytest
import ray
from ray import serve
from safetensors.torch import save_file

from ray_serve import build
from tests.helpers import SMALL, TINY_CONFIG, free_port, tiny_lora


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, tiny_cfg):
    root = tmp_path_factory.mktemp("ray-loras")
    save_file(tiny_lora(tiny_cfg["params"]["hidden_size"]), root / "style.safetensors")
    return root


@pytest.fixture(scope="module")
def serve_url(lora_dir):
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        settings = {"lora_dir": str(lora_dir)}
        app = build(str(TINY_CONFIG), num_replicas=2, gpus_per_replica=0, max_queue_size=2, settings=settings)
        serve.run(app, name="flux", route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):  # bounded: two replicas load the tiny model
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


def post_until_served(client: httpx.Client, url: str, body: dict) -> httpx.Response:
    """A client's way with a full replica: retry its 429 (a few times, bounded)."""
    for _ in range(20):
        answer = client.post(url, json=body)
        if answer.status_code != 429:
            return answer
        time.sleep(0.2)
    return answer


def test_two_replicas_share_the_work_and_agree(serve_url):
    url = f"{serve_url}/generate"
    with httpx.Client(timeout=120) as client, concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda i: post_until_served(client, url, dict(SMALL, seed=i % 2)), range(12)))
    assert [a.status_code for a in answers] == [200] * 12
    by_replica = collections.Counter(a.headers["x-replica"] for a in answers)
    assert len(by_replica) == 2 and min(by_replica.values()) >= 1, by_replica
    for seed in (0, 1):  # the same seed, the same bytes, whichever replica made them
        same = {a.content for i, a in enumerate(answers) if i % 2 == seed}
        assert len(same) == 1
    assert all(a.headers["x-seed"] and a.headers["x-request-id"] for a in answers)


def test_the_apps_errors_and_routes_come_through(serve_url):
    bad = httpx.post(f"{serve_url}/generate", json={"prompt": "x", "width": 7})
    assert bad.status_code == 422 and bad.json()["error"]["type"] == "invalid_request"
    assert httpx.get(f"{serve_url}/health/ready").status_code == 200
    assert httpx.get(f"{serve_url}/v1/models").json()["data"][0]["id"] == "flux-dev"


def test_a_lora_change_reaches_every_replica(serve_url):
    def images() -> dict[str, bytes]:
        seen, url = {}, f"{serve_url}/generate"
        with httpx.Client(timeout=120) as client, concurrent.futures.ThreadPoolExecutor(4) as pool:
            for _ in range(5):  # bounded: until both replicas have answered
                for a in pool.map(lambda _: client.post(url, json=SMALL), range(4)):
                    if a.status_code == 200:  # a replica's queue of two may be full (429): the next round
                        seen[a.headers["x-replica"]] = a.content
                if len(seen) == 2:
                    break
        return seen

    before = images()
    assert len(before) == 2 and len(set(before.values())) == 1
    assert httpx.post(f"{serve_url}/lora", json={"path": "style.safetensors"}, timeout=120).status_code == 200
    after = images()
    assert len(after) == 2 and len(set(after.values())) == 1  # both replicas: the same, new image
    assert set(after.values()) != set(before.values())
    assert httpx.post(f"{serve_url}/lora", json={"name": "style", "action": "unload"}, timeout=120).status_code == 200
    assert set(images().values()) == set(before.values())
