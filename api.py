"""The HTTP API: request models, one GPU worker fed by a bounded queue, and the routes."""

import asyncio
import base64
import io
import queue
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from loguru import logger
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from modules.sampling import Cancelled

MAX_PIXELS = 2048 * 2048
MAX_SEED = 2**53 - 1


@dataclass
class ServerSettings:
    max_queue_size: int = 8
    api_key: str | None = None
    lora_dir: str | None = None


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(max_length=10_000)
    width: int = Field(default=720, ge=128, le=2048, multiple_of=16)
    height: int = Field(default=1024, ge=128, le=2048, multiple_of=16)
    num_steps: int = Field(default=24, ge=1, le=100)
    guidance: float = Field(default=3.5, ge=0, le=20, allow_inf_nan=False)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    strength: float = Field(default=1.0, ge=0, le=1, allow_inf_nan=False)
    init_image: str | None = Field(default=None, max_length=28_000_000)  # ~20 MB once base64-decoded
    num_images: int = Field(default=1, ge=1, le=4)
    output_format: Literal["jpeg", "png", "webp"] = "jpeg"
    jpeg_quality: int = Field(default=99, ge=1, le=100)

    @field_validator("init_image")
    @classmethod
    def _no_init_image(cls, value: str | None) -> str | None:
        if value is not None:
            raise ValueError("init_image (img2img) is not supported by this server yet")
        return value

    @model_validator(mode="after")
    def _pixels(self) -> "GenerateRequest":
        if self.width * self.height > MAX_PIXELS:
            raise ValueError(f"width*height must be at most {MAX_PIXELS}")
        return self


class QueueFull(Exception):
    pass


@dataclass
class Job:
    run: Callable[[threading.Event], Any]
    future: Future
    cancel: threading.Event


class Worker:
    """One thread runs the jobs, in order, from a bounded queue: never two generations at once."""

    def __init__(self, max_queue_size: int):
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue_size)
        self.thread = threading.Thread(target=self._loop, name="gpu-worker", daemon=True)
        self.running = 0

    def start(self) -> None:
        self.thread.start()

    def submit(self, run: Callable[[threading.Event], Any]) -> Job:
        job = Job(run, Future(), threading.Event())
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull from None
        return job

    def stop(self, timeout: float | None = None) -> None:
        """Finish the job that is running, drop the queued ones, end the thread."""
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.future.set_exception(Cancelled("server shutting down"))
        self.jobs.put(None)
        self.thread.join(timeout)

    def _loop(self) -> None:
        while (job := self.jobs.get()) is not None:
            if job.cancel.is_set() or not job.future.set_running_or_notify_cancel():
                continue
            self.running += 1
            try:
                job.future.set_result(job.run(job.cancel))
            except BaseException as e:  # noqa: BLE001 - handed to the waiting request
                job.future.set_exception(e)
            finally:
                self.running -= 1


def error(status: int, message: str, kind: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status, headers=headers)


def encode_image(image, fmt: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    if fmt == "jpeg":
        image.save(buffer, format="JPEG", quality=quality)
    elif fmt == "webp":
        image.save(buffer, format="WEBP", quality=quality)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


async def _wait(job: Job, request: Request) -> Any:
    """Await the job; a client that goes away cancels it (dropped if queued, stopped between steps if running)."""
    wrapped = asyncio.wrap_future(job.future)
    while True:
        done, _ = await asyncio.wait({wrapped}, timeout=0.25)
        if done:
            return wrapped.result()
        if await request.is_disconnected():
            job.cancel.set()
            logger.info("client disconnected: job cancelled")
            return await wrapped


def create_app(pipeline, settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    worker = Worker(settings.max_queue_size)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        app.state.ready = True
        yield
        app.state.ready = False  # /health answers 503 while the running job finishes
        await asyncio.to_thread(worker.stop)

    app = FastAPI(title="flux-fp8-api", lifespan=lifespan)
    app.state.worker = worker
    app.state.ready = False
    app.state.generations = 0  # how many times the pipeline ran (tests read it through /health)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            loc = [str(p) for p in err["loc"] if p != "body"]
            problems.append(f"{'.'.join(loc) or 'body'}: {err['msg']}")
        return error(422, "; ".join(problems), "invalid_request")

    def authorised(request: Request) -> bool:
        if not settings.api_key:
            return True
        given = request.headers.get("authorization", "")
        return secrets.compare_digest(given.encode(), f"Bearer {settings.api_key}".encode())

    @app.get("/health")
    async def health() -> JSONResponse:
        if not app.state.ready:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return JSONResponse(
            {
                "status": "ok",
                "queued": worker.jobs.qsize(),
                "running": worker.running,
                "generations": app.state.generations,
            }
        )

    @app.post("/generate")
    async def generate(body: GenerateRequest, request: Request) -> Response:
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        if not authorised(request):
            return error(401, "missing or wrong API key", "unauthorized")
        if not app.state.ready:
            return error(503, "server is not ready", "unavailable", {"Retry-After": "5"})

        def run(cancel: threading.Event):
            app.state.generations += 1
            return pipeline.generate_images(
                body.prompt,
                body.width,
                body.height,
                body.num_steps,
                body.guidance,
                body.seed,
                body.num_images,
                cancel=cancel,
            )

        start = time.perf_counter()
        try:
            job = worker.submit(run)
        except QueueFull:
            return error(429, "queue is full, retry later", "queue_full", {"Retry-After": "10"})
        try:
            images, seed = await _wait(job, request)
        except Cancelled as e:
            return error(503, str(e), "cancelled")
        except Exception as e:  # noqa: BLE001 - never a traceback to the client
            if type(e).__name__ == "OutOfMemoryError":
                logger.error(f"request {request_id}: out of GPU memory")
                return error(503, "out of GPU memory; try a smaller size or fewer images", "out_of_memory")
            logger.exception(f"request {request_id} failed")
            return error(500, "generation failed", "internal_error")
        elapsed = time.perf_counter() - start
        headers = {"X-Seed": str(seed), "X-Inference-Time": f"{elapsed:.3f}", "X-Request-Id": request_id}
        logger.info(
            f"request {request_id}: {body.num_images}x {body.width}x{body.height}, {body.num_steps} steps, "
            f"seed {seed}, {elapsed:.2f} s"
        )
        encoded = [encode_image(im, body.output_format, body.jpeg_quality) for im in images]
        if body.num_images == 1:
            return Response(encoded[0], media_type=f"image/{body.output_format}", headers=headers)
        return JSONResponse({"images": [base64.b64encode(b).decode() for b in encoded], "seed": seed}, headers=headers)

    return app
