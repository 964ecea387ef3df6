"""BFL's FLUX.1 autoencoder (16 latent channels, 8x downsampling), with BFL's key names."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from kernels.group_norm import group_norm
from kernels.options import KernelOptions


@dataclass
class AutoEncoderParams:
    resolution: int
    in_channels: int
    ch: int
    out_ch: int
    ch_mult: list[int]
    num_res_blocks: int
    z_channels: int
    scale_factor: float
    shift_factor: float


class GroupNorm(nn.GroupNorm):
    """`nn.GroupNorm` (same keys) that can apply the swish after it, both in one kernel (`kernels.group_norm`)."""

    use_kernel = True  # `AutoEncoder.set_kernel_options`

    def forward(self, x: Tensor, swish: bool = False) -> Tensor:
        return group_norm(x, self.weight, self.bias, self.num_groups, self.eps, swish, self.use_kernel)


def _norm(channels: int) -> GroupNorm:
    return GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class AttnBlock(nn.Module):
    """Single-head self-attention over pixels, with 1x1 convolutions as projections."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.norm = _norm(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        h_ = self.norm(x)
        q, k, v = self.q(h_), self.k(h_), self.v(h_)
        b, c, h, w = q.shape
        q, k, v = (rearrange(t, "b c h w -> b 1 (h w) c").contiguous() for t in (q, k, v))
        h_ = F.scaled_dot_product_attention(q, k, v)
        h_ = rearrange(h_, "b 1 (h w) c -> b c h w", h=h, w=w, c=c, b=b)
        return x + self.proj_out(h_)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    band_bytes = 0  # `AutoEncoder.set_kernel_options`: convolutions of larger inputs run in bands (`conv_in_bands`)

    def forward(self, x: Tensor) -> Tensor:
        h = conv_in_bands(self.conv1, self.norm1(x, swish=True), self.band_bytes)
        h = conv_in_bands(self.conv2, self.norm2(h, swish=True), self.band_bytes)
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class Downsample(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        # asymmetric padding (right, bottom), as in the original VQGAN
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


def conv_in_bands(conv: nn.Module, x: Tensor, band_bytes: int) -> Tensor:
    """`conv(x)` for a 3x3, stride 1, padding 1 convolution, made in bands of rows (each with one row of context on
    either side, zeros at the image's edges) when `x` is larger than `band_bytes`: cuDNN converts a whole NCHW
    input (and its output) to its own layout first, which at the decoder's full resolution held a gigabyte more
    than the output (bench/RESULTS.md, profile_decode). The bands' results are the same values."""
    b, c, h, w = x.shape
    size = x.numel() * x.element_size()
    plain = type(conv) is not nn.Conv2d or conv.kernel_size != (3, 3) or conv.stride != (1, 1) or conv.padding != (1, 1)
    if plain or not band_bytes or size <= band_bytes or h < 2:
        return conv(x)
    out = torch.empty((b, conv.out_channels, h, w), dtype=x.dtype, device=x.device)
    rows = max(1, h * band_bytes // size)
    for start in range(0, h, rows):
        stop = min(h, start + rows)
        band = x[:, :, max(0, start - 1) : min(h, stop + 1)]
        edges = (0, 0, int(start == 0), int(stop == h))
        if any(edges):
            band = F.pad(band, edges)
        out[:, :, start:stop] = F.conv2d(band, conv.weight, conv.bias, padding=(0, 1))
    return out


class Upsample(nn.Module):
    """2x nearest upsampling, then a 3x3 convolution. `band_bytes` > 0: where the upsampled tensor would be larger,
    it is made and convolved in bands of rows (each with the one row of context the convolution needs), so the
    whole upsampled tensor never exists: at 1024x1024 the last one would hold 512 MiB next to its output, and
    cuDNN's layout copies of it as much again."""

    band_bytes = 0  # `AutoEncoder.set_kernel_options`

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        big = 4 * x.numel() * x.element_size()
        if not self.band_bytes or big <= self.band_bytes or h < 2:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        out = torch.empty((b, self.conv.out_channels, 2 * h, 2 * w), dtype=x.dtype, device=x.device)
        rows = max(1, h * self.band_bytes // big)  # input rows per band
        for start in range(0, h, rows):
            stop = min(h, start + rows)
            lo, hi = max(0, start - 1), min(h, stop + 1)  # one input row of context each side, where there is one
            band = F.interpolate(x[:, :, lo:hi], scale_factor=2.0, mode="nearest")
            # upsampled rows 2*start-1 .. 2*stop (zeros outside the image, as the convolution's padding)
            top = band[:, :, 2 * (start - lo) - 1 :] if start > 0 else F.pad(band, (0, 0, 1, 0))
            cut = top.shape[2] - (2 * (hi - stop) - 1) if stop < h else None
            rows_in = top[:, :, :cut] if stop < h else F.pad(top, (0, 0, 0, 1))
            out[:, :, 2 * start : 2 * stop] = F.conv2d(rows_in, self.conv.weight, self.conv.bias, padding=(0, 1))
        return out


def _mid(block_in: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(block_in, block_in)
    mid.attn_1 = AttnBlock(block_in)
    mid.block_2 = ResnetBlock(block_in, block_in)
    return mid


class Encoder(nn.Module):
    def __init__(self, ch: int, ch_mult: list[int], num_res_blocks: int, in_channels: int, z_channels: int):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        in_ch_mult = (1, *ch_mult)
        self.down = nn.ModuleList()
        block_in = ch
        for i_level in range(self.num_resolutions):
            block = nn.ModuleList()
            block_in = ch * in_ch_mult[i_level]
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                block.append(ResnetBlock(block_in, block_out))
                block_in = block_out
            down = nn.Module()
            down.block = block
            down.attn = nn.ModuleList()  # empty in FLUX.1; kept for the key layout
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in)
            self.down.append(down)
        self.mid = _mid(block_in)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for i_level in range(self.num_resolutions):
            for i_block in range(self.num_res_blocks):
                h = self.down[i_level].block[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = self.down[i_level].downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(self.norm_out(h, swish=True))  # (B, 2*z, H/f, W/f): mean, log-variance


class Decoder(nn.Module):
    def __init__(self, ch: int, out_ch: int, ch_mult: list[int], num_res_blocks: int, z_channels: int):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = _mid(block_in)
        self.up = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            block = nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                block.append(ResnetBlock(block_in, block_out))
                block_in = block_out
            up = nn.Module()
            up.block = block
            up.attn = nn.ModuleList()
            if i_level != 0:
                up.upsample = Upsample(block_in)
            self.up.insert(0, up)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i_level in reversed(range(self.num_resolutions)):
            for i_block in range(self.num_res_blocks + 1):
                h = self.up[i_level].block[i_block](h)
            if i_level != 0:
                h = self.up[i_level].upsample(h)
        return self.conv_out(self.norm_out(h, swish=True))


class AutoEncoder(nn.Module):
    def __init__(self, params: AutoEncoderParams, options: KernelOptions = KernelOptions()):
        super().__init__()
        self.params = params
        self.encoder = Encoder(params.ch, params.ch_mult, params.num_res_blocks, params.in_channels, params.z_channels)
        self.decoder = Decoder(params.ch, params.out_ch, params.ch_mult, params.num_res_blocks, params.z_channels)
        self.scale_factor = params.scale_factor
        self.shift_factor = params.shift_factor
        self.set_kernel_options(options)

    def set_kernel_options(self, options: KernelOptions) -> None:
        """Its GroupNorms run the kernel or the torch ops (`options.group_norm`)."""
        self.options = options
        for module in self.modules():
            if isinstance(module, GroupNorm):
                module.use_kernel = options.group_norm
            if isinstance(module, (Upsample, ResnetBlock)):
                module.band_bytes = options.decode_band_mib << 20

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.norm_out.weight.dtype  # a norm: never swapped for fp8 storage

    def encode(self, x: Tensor) -> Tensor:
        """Image in [-1, 1] -> normalised latent, from the posterior mean (deterministic)."""
        mean, _logvar = torch.chunk(self.encoder(x), 2, dim=1)
        return self.scale_factor * (mean - self.shift_factor)

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z / self.scale_factor + self.shift_factor)
