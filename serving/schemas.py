"""Request bodies, validated once at the edge (pydantic): limits from `util.LIMITS`, defaults from `util.DEFAULTS`."""

import asyncio
import contextlib
import threading
from typing import Literal

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, model_validator

from images import FORMATS, decode_base64_image
from serving.bodies import SMALL, parse_json, read_body
from util import DEFAULTS, LIMITS

MAX_INIT_IMAGE_CHARS = 4 * LIMITS.max_init_image_bytes // 3 + 128  # base64 of the limit, and a data URL's header
_SIZE = dict(ge=LIMITS.min_size, le=LIMITS.max_size, multiple_of=LIMITS.size_multiple)


class LoraChoice(BaseModel):
    """A LoRA for one request: a file inside the LoRA directory (`path`), or a `name` (a LoRA loaded with
    POST /lora, else the file `<name>.safetensors` there)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    path: str | None = Field(default=None, min_length=1, max_length=1024)
    name: str | None = Field(default=None, min_length=1, max_length=200)
    scale: float = Field(default=1.0, ge=-10, le=10, allow_inf_nan=False)

    @model_validator(mode="after")
    def _one(self) -> "LoraChoice":
        if (self.path is None) == (self.name is None):
            raise ValueError("give a path or a name")
        return self


MAX_REQUEST_LORAS = 8


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # strict: `true` is not 1 step, "7" is not a seed

    prompt: str = Field(max_length=LIMITS.max_prompt_chars)
    width: int = Field(default=DEFAULTS.width, **_SIZE)
    height: int = Field(default=DEFAULTS.height, **_SIZE)
    num_steps: int | None = Field(
        default=None, ge=1, le=LIMITS.max_steps, description="default 24; flux-schnell: 4 (it ignores guidance)"
    )
    guidance: float = Field(default=DEFAULTS.guidance, ge=0, le=LIMITS.max_guidance, allow_inf_nan=False)
    seed: int | None = Field(default=None, ge=0, le=LIMITS.max_seed)
    strength: float = Field(default=DEFAULTS.strength, ge=0, le=1, allow_inf_nan=False)
    init_image: str | None = Field(
        default=None,
        max_length=MAX_INIT_IMAGE_CHARS,
        description=f"base64 or data URL, at most {LIMITS.max_init_image_bytes // 2**20} MB decoded",
    )
    num_images: int = Field(default=DEFAULTS.num_images, ge=1, le=LIMITS.max_images)
    output_format: Literal[tuple(FORMATS)] = "jpeg"
    jpeg_quality: int = Field(default=DEFAULTS.jpeg_quality, ge=1, le=100)
    prompt_emphasis: bool | None = Field(default=None, description="(word:1.5) weights; default: the config's (on)")
    loras: list[LoraChoice] | None = Field(
        default=None,
        max_length=MAX_REQUEST_LORAS,
        description="LoRAs for this request only (none: the server's set from POST /lora; [] for no LoRA)",
    )
    _image: Image.Image | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _pixels(self, info: ValidationInfo) -> "GenerateRequest":
        if self.width * self.height > LIMITS.max_pixels:
            raise ValueError(f"width*height must be at most {LIMITS.max_pixels}")
        # a large init_image arrives cut out of the JSON (`serving.bodies`), its field left ""
        large = (info.context or {}).get("init_image")
        if large is not None and len(large) > MAX_INIT_IMAGE_CHARS:
            raise ValueError(f"init_image must be at most {LIMITS.max_init_image_bytes // 2**20} MB decoded")
        if self.init_image is not None:  # decoded once, here; its errors name init_image
            self._image = decode_base64_image(self.init_image if large is None else large)
        return self


class LoraRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

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


async def parse(request: Request, model: type[BaseModel]) -> BaseModel:
    """The request's JSON body as `model`, read and validated with the interpreter lock held only briefly at a time
    (`serving.bodies`), in a worker thread. Errors are the 422 the route's own validation gives."""
    raw = await read_body(request)  # bounded in size and time by `body_limit`
    return await asyncio.to_thread(_validated, model, raw)


# one large body at a time: the event loop competes for the interpreter lock with this one thread, not with one
# per upload (with four, it waited 150 ms for its turn)
_ONE_LARGE = threading.Lock()


def _validated(model: type[BaseModel], raw: bytearray) -> BaseModel:
    with _ONE_LARGE if len(raw) > SMALL else contextlib.nullcontext():
        return _validated_now(model, raw)


def _validated_now(model: type[BaseModel], raw: bytearray) -> BaseModel:
    data, init_image = parse_json(raw)
    if isinstance(data, dict):
        # unknown keys refused before validation: thousands of them cost one pass, not thousands of error objects
        extra = [key for key in data if key not in model.model_fields]
        if extra:
            errors = [
                {"loc": (k,), "msg": "Extra inputs are not permitted", "type": "extra_forbidden"} for k in extra[:9]
            ]
            if len(extra) > 9:
                errors.append({"loc": ("body",), "msg": f"{len(extra) - 9} more unknown fields", "type": "extra"})
            raise RequestValidationError(errors)
    try:
        return model.model_validate(data, context={"init_image": init_image})
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_input=False, include_url=False)) from None


def documented(model: type[BaseModel]) -> dict:
    """`openapi_extra` that documents `model` as the JSON request body of a route that reads it with `parse`."""
    schema = model.model_json_schema()
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
