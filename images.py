"""Images in and out: decoding user images (img2img inputs) into autoencoder inputs, and encoding generated images
as JPEG, PNG or WebP. One home for both, shared by `FluxPipeline.generate` and the HTTP server."""

import base64
import binascii
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo
from torch import Tensor

from errors import InvalidInput

MAX_INPUT_PIXELS = 6000 * 6000  # a large camera photo; refused before decoding (memory grows 4 bytes a pixel)
MAX_ASPECT = 64  # longest side over shortest: past this an image is a strip, not a picture to start from
DECODERS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")  # the common raster formats; Pillow knows many more


def decode_base64_image(data: str | bytes | memoryview) -> Image.Image:
    """A base64 string or a `data:image/...;base64,` URL -> PIL image; InvalidInput if it is neither. Line breaks
    and spaces inside the base64 (as `base64` tools wrap it) are allowed."""
    if isinstance(data, str):
        try:
            data = data.encode("ascii")
        except UnicodeEncodeError:
            raise InvalidInput("init_image is not valid base64") from None
    if bytes(data[:5]) == b"data:":
        comma = bytes(data[:256]).find(b",")
        if comma < 0 or b";base64" not in bytes(data[:comma]):
            raise InvalidInput("init_image data URL must be base64-encoded")
        data = data[comma + 1 :]
    return open_image_bytes(b64decode_chunked(data))


B64_CHUNK = 256 * 1024
_WHITESPACE = b" \t\r\n\v\f"


def b64decode_chunked(data: bytes | memoryview) -> bytes:
    """Strict base64 (whitespace ignored) decoded 256 KB at a time: each step holds the interpreter lock for a
    millisecond or two, where one call over a 20 MB image would hold it, and stall the server, for 100 ms."""
    out, carry = [], b""
    try:
        for i in range(0, len(data), B64_CHUNK):
            piece = carry + bytes(data[i : i + B64_CHUNK]).translate(None, _WHITESPACE)
            cut = len(piece) - len(piece) % 4
            out.append(base64.b64decode(piece[:cut], validate=True))
            carry = piece[cut:]
        if carry:
            raise ValueError("incomplete")
    except (binascii.Error, ValueError):
        raise InvalidInput("init_image is not valid base64") from None
    return b"".join(out)


def open_image_bytes(raw: bytes) -> Image.Image:
    """Decode one image of the `DECODERS` formats, its size checked before its pixels are decoded."""
    try:
        image = Image.open(io.BytesIO(raw), formats=DECODERS)
        w, h = image.size
        if w * h > MAX_INPUT_PIXELS:
            raise InvalidInput(f"init_image is {w}x{h}: more than {MAX_INPUT_PIXELS} pixels")
        if min(w, h) < 1 or max(w, h) > MAX_ASPECT * min(w, h):
            raise InvalidInput(f"init_image is {w}x{h}: sides more than {MAX_ASPECT} times apart")
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
    """The centre of the image at the width:height aspect, resized to width x height: the image covers the output
    with no border. Cropped before resizing, so the work is bounded by the output size and the crop, never by a
    resized copy of the whole image."""
    w, h = image.size
    crop_w, crop_h = (h * width / height, h) if w * height > h * width else (w, w * height / width)
    if crop_w < 1 or crop_h < 1:
        raise InvalidInput(f"init_image of {w}x{h} has no {width}:{height} region to start from")
    left, top = (w - crop_w) / 2, (h - crop_h) / 2
    return image.resize((width, height), Image.Resampling.LANCZOS, box=(left, top, left + crop_w, top + crop_h))


def to_tensor(image: Image.Image) -> Tensor:
    """RGB PIL image -> (1, 3, H, W) float32 in [-1, 1]."""
    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    return (array.permute(2, 0, 1).float() / 127.5 - 1.0)[None]


FORMATS = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}  # output format -> media type


PARAMETERS = "parameters"  # the key A1111, ComfyUI and image viewers read generation parameters from
# IPTC's digital source type for media made by a trained model: what "AI generated" labels read
AI_SOURCE = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
XMP = (
    '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    '<rdf:Description xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/" '
    'xmlns:dc="http://purl.org/dc/elements/1.1/" Iptc4xmpExt:DigitalSourceType="{source}">'
    '<dc:description><rdf:Alt><rdf:li xml:lang="x-default">{text}</rdf:li></rdf:Alt></dc:description>'
    "</rdf:Description></rdf:RDF></x:xmpmeta>"
)


def parameters_text(prompt: str, settings: dict) -> str:
    """Generation parameters in A1111's layout: the prompt, then one line of `Key: value` pairs."""
    return prompt + "\n" + ", ".join(f"{key}: {value}" for key, value in settings.items())


def encode_image(image: Image.Image, fmt: str = "jpeg", quality: int = 99, metadata: bool = True) -> bytes:
    """A generated image as JPEG, PNG (lossless; `quality` unused) or WebP bytes. With `metadata`, the image's
    `info["parameters"]` (set by `FluxPipeline.generate_images`) is written where tools look for it: a PNG text
    chunk `parameters`, or EXIF (ImageDescription, UserComment) and XMP for JPEG and WebP, with the IPTC mark of
    AI-generated media."""
    buffer = io.BytesIO()
    text = image.info.get(PARAMETERS) if metadata else None
    extra: dict[str, Any] = {}
    if text and fmt == "png":
        info = PngInfo()
        info.add_text(PARAMETERS, text)
        info.add_text("Software", "flux-fp8-api")
        info.add_text("DigitalSourceType", AI_SOURCE)
        extra["pnginfo"] = info
    elif text:
        exif = Image.Exif()
        exif[0x010E] = text  # ImageDescription
        exif[0x0131] = "flux-fp8-api"  # Software
        exif.get_ifd(0x8769)[0x9286] = b"UNICODE\x00" + text.encode("utf-16-be")  # UserComment, as A1111 writes it
        escaped = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        extra.update(exif=exif, xmp=XMP.format(source=AI_SOURCE, text=escaped).encode())
    if fmt == "jpeg":
        # full-resolution colour at high quality: chroma subsampling would cost more than the quality buys
        image.save(buffer, format="JPEG", quality=quality, subsampling=0 if quality >= 90 else 2, **extra)
    elif fmt == "png":
        image.save(buffer, format="PNG", **extra)
    elif fmt == "webp":
        image.save(buffer, format="WEBP", quality=quality, **extra)
    else:
        raise InvalidInput(f"output format must be one of {sorted(FORMATS)}, got {fmt!r}")
    return buffer.getvalue()


def read_parameters(data: bytes) -> str | None:
    """The parameters text an encoded image carries (PNG chunk, else EXIF ImageDescription), or None."""
    image = Image.open(io.BytesIO(data))
    return image.info.get(PARAMETERS) or image.getexif().get(0x010E)
