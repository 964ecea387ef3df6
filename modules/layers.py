"""The flow transformer's building blocks, with black-forest-labs/flux's key names: embedders, the double- and
single-stream blocks and the final layer. Which kernels they run is `KernelOptions`' choice."""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels import fp8_attention, qk_norm_rope
from kernels.fp8_linear import dequantize
from kernels.options import KernelOptions

# Exact attention kernels, fastest first on Hopper (cuDNN about twice flash at 4608 tokens, bench/RESULTS.md);
# each backend that cannot take the inputs (CPU, old GPUs) passes to the next.
SDPA_PRIORITY = (
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
)
FLASH_FIRST = tuple(b for b in SDPA_PRIORITY if b != SDPBackend.CUDNN_ATTENTION)


def rope(pos: Tensor, dim: int, theta: int) -> Tensor:
    """Rotation matrices for adjacent pairs: (..., n) positions -> (..., n, dim/2, 2, 2), float32."""
    scale = torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim
    omega = 1.0 / (theta**scale)
    out = torch.einsum("...n,d->...nd", pos.to(torch.float64), omega)
    out = torch.stack([torch.cos(out), -torch.sin(out), torch.sin(out), torch.cos(out)], dim=-1)
    return rearrange(out, "b n d (i j) -> b n d i j", i=2, j=2).float()


def attention(q: Tensor, k: Tensor, v: Tensor, cudnn_first: bool = True) -> Tensor:
    """(B, H, L, D) rotated q, k and v -> (B, L, H*D)."""
    backends = list(SDPA_PRIORITY if cudnn_first else FLASH_FIRST)
    with sdpa_kernel(backends, set_priority=True):  # inside: torch.compile bakes the choice in
        x = F.scaled_dot_product_attention(q, k, v)
    return rearrange(x, "B H L D -> B L (H D)")


def joint_attention(
    streams: list[tuple[Tensor, Tensor, Tensor]], pe: Tensor, heads: int, options: KernelOptions
) -> tuple[Tensor, Tensor | None]:
    """Attention over the token groups `streams` ((qkv (B, L_i, 3*H*D), q gain, k gain) each, joined along L):
    (B, sum L_i, H*D) and None, or with `options.fp8_attention` the output in e4m3 and its float32 scale."""
    if options.fp8_attention:
        return fp8_attention.attention(streams, pe, heads)
    q, k, v = qk_norm_rope.rms_norm_rope(streams, pe, heads, use_kernel=options.qk_kernel)
    return attention(q, k, v, options.cudnn_attention), None


def timestep_embedding(t: Tensor, dim: int, max_period: int = 10000, time_factor: float = 1000.0) -> Tensor:
    """Sinusoidal embedding, cos before sin, in float32 (in bf16, 1000 * 3.5 rounds to 3504)."""
    t = time_factor * t.float()
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class EmbedND(nn.Module):
    def __init__(self, dim: int, theta: int, axes_dim: list[int]):
        super().__init__()
        self.dim = dim
        self.theta = theta
        self.axes_dim = axes_dim

    def forward(self, ids: Tensor) -> Tensor:
        n_axes = ids.shape[-1]
        emb = torch.cat([rope(ids[..., i], self.axes_dim[i], self.theta) for i in range(n_axes)], dim=-3)
        return emb.unsqueeze(1)  # (B, 1, L, D/2, 2, 2)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=True)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return qk_norm_rope.rms_norm(x, self.scale)


class QKNorm(nn.Module):
    """The gains of the per-head RMSNorm of q and k (`qk_norm_rope.rms_norm_rope` applies them)."""

    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def gains(self) -> tuple[Tensor, Tensor]:
        return self.query_norm.scale, self.key_norm.scale


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)


@dataclass
class ModulationOut:
    shift: Tensor
    scale: Tensor
    gate: Tensor


class Modulation(nn.Module):
    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.is_double = double
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=True)

    def forward(self, vec: Tensor | None, out: Tensor | None = None) -> tuple[ModulationOut, ModulationOut | None]:
        """`out`: `lin(silu(vec))` if the caller computed it already (`Flux.modulation_table`); vec is then not read."""
        out = self.lin(F.silu(vec)) if out is None else out
        out = out[:, None, :].chunk(self.multiplier, dim=-1)  # each (B, 1, D)
        return ModulationOut(*out[:3]), ModulationOut(*out[3:]) if self.is_double else None


def _mlp(hidden_size: int, mlp_hidden_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(hidden_size, mlp_hidden_dim, bias=True),
        nn.GELU(approximate="tanh"),
        nn.Linear(mlp_hidden_dim, hidden_size, bias=True),
    )


def _fuses(linear: nn.Module, x: Tensor) -> bool:
    """Whether `linear` (an fp8 layer) runs its input's preceding ops and quantization as one kernel on `x`."""
    fuses = getattr(linear, "fuses_input_ops", None)
    return fuses is not None and fuses(x)


def gelu_linear(
    linear: nn.Module, a: Tensor | None, b: Tensor, options: KernelOptions, a_scale: Tensor | None = None
) -> Tensor:
    """`linear(cat((a, gelu_tanh(b)), -1))` (`a` may be None; e4m3 with the float32 scale `a_scale` if given); an
    fp8 layer fuses the GELU, the concatenation and its input quantization into one pass."""
    if options.fused_gelu and _fuses(linear, b):
        return linear.forward_gelu_concat(a, b, a_scale, fast_tanh=options.fast_tanh)
    if a_scale is not None:
        a = dequantize(a, a_scale, b.dtype)
    x = F.gelu(b, approximate="tanh")
    return linear(x if a is None else torch.cat((a, x), dim=-1))


def quantized_linear(linear: nn.Module, xq: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """`linear(x)` for x given as e4m3 `xq` with a float32 `scale`: an fp8 layer takes it as it is."""
    takes = getattr(linear, "takes_quantized_input", None)
    if takes is not None and takes():
        return linear.forward_quantized(xq, scale)
    return linear(dequantize(xq, scale, dtype))


def modulated_linear(
    linear: nn.Module, norm: nn.LayerNorm, x: Tensor, mod: ModulationOut, options: KernelOptions
) -> Tensor:
    """`linear((1 + mod.scale) * norm(x) + mod.shift)`; an fp8 layer fuses the LayerNorm, the modulation and its
    input quantization into one pass."""
    if options.fused_norm and norm.weight is None and _fuses(linear, x):
        return linear.forward_modulated(x, mod.scale, mod.shift, norm.eps)
    return linear((1 + mod.scale) * norm(x) + mod.shift)


def _run_mlp(mlp: nn.Sequential, norm: nn.LayerNorm, x: Tensor, mod: ModulationOut, options: KernelOptions) -> Tensor:
    return gelu_linear(mlp[2], None, modulated_linear(mlp[0], norm, x, mod, options), options)


def _layer_norm(hidden_size: int) -> nn.LayerNorm:
    return nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)


class DoubleStreamBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, options: KernelOptions):
        super().__init__()
        mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.img_mod = Modulation(hidden_size, double=True)
        self.img_norm1 = _layer_norm(hidden_size)
        self.img_attn = SelfAttention(hidden_size, num_heads=num_heads, qkv_bias=qkv_bias)
        self.img_norm2 = _layer_norm(hidden_size)
        self.img_mlp = _mlp(hidden_size, mlp_hidden_dim)
        self.txt_mod = Modulation(hidden_size, double=True)
        self.txt_norm1 = _layer_norm(hidden_size)
        self.txt_attn = SelfAttention(hidden_size, num_heads=num_heads, qkv_bias=qkv_bias)
        self.txt_norm2 = _layer_norm(hidden_size)
        self.txt_mlp = _mlp(hidden_size, mlp_hidden_dim)
        self.options = options

    def forward(
        self, img: Tensor, txt: Tensor, vec: Tensor | None, pe: Tensor, mods: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """`mods`: (B, 12 * hidden) precomputed outputs of img_mod and txt_mod (see `Flux.modulation_table`)."""
        split = (None, None) if mods is None else mods.chunk(2, dim=-1)
        img_mod1, img_mod2 = self.img_mod(vec, split[0])
        txt_mod1, txt_mod2 = self.txt_mod(vec, split[1])
        opts = self.options
        img_qkv = modulated_linear(self.img_attn.qkv, self.img_norm1, img, img_mod1, opts)
        txt_qkv = modulated_linear(self.txt_attn.qkv, self.txt_norm1, txt, txt_mod1, opts)

        # joint attention over [txt, img] tokens
        streams = [(txt_qkv, *self.txt_attn.norm.gains()), (img_qkv, *self.img_attn.norm.gains())]
        attn, scale = joint_attention(streams, pe, self.num_heads, opts)
        if scale is not None:
            img_proj, txt_proj = (quantized_linear(a.proj, x, scale, img.dtype) for a, x in self._split(attn, txt))
        else:
            img_proj, txt_proj = (a.proj(x) for a, x in self._split(attn, txt))

        img = img + img_mod1.gate * img_proj
        img = img + img_mod2.gate * _run_mlp(self.img_mlp, self.img_norm2, img, img_mod2, opts)
        txt = txt + txt_mod1.gate * txt_proj
        txt = txt + txt_mod2.gate * _run_mlp(self.txt_mlp, self.txt_norm2, txt, txt_mod2, opts)
        return img, txt

    def _split(self, attn: Tensor, txt: Tensor) -> list[tuple[nn.Module, Tensor]]:
        """The joint attention output's image and text tokens, each with its stream's attention module."""
        return [(self.img_attn, attn[:, txt.shape[1] :]), (self.txt_attn, attn[:, : txt.shape[1]])]


class SingleStreamBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, options: KernelOptions):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        # qkv and the MLP's first layer share one matmul; attention output and MLP share the second
        self.linear1 = nn.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)
        self.norm = QKNorm(hidden_size // num_heads)
        self.pre_norm = _layer_norm(hidden_size)
        self.modulation = Modulation(hidden_size, double=False)
        self.options = options

    def forward(self, x: Tensor, vec: Tensor | None, pe: Tensor, mods: Tensor | None = None) -> Tensor:
        """`mods`: (B, 3 * hidden) precomputed output of the modulation (see `Flux.modulation_table`)."""
        mod, _ = self.modulation(vec, mods)
        h = modulated_linear(self.linear1, self.pre_norm, x, mod, self.options)
        qkv, mlp = torch.split(h, [3 * self.hidden_size, self.mlp_hidden_dim], dim=-1)
        attn, scale = joint_attention([(qkv, *self.norm.gains())], pe, self.num_heads, self.options)
        output = gelu_linear(self.linear2, attn, mlp, self.options, scale)  # linear2(cat(attn, gelu(mlp)))
        return x + mod.gate * output


class LastLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = _layer_norm(hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: Tensor, vec: Tensor | None, mods: Tensor | None = None) -> Tensor:
        shift, scale = (self.adaLN_modulation(vec) if mods is None else mods).chunk(2, dim=1)
        x = (1 + scale[:, None, :]) * self.norm_final(x) + shift[:, None, :]
        return self.linear(x)
