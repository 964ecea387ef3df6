"""Quantization outside the flow model's fp8 matmuls: the text encoders (our fp8 weights, optimum-quanto,
bitsandbytes), the autoencoder (fp8 storage, or quanto), and quanto's weight-only types for the flow model on GPUs
without fp8."""

import torch
import torch.nn.functional as F
from loguru import logger
from torch import Tensor, nn

from errors import ConfigError
from float8_quantize import F8Linear, fp8_supported, quantize_weight

QUANTO = ("quanto_qfloat8", "qint2")  # a text encoder's types that optimum-quanto makes
BITSANDBYTES = ("qint4", "qint8")


def bitsandbytes_config(quant: str | None, compute_dtype: torch.dtype):
    """`quantization_config` for `from_pretrained` (nf4 or int8 weights), or None."""
    if quant not in BITSANDBYTES:
        return None
    try:
        import bitsandbytes  # noqa: F401 - optional: only these two modes need it
        from transformers import BitsAndBytesConfig  # heavy to import: only when asked for
    except ImportError as e:
        raise ConfigError(f"text encoder quantization {quant!r} needs bitsandbytes (pip install bitsandbytes)") from e
    if quant == "qint4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


QUANTO_TYPES = ("qfloat8", "qint2", "qint4", "qint8")


def quanto_quantize(model: nn.Module, quant: str, include: list[str] | None = None) -> nn.Module:
    """Quantize the weights of `model`'s linear (and conv) layers in place with optimum-quanto, weights only:
    qfloat8 (e4m3), qint8, qint4 (groups of 128) or qint2. `include`: module-name patterns to quantize (all if
    None)."""
    try:
        from optimum import quanto
    except ImportError as e:
        raise ConfigError(f"quantization {quant!r} needs optimum-quanto (pip install optimum-quanto)") from e
    quant = quant.removeprefix("quanto_")
    if quant not in QUANTO_TYPES:
        raise ConfigError(f"not a quanto weight type: {quant!r} (one of {', '.join(QUANTO_TYPES)})")
    before = weight_bytes(model)
    quanto.quantize(model, weights=getattr(quanto, quant), include=include)
    quanto.freeze(model)
    logger.info(
        f"{type(model).__name__}: {quant} weights, {before / 2**20:.0f} -> {weight_bytes(model) / 2**20:.0f} MiB"
    )
    return model


def weight_bytes(model: nn.Module) -> int:
    return sum(tensor_bytes(t) for t in [*model.parameters(), *model.buffers()])


def tensor_bytes(t: Tensor) -> int:
    """The bytes a tensor holds. quanto's quantized tensors keep theirs in inner tensors (data and scale), and a
    packed inner tensor (Marlin's int32 words on CUDA) reports its logical shape, not its storage's."""
    inner = t.__tensor_flatten__()[0] if hasattr(t, "__tensor_flatten__") else []
    if not inner:
        return t.numel() * t.element_size()
    return sum(tensor_bytes(getattr(t, name)) for name in inner)


class F8Conv2d(nn.Module):
    """A Conv2d whose weight is stored in e4m3 (one scale per output channel) and upcast for each call."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        out_channels = conv.weight.shape[0]
        q, scale = quantize_weight(conv.weight.detach().reshape(out_channels, -1), per_channel=True)
        self.register_buffer("weight", q.reshape(conv.weight.shape))
        self.register_buffer("weight_scale", scale.reshape(-1, 1, 1, 1))
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        self.compute_dtype = conv.weight.dtype

    def forward(self, x: Tensor) -> Tensor:
        weight = (self.weight.to(torch.float32) * self.weight_scale).to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


def quantize_autoencoder(ae: nn.Module) -> nn.Module:
    """fp8 storage for every convolution with at least 16 input channels x kernel area (the rest are tiny)."""
    before = weight_bytes(ae)

    def swap(module: nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, nn.Conv2d) and child.weight[0].numel() >= 16:
                setattr(module, name, F8Conv2d(child))
            else:
                swap(child)

    swap(ae)
    after = weight_bytes(ae)
    logger.info(
        f"autoencoder: fp8 conv weights, {before / 2**20:.1f} -> {after / 2**20:.1f} MiB "
        f"({(before - after) / 2**20:.1f} MiB saved; computed in {next(iter(ae.parameters())).dtype})"
    )
    return ae


class F8EncoderLinear(nn.Module):
    """A text encoder's linear layer with e4m3 weights, one float32 scale per output channel (half of bf16's bytes).

    Weight-only by default: the weight is cast for each matmul, which runs in the activations' dtype, so only
    the weights' rounding costs accuracy (T5's activations have outlier channels that per-token fp8 would round
    badly); `matmul=True` runs a true fp8 matmul with per-token activation scales instead (`F8Linear`).
    Needs no compiled extension, unlike optimum-quanto's qfloat8, whose CUDA build took minutes at a cold start.
    """

    # transformers' T5 casts `wo`'s input to `wo.weight.dtype` when that differs from its own: e4m3 would ruin it,
    # so this layer shows no `weight` (its e4m3 tensor lives in `fp8.weight`)
    weight = None

    def __init__(self, linear: nn.Linear, matmul: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        self.fp8 = F8Linear(
            self.in_features, self.out_features, linear.bias is not None, fast_accum=True, out_dtype=w.dtype,
            device=w.device,
        )  # fmt: skip
        q, scale = quantize_weight(w, per_channel=True)
        self.fp8.weight.data = q
        self.fp8.weight_scale.copy_(scale)
        if linear.bias is not None:
            self.fp8.bias.data = linear.bias.detach().clone()
        self.matmul = matmul

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 matmul={self.matmul}"

    def forward(self, x: Tensor) -> Tensor:
        if self.matmul and fp8_supported(x.device):  # checked per call: the module may be offloaded between calls
            self.fp8.use_fp8 = True
            return self.fp8(x)
        if x.dtype not in (torch.bfloat16, torch.float32):  # float16 could overflow before the scale: dequantize
            self.fp8.use_fp8 = False
            return self.fp8(x)
        # e4m3 values are exact in bf16, so x @ (q * s)^T = (x @ q^T) * s: the weight is only cast (half the
        # traffic of dequantizing it through float32) and the scale applied to the output channels
        y = F.linear(x, self.fp8.weight.to(x.dtype)).float() * self.fp8.weight_scale.reshape(-1)
        if self.fp8.bias is not None:
            y = y + self.fp8.bias.float()
        return y.to(x.dtype)


@torch.no_grad()
def fp8_text_encoder(model: nn.Module, matmul: bool = False) -> nn.Module:
    """Swap every linear layer of a `transformers` text encoder for `F8EncoderLinear`, in place, one layer at a
    time (the peak is the model plus one layer's e4m3 copy); embeddings and norms stay as they are."""
    before = weight_bytes(model)

    def swap(module: nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, nn.Linear) and child.in_features % 16 == 0 and child.out_features % 16 == 0:
                setattr(module, name, F8EncoderLinear(child, matmul))
            else:
                swap(child)

    swap(model)
    logger.info(
        f"{type(model).__name__}: fp8 weights{' and matmuls' if matmul else ''}, "
        f"{before / 2**20:.0f} -> {weight_bytes(model) / 2**20:.0f} MiB"
    )
    return model
