"""Ray Serve: one replica of the pipeline per GPU, on one machine or a Ray cluster of many (the `ray` extra).

    serve run ray_serve:app config_path=configs/config-dev-1-H100.json num_replicas=2

Each replica builds the pipeline on its GPU and serves it through our own FastAPI app (`api.create_app`), so
every route, limit, error shape and header is the single server's. Serve's health checks ask the replica's
readiness (loaded, worker alive, no fatal CUDA error); a replica that fails them is replaced. Each replica keeps
its own queue of `max_queue_size` (its 429 beyond); Serve admits `max_queue_size` requests to a replica at a
time (`max_ongoing_requests`, one less than the replica holds) and holds `max_queued_requests` more at its
router, answering 503 past them.
LoRAs: a `POST /lora` that succeeds on one replica is recorded in a named Ray actor (`LoraRegistry`); every
replica brings its own set to the recorded one before its next request (as a job on its worker, so in order),
so all replicas serve with the same LoRAs (the LoRA directory must be the same path on every machine).
Responses are sent whole: `GET /jobs/{id}/events` is not streamed through Serve,
and a job lives on the replica that took it.
"""

import asyncio
import os
from typing import Any

import ray
from ray import serve
from starlette.requests import Request
from starlette.responses import Response

from api import create_app, start, stop
from flux_pipeline import FluxPipeline
from serving.lora import use_loras
from serving.settings import ServerSettings
from serving.worker import QueueFull

REGISTRY = "flux-lora-registry"


@ray.remote(num_cpus=0)
class LoraRegistry:
    """The LoRA set of the whole deployment (name -> (path, scale)) and a version that counts its changes."""

    def __init__(self):
        self.version, self.loras = 0, {}

    def set(self, loras: dict) -> int:
        self.version, self.loras = self.version + 1, dict(loras)
        return self.version

    def get(self) -> tuple[int, dict]:
        return self.version, self.loras


def registry():
    return LoraRegistry.options(name=REGISTRY, get_if_exists=True, lifetime="detached").remote()


class FluxReplica:
    """A replica: the pipeline on this actor's GPU (or the CPU), served by our FastAPI app."""

    def __init__(self, config_path: str, overrides: dict | None = None, settings: dict | None = None):
        overrides = dict(overrides or {})
        gpus = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        if gpus and "flux_device" not in overrides:  # Ray shows this actor its one GPU as cuda:0
            overrides.update(flux_device="cuda:0", text_enc_device="cuda:0", ae_device="cuda:0")
        server = ServerSettings(**(settings or {}))
        # warmed up for the batches its worker will run, as main.py's server is
        self.pipeline = FluxPipeline.load_pipeline_from_config_path(
            config_path, warm_up_batch=server.max_batch, **overrides
        )
        self.pipeline.generate_images("warm-up", 256, 256, 1, seed=0)
        self.app = create_app(self.pipeline, server)
        start(self.app)
        self.name = serve.get_replica_context().replica_tag
        self.registry, self.lora_version = registry(), 0

    async def __call__(self, request: Request) -> Response:
        """The request through our app, answered whole; the deployment's LoRA set brought here first, and a
        successful LoRA change recorded for the other replicas."""
        await self._follow_loras()
        status, headers, body = 500, [], []

        async def send(message: dict[str, Any]) -> None:
            nonlocal status, headers
            if message["type"] == "http.response.start":
                status, headers = message["status"], message.get("headers", [])
            elif message["type"] == "http.response.body":
                body.append(message.get("body", b""))

        await self.app(request.scope, request.receive, send)
        if request.url.path == "/lora" and request.method == "POST" and status == 200:
            self.lora_version = await self.registry.set.remote(self.app.state.base_loras)
        response = Response(b"".join(body), status_code=status)
        response.raw_headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
        response.headers["content-length"] = str(len(response.body))
        response.headers["x-replica"] = self.name
        return response

    async def _follow_loras(self) -> None:
        version, loras = await self.registry.get.remote()
        if version == self.lora_version:
            return
        app = self.app

        def adopt(cancel) -> None:
            app.state.base_loras = loras
            use_loras(app, None)

        for _ in range(600):  # bounded: the queue may be full of requests that came first; they run before it
            try:
                job = app.state.worker.submit(adopt)
                break
            except QueueFull:
                await asyncio.sleep(0.1)
        else:
            raise RuntimeError("the queue stayed full for 60 s: the LoRA set was not adopted")
        await asyncio.wrap_future(job.future)
        self.lora_version = version

    def check_health(self) -> None:
        """Serve's probe: raising marks this replica unhealthy, and Serve replaces it."""
        worker = self.app.state.worker
        if not self.app.state.ready or not worker.thread.is_alive() or worker.fatal:
            raise RuntimeError(f"replica not ready (fatal: {worker.fatal})")

    def __del__(self):
        if hasattr(self, "app"):
            stop(self.app)


def build(
    config_path: str,
    num_replicas: int | str = 1,
    gpus_per_replica: float | str = 1,
    max_queue_size: int | str = 8,
    max_queued_requests: int | str = 64,
    min_replicas: int | str | None = None,
    max_replicas: int | str | None = None,
    overrides: dict | None = None,
    settings: dict | None = None,
) -> serve.Application:
    """The Serve application: `num_replicas` (or autoscaling between `min_replicas` and `max_replicas`), each with
    `gpus_per_replica` GPUs (0 on CPU-only clusters)."""
    max_queue_size = int(max_queue_size)
    options: dict[str, Any] = {
        "ray_actor_options": {"num_gpus": float(gpus_per_replica), "num_cpus": 1},
        # below the replica's own capacity (its running job and its queue), leaving room for a LoRA adoption and
        # for the router admitting one more than asked under load: our app's 429 stays the rare case
        "max_ongoing_requests": max(max_queue_size, 1),
        "max_queued_requests": int(max_queued_requests),
        "health_check_period_s": 10,
        "health_check_timeout_s": 30,
        "graceful_shutdown_timeout_s": 600,  # the running image finishes
    }
    if min_replicas is not None or max_replicas is not None:
        low = int(min_replicas or 1)
        options["autoscaling_config"] = {
            "min_replicas": low,
            "max_replicas": int(max_replicas or low),
            "target_ongoing_requests": 2,
        }
    else:
        options["num_replicas"] = int(num_replicas)
    deployment = serve.deployment(FluxReplica, name="flux", **options)
    settings = {"max_queue_size": max_queue_size, **(settings or {})}
    return deployment.bind(config_path, overrides or {}, settings)


def app(args: dict[str, str]) -> serve.Application:
    """`serve run ray_serve:app key=value ...` (the keys of `build`)."""
    return build(**args)
