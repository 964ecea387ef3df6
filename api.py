"""The HTTP API: request models, routes, errors. The queue and worker live in server_queue.py."""

import asyncio
import base64
import io
import re
import secrets
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, Literal

import torch
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from loguru import logger
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from flux_pipeline import MAX_SEED, to_jpeg
from images import decode_base64_image
from modules.sampling import Cancelled
from server_queue import Job, QueueFull, Worker

MAX_PIXELS = 4_194_304
MAX_INIT_IMAGE_BYTES = 20 * 1024 * 1024
RETRY_AFTER_S = "10"


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
    init_image: str | None = Field(
        default=None,
        max_length=4 * MAX_INIT_IMAGE_BYTES // 3 + 128,
        description="base64 or data URL, at most 20 MB decoded",
    )
    num_images: int = Field(default=1, ge=1, le=4)
    output_format: Literal["jpeg", "png", "webp"] = "jpeg"
    jpeg_quality: int = Field(default=99, ge=1, le=100)
    _image: Image.Image | None = PrivateAttr(default=None)

    @field_validator("init_image")
    @classmethod
    def _decodable(cls, value: str | None) -> str | None:
        if value is not None:
            decode_base64_image(value)  # ValueError -> 422 naming init_image
        return value

    @model_validator(mode="after")
    def _pixels(self) -> "GenerateRequest":
        if self.width * self.height > MAX_PIXELS:
            raise ValueError(f"width*height must be at most {MAX_PIXELS}")
        if self.init_image is not None:
            self._image = decode_base64_image(self.init_image)
        return self


class LoraRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(
        default=None,
        min_length=1,
        max_length=1024,
        description="a .safetensors file inside the server's LoRA directory",
    )
    name: str | None = Field(default=None, min_length=1, max_length=200)
    scale: float = Field(default=1.0, ge=-10, le=10, allow_inf_nan=False)
    action: Literal["load", "unload"] = "load"

    @model_validator(mode="after")
    def _target(self) -> "LoraRequest":
        if self.path is None and (self.action == "load" or self.name is None):
            raise ValueError("path is required (unload also takes a name)")
        return self


MAX_BODY_BYTES = 32 * 1024 * 1024  # a 20 MB image in base64 plus the other fields


class BodyLimit:
    """ASGI middleware: 413 for request bodies over `limit` bytes, declared or streamed, before they are read."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await error(413, f"request body over {self.limit} bytes", "too_large")(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, f"request body over {self.limit} bytes")
            return message

        return await self.app(scope, limited_receive, send)


def error(status: int, message: str, kind: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status, headers=headers)


def resolve_lora_path(lora_dir: Path, requested: str) -> Path:
    """A path inside `lora_dir`, symlinks resolved before the containment check; HTTPException otherwise."""
    pure = PurePath(requested)
    if (
        "\x00" in requested
        or pure.is_absolute()
        or requested.startswith(("\\", "/"))
        or re.match(r"^[A-Za-z]:", requested)
    ):
        raise HTTPException(400, "path must be relative to the LoRA directory")
    if ".." in pure.parts or ".." in requested.replace("\\", "/").split("/"):
        raise HTTPException(400, "path may not contain '..'")
    if pure.suffix != ".safetensors":
        raise HTTPException(400, "only .safetensors LoRA files are accepted")
    root = lora_dir.resolve()
    full = (root / pure).resolve()
    if not full.is_relative_to(root):
        raise HTTPException(403, "path leads outside the LoRA directory")
    if not full.is_file():
        raise HTTPException(404, "no such LoRA file")
    return full


def encode_image(image: Image.Image, fmt: str, quality: int) -> bytes:
    if fmt == "jpeg":
        return to_jpeg(image, quality).getvalue()
    buffer = io.BytesIO()
    if fmt == "png":
        image.save(buffer, format="PNG")
    else:
        image.save(buffer, format="WEBP", quality=quality)
    return buffer.getvalue()


async def wait_for(job: Job, request: Request) -> Any:
    """The job's result; a client that goes away cancels it (dropped if queued, stopped between steps if running)."""
    wrapped = asyncio.wrap_future(job.future)
    while True:
        done, _ = await asyncio.wait({wrapped}, timeout=0.2)
        if done:
            return wrapped.result()
        if await request.is_disconnected():
            job.cancel.set()
            logger.info("client disconnected: its job is cancelled")
            return await wrapped


def create_app(pipeline, settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    worker = Worker(settings.max_queue_size)
    lora_dir = Path(settings.lora_dir).resolve() if settings.lora_dir else None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        app.state.ready = True
        yield
        app.state.ready = False
        await asyncio.to_thread(worker.stop)

    app = FastAPI(title="flux-fp8-api", lifespan=lifespan)
    app.add_middleware(BodyLimit)
    app.state.ready = False
    app.state.worker = worker

    def drain() -> None:
        """SIGTERM: answer 503 from now on, fail the queued jobs, let the running one finish."""
        app.state.ready = False
        dropped = worker.drop_queued("server shutting down")
        logger.info(f"draining: {dropped} queued jobs dropped, {worker.running} running job finishing")

    app.state.drain = drain

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"] if p != "body") or "body"
            problems.append(f"{loc}: {err['msg']}")
        return error(422, "; ".join(problems), "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kinds = {
            400: "invalid_request",
            401: "unauthorized",
            403: "forbidden",
            404: "not_found",
            405: "method_not_allowed",
            413: "too_large",
            429: "queue_full",
            503: "unavailable",
        }
        return error(exc.status_code, str(exc.detail), kinds.get(exc.status_code, "error"), exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.opt(exception=exc).error(f"{request.method} {request.url.path} failed")
        return error(500, "internal error", "internal_error")

    async def authorised(request: Request) -> None:
        if settings.api_key:
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {settings.api_key}".encode()):
                raise HTTPException(401, "missing or wrong API key", {"WWW-Authenticate": "Bearer"})

    def ready() -> None:
        if not app.state.ready:
            raise HTTPException(503, "server is starting or shutting down", {"Retry-After": RETRY_AFTER_S})

    async def run_job(fn, request: Request) -> Any:
        ready()
        try:
            job = worker.submit(fn)
        except QueueFull:
            raise HTTPException(429, "queue is full; retry later", {"Retry-After": RETRY_AFTER_S}) from None
        try:
            return await wait_for(job, request)
        except Cancelled as e:
            raise HTTPException(503, str(e), {"Retry-After": RETRY_AFTER_S}) from None
        except torch.cuda.OutOfMemoryError:
            logger.error("out of GPU memory; the request failed, the server goes on")
            torch.cuda.empty_cache()
            raise HTTPException(503, "out of GPU memory; try a smaller size or fewer images") from None

    @app.get("/health")
    async def health() -> JSONResponse:
        body = {
            "status": "ok" if app.state.ready else "unavailable",
            "queued": worker.jobs.qsize(),
            "running": worker.running,
            "completed": worker.completed,
            "cancelled": worker.cancelled,
        }
        return JSONResponse(body, status_code=200 if app.state.ready else 503)

    @app.post(
        "/generate",
        dependencies=[Depends(authorised)],
        responses={200: {"content": {"image/jpeg": {}, "image/png": {}, "image/webp": {}}}},
    )
    async def generate(body: GenerateRequest, request: Request) -> Response:
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        start = time.perf_counter()

        def run(cancel: threading.Event):
            return pipeline.generate_images(
                body.prompt,
                body.width,
                body.height,
                body.num_steps,
                body.guidance,
                body.seed,
                body.num_images,
                cancel=cancel,
                init_image=body._image,
                strength=body.strength,
                allow_image_path=False,
            )

        images, seed = await run_job(run, request)
        elapsed = time.perf_counter() - start
        headers = {"X-Seed": str(seed), "X-Inference-Time": f"{elapsed:.3f}", "X-Request-Id": request_id[:200]}
        logger.info(
            f"request {request_id[:200]}: {body.num_images}x {body.width}x{body.height}, {body.num_steps} "
            f"steps, seed {seed}, {elapsed:.2f} s"
        )
        encoded = [encode_image(im, body.output_format, body.jpeg_quality) for im in images]
        if body.num_images == 1:
            return Response(encoded[0], media_type=f"image/{body.output_format}", headers=headers)
        return JSONResponse({"images": [base64.b64encode(b).decode() for b in encoded], "seed": seed}, headers=headers)

    def shown_path(path: str | None) -> str | None:
        if path is None or lora_dir is None:
            return None
        p = Path(path)
        return str(p.relative_to(lora_dir)) if p.is_relative_to(lora_dir) else p.name

    @app.get("/lora", dependencies=[Depends(authorised)])
    async def list_loras() -> JSONResponse:
        loras = [dict(lora, path=shown_path(lora["path"])) for lora in pipeline.list_loras()]
        return JSONResponse({"loras": loras})

    @app.post("/lora", dependencies=[Depends(authorised)])
    async def lora(body: LoraRequest, request: Request) -> JSONResponse:
        if lora_dir is None:
            raise HTTPException(403, "LoRA loading is disabled: start the server with --lora-dir")
        if body.action == "load":
            full = resolve_lora_path(lora_dir, body.path)

            def load(cancel: threading.Event) -> str:
                return pipeline.load_lora(full, scale=body.scale, name=body.name)

            try:
                name = await run_job(load, request)
            except ValueError as e:
                raise HTTPException(400, f"not a usable LoRA: {e}".replace(str(lora_dir), "<lora-dir>")) from None
            return JSONResponse({"status": "loaded", "name": name, "scale": body.scale})

        key = body.name if body.name is not None else str(resolve_lora_path(lora_dir, body.path))

        def unload(cancel: threading.Event) -> None:
            pipeline.unload_lora(key)

        try:
            await run_job(unload, request)
        except KeyError:
            raise HTTPException(404, "that LoRA is not loaded") from None
        return JSONResponse({"status": "unloaded", "name": body.name or shown_path(key)})

    return app
