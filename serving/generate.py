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
):
    """The worker's job for a generation request: the request's LoRAs in place (or the server's own set), then the
    images, with the step times and totals in the metrics. Returns `run(cancel) -> (images, seed)`."""
    pipeline, metrics = app.state.pipeline, app.state.metrics
    wanted = resolve_request_loras(app, body.loras)

    def run(cancel: threading.Event):
        metrics.lora_swaps.inc(use_loras(app, wanted))
        step_timer = metrics.step_timer()

        def callback(step: int, total: int) -> None:
            step_timer(step, total)
            if progress is not None:
                progress(step, total)

        start = time.perf_counter()
        images, seed = pipeline.generate_images(
            body.prompt, body.width, body.height, body.num_steps, body.guidance, body.seed, body.num_images,
            callback=callback, cancel=cancel, init_image=body._image, strength=body.strength,
            allow_image_path=False, prompt_emphasis=body.prompt_emphasis, on_latents=on_latents,
        )  # fmt: skip
        metrics.generation(body.width, body.height, time.perf_counter() - start, len(images))
        return images, seed

    return run


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
