"""OpenAI's Images API under /v1, for its official clients (`OpenAI(base_url=".../v1")`): `POST
/v1/images/generations`, `POST /v1/images/edits` (multipart: img2img), `GET /v1/models`. Jobs go through the
server's one worker queue like `/generate`; errors are OpenAI's shape (`{"error": {"message", "type", "param",
"code"}}`, invalid input 400 naming the param), the API key is the same bearer token.

`quality` picks a step count (`QUALITY_STEPS`; `num_steps` overrides it). Our own fields ride along in the body,
as the client's `extra_body` sends them: `seed`, `num_steps`, `guidance`, `loras`, `strength` (edits).
"""

import asyncio
import base64
import json
import time
from typing import Literal

from fastapi import APIRouter, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from images import FORMATS, open_image_bytes
from serving.generate import encode_all, generation
from serving.http_errors import RESPONSES
from serving.jobs import run_job
from serving.schemas import GenerateRequest, LoraChoice, parse
from util import DEFAULTS, LIMITS

router = APIRouter(prefix="/v1", responses=RESPONSES)
# `quality` -> denoising steps, by model (None: the model's default: 24 for flux-dev, 4 for flux-schnell)
QUALITY_STEPS = {
    "flux-dev": {"low": 12, "medium": 20, "high": 28, "standard": None, "hd": 32, "auto": None},
    "flux-schnell": {"low": 2, "medium": 3, "high": 4, "standard": None, "hd": 4, "auto": None},
}
DEFAULT_SIZE = "1024x1024"


def parse_size(size: str) -> tuple[int, int]:
    try:
        width, height = (int(side) for side in size.lower().split("x"))
    except ValueError:
        raise ValueError(f"size must be 'WIDTHxHEIGHT' or 'auto', got {size!r}") from None
    low, high, step = LIMITS.min_size, LIMITS.max_size, LIMITS.size_multiple
    if not (low <= width <= high and low <= height <= high) or width % step or height % step:
        raise ValueError(f"size sides must be multiples of {step} in [{low}, {high}], got {size}")
    if width * height > LIMITS.max_pixels:
        raise ValueError(f"size must be at most {LIMITS.max_pixels} pixels, got {size}")
    return width, height


class ImagesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=LIMITS.max_prompt_chars)
    model: str | None = Field(default=None, max_length=200, description="any name: the loaded model answers")
    n: int = Field(default=1, ge=1, le=LIMITS.max_images)
    size: str = Field(default="auto", max_length=20, description="'WIDTHxHEIGHT' (multiples of 16) or 'auto'")
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: Literal[tuple(FORMATS)] = "png"
    output_compression: int | None = Field(default=None, ge=0, le=100, description="JPEG/WebP quality")
    quality: Literal["low", "medium", "high", "standard", "hd", "auto"] = "auto"
    style: str | None = Field(default=None, max_length=50, description="accepted, not used")
    background: str | None = Field(default=None, max_length=50, description="accepted, not used")
    moderation: str | None = Field(default=None, max_length=50, description="accepted, not used")
    user: str | None = Field(default=None, max_length=500, description="accepted, logged with the request")
    # ours, as `extra_body`
    seed: int | None = Field(default=None, ge=0, le=LIMITS.max_seed)
    num_steps: int | None = Field(default=None, ge=1, le=LIMITS.max_steps)
    guidance: float = Field(default=DEFAULTS.guidance, ge=0, le=LIMITS.max_guidance, allow_inf_nan=False)
    loras: list[LoraChoice] | None = Field(default=None, max_length=8)
    strength: float = Field(default=0.8, ge=0, le=1, allow_inf_nan=False, description="edits: how much changes")

    @field_validator("size")
    @classmethod
    def _size(cls, value: str) -> str:
        if value != "auto":
            parse_size(value)
        return value


def generate_request(app, body: ImagesRequest, size: str, image=None) -> GenerateRequest:
    """The `/generate` request an Images API request amounts to."""
    width, height = parse_size(size)
    steps = body.num_steps or QUALITY_STEPS[app.state.pipeline.config.version][body.quality]
    request = GenerateRequest.model_validate(
        {
            "prompt": body.prompt,
            "width": width,
            "height": height,
            "num_steps": steps,
            "guidance": body.guidance,
            "seed": body.seed,
            "num_images": body.n,
            "output_format": body.output_format,
            "jpeg_quality": body.output_compression or DEFAULTS.jpeg_quality,
            "strength": body.strength,
            "loras": None if body.loras is None else [lora.model_dump() for lora in body.loras],
        }  # fmt: skip
    )
    request._image = image
    if image is None:
        request.strength = 1.0
    return request


async def answer(request: Request, body: ImagesRequest, job: GenerateRequest) -> JSONResponse:
    images, _ = await run_job(generation(request.app, job), request)
    metadata = request.app.state.settings.metadata
    encoded = await asyncio.to_thread(encode_all, images, job.output_format, job.jpeg_quality, metadata)
    data = []
    for image, blob in zip(images, encoded, strict=True):
        b64 = base64.b64encode(blob).decode()
        url = f"data:{FORMATS[job.output_format]};base64,{b64}"  # a data URL: no file is kept to link to
        item = {"b64_json": b64} if body.response_format == "b64_json" else {"url": url}
        data.append({**item, "revised_prompt": body.prompt, "seed": image.info["seed"]})
    width, height = job.width, job.height
    return JSONResponse(
        {"created": int(time.time()), "data": data, "output_format": job.output_format, "size": f"{width}x{height}"}
    )


@router.post("/images/generations")
async def generations(request: Request) -> JSONResponse:
    body = await parse(request, ImagesRequest)
    size = DEFAULT_SIZE if body.size == "auto" else body.size
    return await answer(request, body, generate_request(request.app, body, size))


MAX_FORM_FIELDS = 40


@router.post("/images/edits")
async def edits(request: Request) -> JSONResponse:
    """Multipart: `image` (a file; the first of `image[]`), `prompt`, and the generation fields as text."""
    form = await request.form(max_files=4, max_fields=MAX_FORM_FIELDS, max_part_size=256 * 1024)
    files = [value for key, value in form.multi_items() if key in ("image", "image[]") and hasattr(value, "read")]
    if not files:
        raise invalid("image", "an image file is required (multipart field 'image')")
    if "mask" in form:
        raise invalid("mask", "masks are not supported: the whole image is edited (use strength)")
    fields = {k: v for k, v in form.multi_items() if isinstance(v, str) and k not in ("image", "image[]")}
    try:
        body = ImagesRequest.model_validate(coerce_form(fields))
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_input=False, include_url=False)) from None
    raw = await files[0].read()
    image = await asyncio.to_thread(open_image_bytes, raw)
    size = body.size if body.size != "auto" else auto_size(*image.size)
    return await answer(request, body, generate_request(request.app, body, size, image.convert("RGB")))


def coerce_form(fields: dict[str, str]) -> dict:
    """Multipart fields are text: numbers and lists (`loras` as JSON) made what the JSON body would hold."""
    out: dict = {}
    for key, value in fields.items():
        if key in ("n", "seed", "num_steps", "output_compression"):
            out[key] = int(value) if value.strip().lstrip("-").isdigit() else value
        elif key in ("guidance", "strength"):
            try:
                out[key] = float(value)
            except ValueError:
                out[key] = value
        elif key == "loras":
            try:
                out[key] = json.loads(value)
            except ValueError:
                out[key] = value
        else:
            out[key] = value
    return out


def auto_size(width: int, height: int) -> str:
    """The input image's size, scaled into the limits and rounded to multiples of 16."""
    scale = min(1.0, (LIMITS.max_pixels / (width * height)) ** 0.5, LIMITS.max_size / max(width, height))
    step = LIMITS.size_multiple
    w, h = (max(LIMITS.min_size, min(LIMITS.max_size, round(side * scale / step) * step)) for side in (width, height))
    return f"{w}x{h}"


def invalid(param: str, message: str) -> RequestValidationError:
    return RequestValidationError([{"loc": (param,), "msg": message, "type": "invalid"}])


@router.get("/models")
async def models(request: Request) -> JSONResponse:
    return JSONResponse({"object": "list", "data": [model_card(request)]})


@router.get("/models/{model_id}")
async def model(model_id: str, request: Request) -> JSONResponse:
    card = model_card(request)
    if model_id != card["id"]:
        raise HTTPException(404, f"no model {model_id!r}; this server has {card['id']!r}")
    return JSONResponse(card)


def model_card(request: Request) -> dict:
    version = request.app.state.pipeline.config.version
    return {"id": version, "object": "model", "created": 0, "owned_by": "flux-fp8-api"}
