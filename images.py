"""Images in and out: decoding user images (img2img inputs) into autoencoder inputs, and encoding generated images
as JPEG, PNG or WebP. One home for both, shared by `FluxPipeline.generate` and the HTTP server."""

import base64
import binascii
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from errors import InvalidInput

MAX_INPUT_PIXELS = 64 * 1024 * 1024  # refuse decompression bombs before decoding them


def decode_base64_image(data: str) -> Image.Image:
    """A base64 string or a `data:image/...;base64,` URL -> PIL image; InvalidInput if it is neither."""
    if data.startswith("data:"):
        header, _, data = data.partition(",")
        if ";base64" not in header:
            raise InvalidInput("init_image data URL must be base64-encoded")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput("init_image is not valid base64") from None
    return open_image_bytes(raw)


def open_image_bytes(raw: bytes) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(raw))
        if image.width * image.height > MAX_INPUT_PIXELS:
            raise InvalidInput(f"init_image is {image.width}x{image.height}: too many pixels")
        image.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise InvalidInput(f"init_image could not be decoded as an image ({type(e).__name__})") from None
    return image


def load_image(value: Any, allow_path: bool = True) -> Image.Image:
    """PIL image, numpy array (H, W[, C]) uint8, uint8 tensor ((C, H, W) or (H, W, C)), base64 or data URL,
    or (Python API only) a local path -> RGB PIL image."""
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, np.ndarray):
        image = _from_array(value)
    elif isinstance(value, Tensor):
        array = value.detach().cpu()
        if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
            array = array.permute(1, 2, 0)
        image = _from_array(array.numpy())
    elif isinstance(value, (str, Path)):
        text = str(value)
        if allow_path and not text.startswith("data:") and len(text) < 4096 and Path(text).is_file():
            image = open_image_bytes(Path(text).read_bytes())
        else:
            image = decode_base64_image(text)
    else:
        raise InvalidInput(f"init_image of type {type(value).__name__} is not supported")
    return image.convert("RGB")


def _from_array(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8:
        raise InvalidInput(f"init_image arrays must be uint8, got {array.dtype}")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise InvalidInput(f"init_image array of shape {tuple(array.shape)} is not an image")
    return Image.fromarray(array)


def cover_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """Resize keeping the aspect ratio so the image covers width x height, then crop the centre."""
    scale = max(width / image.width, height / image.height)
    size = (max(width, math.ceil(image.width * scale)), max(height, math.ceil(image.height * scale)))
    image = image.resize(size, Image.Resampling.LANCZOS)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    return image.crop((left, top, left + width, top + height))


def to_tensor(image: Image.Image) -> Tensor:
    """RGB PIL image -> (1, 3, H, W) float32 in [-1, 1]."""
    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    return (array.permute(2, 0, 1).float() / 127.5 - 1.0)[None]


FORMATS = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}  # output format -> media type


def encode_image(image: Image.Image, fmt: str = "jpeg", quality: int = 99) -> bytes:
    """A generated image as JPEG, PNG (lossless; `quality` unused) or WebP bytes."""
    buffer = io.BytesIO()
    if fmt == "jpeg":
        # full-resolution colour at high quality: chroma subsampling would cost more than the quality buys
        image.save(buffer, format="JPEG", quality=quality, subsampling=0 if quality >= 90 else 2)
    elif fmt == "png":
        image.save(buffer, format="PNG")
    elif fmt == "webp":
        image.save(buffer, format="WEBP", quality=quality)
    else:
        raise InvalidInput(f"output format must be one of {sorted(FORMATS)}, got {fmt!r}")
    return buffer.getvalue()
