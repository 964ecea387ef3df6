"""Prometheus metrics at /metrics (prometheus-client), one registry per app: requests by route and status, the
queue, time in queue, step and end-to-end times, images, batches, LoRA swaps, GPU memory, errors by type. Route labels
are the app's route templates (an unknown path counts as "unmatched"), so no client can grow the label set."""

import time

import torch
from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

router = APIRouter()
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
TIME_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
MEGAPIXELS = (0.25, 0.5, 1, 2, 4)  # the size label: the smallest of these the image fits in


class Metrics:
    def __init__(self, worker):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("flux_requests", "HTTP requests", ["route", "status"], registry=r)
        self.errors = Counter("flux_errors", "failed requests and jobs, by error type", ["type"], registry=r)
        self.queue_seconds = Histogram("flux_queue_seconds", "time jobs wait in the queue", buckets=TIME_BUCKETS,
                                       registry=r)  # fmt: skip
        self.step_seconds = Histogram("flux_step_seconds", "denoising step time", buckets=STEP_BUCKETS, registry=r)
        self.generation_seconds = Histogram(
            "flux_generation_seconds", "end-to-end generation time", ["megapixels"], buckets=TIME_BUCKETS, registry=r
        )
        self.images = Counter("flux_images", "images generated", registry=r)
        self.lora_swaps = Counter("flux_lora_swaps", "LoRA loads and unloads done by the worker", registry=r)
        self.batches = Counter("flux_batches", "batches of more than one request run", registry=r)
        self.batched_requests = Counter("flux_batched_requests", "requests run in a batch with others", registry=r)
        Gauge("flux_queue_depth", "jobs waiting", registry=r).set_function(worker.jobs.qsize)
        Gauge("flux_jobs_running", "jobs running", registry=r).set_function(lambda: worker.running)
        memory = Gauge("flux_gpu_memory_bytes", "GPU memory held by tensors", ["kind"], registry=r)
        memory.labels("in_use").set_function(lambda: _gpu(torch.cuda.memory_allocated))
        memory.labels("peak").set_function(lambda: _gpu(torch.cuda.max_memory_allocated))

    def generation(self, width: int, height: int, seconds: float, images: int) -> None:
        mp = width * height / 1e6
        label = next((str(m) for m in MEGAPIXELS if mp <= m * 1.05), "more")
        self.generation_seconds.labels(label).observe(seconds)
        self.images.inc(images)

    def batch(self, requests: int) -> None:
        self.batches.inc()
        self.batched_requests.inc(requests)

    def step_timer(self):
        """A step callback that observes the time between steps (the first from when it was made)."""
        last = [time.perf_counter()]

        def step(_step: int, _total: int) -> None:
            now = time.perf_counter()
            self.step_seconds.observe(now - last[0])
            last[0] = now

        return step


def _gpu(read) -> float:
    return float(read()) if torch.cuda.is_available() else 0.0


class CountRequests:
    """ASGI middleware: every answered request, by route template and status."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def recording_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = scope.get("route")
            self.metrics.requests.labels(getattr(route, "path", "unmatched"), str(status[0])).inc()


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
