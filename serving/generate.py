"""POST /generate: one image as bytes, or several as base64 JSON."""

import asyncio
import base64
import threading
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from loguru import logger

from images import FORMATS, encode_image
from serving.http_errors import RESPONSES
from serving.jobs import run_job
from serving.schemas import GenerateRequest, documented, parse

router = APIRouter()


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
            prompt_emphasis=body.prompt_emphasis,
        )

    images, seed = await run_job(run, request)
    elapsed = time.perf_counter() - start
    headers = {"X-Seed": str(seed), "X-Inference-Time": f"{elapsed:.3f}"}
    logger.info(
        f"request {request_id}: {body.num_images}x {body.width}x{body.height}, "
        f"{body.num_steps or pipeline.default_steps} steps, seed {seed}, {elapsed:.2f} s"
    )
    encoded = await asyncio.to_thread(encode_all, images, body.output_format, body.jpeg_quality)
    if body.num_images == 1:
        return Response(encoded[0], media_type=FORMATS[body.output_format], headers=headers)
    return JSONResponse({"images": [base64.b64encode(b).decode() for b in encoded], "seed": seed}, headers=headers)


def encode_all(images: list, fmt: str, quality: int) -> list[bytes]:
    return [encode_image(image, fmt, quality) for image in images]  # off the event loop: seconds for large PNGs
