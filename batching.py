"""Several image requests of one size and step count as one batch through the flow model.

Each request keeps its own prompt, guidance, seeds, progress callback and cancel event; a batch of one is how a
single request runs, so both take the same path. The flow model's fp8 activations are scaled per token, so a
request's rows do not depend on the other rows of the batch; what can differ is the rounding of matmuls of a
different height (bench/RESULTS.md measures it).
"""

import functools
import itertools
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from loguru import logger
from PIL import Image
from torch import Tensor

from errors import Cancelled, InvalidInput
from images import PARAMETERS, load_image, parameters_text
from legacy import coerce_seed
from model_spec import DEFAULTS, LIMITS
from modules import sampling
from modules.sampling import StepCallback

Outcome = tuple[list[Image.Image], int] | BaseException  # (images, first seed) or why the request failed


@dataclass
class ImageRequest:
    """What may differ between the requests of one batch."""

    prompt: str
    guidance: float = DEFAULTS.guidance
    seed: int | None = None
    num_images: int = DEFAULTS.num_images
    prompt_emphasis: bool | None = None
    callback: StepCallback | None = None  # (step, total) after each step; raising stops this request
    cancel: threading.Event | None = None  # set: this request stops before its next step
    on_latents: Callable[[int, Tensor], None] | None = None  # its packed latents after each step (previews)

    def checked(self) -> "ImageRequest":
        if not isinstance(self.prompt, str):
            raise InvalidInput(f"prompt must be a string, got {type(self.prompt).__name__}")
        n = self.num_images
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidInput(f"num_images must be a positive integer, got {n!r}")
        if isinstance(self.guidance, bool) or not isinstance(self.guidance, (int, float)):
            raise InvalidInput(f"guidance must be a number, got {self.guidance!r}")
        if not math.isfinite(self.guidance):
            raise InvalidInput(f"guidance must be finite, got {self.guidance!r}")
        seed = coerce_seed(self.seed)  # "123", -5 and 3.0 work, as in the original
        if seed is None:
            seed = random.SystemRandom().randint(0, LIMITS.max_seed)
        self.seed = seed
        return self

    @property
    def seeds(self) -> list[int]:
        """One seed per image (seed, seed + 1, ...): each image is regenerated alone from its own seed."""
        return [(self.seed + i) % (LIMITS.max_seed + 1) for i in range(self.num_images)]


def size_of(width: int, height: int) -> tuple[int, int]:
    """The size a request runs at: checked, and floored to multiples of 16 (with a warning)."""
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidInput(f"{name} must be an integer, got {value!r}")
        if value < 16:
            raise InvalidInput(f"{name} must be at least 16, got {value}")
    floored = 16 * (width // 16), 16 * (height // 16)
    if floored != (width, height):
        logger.warning(f"size {width}x{height} is not a multiple of 16: using {floored[0]}x{floored[1]}")
    return floored


class _Rows:
    """Which requests of a batch are still running, and the outcome of those that stopped."""

    def __init__(self, requests: list[ImageRequest], on_outcome: Callable[[int, Outcome], None] | None):
        self.requests = requests
        self.on_outcome = on_outcome
        self.outcomes: dict[int, Outcome] = {}
        starts = [0, *itertools.accumulate(r.num_images for r in requests)]
        self.rows = [slice(a, b) for a, b in zip(starts[:-1], starts[1:], strict=True)]

    def active(self) -> list[int]:
        return [i for i in range(len(self.requests)) if i not in self.outcomes]

    def stop(self, i: int, why: BaseException) -> None:
        self.outcomes[i] = why
        if self.on_outcome is not None:
            self.on_outcome(i, why)
        if not self.active():  # nothing left to compute: the loop ends with the last one's reason
            raise why

    def before_step(self, step: int, total: int) -> None:
        for i in self.active():
            cancel = self.requests[i].cancel
            if cancel is not None and cancel.is_set():
                self.stop(i, Cancelled(f"cancelled before step {step} of {total}"))

    def after_step(self, step: int, total: int) -> None:
        for i in self.active():
            callback = self.requests[i].callback
            if callback is not None:
                try:
                    callback(step, total)
                except Exception as e:  # noqa: BLE001 - stops this request only (all of them: raised)
                    self.stop(i, e)

    def latents(self, step: int, img: Tensor) -> None:
        for i in self.active():
            if self.requests[i].on_latents is not None:
                self.requests[i].on_latents(step, img[self.rows[i]])


def _without_autograd(method):
    """`torch.inference_mode` around a pipeline method, or `no_grad` where quanto's 4-bit flow weights need it (they
    unpack with an in-place op that inference tensors refuse)."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        quanto_4bit = self.config.flow_quantization_dtype == "qint4"
        with torch.no_grad() if quanto_4bit else torch.inference_mode():
            return method(self, *args, **kwargs)

    return run


class PipelineBatching:
    """Mixed into `FluxPipeline`: `generate_batch`. Needs `lock`, `config`, `flux_device`, `encode_prompt`,
    `encode_image`, `decode`, `step_model`, `model`, `ae` and `_on`."""

    @_without_autograd
    def generate_batch(
        self,
        requests: list[ImageRequest],
        width: int = DEFAULTS.width,
        height: int = DEFAULTS.height,
        num_steps: int | None = None,
        init_image: Any = None,
        strength: float = DEFAULTS.strength,
        allow_image_path: bool = True,
        on_outcome: Callable[[int, Outcome], None] | None = None,
    ) -> list[Outcome]:
        """Run `requests` (same size and steps) as one batch; per request, its (images, seed) or the exception
        that stopped it (a cancel, a failing callback), in order. `on_outcome(index, outcome)` hears of each
        request as soon as it is settled (a cancelled one before the batch ends). Raises when every request
        stopped, or on an error that fails the whole batch. `init_image` (img2img) needs a batch of one."""
        num_steps = self.default_steps if num_steps is None else num_steps
        width, height = size_of(width, height)
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise InvalidInput(f"num_steps must be a positive integer, got {num_steps!r}")
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
            raise InvalidInput(f"strength must be in [0, 1], got {strength!r}")
        if not requests:
            return []
        if init_image is not None and len(requests) > 1:
            raise InvalidInput("img2img runs one request at a time")
        requests = [r.checked() for r in requests]
        init = None if init_image is None else load_image(init_image, allow_path=allow_image_path)
        with self.lock:
            rows = _Rows(requests, on_outcome)
            start = time.perf_counter()
            encoded = [self.encode_prompt(r.prompt, r.num_images, r.prompt_emphasis) for r in requests]
            txt, vec = torch.cat([t for t, _ in encoded]), torch.cat([v for _, v in encoded])
            _finish(txt)  # the phases' times in the log are the GPU's, not only the launches'
            t_text = time.perf_counter()
            seeds = [s for r in requests for s in r.seeds]
            batch = len(seeds)
            noise = torch.cat([sampling.get_noise(1, height, width, s) for s in seeds])
            img = sampling.pack(noise).to(self.flux_device)
            img_ids = sampling.img_ids(batch, height, width).to(self.flux_device)
            txt_ids = sampling.txt_ids(batch, txt.shape[1]).to(self.flux_device)
            guidance = torch.tensor([float(r.guidance) for r in requests for _ in range(r.num_images)])
            timesteps = sampling.get_schedule(num_steps, img.shape[1], shift=self.config.version == "flux-dev")
            if init is not None and strength < 1:
                # BFL img2img: skip the first steps and start from the noised encoding of the image
                timesteps = timesteps[int((1 - strength) * num_steps) :]
                with self._on(self.ae, self.ae_device, self.config.offload_vae):
                    x0 = sampling.pack(self.encode_image(init, width, height)).to(self.flux_device)
                img = timesteps[0] * img + (1 - timesteps[0]) * x0.expand_as(img)
            with self._on(self.model, self.flux_device, self.config.offload_flow):
                img = sampling.denoise(
                    self.step_model, img, img_ids, txt, txt_ids, vec, timesteps, guidance.to(self.flux_device),
                    rows.after_step, rows.before_step, rows.latents,
                )  # fmt: skip
            _finish(img)
            t_denoise = time.perf_counter()
            active = rows.active()
            with self._on(self.ae, self.ae_device, self.config.offload_vae):
                # one image at a time: a batch's decode would hold every image's activations at once
                images = {i: [self.decode(img[r : r + 1], height, width)[0] for r in _range(rows.rows[i])]
                          for i in active}  # fmt: skip
            what = f"{batch}x {width}x{height}" + (f" ({len(requests)} requests)" if len(requests) > 1 else "")
            logger.info(
                f"generated {what}, {num_steps} steps, seed {', '.join(str(requests[i].seed) for i in active)}: "
                f"text {t_text - start:.2f} s, denoise {t_denoise - t_text:.2f} s, "
                f"decode {time.perf_counter() - t_denoise:.2f} s"
            )
        extra = {"Denoising strength": strength} if init is not None else {}
        if self.loras.loaded:
            extra["LoRAs"] = '"' + ", ".join(f"{n}:{lora.scale:g}" for n, lora in self.loras.loaded.items()) + '"'
        for i in active:
            request = requests[i]
            settings = {
                "Steps": num_steps, "Sampler": "Euler", "Guidance": request.guidance, "Size": f"{width}x{height}",
                "Model": self.config.version, "Software": "flux-fp8-api", "AI generated": "yes", **extra,
            }  # fmt: skip
            for image, image_seed in zip(images[i], request.seeds, strict=True):
                params = {**settings, "Seed": image_seed}
                image.info[PARAMETERS] = parameters_text(request.prompt, params)
                image.info["seed"] = image_seed
            rows.outcomes[i] = (images[i], request.seed)
            if on_outcome is not None:
                on_outcome(i, rows.outcomes[i])
        return [rows.outcomes[i] for i in range(len(requests))]


def _range(rows: slice) -> range:
    return range(rows.start, rows.stop)


def _finish(x: Tensor) -> None:
    """Wait for the work queued on `x`'s GPU (nothing on the CPU)."""
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
