"""LoRA files in the common formats -> checked low-rank deltas on BFL module names (`lora_fusing` fuses them).

Each format has a pure converter `state_dict -> {BFL module name: [LoraPart]}`; a part may cover a row block
of a fused BFL layer (diffusers' to_q/to_k/to_v inside `qkv` or `linear1`). Every pair is checked here (dtype,
finite values, shapes, rank, bias, alpha) so that fusing never meets a tensor it cannot apply.
"""

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from loguru import logger
from safetensors import safe_open
from torch import Tensor

from errors import LoraError


@dataclass
class LoraPart:
    down: Tensor  # A: (rank, in)
    up: Tensor  # B: (rows, rank)
    alpha: float | None = None  # None: alpha = rank (scale 1)
    bias: Tensor | None = None  # (rows,)
    rows: tuple[int, int] | None = None  # row block of the target weight; None: all rows
    swap_halves: bool = False  # diffusers norm_out: (scale, shift) rows -> BFL (shift, scale)

    def delta(self, scale: float) -> Tensor:
        rank = self.down.shape[0]
        factor = scale * ((self.alpha if self.alpha is not None else rank) / rank)
        d = factor * (self.up.float() @ self.down.float())
        return _swap(d) if self.swap_halves else d

    def bias_delta(self, scale: float) -> Tensor | None:
        if self.bias is None:
            return None
        rank = self.down.shape[0]
        b = scale * ((self.alpha if self.alpha is not None else rank) / rank) * self.bias.float()
        return _swap(b) if self.swap_halves else b


def _swap(t: Tensor) -> Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


LoraDeltas = dict[str, list[LoraPart]]

# ---- reading ---------------------------------------------------------------------------------------------


def read_lora(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """A LoRA file's tensors and metadata; LoraError for anything that is not a readable safetensors file."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise LoraError(f"LoRA files must be .safetensors, got {path.name}")
    try:
        if not path.is_file():
            raise LoraError(f"LoRA file not found: {path}")
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except LoraError:
        raise
    except Exception as e:  # safetensors' errors (header, offsets, dtype), I/O errors, a header too large to hold
        raise LoraError(
            f"{path.name} is not a readable safetensors file ({type(e).__name__}: {str(e)[:200]})"
        ) from None


# ---- formats ---------------------------------------------------------------------------------------------

_DOWN = (".lora_A.weight", ".lora_down.weight", ".down.weight")
_UP = (".lora_B.weight", ".lora_up.weight", ".up.weight")
_TEXT_ENCODER = ("text_encoder", "lora_te", "te1", "te2", "text_model", "encoder.block")


def _group(sd: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """{module key: {'down', 'up', 'alpha', 'bias'}} for every key that belongs to a LoRA pair."""
    groups: dict[str, dict[str, Tensor]] = {}
    for key, t in sd.items():
        for suffix, part in [
            *((s, "down") for s in _DOWN),
            *((s, "up") for s in _UP),
            (".lora_B.bias", "bias"),
            (".lora_up.bias", "bias"),
            (".alpha", "alpha"),
        ]:
            if key.endswith(suffix):
                groups.setdefault(key[: -len(suffix)], {})[part] = t
                break
    return groups


_KOHYA = [  # underscore form -> dotted BFL form, for the parts after the block index
    ("img_attn_qkv", "img_attn.qkv"),
    ("img_attn_proj", "img_attn.proj"),
    ("txt_attn_qkv", "txt_attn.qkv"),
    ("txt_attn_proj", "txt_attn.proj"),
    ("img_mlp_0", "img_mlp.0"),
    ("img_mlp_2", "img_mlp.2"),
    ("txt_mlp_0", "txt_mlp.0"),
    ("txt_mlp_2", "txt_mlp.2"),
    ("img_mod_lin", "img_mod.lin"),
    ("txt_mod_lin", "txt_mod.lin"),
    ("modulation_lin", "modulation.lin"),
    ("linear1", "linear1"),
    ("linear2", "linear2"),
]
_KOHYA_TOP = {
    "img_in": "img_in",
    "txt_in": "txt_in",
    "time_in_in_layer": "time_in.in_layer",
    "time_in_out_layer": "time_in.out_layer",
    "vector_in_in_layer": "vector_in.in_layer",
    "vector_in_out_layer": "vector_in.out_layer",
    "guidance_in_in_layer": "guidance_in.in_layer",
    "guidance_in_out_layer": "guidance_in.out_layer",
    "final_layer_linear": "final_layer.linear",
    "final_layer_adaLN_modulation_1": "final_layer.adaLN_modulation.1",
}


def _kohya_name(key: str) -> str | None:
    name = key.removeprefix("lora_unet_")
    if name in _KOHYA_TOP:
        return _KOHYA_TOP[name]
    m = re.fullmatch(r"(double_blocks|single_blocks)_(\d+)_(\w+)", name)
    if m:
        for under, dotted in _KOHYA:
            if m.group(3) == under:
                return f"{m.group(1)}.{m.group(2)}.{dotted}"
    return None


def _diffusers_targets(name: str, hidden: int) -> list[tuple[str, tuple[int, int] | None, bool]]:
    """diffusers module name -> [(BFL module, row block, swap halves)]."""
    h = hidden
    if m := re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", name):
        b, rest = f"double_blocks.{m.group(1)}", m.group(2)
        qkv = {
            "attn.to_q": ("img_attn.qkv", 0),
            "attn.to_k": ("img_attn.qkv", 1),
            "attn.to_v": ("img_attn.qkv", 2),
            "attn.add_q_proj": ("txt_attn.qkv", 0),
            "attn.add_k_proj": ("txt_attn.qkv", 1),
            "attn.add_v_proj": ("txt_attn.qkv", 2),
        }
        if rest in qkv:
            target, i = qkv[rest]
            return [(f"{b}.{target}", (i * h, (i + 1) * h), False)]
        plain = {
            "attn.to_out.0": "img_attn.proj",
            "attn.to_add_out": "txt_attn.proj",
            "ff.net.0.proj": "img_mlp.0",
            "ff.net.2": "img_mlp.2",
            "ff_context.net.0.proj": "txt_mlp.0",
            "ff_context.net.2": "txt_mlp.2",
            "norm1.linear": "img_mod.lin",
            "norm1_context.linear": "txt_mod.lin",
        }
        return [(f"{b}.{plain[rest]}", None, False)] if rest in plain else []
    if m := re.fullmatch(r"single_transformer_blocks\.(\d+)\.(.+)", name):
        b, rest = f"single_blocks.{m.group(1)}", m.group(2)
        qkv = {"attn.to_q": 0, "attn.to_k": 1, "attn.to_v": 2}
        if rest in qkv:
            i = qkv[rest]
            return [(f"{b}.linear1", (i * h, (i + 1) * h), False)]
        if rest == "proj_mlp":
            return [(f"{b}.linear1", (3 * h, None), False)]  # up to the end: the MLP's rows
        plain = {"proj_out": "linear2", "norm.linear": "modulation.lin"}
        return [(f"{b}.{plain[rest]}", None, False)] if rest in plain else []
    top = {
        "x_embedder": "img_in",
        "context_embedder": "txt_in",
        "proj_out": "final_layer.linear",
        "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
        "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
        "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    }
    if name in top:
        return [(top[name], None, False)]
    if name == "norm_out.linear":
        return [("final_layer.adaLN_modulation.1", None, True)]
    return []


def _peft_alpha(metadata: dict[str, str]) -> float | None:
    """lora_alpha from diffusers' `lora_adapter_metadata` (PEFT config), if the file carries it."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except ValueError:
        raise LoraError("metadata lora_adapter_metadata is not valid JSON") from None
    if not isinstance(config, dict):
        raise LoraError(f"metadata lora_adapter_metadata must be a JSON object, not {type(config).__name__}")
    for key, value in config.items():
        if key.split(".")[-1] == "lora_alpha":
            return _alpha(value, "metadata lora_alpha")
    return None


def _alpha(value, where: str) -> float:
    """A LoRA alpha: one finite, positive number."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or not (value.is_floating_point() or value.dtype in _INTEGER):
            raise LoraError(f"{where} must be one number, got a {value.dtype} tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise LoraError(f"{where} must be a number, got {type(value).__name__}")
    try:
        number = float(value)
    except ValueError:
        raise LoraError(f"{where} must be a number, got {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise LoraError(f"{where} must be finite and positive, got {number}")
    return number


_INTEGER = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _checked_pair(key: str, g: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
    """(down, up, bias) of one LoRA pair after checking what fusing relies on; LoraError naming the key otherwise."""
    down, up, bias = g["down"], g["up"], g.get("bias")
    for part, t in (("lora_A/down", down), ("lora_B/up", up), ("bias", bias)):
        if t is None:
            continue
        if not t.is_floating_point():
            raise LoraError(f"{key}: {part} must hold floating-point values, not {t.dtype}")
        if not torch.isfinite(t).all():
            raise LoraError(f"{key}: {part} holds NaN or infinite values")
    if down.ndim != 2 or up.ndim != 2:
        raise LoraError(f"{key}: lora_A and lora_B must be 2-D matrices, got shapes {tuple(down.shape)} and "
                        f"{tuple(up.shape)} (convolution LoRAs do not apply to FLUX)")  # fmt: skip
    rank = down.shape[0]
    if rank < 1 or up.shape[1] != rank:
        raise LoraError(f"{key}: rank {rank} of lora_A {tuple(down.shape)} does not match lora_B {tuple(up.shape)}")
    if bias is not None and (bias.ndim != 1 or bias.shape[0] != up.shape[0]):
        raise LoraError(f"{key}: bias of shape {tuple(bias.shape)} does not match lora_B's {up.shape[0]} rows")
    return down, up, bias


def convert_lora(sd: dict[str, Tensor], hidden_size: int, metadata: dict[str, str] | None = None) -> LoraDeltas:
    """Any supported format -> {BFL module name: [LoraPart]}. Text-encoder keys are dropped with one warning."""
    metadata = metadata or {}
    groups = _group(sd)
    file_alpha = _peft_alpha(metadata)
    out: LoraDeltas = {}
    skipped_te, unknown = [], []
    for key, g in groups.items():
        if any(marker in key for marker in _TEXT_ENCODER):
            skipped_te.append(key)
            continue
        if "down" not in g or "up" not in g:
            unknown.append(key)
            continue
        down, up, bias = _checked_pair(key, g)
        alpha = _alpha(g["alpha"], f"{key}.alpha") if "alpha" in g else file_alpha
        name = key
        for prefix in ("base_model.model.", "transformer.", "diffusion_model.", "model.diffusion_model.", "unet."):
            name = name.removeprefix(prefix)
        if m := re.fullmatch(r"double_blocks\.(\d+)\.processor\.(qkv|proj)_lora([12])", name):  # XLabs
            stream = "img" if m.group(3) == "1" else "txt"
            targets = [(f"double_blocks.{m.group(1)}.{stream}_attn.{m.group(2)}", None, False)]
        elif name.startswith("lora_unet_"):  # kohya
            bfl = _kohya_name(name)
            targets = [(bfl, None, False)] if bfl else []
        elif name.startswith(
            (
                "transformer_blocks.",
                "single_transformer_blocks.",
                "x_embedder",
                "context_embedder",
                "time_text_embed.",
                "norm_out.",
                "proj_out",
            )
        ):  # diffusers / PEFT
            targets = _diffusers_targets(name, hidden_size)
        else:  # BFL-native (also ComfyUI after its prefix)
            targets = [(name, None, False)]
        if not targets:
            unknown.append(key)
        for target, rows, swap in targets:
            if rows is not None and rows[1] is None:
                rows = (rows[0], rows[0] + up.shape[0])
            out.setdefault(target, []).append(LoraPart(down, up, alpha, bias, rows, swap))
    if skipped_te:
        logger.warning(f"LoRA: ignoring {len(skipped_te)} text-encoder layers (only the flow model is adapted)")
    if unknown:
        logger.warning(f"LoRA: ignoring {len(unknown)} keys with no flow-model target, e.g. {unknown[:3]}")
    if not out:
        raise LoraError(f"no usable LoRA keys for the flow model; keys look like {list(sd)[:5]}")
    return out
