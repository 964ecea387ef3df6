"""Prequantized flow checkpoints written by the original flux-fp8-api (its `F8Linear` state dict).

Each fp8 layer `P` holds `P.float8_data` (e4m3 weight), `P.scale` / `P.scale_reciprocal` (one per tensor),
`P.input_scale` / `P.input_scale_reciprocal` (static, per tensor: activations go to e5m2) and a 1-element
placeholder `P.weight`. Such a file is read either with the original's recipe, outputs as the original's on it
(`prequantized_flow: true`), or dequantized as it is read and quantized again with ours
(`prequantized_flow: false`), which is how it is converted: `python float8_quantize.py` on a config naming it.
"""

import torch
from loguru import logger
from torch import Tensor

from errors import ConfigError
from float8_quantize import EMBEDDERS, MODULATIONS, ORIGINAL_RECIPE, F8Settings

FP8_DATA = ".float8_data"
# the original's buffer -> ours, for a layer read with its recipe (None: not needed)
RENAMES = {
    "float8_data": "weight",
    "scale_reciprocal": "weight_scale",
    "input_scale_reciprocal": "input_scale",
    "input_scale": "input_multiplier",
    "scale": None,
    "weight": None,  # the placeholder
}


def fp8_layers(keys: list[str]) -> set[str]:
    """The layers stored in the original's fp8 format (empty: not such a file)."""
    return {k[: -len(FP8_DATA)] for k in keys if k.endswith(FP8_DATA)}


def settings_of(layers: set[str]) -> F8Settings:
    """The original's recipe, with its flags read from which layers the file quantized."""
    return F8Settings(
        weight_scaling="per_tensor",
        activation_scaling=ORIGINAL_RECIPE,
        quantize_modulation=any(m in name for name in layers for m in MODULATIONS),
        quantize_flow_embedder_layers=any(name.startswith(EMBEDDERS) for name in layers),
    )


def check_complete(keys: list[str], layers: set[str], path: str) -> None:
    lacking = sorted(n for n in layers if f"{n}.input_scale" not in keys or f"{n}.input_scale_reciprocal" not in keys)
    if lacking:
        raise ConfigError(
            f"{path}: {len(lacking)} fp8 layers have no input scales (e.g. {lacking[0]}); load it with "
            "prequantized_flow false to quantize it again with this project's recipe"
        )


def announce(path: str, layers: set[str]) -> None:
    logger.warning(
        f"{path} is a prequantized checkpoint of the original flux-fp8-api ({len(layers)} fp8 layers: per-tensor "
        "e4m3 weights, static e5m2 inputs); it runs with that recipe, as it did there. This project's recipe is "
        "more accurate: convert the file with `python float8_quantize.py --config-path CONFIG --output OUT` on a "
        "config naming it with prequantized_flow false, then load OUT with prequantized_flow true"
    )


def recipe_converter(layers: set[str], dtype: torch.dtype):
    """Checkpoint tensor -> ours, for the original's recipe: fp8 buffers renamed, everything else in `dtype`."""

    def convert(key: str, t: Tensor) -> dict[str, Tensor]:
        module, _, leaf = key.rpartition(".")
        if module in layers and leaf in RENAMES:
            new = RENAMES[leaf]
            if new is None:
                return {}
            return {f"{module}.{new}": t if leaf == "float8_data" else t.float().reshape(())}
        return {key: t.to(dtype)}

    return convert


def dequantized(sd: dict[str, Tensor], layers: set[str], dtype: torch.dtype) -> dict[str, Tensor]:
    """The state dict with each fp8 layer's weight back in `dtype` (float8_data x scale_reciprocal), the other
    buffers dropped: a plain checkpoint, to be quantized with this project's recipe."""
    out = {}
    for key, t in sd.items():
        module, _, leaf = key.rpartition(".")
        if module not in layers or leaf not in RENAMES:
            out[key] = t
        elif leaf == "float8_data":
            out[f"{module}.weight"] = (t.float() * sd[f"{module}.scale_reciprocal"].float()).to(dtype)
    return out
