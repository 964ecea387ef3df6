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
from lora_formats import ONETRAINER, diffusers_targets, kohya_name, refuse_unsupported


@dataclass
class LoraPart:
    down: Tensor  # A: (rank, in)
    up: Tensor  # B: (rows, rank)
    alpha: float | None = None  # None: alpha = rank (scale 1)
    bias: Tensor | None = None  # (rows,)
    rows: tuple[int, int] | None = None  # row block of the target weight; None: all rows
    swap_halves: bool = False  # diffusers norm_out: (scale, shift) rows -> BFL (shift, scale)
    magnitude: Tensor | None = None  # DoRA: (rows,) per output row, or (1, in) per input column
    full: Tensor | None = None  # a full-weight delta (`.diff`): used instead of up @ down

    @property
    def ratio(self) -> float:
        """alpha / rank, the low-rank product's multiplier (1 without an alpha)."""
        rank = self.down.shape[0]
        return (self.alpha if self.alpha is not None else rank) / rank

    def delta(self, scale: float, base: Tensor | None = None) -> Tensor:
        """The change to the target rows at `scale`. DoRA needs `base`, the rows' pristine float32 weight: its
        result is `magnitude * (base + BA) / norm(base + BA)` (norm per output row, or per input column), and
        `scale` blends between the base (0) and that (1)."""
        if self.full is not None:
            d = scale * self.full.float()
            return _swap(d) if self.swap_halves else d
        d = self.ratio * (self.up.float() @ self.down.float())
        if self.magnitude is None:
            d = scale * d
        else:
            if base is None:
                raise ValueError("a DoRA part needs the pristine weight")
            b = _swap(base) if self.swap_halves else base
            merged = b + d
            per_row = self.magnitude.ndim == 1 or self.magnitude.shape[-1] == 1
            norm = merged.norm(dim=1, keepdim=True) if per_row else merged.norm(dim=0, keepdim=True)
            m = self.magnitude.float().reshape(-1, 1) if per_row else self.magnitude.float().reshape(1, -1)
            d = scale * (m / norm * merged - b)
        return _swap(d) if self.swap_halves else d

    def add_to(self, rows: Tensor, scale: float, base: Tensor | None = None) -> None:
        """`rows += delta(scale, base)` in place (float32 `rows`); a plain low-rank part is one matrix product that
        adds into `rows`, with no delta-sized temporaries."""
        if self.full is not None or self.magnitude is not None or self.swap_halves:
            rows += self.delta(scale, base).to(rows.device)
            return
        up, down = self.up.to(rows.device, torch.float32), self.down.to(rows.device, torch.float32)
        rows.addmm_(up, down, alpha=scale * self.ratio)

    def bias_delta(self, scale: float) -> Tensor | None:
        if self.bias is None:
            return None
        if self.full is not None:
            b = scale * self.bias.float()
            return _swap(b) if self.swap_halves else b
        b = scale * self.ratio * self.bias.float()
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
            (".lora_magnitude_vector", "magnitude"),  # DoRA, PEFT's name
            (".dora_scale", "magnitude"),  # DoRA, kohya's and LyCORIS's
            (".diff", "full"),  # a full-weight delta
            (".diff_b", "full_bias"),
        ]:
            if key.endswith(suffix):
                groups.setdefault(key[: -len(suffix)], {})[part] = t
                break
    return groups


def _peft_alpha(metadata: dict[str, str]) -> tuple[float | None, dict[str, float]]:
    """lora_alpha and its per-module `alpha_pattern` from diffusers' `lora_adapter_metadata` (PEFT config)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None, {}
    try:
        config = json.loads(raw)
    except ValueError:
        raise LoraError("metadata lora_adapter_metadata is not valid JSON") from None
    if not isinstance(config, dict):
        raise LoraError(f"metadata lora_adapter_metadata must be a JSON object, not {type(config).__name__}")
    alpha, pattern = None, {}
    for key, value in config.items():
        if key.split(".")[-1] == "lora_alpha":
            alpha = _alpha(value, "metadata lora_alpha")
        elif key.split(".")[-1] == "alpha_pattern" and value:
            if not isinstance(value, dict):
                raise LoraError("metadata alpha_pattern must be a JSON object")
            pattern = {str(k): _alpha(v, f"metadata alpha_pattern[{k}]") for k, v in value.items()}
    return alpha, pattern


def _pattern_alpha(name: str, pattern: dict[str, float]) -> float | None:
    """PEFT's matching: the module name itself, a suffix of it, or a regular expression for all of it."""
    for key, value in pattern.items():
        if name == key or name.endswith("." + key):
            return value
        try:
            if re.fullmatch(key, name) or re.fullmatch(rf".*\.{key}", name):
                return value
        except re.error:
            continue
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
# IEEE formats: a value is NaN or infinite exactly when its exponent bits are all ones
_EXPONENT = {
    torch.bfloat16: (torch.int16, 0x7F80),
    torch.float16: (torch.int16, 0x7C00),
    torch.float32: (torch.int32, 0x7F800000),
}


def all_finite(t: Tensor) -> bool:
    """Whether every value of a floating-point tensor is finite. On the CPU, for bf16/fp16/fp32, from the exponent bits
    with an integer max: `torch.isfinite(...).all()` on bf16 runs unvectorized there and was most of a large LoRA's
    conversion time (bench/RESULTS.md)."""
    bits = _EXPONENT.get(t.dtype)
    if t.device.type != "cpu" or bits is None or not t.is_contiguous():
        return bool(torch.isfinite(t).all())
    view, mask = bits
    if t.numel() == 0:
        return True
    return int((t.view(view) & mask).amax()) != mask  # the masked bits are never negative: the largest tells


def _checked_pair(key: str, g: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
    """(down, up, bias) of one LoRA pair after checking what fusing relies on; LoraError naming the key otherwise."""
    down, up, bias = g["down"], g["up"], g.get("bias")
    for part, t in (("lora_A/down", down), ("lora_B/up", up), ("bias", bias)):
        if t is None:
            continue
        if not t.is_floating_point():
            raise LoraError(f"{key}: {part} must hold floating-point values, not {t.dtype}")
        if not all_finite(t):
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


def _checked_full(key: str, g: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
    """A full-weight delta (`.diff`, with `.diff_b` for the bias), checked like a pair."""
    full, bias = g["full"], g.get("full_bias")
    for part, t in (("diff", full), ("diff_b", bias)):
        if t is not None and (not t.is_floating_point() or not all_finite(t)):
            raise LoraError(f"{key}: {part} must hold finite floating-point values")
    if full.ndim != 2:
        raise LoraError(f"{key}: a .diff delta must be 2-D to apply to a linear layer, got {tuple(full.shape)}")
    if bias is not None and (bias.ndim != 1 or bias.shape[0] != full.shape[0]):
        raise LoraError(f"{key}: diff_b of shape {tuple(bias.shape)} does not match the {full.shape[0]} rows")
    return full, bias


def _checked_magnitude(key: str, magnitude: Tensor | None, rows: int, columns: int) -> Tensor | None:
    """A DoRA magnitude: finite, positive, one per output row (or one per input column)."""
    if magnitude is None:
        return None
    if not magnitude.is_floating_point() or not all_finite(magnitude):
        raise LoraError(f"{key}: the DoRA magnitude must hold finite floating-point values")
    if tuple(magnitude.shape) not in ((rows,), (rows, 1), (1, columns)):
        raise LoraError(
            f"{key}: the DoRA magnitude of shape {tuple(magnitude.shape)} fits neither the {rows} output rows nor "
            f"the {columns} input columns"
        )
    return magnitude


def convert_lora(
    sd: dict[str, Tensor], hidden_size: int, metadata: dict[str, str] | None = None, ignored: list | None = None
) -> LoraDeltas:
    """Any supported format -> {BFL module name: [LoraPart]}. Keys that are not applied (text encoder, no flow
    target) are warned about and appended to `ignored`."""
    metadata = metadata or {}
    refuse_unsupported(sd)
    groups = _group(sd)
    file_alpha, alpha_pattern = _peft_alpha(metadata)
    out: LoraDeltas = {}
    skipped_te, unknown = [], []
    for key, g in groups.items():
        if any(marker in key for marker in _TEXT_ENCODER):
            skipped_te.append(key)
            continue
        name = key
        for prefix in ("base_model.model.", "transformer.", "diffusion_model.", "model.diffusion_model.", "unet."):
            name = name.removeprefix(prefix)
        name = ONETRAINER.get(name, name)
        if "full" in g:
            full, bias = _checked_full(key, g)
            down, up, alpha, magnitude = full.new_empty(0, full.shape[1]), full.new_empty(full.shape[0], 0), None, None
        elif "down" in g and "up" in g:
            down, up, bias = _checked_pair(key, g)
            full = None
            alpha = _alpha(g["alpha"], f"{key}.alpha") if "alpha" in g else None
            if alpha is None:
                alpha = _pattern_alpha(name, alpha_pattern) if alpha_pattern else None
            alpha = file_alpha if alpha is None else alpha
            magnitude = _checked_magnitude(key, g.get("magnitude"), up.shape[0], down.shape[1])
        else:
            unknown.append(key)
            continue
        if m := re.fullmatch(r"double_blocks\.(\d+)\.processor\.(qkv|proj)_lora([12])", name):  # XLabs
            stream = "img" if m.group(3) == "1" else "txt"
            targets = [(f"double_blocks.{m.group(1)}.{stream}_attn.{m.group(2)}", None, False)]
        elif name.startswith("lora_unet_"):  # kohya
            bfl = kohya_name(name)
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
            targets = diffusers_targets(name, hidden_size)
        else:  # BFL-native (also ComfyUI after its prefix)
            targets = [(name, None, False)]
        if not targets:
            unknown.append(key)
        for target, rows, swap in targets:
            if rows is not None and rows[1] is None:
                rows = (rows[0], rows[0] + up.shape[0])
            out.setdefault(target, []).append(LoraPart(down, up, alpha, bias, rows, swap, magnitude, full))
    if skipped_te:
        logger.warning(f"LoRA: ignoring {len(skipped_te)} text-encoder layers (only the flow model is adapted)")
    if unknown:
        logger.warning(f"LoRA: ignoring {len(unknown)} keys with no flow-model target: {unknown[:20]}")
    if ignored is not None:
        ignored.extend(unknown + skipped_te)
    if not out:
        raise LoraError(f"no usable LoRA keys for the flow model; keys look like {list(sd)[:5]}")
    return out
