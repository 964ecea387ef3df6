"""Noise, schedule, latent packing and the Euler loop: pure functions, BFL semantics."""

import math
from collections.abc import Callable

import torch
from einops import rearrange, repeat
from torch import Tensor

StepCallback = Callable[[int, int], None]  # (step, total steps); may raise to stop the loop


def get_noise(num_samples: int, height: int, width: int, seed: int) -> Tensor:
    """Latent noise from a CPU generator, so the same seed gives the same image on any device (float32)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    shape = (num_samples, 16, 2 * math.ceil(height / 16), 2 * math.ceil(width / 16))
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def time_shift(mu: float, sigma: float, t: Tensor) -> Tensor:
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def get_lin_function(x1: float = 256, y1: float = 0.5, x2: float = 4096, y2: float = 1.15) -> Callable[[float], float]:
    m = (y2 - y1) / (x2 - x1)
    b = y1 - m * x1
    return lambda x: m * x + b


def get_schedule(
    num_steps: int, image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15, shift: bool = True
) -> list[float]:
    """Timesteps from 1 to 0 (num_steps + 1 values); shifted towards high noise for large images (dev)."""
    timesteps = torch.linspace(1, 0, num_steps + 1)
    if shift:
        mu = get_lin_function(y1=base_shift, y2=max_shift)(image_seq_len)
        timesteps = time_shift(mu, 1.0, timesteps)
    return timesteps.tolist()


def pack(latents: Tensor) -> Tensor:
    """(B, C, H, W) latents -> (B, H/2 * W/2, C * 4) tokens of 2x2 patches."""
    return rearrange(latents, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)


def unpack(x: Tensor, height: int, width: int) -> Tensor:
    """Inverse of `pack` for an image of height x width pixels."""
    return rearrange(
        x, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=math.ceil(height / 16), w=math.ceil(width / 16), ph=2, pw=2
    )


def img_ids(batch: int, height: int, width: int) -> Tensor:
    """(B, L_img, 3) float32 position ids: (0, patch row, patch column)."""
    h, w = math.ceil(height / 16), math.ceil(width / 16)
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w)[None, :]
    return repeat(ids, "h w c -> b (h w) c", b=batch)


def txt_ids(batch: int, length: int) -> Tensor:
    return torch.zeros(batch, length, 3)


def denoise(
    model: torch.nn.Module,
    img: Tensor,
    img_ids: Tensor,
    txt: Tensor,
    txt_ids: Tensor,
    vec: Tensor,
    timesteps: list[float],
    guidance: float | Tensor = 4.0,
    callback: StepCallback | None = None,
    before_step: StepCallback | None = None,
    on_latents: Callable[[int, Tensor], None] | None = None,
) -> Tensor:
    """Euler integration of the flow from timesteps[0] to timesteps[-1].

    `guidance`: one value, or one per row. `img` stays float32 between steps (the model sees it in its own
    dtype) so rounding does not accumulate.
    `callback(step, total)` runs after every step, `before_step(step, total)` before it (the step about to run,
    counted from 1): either may raise to stop the loop between steps. `on_latents(step, img)` sees the packed
    latents after each step (previews).
    A model with `modulation_table` (the flow model, or its CUDA-graph wrapper) gets every step's modulations
    computed up front, once per image.
    """
    batch = img.shape[0]
    if isinstance(guidance, Tensor):  # one value per row (a batch of requests)
        guidance_vec = guidance.to(img.device, torch.float32).expand(batch)
    else:
        guidance_vec = torch.full((batch,), guidance, device=img.device, dtype=torch.float32)
    total = len(timesteps) - 1
    table = None
    if hasattr(model, "modulation_table") and total:
        t_all = torch.tensor(timesteps[:-1], dtype=torch.float32, device=img.device)[:, None].expand(-1, batch)
        table = model.modulation_table(t_all, vec, guidance_vec)
    for step, (t_curr, t_prev) in enumerate(zip(timesteps[:-1], timesteps[1:], strict=True)):
        if before_step is not None:
            before_step(step + 1, total)
        t_vec = torch.full((batch,), t_curr, dtype=torch.float32, device=img.device)
        pred = model(
            img=img, img_ids=img_ids, txt=txt, txt_ids=txt_ids, y=vec, timesteps=t_vec, guidance=guidance_vec,
            **({} if table is None else {"mods": table[step]}),
        )  # fmt: skip
        img = img + (t_prev - t_curr) * pred.float()
        if on_latents is not None:
            on_latents(step + 1, img)
        if callback is not None:
            callback(step + 1, total)
    return img
