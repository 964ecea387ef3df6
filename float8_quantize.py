"""fp8 linear layers (`F8Linear` on `torch._scaled_mm`), the module swap, and prequantized checkpoints.

Weights are float8_e4m3fn with a float32 scale per output channel or per tensor. Activations are quantized
to e4m3 on the fly, with a scale per token (row) or per tensor, or with a static per-tensor scale
calibrated at load on fixed synthetic inputs (never on user requests), so outputs depend only on the seed
and the config.
"""

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from loguru import logger
from safetensors.torch import save_file
from torch import Tensor, nn

from errors import ConfigError
from kernels import fp8_linear
from kernels.common import E4M3, E4M3_MAX, MIN_SCALE
from modules import sampling

METADATA_FORMAT = "flux-fp8-api/f8"
WEIGHT_SCALINGS = ("per_channel", "per_tensor")
ACTIVATION_SCALINGS = ("dynamic_per_token", "dynamic_per_tensor", "static_per_tensor")
# the original flux-fp8-api's recipe, for its prequantized files only (`f8_original`), not a config choice: static
# per-tensor scales and e5m2 activations, multiplied by the scale in the activations' own dtype
ORIGINAL_RECIPE = "static_per_tensor_e5m2"
E5M2 = torch.float8_e5m2
E5M2_MAX = torch.finfo(E5M2).max  # 57344
EMBEDDERS = ("img_in", "txt_in", "time_in", "vector_in", "guidance_in")
MODULATIONS = (".img_mod.", ".txt_mod.", ".modulation.")


@dataclass(frozen=True)
class F8Settings:
    weight_scaling: str = "per_channel"
    activation_scaling: str = "dynamic_per_token"
    quantize_modulation: bool = True
    quantize_flow_embedder_layers: bool = False

    def __post_init__(self):
        if self.weight_scaling not in WEIGHT_SCALINGS:
            raise ConfigError(f"f8_weight_scaling must be one of {WEIGHT_SCALINGS}, got {self.weight_scaling!r}")
        if self.activation_scaling not in (*ACTIVATION_SCALINGS, ORIGINAL_RECIPE):
            raise ConfigError(
                f"f8_activation_scaling must be one of {ACTIVATION_SCALINGS}, got {self.activation_scaling!r}"
            )


def fp8_supported(device: torch.device) -> bool:
    """fp8 tensor cores: compute capability 8.9 (Ada) and newer; the CPU runs `_scaled_mm` too."""
    if device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device) >= (8, 9)


def quantize_weight(
    weight: Tensor, per_channel: bool, chunk: int = 1024, consume: bool = False
) -> tuple[Tensor, Tensor]:
    """(out, in) weight -> e4m3 weight and float32 scale, (1, out) per channel or () per tensor. A weight with a NaN
    or an infinity gets a non-finite scale.

    Works `chunk` rows at a time, so quantizing at load needs little more than the weight itself. `consume`: a
    float32 `weight` is scaled in place (LoRA fusing's working copy: two passes fewer), with the same result.
    """
    rows = weight.split(chunk)
    # max |w| per row, exact in any dtype, NaN and inf carried; one pass, no |w| temporary
    amax = torch.cat([torch.linalg.vector_norm(r, float("inf"), dim=1) for r in rows]).float()
    if not per_channel:
        amax = amax.max()
    scale = (amax / E4M3_MAX).clamp(min=MIN_SCALE)
    q = torch.empty(weight.shape, dtype=E4M3, device=weight.device)
    for i, r in enumerate(rows):
        s = scale[i * chunk : i * chunk + len(r), None] if per_channel else scale
        work = r if consume and r.dtype == torch.float32 else r.to(torch.float32, copy=True)
        q[i * chunk : i * chunk + len(r)] = work.div_(s).clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, scale[None, :] if per_channel else scale


def dequantize_weight(weight: Tensor, scale: Tensor) -> Tensor:
    """float32 weight from an e4m3 weight and its scale (either layout)."""
    return weight.float() * (scale.reshape(-1, 1) if scale.numel() > 1 else scale)


class F8Linear(nn.Module):
    """`nn.Linear` with an e4m3 weight and one `torch._scaled_mm` per call (bias fused, output in `out_dtype`)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        weight_scaling: str = "per_channel",
        activation_scaling: str = "dynamic_per_token",
        fast_accum: bool = False,
        out_dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if in_features % 16 or out_features % 16:
            raise ValueError(f"fp8 matmuls need multiples of 16, got {in_features}x{out_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.weight_scaling = weight_scaling
        self.activation_scaling = activation_scaling
        self.fast_accum = fast_accum
        self.out_dtype = out_dtype
        self.use_fp8 = True  # False: dequantize-then-matmul on GPUs without fp8 (set by the loader)
        self.calibrating = False
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=E4M3, device=device), False)
        scale_shape = (1, out_features) if weight_scaling == "per_channel" else ()
        self.register_buffer("weight_scale", torch.ones(scale_shape, dtype=torch.float32, device=device))
        if activation_scaling in ("static_per_tensor", ORIGINAL_RECIPE):
            self.register_buffer("input_scale", torch.ones((), dtype=torch.float32, device=device))
        if activation_scaling == ORIGINAL_RECIPE:  # its reciprocal as the file holds it: rounded the same way
            self.register_buffer("input_multiplier", torch.ones((), dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=out_dtype, device=device), False) if bias else None

    @classmethod
    def like(cls, linear: nn.Linear, settings: F8Settings, fast_accum: bool, out_dtype: torch.dtype) -> "F8Linear":
        """An empty F8Linear with `linear`'s shape, on `linear`'s device (meta while building)."""
        return cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            weight_scaling=settings.weight_scaling,
            activation_scaling=settings.activation_scaling,
            fast_accum=fast_accum,
            out_dtype=out_dtype,
            device=linear.weight.device,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"weight={self.weight_scaling}, activation={self.activation_scaling}, fast_accum={self.fast_accum}"
        )

    def _quantize_input(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(M, K) activations -> e4m3 and the float32 scale, (M, 1) per token or () per tensor."""
        if self.calibrating:
            amax = x.abs().amax().float()
            self.input_scale.copy_(torch.maximum(self.input_scale, amax / E4M3_MAX))
        if self.activation_scaling == ORIGINAL_RECIPE:
            xq = x.mul(self.input_multiplier).clamp(-E5M2_MAX, E5M2_MAX).to(E5M2)
            return xq, self.input_scale
        if self.activation_scaling == "static_per_tensor" and not self.calibrating:
            scale = self.input_scale
            return fp8_linear.quantizer(x.is_cuda)(x, scale), scale
        per_token = self.activation_scaling == "dynamic_per_token"
        return fp8_linear.dynamic_quantizer(x.is_cuda)(x, per_token)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (M, K): _scaled_mm is 2-D
        if not self.use_fp8:
            w = dequantize_weight(self.weight, self.weight_scale).to(self.out_dtype)
            bias = None if self.bias is None else self.bias.to(self.out_dtype)
            return nn.functional.linear(x.to(self.out_dtype), w, bias).reshape(*shape[:-1], self.out_features)
        return self._matmul(*self._quantize_input(x)).reshape(*shape[:-1], self.out_features)

    def fuses_input_ops(self, x: Tensor) -> bool:
        """Whether the ops before this layer can run as one pass with its input quantization (`kernels.fp8_linear`):
        per-token scaling on CUDA with Triton. The `forward_gelu_concat` and `forward_modulated` entries need it."""
        dynamic = self.use_fp8 and self.activation_scaling == "dynamic_per_token" and not self.calibrating
        return dynamic and fp8_linear.available(x)

    def takes_quantized_input(self) -> bool:
        """Whether `forward_quantized` can take an e4m3 input as it is (not while a static scale is being measured,
        nor in the original's recipe, whose inputs are e5m2)."""
        return self.use_fp8 and not self.calibrating and self.activation_scaling != ORIGINAL_RECIPE

    def forward_gelu_concat(self, a: Tensor | None, b: Tensor, a_scale: Tensor | None, fast_tanh: bool) -> Tensor:
        """`self(cat((a, gelu_tanh(b)), -1))` (`a` may be None; e4m3 with the float32 scale `a_scale` if given), the
        GELU, the concatenation and the quantization in one kernel (`fuses_input_ops(b)` must hold)."""
        xq, scale = fp8_linear.gelu_concat_quantize(a, b, a_scale, fast_tanh)
        return self._matmul(xq, scale).reshape(*b.shape[:-1], self.out_features)

    def forward_quantized(self, xq: Tensor, scale: Tensor) -> Tensor:
        """`self(x)` for x given as e4m3 `xq` with one float32 `scale` (the fp8 attention's output), with no
        quantization pass (`takes_quantized_input()` must hold)."""
        shape = xq.shape
        return self._matmul(xq.reshape(-1, shape[-1]), scale.float()).reshape(*shape[:-1], self.out_features)

    def forward_modulated(self, x: Tensor, scale: Tensor, shift: Tensor, eps: float) -> Tensor:
        """`self((1 + scale) * layer_norm(x) + shift)` (no affine LayerNorm), the LayerNorm, the modulation and the
        quantization in one kernel (`fuses_input_ops(x)` must hold)."""
        xq, scale_a = fp8_linear.layernorm_modulate_quantize(x, scale, shift, eps)
        return self._matmul(xq, scale_a).reshape(*x.shape[:-1], self.out_features)

    def _matmul(self, xq: Tensor, scale_a: Tensor) -> Tensor:
        """(M, K) e4m3 activations and their scale -> (M, N) in `out_dtype`."""
        scale_b = self.weight_scale
        rowwise = scale_a.ndim > 0 or scale_b.ndim > 0
        if rowwise and scale_a.ndim != scale_b.ndim:  # mixed modes run the row-wise kernel: both as vectors
            scale_a = scale_a.reshape(-1, 1).repeat(xq.shape[0] // scale_a.numel(), 1)
            scale_b = scale_b.reshape(1, -1).repeat(1, self.out_features // scale_b.numel())
        mm_dtype, fused = self._mm_dtype(rowwise, xq.is_cuda)
        out = torch._scaled_mm(
            xq,
            self.weight.t(),  # (K, N) column-major, as the kernel wants
            scale_a=scale_a,
            scale_b=scale_b,
            bias=self.bias if fused else None,
            out_dtype=mm_dtype,
            use_fast_accum=self.fast_accum,
        )
        if not fused:
            out = out.to(self.out_dtype) if self.bias is None else out.to(self.out_dtype) + self.bias
        return out

    def _mm_dtype(self, rowwise: bool, cuda: bool) -> tuple[torch.dtype, bool]:
        """What the kernel writes, and whether it adds the bias. CUDA's row-wise kernel writes bf16 only, and
        cuBLASLt takes no bias with a float32 output; the CPU does everything."""
        if not cuda or self.out_dtype == torch.bfloat16:
            return self.out_dtype, True
        if rowwise:
            return torch.bfloat16, False
        return self.out_dtype, self.out_dtype != torch.float32


def swap_linears(module: nn.Module, predicate: Callable[[str], bool], factory: Callable, prefix: str = "") -> None:
    """Replace every `nn.Linear` whose dotted name satisfies `predicate` by `factory(linear)`, in place."""
    for name, child in module.named_children():
        full = prefix + name
        if isinstance(child, nn.Linear) and predicate(full):
            setattr(module, name, factory(child))
        else:
            swap_linears(child, predicate, factory, full + ".")


def quantized_layer(name: str, settings: F8Settings) -> bool:
    """Which linears are fp8: the blocks' always, modulation and embedders by flag, the final layer never."""
    if name.startswith(("double_blocks.", "single_blocks.")):
        return settings.quantize_modulation or not any(m in name for m in MODULATIONS)
    return name.startswith(EMBEDDERS) and settings.quantize_flow_embedder_layers


@torch.no_grad()
def quantize_flow_model(model: nn.Module, settings: F8Settings, fast_accum: bool = True) -> nn.Module:
    """Swap the linears of an already loaded flow model for F8Linear, quantizing their weights, in place."""
    per_channel = settings.weight_scaling == "per_channel"

    def convert(linear: nn.Linear) -> F8Linear:
        layer = F8Linear.like(linear, settings, fast_accum, linear.weight.dtype)
        q, scale = quantize_weight(linear.weight, per_channel)
        layer.weight.data = q
        layer.weight_scale.copy_(scale)
        if linear.bias is not None:
            layer.bias.data = linear.bias.data.clone()
        return layer

    swap_linears(model, lambda n: quantized_layer(n, settings), convert)
    return model


def metadata_for(settings: F8Settings, params: dict, flow_dtype: str) -> dict[str, str]:
    """What a prequantized file records: its fp8 settings, the architecture and the activation dtype."""
    return {
        "format": METADATA_FORMAT,
        "settings": json.dumps(asdict(settings), sort_keys=True),
        "params": json.dumps(params, sort_keys=True),
        "flow_dtype": flow_dtype,
    }


def check_metadata(metadata: dict[str, str], settings: F8Settings, params: dict, path: str) -> None:
    """A prequantized file must have been made with the settings (and architecture) the config asks for."""
    if metadata.get("format") != METADATA_FORMAT:
        raise ConfigError(f"prequantized_flow is true but {path} is not a prequantized flux-fp8-api checkpoint")
    stored = json.loads(metadata["settings"])
    names = {"weight_scaling": "f8_weight_scaling", "activation_scaling": "f8_activation_scaling"}
    diffs = [
        f"{names.get(k, k)}: file has {stored.get(k)!r}, config has {v!r}"
        for k, v in asdict(settings).items()
        if stored.get(k) != v
    ]
    if json.loads(metadata["params"]) != params:
        diffs.append("params: the file was made for another architecture")
    if diffs:
        raise ConfigError(f"prequantized checkpoint {path} does not match the config: " + "; ".join(diffs))


def swap_for_f8(model: nn.Module, settings: F8Settings, fast_accum: bool, dtype: torch.dtype) -> dict[str, F8Linear]:
    """Swap `model`'s (meta) linears that `settings` quantizes for empty F8Linear layers; returns them by name."""
    swap_linears(
        model,
        lambda n: quantized_layer(n, settings),
        lambda lin: F8Linear.like(lin, settings, fast_accum, dtype),
    )
    return {name: m for name, m in model.named_modules() if isinstance(m, F8Linear)}


def tensor_converter(
    f8_modules: dict[str, F8Linear], settings: F8Settings, dtype: torch.dtype, prequantized: bool
) -> Callable[[str, Tensor], dict[str, Tensor]]:
    """What each checkpoint tensor becomes as it is read: a prequantized file's fp8 tensors and scales as they
    are, a bf16 file's F8Linear weights quantized (with their scales), everything else in `dtype`."""
    per_channel = settings.weight_scaling == "per_channel"

    def prequantized_tensor(key: str, t: Tensor) -> dict[str, Tensor]:
        keep = t.dtype == E4M3 or key.endswith(("weight_scale", "input_scale"))
        return {key: t if keep else t.to(dtype)}

    def bf16_tensor(key: str, t: Tensor) -> dict[str, Tensor]:
        module, _, leaf = key.rpartition(".")
        if module in f8_modules and leaf == "weight":
            q, scale = quantize_weight(t, per_channel)
            return {key: q, f"{module}.weight_scale": scale}
        return {key: t.to(dtype)}

    return prequantized_tensor if prequantized else bf16_tensor


def match_device(model: nn.Module, device: torch.device) -> None:
    """On a GPU without fp8 tensor cores (compute capability < 8.9), dequantize for every matmul instead."""
    supported = fp8_supported(device)
    if not supported:
        logger.warning(
            f"{device} has no fp8 tensor cores (compute capability < 8.9): fp8 weights are dequantized for every "
            "matmul; expect bf16 speed and fp8 weight error"
        )
    for m in model.modules():
        if isinstance(m, F8Linear):
            m.use_fp8 = supported


CALIBRATION_SIZE = 512  # pixels a side: the static scales see a 1024-token image, as real requests do


@torch.inference_mode()
def calibrate(model: nn.Module, dtype: torch.dtype, seed: int = 0, size: int = CALIBRATION_SIZE) -> None:
    """Static input scales from fixed, seeded synthetic inputs (a `size` x `size` image, 256 text tokens, four
    noise levels): the same scales in every process."""
    params = model.params
    device = model.final_layer.linear.weight.device
    layers = [m for m in model.modules() if isinstance(m, F8Linear)]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    img = sampling.pack(torch.randn(1, params.in_channels // 4, size // 8, size // 8, generator=gen))
    txt = torch.randn(1, 256, params.context_in_dim, generator=gen)
    vec = torch.randn(1, params.vec_in_dim, generator=gen)
    inputs = dict(
        img_ids=sampling.img_ids(1, size, size).to(device),
        txt_ids=sampling.txt_ids(1, 256).to(device),
        txt=txt.to(device, dtype),
        y=vec.to(device, dtype),
        guidance=torch.full((1,), 4.0, device=device),
    )
    for m in layers:
        m.calibrating = True
        m.input_scale.zero_()
    try:
        for t in (1.0, 0.75, 0.5, 0.25):
            noisy = (t * img + (1 - t) * torch.randn(img.shape, generator=gen)).to(device, dtype)
            model(img=noisy, timesteps=torch.full((1,), t, device=device), **inputs)
    finally:
        for m in layers:
            m.calibrating = False
            m.input_scale.clamp_(min=MIN_SCALE)


def save_prequantized(model: nn.Module, path: str, metadata: dict[str, str]) -> None:
    """Write the fp8 flow model as safetensors, with `metadata_for`'s record of how it was made."""
    sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(sd, path, metadata=metadata)
    size = sum(t.numel() * t.element_size() for t in sd.values())
    logger.info(f"wrote prequantized flow model to {path} ({size / 2**30:.2f} GiB)")


if __name__ == "__main__":  # the script reads a config: like main.py, it sits above the library's layers
    import argparse

    import util

    parser = argparse.ArgumentParser(description="Write a prequantized fp8 flow checkpoint from a config.")
    parser.add_argument("--config-path", "-c", required=True)
    parser.add_argument("--output", "-o", required=True, help="safetensors file to write")
    parser.add_argument("--device", help="device to quantize on (default: the config's flux_device)")
    args = parser.parse_args()
    try:
        util.write_prequantized(args.config_path, args.output, args.device)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
