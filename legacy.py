"""The original flux-fp8-api's `FluxPipeline` surface, as thin aliases over ours: its attribute names (`name`,
`dtype`, `device_flux`, `offload_*`), its helpers (`set_seed`, `get_schedule`, `get_noise`, `into_bytes`,
`vae_decode`, ...) and its seed coercion. Kept apart so that `flux_pipeline` reads as the pipeline itself."""

import io
import math

import torch
from loguru import logger
from PIL import Image
from torch import Tensor

from errors import InvalidInput
from images import encode_image
from model_spec import DEFAULTS, LIMITS, TORCH_DTYPES
from modules import sampling


def coerce_seed(seed) -> int | None:
    """A seed as the original took it: an int in range as it is; a float, a numeric string or a negative number
    as `int(abs(seed))` modulo the range (with a warning when that changes the value); a non-numeric string
    a random seed (with a warning); None random. Booleans and non-finite numbers are refused."""
    if seed is None or (type(seed) is int and 0 <= seed <= LIMITS.max_seed):
        return seed
    if isinstance(seed, bool):
        raise InvalidInput(f"seed must be a number, got {seed!r}")
    value = seed
    if isinstance(seed, str):
        try:
            value = float(seed.strip()) if not seed.strip().lstrip("+-").isdigit() else int(seed.strip())
        except ValueError:
            logger.warning(f"seed {seed!r} is not a number: using a random seed")
            return None
    if not isinstance(value, (int, float)) or (isinstance(value, float) and not math.isfinite(value)):
        raise InvalidInput(f"seed must be a finite number, got {seed!r}")
    coerced = int(abs(value)) % (LIMITS.max_seed + 1)
    if coerced != value:
        logger.warning(f"seed {seed!r} used as {coerced}")
    return coerced


class OriginalSurface:
    """Mixed into `FluxPipeline`: what the original's scripts call on a pipeline. Needs `config`, `ae`,
    `flux_device`, `ae_device`, `text_enc_device` and `decode`."""

    @property
    def name(self) -> str:
        return self.config.version

    @property
    def dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.config.flow_dtype]

    @property
    def device_flux(self) -> torch.device:
        return self.flux_device

    @property
    def device_ae(self) -> torch.device:
        return self.ae_device

    @property
    def device_clip(self) -> torch.device:
        return self.text_enc_device

    @property
    def device_t5(self) -> torch.device:
        return self.text_enc_device

    @property
    def offload_text_encoder(self) -> bool:
        return self.config.offload_text_encoder

    @property
    def offload_vae(self) -> bool:
        return self.config.offload_vae

    @property
    def offload_flow(self) -> bool:
        return self.config.offload_flow

    def set_seed(self, seed=None, seed_globally: bool = False) -> int:
        """The seed a generation with `seed` uses (coerced as the original did; random for None)."""
        coerced = coerce_seed(seed)
        if coerced is None:
            coerced = int(torch.randint(0, LIMITS.max_seed, ()).item())
        if seed_globally:
            torch.manual_seed(coerced)
        return coerced

    @staticmethod
    def time_shift(mu: float, sigma: float, t: Tensor) -> Tensor:
        return sampling.time_shift(mu, sigma, t)

    @staticmethod
    def get_lin_function(x1: float = 256, y1: float = 0.5, x2: float = 4096, y2: float = 1.15):
        return sampling.get_lin_function(x1, y1, x2, y2)

    def get_schedule(
        self, num_steps: int, image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15, shift: bool = True
    ) -> list[float]:
        return sampling.get_schedule(num_steps, image_seq_len, base_shift, max_shift, shift)

    def get_noise(
        self,
        num_samples: int,
        height: int,
        width: int,
        generator: torch.Generator | None = None,
        dtype=None,
        device=None,
    ) -> Tensor:
        """(num_samples, 16, 2*ceil(h/16), 2*ceil(w/16)) latent noise; `generator` as given (default: a random
        seed), on `device` (default the flow device) in `dtype` (default the flow dtype)."""
        shape = (num_samples, 16, 2 * math.ceil(height / 16), 2 * math.ceil(width / 16))
        generator = generator or torch.Generator("cpu").manual_seed(self.set_seed())
        noise = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
        return noise.to(device or self.flux_device, dtype or self.dtype)

    def unpack(self, x: Tensor, height: int, width: int) -> Tensor:
        return sampling.unpack(x, height, width)

    @torch.inference_mode()
    def vae_decode(self, x: Tensor, height: int, width: int) -> Tensor:
        """Packed latents -> images (B, 3, H, W) in about [-1, 1], on the autoencoder's device."""
        with self._on(self.ae, self.ae_device, self.config.offload_vae):
            latents = sampling.unpack(x.float(), height, width).to(self.ae_device, self.ae.dtype)
            return self.ae.decode(latents).float()

    @torch.inference_mode()
    def into_bytes(self, x: Tensor, jpeg_quality: int = DEFAULTS.jpeg_quality) -> io.BytesIO:
        """JPEG of the first image of (B, 3, H, W) pixels in [-1, 1] (the original's one-image encoder)."""
        pixels = (127.5 * (x[0].float().clamp(-1, 1) + 1.0)).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        return io.BytesIO(encode_image(Image.fromarray(pixels), "jpeg", jpeg_quality))
