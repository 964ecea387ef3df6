"""POST /generate: one image as bytes, or several as base64 JSON."""

import asyncio
import base64
import threading
import time
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from loguru import logger

from batching import ImageRequest
from images import FORMATS, encode_image
from serving.http_errors import RESPONSES
from serving.jobs import run_job
from serving.lora import resolve_request_loras, use_loras
from serving.schemas import GenerateRequest, documented, parse

router = APIRouter()


def generation(
    app,
    body: GenerateRequest,
    progress: Callable[[int, int], None] | None = None,
    on_latents: Callable[[int, Any], None] | None = None,
) -> "GenerationJob":
    """The worker's job for a generation request (see `GenerationJob`)."""
    return GenerationJob(app, body, progress, on_latents)


class GenerationJob:
    """A generation request on the worker: the request's LoRAs in place (or the server's own set), then the images,
    with the step times and totals in the metrics. Called with a cancel event it runs alone and returns (images,
    seed); `batch_key` tells the worker which waiting requests may run in one batch with it (`run_batch`): same
    size, steps and LoRA set, no input image, and a size the server batches (`ServerSettings.batch_max_pixels`)."""

    def __init__(self, app, body: GenerateRequest, progress=None, on_latents=None):
        self.app, self.body, self.progress, self.on_latents = app, body, progress, on_latents
        self.wanted = resolve_request_loras(app, body.loras)
        settings = app.state.settings
        steps = body.num_steps or app.state.pipeline.default_steps
        batchable = body._image is None and body.width * body.height <= settings.batch_max_pixels
        loras = None if self.wanted is None else tuple(sorted(self.wanted.items()))
        self.batch_key = (body.width, body.height, steps, loras) if batchable else None
        self.rows = body.num_images

    def request(self, cancel: threading.Event) -> ImageRequest:
        step_timer = self.app.state.metrics.step_timer()

        def callback(step: int, total: int) -> None:
            step_timer(step, total)
            if self.progress is not None:
                self.progress(step, total)

        body = self.body
        return ImageRequest(
            body.prompt, body.guidance, body.seed, body.num_images, body.prompt_emphasis, callback, cancel,
            self.on_latents,
        )  # fmt: skip

    def __call__(self, cancel: threading.Event):
        (outcome,) = self.run_batch([self], [cancel])  # alone, what stops it is raised
        return outcome

    @staticmethod
    def run_batch(jobs: "list[GenerationJob]", cancels: list[threading.Event], settle=None) -> list:
        """Run `jobs` (one `batch_key`) as one batch; per job its (images, seed) or its exception; `settle(index,
        outcome)` hears of each as soon as it is known."""
        first = jobs[0]
        app, body = first.app, first.body
        pipeline, metrics = app.state.pipeline, app.state.metrics
        metrics.lora_swaps.inc(use_loras(app, first.wanted))
        start = time.perf_counter()
        outcomes = pipeline.generate_batch(
            [job.request(cancel) for job, cancel in zip(jobs, cancels, strict=True)], body.width, body.height,
            body.num_steps, init_image=body._image, strength=body.strength, allow_image_path=False, on_outcome=settle,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        for outcome in outcomes:
            if not isinstance(outcome, BaseException):
                metrics.generation(body.width, body.height, seconds, len(outcome[0]))
        return outcomes


@router.post(
    "/generate",
    responses={200: {"content": {media: {} for media in FORMATS.values()}}, **RESPONSES},
    openapi_extra=documented(GenerateRequest),
)
async def generate(request: Request) -> Response:
    body = await parse(request, GenerateRequest)
    request_id = request.state.request_id
    start = time.perf_counter()
    pipeline = request.app.state.pipeline
    images, seed = await run_job(generation(request.app, body), request)
    elapsed = time.perf_counter() - start
    headers = {"X-Seed": str(seed), "X-Inference-Time": f"{elapsed:.3f}"}
    logger.info(
        f"request {request_id}: {body.num_images}x {body.width}x{body.height}, "
        f"{body.num_steps or pipeline.default_steps} steps, seed {seed}, {elapsed:.2f} s"
    )
    metadata = request.app.state.settings.metadata
    encoded = await asyncio.to_thread(encode_all, images, body.output_format, body.jpeg_quality, metadata)
    if body.num_images == 1:
        return Response(encoded[0], media_type=FORMATS[body.output_format], headers=headers)
    images_b64 = [base64.b64encode(b).decode() for b in encoded]
    seeds = [image.info["seed"] for image in images]  # each regenerates its image alone
    return JSONResponse({"images": images_b64, "seed": seed, "seeds": seeds}, headers=headers)


def encode_all(images: list, fmt: str, quality: int, metadata: bool = True) -> list[bytes]:
    # off the event loop: seconds for large PNGs
    return [encode_image(image, fmt, quality, metadata) for image in images]
