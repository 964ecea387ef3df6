"""GroupNorm (and the swish that follows it in the autoencoder) for NCHW activations, with statistics that use
the whole GPU.

PyTorch's CUDA GroupNorm computes each group's mean and variance in one thread block: B x 32 blocks for the
autoencoder, each reading up to 4 Mi values at 1024x1024 (128 channels, 1024x1024 pixels, 4 channels per
group): on an H200 those statistics took half of a 1024x1024 decode (profile in bench/RESULTS.md). Here three
kernels do the work: partial moments of 4096-value chunks (all SMs busy), one program per group
combining them (Chan's parallel formula, float32), then one pass that normalizes, applies the affine and,
where the model asks, the swish, writing the result once.

Each output is `x * a + b` in float32 with `a = rstd * weight` and `b = bias - a * mean`, rounded to the
activation dtype, as PyTorch computes it; the swish rounds its sigmoid and product to that dtype too, as the
torch ops do. The statistics stay in float32, as in PyTorch's CPU kernel, where its CUDA kernel (torch 2.11)
rounds the mean and 1/std to the activation dtype first: in bf16 that moves ~30% of the outputs (a group's mean
is off by up to 2^-9 of itself), so this kernel is closer to the exact values than `group_norm_reference` on
CUDA (GPU tests: against float64, and elementwise against the same formula with exact statistics).
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.common import ROUND as _ROUND
from kernels.common import available, tl, triton

CHUNK = 4096  # values per partial-moment program
MAX_GRID = 65535  # CUDA's limit on a grid's second dimension: 268 M values per group (a 4096x4096 decode has 67 M)


def group_norm_reference(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float, swish: bool) -> Tensor:
    y = F.group_norm(x, groups, weight, bias, eps)
    return y * torch.sigmoid(y) if swish else y


def group_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    groups: int,
    eps: float,
    swish: bool = False,
    use_kernel: bool = True,
    max_grid: int = MAX_GRID,
) -> Tensor:
    """`F.group_norm`, followed by `y * sigmoid(y)` when `swish`; the kernels where they run and `use_kernel`."""
    args = (x, weight, bias, groups, eps, swish)
    if (
        use_kernel
        and available(x)
        and x.ndim == 4
        and x.is_contiguous()
        and weight is not None
        and bias is not None
        and x.dtype in _ROUND
        and weight.device == x.device
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))  # no backward here
        and x.shape[1] // groups * x.shape[2] * x.shape[3] <= CHUNK * max_grid  # values per group
    ):
        return torch.ops.flux.group_norm(*args)
    return group_norm_reference(*args)


if triton is not None:

    @triton.jit
    def _moments_kernel(x_ptr, mean_ptr, m2_ptr, N, CHUNKS, BLOCK: tl.constexpr):
        """Mean and sum of squared deviations of one chunk of one group (the group's values are contiguous)."""
        row = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1)
        offs = chunk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        x = tl.load(x_ptr + row * N + offs, mask=mask, other=0.0).to(tl.float32)
        count = tl.minimum(N - chunk.to(tl.int64) * BLOCK, BLOCK).to(tl.float32)
        mean = tl.sum(x, axis=0) / count
        d = tl.where(mask, x - mean, 0.0)
        tl.store(mean_ptr + row * CHUNKS + chunk, mean)
        tl.store(m2_ptr + row * CHUNKS + chunk, tl.sum(d * d, axis=0))

    @triton.jit
    def _combine_kernel(mean_ptr, m2_ptr, out_ptr, N, CHUNKS, eps, BLOCK: tl.constexpr, CB: tl.constexpr):
        """A group's mean and 1/std from its chunks' moments: M2 = sum(M2_i) + sum(n_i (mean_i - mean)^2)."""
        row = tl.program_id(0).to(tl.int64)
        base = row * CHUNKS
        acc = tl.zeros([CB], dtype=tl.float32)
        for start in range(0, CHUNKS, CB):
            c = start + tl.arange(0, CB)
            count = tl.minimum(N - c.to(tl.int64) * BLOCK, BLOCK).to(tl.float32)
            m = tl.load(mean_ptr + base + c, mask=c < CHUNKS, other=0.0)
            acc += tl.where(c < CHUNKS, m * count, 0.0)
        mean = tl.sum(acc, axis=0) / N
        acc = tl.zeros([CB], dtype=tl.float32)
        for start in range(0, CHUNKS, CB):
            c = start + tl.arange(0, CB)
            count = tl.minimum(N - c.to(tl.int64) * BLOCK, BLOCK).to(tl.float32)
            m = tl.load(mean_ptr + base + c, mask=c < CHUNKS, other=0.0)
            m2 = tl.load(m2_ptr + base + c, mask=c < CHUNKS, other=0.0)
            acc += tl.where(c < CHUNKS, m2 + count * (m - mean) * (m - mean), 0.0)
        var = tl.maximum(tl.sum(acc, axis=0) / N, 0.0)
        tl.store(out_ptr + row * 2, mean)
        tl.store(out_ptr + row * 2 + 1, tl.rsqrt(var + eps))  # PyTorch's kernel: rsqrtf

    @triton.jit
    def _apply_kernel(
        x_ptr, stats_ptr, w_ptr, b_ptr, y_ptr, C, HW, CPG,
        SWISH: tl.constexpr, ROUND: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        bc = tl.program_id(0).to(tl.int64)  # (batch, channel)
        channel = bc % C
        group = (bc // C) * (C // CPG) + channel // CPG
        mean = tl.load(stats_ptr + group * 2)
        rstd = tl.load(stats_ptr + group * 2 + 1)
        a = rstd * tl.load(w_ptr + channel).to(tl.float32)
        b = tl.load(b_ptr + channel).to(tl.float32) - a * mean
        offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < HW
        x = tl.load(x_ptr + bc * HW + offs, mask=mask, other=0.0).to(tl.float32)
        y = (x * a + b).to(ROUND)
        if SWISH:  # y * sigmoid(y), each op rounded to the activation dtype as the torch ops are
            yf = y.to(tl.float32)
            y = (yf * tl.sigmoid(yf).to(ROUND).to(tl.float32)).to(ROUND)
        tl.store(y_ptr + bc * HW + offs, y, mask=mask)

    @torch.library.custom_op("flux::group_norm", mutates_args=())
    def _group_norm_op(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float, swish: bool) -> Tensor:
        b, c, h, w = x.shape
        if c % groups:
            raise ValueError(f"{c} channels do not split into {groups} groups")
        y = torch.empty_like(x)
        if not x.numel():
            return y
        rows, n, hw = b * groups, (c // groups) * h * w, h * w
        chunks = triton.cdiv(n, CHUNK)
        moments = torch.empty((2, rows, chunks), dtype=torch.float32, device=x.device)
        stats = torch.empty((rows, 2), dtype=torch.float32, device=x.device)
        with torch.cuda.device(x.device):
            _moments_kernel[(rows, chunks)](x, moments[0], moments[1], n, chunks, BLOCK=CHUNK, num_warps=8)
            _combine_kernel[(rows,)](
                moments[0], moments[1], stats, n, chunks, eps, BLOCK=CHUNK, CB=min(1024, triton.next_power_of_2(chunks))
            )  # fmt: skip
            block = min(4096, triton.next_power_of_2(hw))
            _apply_kernel[(b * c, triton.cdiv(hw, block))](
                x, stats, weight, bias, y, c, hw, c // groups, SWISH=swish, ROUND=_ROUND[x.dtype], BLOCK=block,
                num_warps=8 if block >= 2048 else 4,
            )  # fmt: skip
        return y

    @_group_norm_op.register_fake
    def _(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float, swish: bool) -> Tensor:
        return torch.empty_like(x)
