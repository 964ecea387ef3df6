"""POST /generate: one image as bytes, or several as base64 JSON."""

import base64
import threading
import time
import uuid

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from loguru import logger

from images import FORMATS, encode_image
from serving.auth import require_api_key
from serving.jobs import run_job
from serving.schemas import GenerateRequest

router = APIRouter()


@router.post(
    "/generate",
    dependencies=[Depends(require_api_key)],
    responses={200: {"content": {media: {} for media in FORMATS.values()}}},
)
async def generate(body: GenerateRequest, request: Request) -> Response:
    request_id = (request.headers.get("x-request-id") or uuid.uuid4().hex)[:200]
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
        )

    images, seed = await run_job(run, request)
    elapsed = time.perf_counter() - start
    headers = {"X-Seed": str(seed), "X-Inference-Time": f"{elapsed:.3f}", "X-Request-Id": request_id}
    logger.info(
        f"request {request_id}: {body.num_images}x {body.width}x{body.height}, {body.num_steps} steps, "
        f"seed {seed}, {elapsed:.2f} s"
    )
    encoded = [encode_image(im, body.output_format, body.jpeg_quality) for im in images]
    if body.num_images == 1:
        return Response(encoded[0], media_type=FORMATS[body.output_format], headers=headers)
    return JSONResponse({"images": [base64.b64encode(b).decode() for b in encoded], "seed": seed}, headers=headers)
