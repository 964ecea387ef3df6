"""Ray Serve on a real local Ray instance (CPU): two replicas of the tiny model behind Serve's HTTP proxy on
127.0.0.1 serve concurrent requests, both do work, the same seed gives the same bytes from either, our app's
routes, errors and headers come through, and shutdown is clean."""

import collections
import concurrent.futures

import httpx
import pytest
import ray
from ray import serve

from ray_serve import build
from tests.helpers import SMALL, TINY_CONFIG, free_port


@pytest.fixture(scope="module")
def serve_url():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build(str(TINY_CONFIG), num_replicas=2, gpus_per_replica=0, max_queue_size=2)
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


def test_two_replicas_share_the_work_and_agree(serve_url):
    with httpx.Client(timeout=120) as client, concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(
            pool.map(lambda i: client.post(f"{serve_url}/generate", json=dict(SMALL, seed=i % 2)), range(12))
        )
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
