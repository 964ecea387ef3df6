"""The server's protocols beside /generate, on a real server: jobs with server-sent progress and cancel, per-request
LoRAs, Prometheus metrics, JSON logs with the request id on every line, health probes, CORS, and the generation
parameters written into the image files."""

import base64
import io
import json
import time

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import save_file

import images
from api import create_app
from serving import job_routes
from serving.settings import ServerSettings
from serving.worker import Worker
from tests.helpers import SLOW, SMALL, running_server, tiny_lora

ORIGIN = "http://app.example"


@pytest.fixture(scope="module")
def logged_server(tmp_path_factory, tiny_cfg):
    root = tmp_path_factory.mktemp("protocols")
    (root / "loras").mkdir()
    h = tiny_cfg["params"]["hidden_size"]
    lora = tiny_lora(h)
    save_file(lora, root / "loras" / "style.safetensors")
    unknown = {
        "transformer_blocks.0.unknown.lora_A.weight": torch.ones(4, h),
        "transformer_blocks.0.unknown.lora_B.weight": torch.ones(h, 4),
    }
    save_file(dict(lora, **unknown), root / "loras" / "partial.safetensors")
    log = root / "server.log"
    args = ("--lora-dir", str(root / "loras"), "--max-queue-size", "1", "--log-json", "--cors-origin", ORIGIN)
    with running_server(*args, log_path=log) as server:
        server.log_path = log
        yield server


def events(url: str, timeout: float = 60) -> list[tuple[str, dict]]:
    """Every server-sent event of a job's stream, to its end, as (event, data)."""
    out, name = [], None
    with httpx.stream("GET", url, timeout=timeout) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("event:"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                out.append((name, json.loads(line.split(":", 1)[1])))
    return out


def wait_state(server, job_id: str, states: tuple, seconds: float = 60) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        view = httpx.get(f"{server.url}/jobs/{job_id}").json()
        if view["state"] in states:
            return view
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached {states}: {view}")


def test_a_job_streams_every_step_then_its_result(logged_server):
    s = logged_server
    body = dict(SMALL, num_steps=5, output_format="png")
    r = s.post("/jobs", json=body)
    assert r.status_code == 202 and r.headers["location"] == f"/jobs/{r.json()['id']}"
    job_id = r.json()["id"]
    stream = events(f"{s.url}/jobs/{job_id}/events")
    steps = [data["step"] for name, data in stream if name == "progress"]
    assert steps == [1, 2, 3, 4, 5] and stream[-1][0] == "done"
    assert all(data["total"] == 5 for name, data in stream if name == "progress")
    view = httpx.get(f"{s.url}/jobs/{job_id}").json()
    assert view["state"] == "done" and view["position"] is None and view["finished"] >= view["started"]
    png = base64.b64decode(view["result"]["images"][0])
    assert png == s.post("/generate", json=body).content  # the same queue, the same image
    assert httpx.get(f"{s.url}/jobs/nope").status_code == 404


def test_jobs_cancel_and_share_the_queue_with_generate(logged_server):
    s = logged_server
    running = s.post("/jobs", json=SLOW).json()["id"]
    wait_state(s, running, ("running",))
    queued = s.post("/jobs", json=SMALL).json()["id"]
    assert httpx.get(f"{s.url}/jobs/{queued}").json()["position"] == 1
    assert s.post("/jobs", json=SMALL).status_code == 429  # the one queue, full
    assert s.post("/generate", json=SMALL).status_code == 429
    dropped = httpx.delete(f"{s.url}/jobs/{queued}").json()
    assert dropped["state"] == "cancelled"  # never runs
    while httpx.get(f"{s.url}/jobs/{running}").json()["step"] < 1:
        time.sleep(0.05)
    asked = time.monotonic()
    httpx.delete(f"{s.url}/jobs/{running}")
    view = wait_state(s, running, ("cancelled", "failed", "done"), 30)
    assert view["state"] == "cancelled" and time.monotonic() - asked < 10 and view["step"] < 30
    assert httpx.get(f"{s.url}/jobs/{queued}").json()["started"] is None


def test_forgotten_jobs_are_410(monkeypatch):
    monkeypatch.setattr(job_routes, "KEEP", 1)
    registry = job_routes.JobRegistry()
    for name in ("a", "b"):
        record = job_routes.JobRecord(name, request=None, state="done", finished=time.time())
        registry.add(record)
    with pytest.raises(job_routes.HTTPException) as gone:
        registry.get("a")
    assert gone.value.status_code == 410 and registry.get("b").id == "b"


def test_per_request_loras_apply_to_their_request_only(logged_server):
    s = logged_server
    plain = s.post("/generate", json=SMALL).content
    styled = s.post("/generate", json=dict(SMALL, loras=[{"path": "style.safetensors", "scale": 1.0}]))
    assert styled.status_code == 200 and styled.content != plain
    assert s.post("/generate", json=dict(SMALL, loras=[{"name": "style"}])).content == styled.content
    assert s.post("/generate", json=SMALL).content == plain  # the server's own set (none) again, exactly
    assert httpx.get(f"{s.url}/lora").json() == {"loras": []}
    assert s.post("/generate", json=dict(SMALL, loras=[{"path": "../x.safetensors"}])).status_code == 400
    assert s.post("/generate", json=dict(SMALL, loras=[{"name": "absent"}])).status_code == 404


def test_metrics_count_what_happened(logged_server):
    s = logged_server
    s.post("/generate", json=SMALL)
    text = httpx.get(f"{s.url}/metrics").text
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert samples[("flux_requests_total", (("route", "/generate"), ("status", "200")))] >= 1
    assert samples[("flux_images_total", ())] >= 1
    assert samples[("flux_step_seconds_count", ())] >= 2
    assert samples[("flux_generation_seconds_count", (("megapixels", "0.25"),))] >= 1
    assert samples[("flux_lora_swaps_total", ())] >= 2  # the per-request LoRA's load and unload
    assert ("flux_queue_depth", ()) in samples and ("flux_queue_seconds_count", ()) in samples
    assert ("flux_gpu_memory_bytes", (("kind", "peak"),)) in samples
    httpx.get(f"{s.url}/no/such/path/{time.time()}")
    text = httpx.get(f"{s.url}/metrics").text
    assert "no/such" not in text and 'route="unmatched"' in text  # paths cannot grow the label set


def test_logs_are_json_with_the_request_id_on_every_line_of_its_work(logged_server):
    s = logged_server
    assert s.post("/generate", json=SMALL, headers={"X-Request-Id": "trace-me-1"}).status_code == 200
    time.sleep(0.5)
    lines = [json.loads(line) for line in s.log_path.read_text().splitlines() if line.strip()]  # all JSON
    mine = [line["record"] for line in lines if line["record"]["extra"].get("request_id") == "trace-me-1"]
    sources = {record["name"] for record in mine}
    assert "batching" in sources and "serving.generate" in sources  # the worker thread's lines too
    assert any(record["name"].startswith("uvicorn") for record in (line["record"] for line in lines))
    assert not any("Loading weights" in line["text"] for line in lines)  # no progress bars


def test_health_probes(logged_server, bf16_pipeline):
    assert httpx.get(f"{logged_server.url}/health/live").json() == {"status": "alive"}
    assert httpx.get(f"{logged_server.url}/health/ready").status_code == 200
    with TestClient(create_app(bf16_pipeline, ServerSettings())) as client:
        assert client.get("/health/ready").status_code == 200
        client.app.state.worker.fatal = "AcceleratorError: CUDA error: an illegal memory access"
        ready = client.get("/health/ready")
        assert ready.status_code == 503 and "CUDA" in ready.json()["problems"][0]
        assert client.get("/health/live").status_code == 200


def test_a_cuda_error_marks_the_worker_fatal():
    worker = Worker(2)
    worker.start()
    try:
        job = worker.submit(lambda cancel: (_ for _ in ()).throw(RuntimeError("CUDA error: device-side assert")))
        with pytest.raises(RuntimeError):
            job.future.result(10)
        assert worker.fatal and "CUDA error" in worker.fatal
    finally:
        worker.stop(10)


def test_cors_for_the_configured_origins_only(logged_server):
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x-a"}
    r = httpx.options(f"{logged_server.url}/generate", headers=preflight)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.options(f"{logged_server.url}/generate", headers=dict(preflight, Origin="http://evil.example"))
    assert "access-control-allow-origin" not in other.headers
    r = logged_server.post("/generate", json=SMALL, headers={"Origin": ORIGIN})
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert "x-seed" in r.headers["access-control-expose-headers"].lower()


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_images_carry_their_parameters(logged_server, fmt):
    r = logged_server.post("/generate", json=dict(SMALL, output_format=fmt, prompt="a red (kite:1.2)"))
    text = images.read_parameters(r.content)
    assert text.startswith("a red (kite:1.2)\n") and "Seed: 7" in text and "Steps: 3" in text
    assert "Size: 128x128" in text and "Model: flux-dev" in text
    if fmt != "png":
        assert images.AI_SOURCE.encode() in Image.open(io.BytesIO(r.content)).info["xmp"]


def test_each_image_of_a_batch_has_its_own_seed(logged_server):
    batch = logged_server.post("/generate", json=dict(SMALL, num_images=2, output_format="png", seed=40)).json()
    assert batch["seeds"] == [40, 41]
    second = base64.b64decode(batch["images"][1])
    assert "Seed: 41" in images.read_parameters(second)
    alone = logged_server.post("/generate", json=dict(SMALL, output_format="png", seed=41)).content
    a, b = (np.asarray(Image.open(io.BytesIO(x)), dtype=int) for x in (second, alone))
    assert np.abs(a - b).max() <= 2  # the same image (a batch of two may round differently from one)


def test_no_metadata_when_asked(bf16_pipeline):
    image = bf16_pipeline.generate_images("x", 128, 128, 1, seed=1)[0][0]
    assert images.read_parameters(images.encode_image(image, "png")) is not None
    assert images.read_parameters(images.encode_image(image, "png", metadata=False)) is None
    assert images.read_parameters(images.encode_image(image, "jpeg", metadata=False)) is None


def test_job_previews_when_asked(logged_server):
    s = logged_server
    job_id = s.post("/jobs?preview_every=2", json=dict(SMALL, num_steps=4, width=256)).json()["id"]
    stream = events(f"{s.url}/jobs/{job_id}/events")
    previews = {data["preview_step"]: data["preview"] for name, data in stream if "preview" in data}
    assert set(previews) <= {2, 4} and 4 in previews
    assert Image.open(io.BytesIO(base64.b64decode(previews[4]))).size == (32, 16)  # 1/8 of 256x128
    plain = s.post("/jobs", json=SMALL).json()["id"]
    assert all("preview" not in data for _, data in events(f"{s.url}/jobs/{plain}/events"))
    assert s.post("/jobs?preview_every=-1", json=SMALL).status_code == 422


def test_keys_a_lora_file_holds_but_that_are_not_applied_are_reported(logged_server):
    r = logged_server.post("/lora", json={"path": "partial.safetensors"})
    assert r.status_code == 200 and r.json()["ignored_keys"] == ["transformer_blocks.0.unknown"]
    assert r.json()["ignored_count"] == 1
    assert logged_server.post("/lora", json={"name": "partial", "action": "unload"}).status_code == 200
