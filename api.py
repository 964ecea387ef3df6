"""The HTTP API: `create_app(pipeline, settings)` assembles the FastAPI app from `serving/`."""

import asyncio
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from loguru import logger

from flux_pipeline import FluxPipeline
from serving import generate, health, http_errors, lora
from serving.body_limit import BodyLimit
from serving.settings import ServerSettings
from serving.worker import Worker

__all__ = ["ServerSettings", "create_app"]


def create_app(pipeline: FluxPipeline, settings: ServerSettings | None = None) -> FastAPI:
    """The app serving `pipeline`: its routes share one GPU worker with a queue of `settings.max_queue_size`.
    `app.state.drain()` (what SIGTERM calls) turns new requests away and drops the queued jobs."""
    settings = settings or ServerSettings()
    worker = Worker(settings.max_queue_size)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        app.state.ready = True
        yield
        app.state.ready = False
        await asyncio.to_thread(worker.stop)

    app = FastAPI(title="flux-fp8-api", lifespan=lifespan)
    app.add_middleware(BodyLimit)
    app.state.pipeline = pipeline
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
    for module in (health, generate, lora):
        app.include_router(module.router)
    return app
