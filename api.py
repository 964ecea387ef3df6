"""The HTTP API: `create_app(pipeline, settings)` assembles the FastAPI app from `serving/`."""

import asyncio
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from loguru import logger

from flux_pipeline import FluxPipeline
from serving import generate, health, http_errors, job_routes, lora, openai_routes, ui
from serving import metrics as metrics_routes
from serving.auth import ApiKeyGuard
from serving.body_limit import BodyLimit
from serving.job_routes import JobRegistry
from serving.lora import current_loras
from serving.metrics import CountRequests, Metrics
from serving.request_context import RequestContext
from serving.settings import ServerSettings
from serving.worker import Worker

__all__ = ["ServerSettings", "app", "create_app", "start", "stop"]


def create_app(pipeline: FluxPipeline | None = None, settings: ServerSettings | None = None) -> FastAPI:
    """The app serving `pipeline`: its routes share one GPU worker with a queue of `settings.max_queue_size`.
    `app.state.drain()` (what SIGTERM calls) turns new requests away and drops the queued jobs. Without a
    pipeline, the one set as `app.state.model` before the server starts is served (the original's way)."""
    settings = settings or ServerSettings()
    worker = Worker(settings.max_queue_size, settings.max_batch)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        start(app)
        yield
        await asyncio.to_thread(stop, app)

    app = FastAPI(title="flux-fp8-api", lifespan=lifespan)
    metrics = Metrics(worker)
    worker.observe_wait = metrics.queue_seconds.observe
    worker.observe_error = lambda e: metrics.errors.labels(type(e).__name__).inc()
    worker.observe_batch = metrics.batch
    # outermost last: CORS answers preflights (they carry no key), every request is counted and gets its id,
    # then the key is checked, then the body is bounded as it is read
    app.add_middleware(BodyLimit)
    # the UI has its own login (a browser sends no bearer header)
    app.add_middleware(
        ApiKeyGuard, key=settings.api_key, public_docs=settings.public_docs, ui=settings.ui,
        public_metrics=settings.public_metrics,
    )  # fmt: skip
    app.add_middleware(RequestContext)
    app.add_middleware(CountRequests, metrics=metrics)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["*"], allow_headers=["*"],
            expose_headers=["X-Seed", "X-Request-Id", "X-Inference-Time"],
        )  # fmt: skip
    app.state.metrics = metrics
    app.state.jobs = JobRegistry()
    app.state.base_loras = {}
    app.state.pipeline = pipeline
    if pipeline is not None:
        app.state.model = pipeline  # the original's name for it
    app.state.settings = settings
    app.state.lora_dir = Path(settings.lora_dir).resolve() if settings.lora_dir else None
    app.state.worker = worker
    app.state.ready = False

    def drain() -> None:
        """SIGTERM: answer 503 from now on, fail the queued jobs, let the running one finish."""
        app.state.ready = False
        dropped = worker.drop_queued("server shutting down")
        logger.info(f"draining: {dropped} queued jobs dropped, {worker.running} running job finishing")

    app.state.drain = drain
    http_errors.install(app)
    for module in (health, generate, lora, job_routes, openai_routes, metrics_routes):
        app.include_router(module.router)
    build_schema = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:  # the error shape every documented error status refers to
            schema = build_schema()
            schema.setdefault("components", {}).setdefault("schemas", {})["Error"] = http_errors.ERROR_SCHEMA
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    if settings.ui:
        if pipeline is None:
            raise ValueError("the web UI needs the pipeline given to create_app")
        ui.mount(app, settings)
    return app


def start(app: FastAPI) -> None:
    """What the app's lifespan does first (and a host that runs no lifespan, Ray Serve, calls): the pipeline
    found, the worker started, ready."""
    if app.state.pipeline is None:
        app.state.pipeline = getattr(app.state, "model", None)
    if app.state.pipeline is None:
        raise RuntimeError("no pipeline: set app.state.model = FluxPipeline.load_pipeline_from_config_path(...)")
    app.state.model = app.state.pipeline
    app.state.base_loras = current_loras(app.state.pipeline)  # what POST /lora changes; requests may differ
    app.state.worker.start()
    app.state.ready = True


def stop(app: FastAPI) -> None:
    """Not ready any more; the running job finishes, the queued ones fail."""
    app.state.ready = False
    app.state.worker.stop()


# The original's module-level app: `from api import app; app.state.model = pipeline; uvicorn.run(app, ...)`.
# It has the default settings (no API key, no LoRA directory); `create_app` is the way to choose them.
app = create_app()
