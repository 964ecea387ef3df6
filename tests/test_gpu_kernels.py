"""CUDA-only checks of the autoencoder's GroupNorm kernel (run with `python -m pytest -q -m gpu`)."""

import pytest
import torch
import torch.nn.functional as F

from kernels import group_norm as gn
from kernels.options import KernelOptions
from modules.autoencoder import AutoEncoder, AutoEncoderParams

pytestmark = pytest.mark.gpu


def _norm(channels: int, dtype: torch.dtype) -> torch.nn.GroupNorm:
    norm = torch.nn.GroupNorm(32, channels, eps=1e-6).cuda().to(dtype).requires_grad_(False)
    norm.weight.copy_(torch.randn(channels) * 0.5 + 1)
    norm.bias.copy_(torch.randn(channels) * 0.3)
    return norm


def apply(norm: torch.nn.GroupNorm, x: torch.Tensor, swish: bool, **kwargs) -> torch.Tensor:
    return gn.group_norm(x, norm.weight, norm.bias, norm.num_groups, norm.eps, swish, **kwargs)


def intended(x: torch.Tensor, norm: torch.nn.GroupNorm, swish: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's math with exact statistics: `x * a + b`, `a = rstd * weight`, `b = bias - a * mean`, rounded
    to the activation dtype, then the swish with its sigmoid and product rounded to it too. Also the size of the
    terms, `|a| (|x| + |mean|) + |bias|`, which bounds what float32 statistics can move."""
    b, c = x.shape[:2]
    groups = x.double().reshape(b, 32, -1)
    mean = groups.mean(-1).repeat_interleave(c // 32, 1)[..., None, None]
    rstd = (groups.var(-1, unbiased=False) + 1e-6).rsqrt().repeat_interleave(c // 32, 1)[..., None, None]
    a = rstd * norm.weight.double()[:, None, None]
    bias = norm.bias.double()[:, None, None]
    y = (x.double() * a + (bias - a * mean)).to(x.dtype)
    if swish:
        y = (y.double() * torch.sigmoid(y.double()).to(x.dtype).double()).to(x.dtype)
    return y, a.abs() * (x.double().abs() + mean.abs()) + bias.abs()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("swish", [False, True])
@pytest.mark.parametrize(
    "shape,offset",
    [
        ((2, 64, 37, 53), 0.0),  # odd sizes: one partial chunk per group
        ((1, 128, 96, 96), 0.0),  # 36,864 values per group: nine chunks, the last partial
        ((1, 64, 96, 96), 40.0),  # mean 400x the spread: the statistics must not cancel
        ((1, 128, 1040, 1040), 0.0),  # 1,057 chunks per group: the combine loops (as at 1024x1024, 256 channels)
    ],
)
@torch.no_grad()
def test_group_norm_kernel(dtype, swish, shape, offset):
    torch.manual_seed(0)
    x = (torch.randn(shape, device="cuda") * 0.1 + offset).to(dtype)
    x[0, 3, 5, 7] = offset + 3  # an outlier
    norm = _norm(shape[1], dtype)
    out = apply(norm, x, swish)
    assert out.shape == x.shape and out.dtype == dtype
    # the intended values, but where float32 statistics (summed in chunks) tip a rounding to the activation
    # dtype the other way: one step of it (which the swish can grow ~4x, where y ~ -5), or a few float32 ulps of
    # the terms
    want, terms = intended(x, norm, swish)
    stats = 16 * torch.finfo(torch.float32).eps
    steps = (6 if swish else 2) * torch.finfo(dtype).eps
    diff = (out.double() - want.double()).abs()
    assert (diff <= steps * want.double().abs() + stats * terms).all(), diff.max()
    if dtype != torch.float32 and not offset:  # a float32 mean 400 spreads away moves many roundings
        assert (out != want).float().mean() < 0.01
    # as accurate as PyTorch's CUDA GroupNorm, or more: it rounds the mean and 1/std to the activation dtype
    exact = F.group_norm(x.double(), 32, norm.weight.double(), norm.bias.double(), 1e-6)
    exact = exact * torch.sigmoid(exact) if swish else exact
    ref = gn.group_norm_reference(x, norm.weight, norm.bias, 32, 1e-6, swish)
    err, err_ref = ((t.double() - exact).norm() / exact.norm() for t in (out, ref))
    assert err <= err_ref * 1.05 + stats * (1 + offset / 0.1), (err, err_ref)


@torch.no_grad()
def test_group_norm_kernel_under_compile_and_fallbacks():
    torch.manual_seed(0)
    norm = _norm(64, torch.bfloat16)
    x = torch.randn(1, 64, 40, 40, device="cuda", dtype=torch.bfloat16)
    eager = apply(norm, x, True)
    compiled = torch.compile(lambda t: apply(norm, t, True), fullgraph=True)(x)
    assert torch.equal(compiled, eager)
    # channels_last input (the kernel reads NCHW) takes the torch ops, with the torch ops' values
    cl = x.to(memory_format=torch.channels_last)
    expected = gn.group_norm_reference(cl, norm.weight, norm.bias, 32, 1e-6, True)
    assert torch.equal(apply(norm, cl, True), expected)
    # an input that needs a gradient takes the torch ops too: the kernel has no backward
    with torch.enable_grad():
        xg = x.clone().requires_grad_()
        apply(norm, xg, True).float().sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    # groups too large for the launch grid take the torch ops (here: more than one chunk per group)
    big = torch.randn(1, 64, 50, 50, device="cuda", dtype=torch.bfloat16)
    expected = gn.group_norm_reference(big, norm.weight, norm.bias, 32, 1e-6, True)
    assert torch.equal(apply(norm, big, True, max_grid=1), expected)


@torch.no_grad()
def test_autoencoder_decode_with_kernel_is_as_accurate_as_torch_ops():
    params = AutoEncoderParams(
        resolution=64, in_channels=3, ch=32, out_ch=3, ch_mult=[1, 2], num_res_blocks=1, z_channels=4,
        scale_factor=0.3611, shift_factor=0.1159,
    )  # fmt: skip
    torch.manual_seed(0)
    ae = AutoEncoder(params).cuda().eval().requires_grad_(False)
    z = torch.randn(1, 4, 24, 20, device="cuda")
    exact = ae.double().decode(z.double())
    ae.to(torch.bfloat16)
    out = ae.decode(z.bfloat16())
    ae.set_kernel_options(KernelOptions(group_norm=False))
    ref = ae.decode(z.bfloat16())
    assert out.shape == ref.shape == exact.shape == (1, 3, 48, 40)
    err, err_ref = ((t.double() - exact).norm() / exact.norm() for t in (out, ref))
    assert err <= err_ref * 1.1, (err, err_ref)
