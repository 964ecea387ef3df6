"""The component loaders, the original project's entry points (`load_config(version, flux_path=...)`,
`load_config_from_path`, `load_models_from_config[_path]`, `into_device`, `into_dtype`), and the configuration
surface of `model_spec`, re-exported: this is where the original's users import all of it from."""

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import huggingface_hub
import torch
from loguru import logger
from safetensors import safe_open
from torch import nn

import compile_cache
import encoder_quantize
import f8_original
import float8_quantize
import hub
from checkpoint_source import CheckpointSource, shared_prefix
from errors import ConfigError
from kernels import fp8_attention
from kernels.options import KernelOptions
from model_spec import (
    DEFAULTS,
    LIMITS,
    TORCH_DTYPES,
    GenerationDefaults,
    GenerationLimits,
    ModelSpec,
    ModelVersion,
    QuantizationDtype,
    load_config_file,
    spec_from_dict,
)
from modules.autoencoder import AutoEncoder, AutoEncoderParams
from modules.conditioner import HFEmbedder
from modules.flux_model import Flux, FluxParams

__all__ = [
    "DEFAULTS", "LIMITS", "TORCH_DTYPES", "GenerationDefaults", "GenerationLimits", "ModelSpec", "ModelVersion",
    "QuantizationDtype", "spec_from_dict", "load_config", "load_config_from_path", "load_models",
    "load_models_from_config", "load_models_from_config_path", "LoadedModels", "into_device", "into_dtype",
    "check_device", "read_metadata", "read_safetensors", "assign_state_dict", "load_flow_model",
    "write_prequantized", "load_autoencoder", "load_text_encoders",
]  # fmt: skip

Convert = Callable[[str, torch.Tensor], dict[str, torch.Tensor]]
VERSIONS = tuple(v.value for v in ModelVersion)
DEFAULT_CONFIGS = {
    version: Path(__file__).parent / "configs" / f"config-{version[5:]}-1-H100.json" for version in VERSIONS
}
# the original's `load_config` keywords that are not config keys -> the config key each one sets
_ORIGINAL_ARGS = {
    "flux_path": "ckpt_path",
    "offload_text_enc": "offload_text_encoder",
    "offload_ae": "offload_vae",
}


def load_config(path_or_version: str | Path = ModelVersion.flux_dev, **overrides: Any) -> ModelSpec:
    """A `ModelSpec` from a JSON config file, `overrides` being config keys. Given a model version instead of a
    path (`load_config("flux-schnell", flux_path=..., ae_path=...)`, or `name=...`), it is the original's
    `load_config`: that version's defaults with the original's keyword arguments, which are accepted too."""
    version = overrides.pop("name", None)
    if version is None and str(path_or_version) in VERSIONS:
        version = str(path_or_version)
    if version is None:
        return load_config_file(path_or_version, **overrides)
    keys = {_ORIGINAL_ARGS.get(k, k): v for k, v in overrides.items() if v is not None}
    if "quant_text_enc" in keys:  # the original's choices; its "float8" is qfloat8 (its own typo made it none)
        quant = keys.pop("quant_text_enc")
        keys["text_enc_quantization_dtype"] = {"float8": "qfloat8", "bf16": None}.get(quant, quant)
    if keys.pop("quant_ae", False):
        keys["ae_quantization_dtype"] = "qfloat8"
    keys = {"version": str(version), "compile_blocks": False, "compile_extras": False, **keys}
    return load_config_file(DEFAULT_CONFIGS[str(version)], **keys)


def load_config_from_path(path: str | Path) -> ModelSpec:
    """The original's name for reading a config file."""
    return load_config_file(path)


class LoadedModels(NamedTuple):
    flow: nn.Module
    ae: AutoEncoder
    clip: HFEmbedder
    t5: HFEmbedder
    config: ModelSpec


def load_models(config: ModelSpec) -> tuple[nn.Module, AutoEncoder, HFEmbedder, HFEmbedder]:
    """(flow, ae, clip, t5), each on its configured device."""
    return load_flow_model(config), load_autoencoder(config), *load_text_encoders(config)


def load_models_from_config(config: ModelSpec) -> LoadedModels:
    flow, ae, clip, t5 = load_models(config)
    return LoadedModels(flow, ae, clip, t5, config)


def load_models_from_config_path(path: str | Path) -> LoadedModels:
    return load_models_from_config(load_config_file(path))


def into_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"not a dtype name: {dtype!r} (one of {sorted(TORCH_DTYPES)})")
    return TORCH_DTYPES[dtype]


def into_device(device: str | int | torch.device | None) -> torch.device:
    """A device from a name, a CUDA index, or None (cuda:0), as the original took them."""
    if device is None:
        return torch.device("cuda:0")
    if isinstance(device, int) and not isinstance(device, bool):
        return torch.device(f"cuda:{device}")
    return torch.device(device)


def flow_checkpoint(config: ModelSpec) -> str:
    """The flow model's file on disk (downloaded first when the config names it on the hub)."""
    return hub.resolve(config.ckpt_path, config.repo_id, config.repo_flow, "ckpt_path")


def check_device(device: str, key: str) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{key} is {device!r} but CUDA is not available (use 'cpu')")
        if (dev.index or 0) >= torch.cuda.device_count():
            raise ConfigError(f"{key} is {device!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
    return dev


def read_keys(path: str) -> list[str]:
    with safe_open(path, framework="pt", device="cpu") as f:
        return list(f.keys())


def read_metadata(path: str) -> dict[str, str]:
    with safe_open(path, framework="pt", device="cpu") as f:
        return f.metadata() or {}


def read_safetensors(path: str, device: torch.device, convert: Convert | None = None) -> dict[str, torch.Tensor]:
    """Stream a safetensors file tensor by tensor onto `device`.

    `convert(key, tensor) -> {key: tensor}` runs on each tensor as it arrives (cast, quantize), so the file's
    own dtype is never held for the whole model. A prefix that every key shares (ComfyUI's
    `model.diffusion_model.`) is dropped.
    """
    tensors = {}
    with safe_open(path, framework="pt", device=str(device)) as f:
        keys = list(f.keys())
        prefix = shared_prefix(keys)
        for key in keys:
            tensor = f.get_tensor(key)
            name = key[len(prefix) :]
            tensors.update(convert(name, tensor) if convert else {name: tensor})
    return tensors


def assign_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    """`load_state_dict(assign=True)` that fails on missing keys and reports unexpected ones."""
    expected = set(model.state_dict().keys())
    missing = sorted(expected - sd.keys())
    unexpected = sorted(sd.keys() - expected)
    if missing:
        raise ConfigError(f"{what}: checkpoint lacks {len(missing)} keys, e.g. {missing[:5]}")
    if unexpected:
        logger.warning(f"{what}: ignoring {len(unexpected)} unexpected keys, e.g. {unexpected[:5]}")
    model.load_state_dict({k: sd[k] for k in expected}, strict=True, assign=True)


def load_flow_model(config: ModelSpec, options: KernelOptions = KernelOptions()) -> nn.Module:
    """The flow transformer on `flux_device` in `flow_dtype`, fp8 linears if `flow_quantization_dtype` is qfloat8,
    fp8 attention if the config's `fp8_attention` or `options.fp8_attention` asks for it."""
    device = check_device(config.flux_device, "flux_device")
    options = dataclasses.replace(options, fp8_attention=config.fp8_attention or options.fp8_attention)
    if options.fp8_attention:  # checked before any weight is read
        if device.type != "cuda":
            logger.warning(f"fp8_attention on {device}: torch ops emulate cuDNN's fp8 math, slower than the default")
        elif problem := fp8_attention.unsupported(device, config.params.hidden_size // config.params.num_heads):
            raise ConfigError(f"fp8_attention: {problem}")
    with torch.device("meta"):
        model = Flux(FluxParams(**config.params.model_dump()), options)
    if config.flow_fp8:
        _load_fp8_weights(model, config, device)
    else:
        if config.prequantized_flow:
            raise ConfigError("prequantized_flow is true but flow_quantization_dtype is not 'qfloat8'")
        dtype = config.flow_torch_dtype
        path = flow_checkpoint(config)
        sd = read_safetensors(path, device, lambda k, t: {k: t.to(dtype)})
        assign_state_dict(model, sd, f"flow model {path}")
        if config.flow_quantization_dtype in encoder_quantize.QUANTO_TYPES:  # weight-only: the fp8 layers' set
            settings = config.f8_settings
            # quanto's 4-bit weights are grouped by 128 inputs; a layer with fewer or an odd count stays as it is
            group = 128 if config.flow_quantization_dtype == "qint4" else 1
            names = [
                n
                for n, m in model.named_modules()
                if isinstance(m, nn.Linear)
                and float8_quantize.quantized_layer(n, settings)
                and m.in_features % group == 0
            ]
            encoder_quantize.quanto_quantize(model, config.flow_quantization_dtype, include=names)
    if options.fp8_attention:
        logger.info("fp8 attention on: e4m3 q, k, v, probabilities and output (opt-in, not exact; see README)")
    return model.eval().requires_grad_(False)


def _load_fp8_weights(model: Flux, config: ModelSpec, device: torch.device) -> None:
    """Swap `model`'s (meta) linears for F8Linear and fill it from `config.ckpt_path`, quantizing tensor by tensor.

    A bf16 checkpoint is quantized as each weight arrives on `device`, so the peak is the fp8 model plus one bf16
    tensor; a prequantized one is read as is.
    """
    settings, dtype, path = config.f8_settings, config.flow_torch_dtype, flow_checkpoint(config)
    original = f8_original.fp8_layers(read_keys(path))
    if original:
        return _load_original_fp8(model, config, device, original)
    f8_modules = float8_quantize.swap_for_f8(model, settings, config.f8_fast_accum, dtype)
    metadata = read_metadata(path)
    if config.prequantized_flow:
        float8_quantize.check_metadata(metadata, settings, config.params.model_dump(), path)
    elif metadata.get("format") == float8_quantize.METADATA_FORMAT:
        raise ConfigError(f"{path} is a prequantized checkpoint: set prequantized_flow to true")
    convert = float8_quantize.tensor_converter(f8_modules, settings, dtype, config.prequantized_flow)
    sd = read_safetensors(path, device, convert)
    needs_calibration = settings.activation_scaling == "static_per_tensor" and not config.prequantized_flow
    if needs_calibration:
        sd.update({f"{n}.input_scale": torch.zeros((), device=device) for n in f8_modules})
    assign_state_dict(model, sd, f"flow model {path}")
    model.eval().requires_grad_(False)
    float8_quantize.match_device(model, device)
    if needs_calibration:
        float8_quantize.calibrate(model, dtype, size=config.f8_calibration_size)
    logger.info(
        f"fp8 flow model: {len(f8_modules)} F8Linear layers ({settings.weight_scaling} weights, "
        f"{settings.activation_scaling} activations) on {device}"
    )


def _load_original_fp8(model: Flux, config: ModelSpec, device: torch.device, layers: set[str]) -> None:
    """A prequantized file of the original flux-fp8-api: run with its recipe (`prequantized_flow`), or dequantized
    and quantized again with ours (what converts it)."""
    dtype, path = config.flow_torch_dtype, flow_checkpoint(config)
    if config.prequantized_flow:
        f8_original.check_complete(read_keys(path), layers, path)
        settings = f8_original.settings_of(layers)
        float8_quantize.swap_for_f8(model, settings, True, dtype)  # the original always used fast accumulation
        f8_original.announce(path, layers)
        sd = read_safetensors(path, device, f8_original.recipe_converter(layers, dtype))
    else:
        settings = config.f8_settings
        f8_modules = float8_quantize.swap_for_f8(model, settings, config.f8_fast_accum, dtype)
        plain = f8_original.dequantized(read_safetensors(path, device), layers, dtype)
        convert = float8_quantize.tensor_converter(f8_modules, settings, dtype, False)
        sd = {k: v for key, t in plain.items() for k, v in convert(key, t).items()}
        logger.info(f"{path}: the original flux-fp8-api's fp8 weights, dequantized and quantized again")
        if settings.activation_scaling == "static_per_tensor":
            sd.update({f"{n}.input_scale": torch.zeros((), device=device) for n in f8_modules})
    assign_state_dict(model, sd, f"flow model {path}")
    model.eval().requires_grad_(False)
    float8_quantize.match_device(model, device)
    if not config.prequantized_flow and settings.activation_scaling == "static_per_tensor":
        float8_quantize.calibrate(model, dtype, size=config.f8_calibration_size)


def write_prequantized(config_path: str, output: str, device: str | None = None) -> None:
    """Quantize the flow model a config names (on `device`, default its `flux_device`) and write it to `output`."""
    overrides: dict[str, Any] = {"flow_quantization_dtype": "qfloat8", "prequantized_flow": False}
    if device:
        overrides["flux_device"] = device
    config = load_config_file(config_path, **overrides)
    metadata = float8_quantize.metadata_for(config.f8_settings, config.params.model_dump(), config.flow_dtype)
    float8_quantize.save_prequantized(load_flow_model(config), output, metadata)


def compile_artifact(config: ModelSpec) -> Path | None:
    """The compile-cache artifact this config's starts load (`compile_cache`), or None where the config turns it
    off."""
    return compile_cache.artifact_path(config.compile_cache, lambda: flow_checkpoint(config))


def checkpoint_source(config: ModelSpec, model: nn.Module) -> CheckpointSource | None:
    """The flow model's checkpoint as LoRA unloads read it back (`checkpoint_source`): each tensor converted as
    `load_flow_model` converted it, on the model's device. None where that cannot be the same bits: optimum-quanto
    weights, the original flux-fp8-api's fp8 files (dequantized and re-quantized, or its own recipe)."""
    if not config.flow_fp8 and config.flow_quantization_dtype in encoder_quantize.QUANTO_TYPES:
        return None
    path = flow_checkpoint(config)
    if f8_original.fp8_layers(read_keys(path)):
        return None
    device = next(model.parameters()).device
    dtype = config.flow_torch_dtype
    if config.flow_fp8:
        f8_modules = {n: m for n, m in model.named_modules() if isinstance(m, float8_quantize.F8Linear)}
        convert = float8_quantize.tensor_converter(f8_modules, config.f8_settings, dtype, config.prequantized_flow)
    else:
        convert = lambda key, t: {key: t.to(dtype)}  # noqa: E731 - as load_flow_model reads an unquantized file
    return CheckpointSource(path, convert, device)


def load_autoencoder(config: ModelSpec, options: KernelOptions = KernelOptions()) -> AutoEncoder:
    device = check_device(config.ae_device, "ae_device")
    with torch.device("meta"):
        ae = AutoEncoder(AutoEncoderParams(**config.ae_params.model_dump()), options)
    dtype = TORCH_DTYPES[config.ae_dtype]
    path = hub.resolve(config.ae_path, config.repo_id, config.repo_ae, "ae_path")
    sd = read_safetensors(path, device, lambda k, t: {k: t.to(dtype)})
    assign_state_dict(ae, sd, f"autoencoder {path}")
    if config.ae_quantization_dtype == "qfloat8":
        encoder_quantize.quantize_autoencoder(ae)
    elif config.ae_quantization_dtype in encoder_quantize.QUANTO_TYPES:
        encoder_quantize.quanto_quantize(ae, config.ae_quantization_dtype)
    return ae.eval().requires_grad_(False)


def _load_encoder(path: str, is_clip: bool, max_length: int, dtype: torch.dtype, device: torch.device, quant):
    # transformers takes seconds to import: only what loads the text encoders pays for it
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel
    from transformers.utils import logging as transformers_logging

    if os.environ.get("FLUX_QUIET_LOADING"):  # a server's log: no per-layer bars, but downloads keep theirs
        transformers_logging.disable_progress_bar()
        huggingface_hub.utils.enable_progress_bars()

    model_cls = CLIPTextModel if is_clip else T5EncoderModel
    tokenizer = AutoTokenizer.from_pretrained(path)
    bnb = encoder_quantize.bitsandbytes_config(quant, dtype)
    if bnb is not None:
        if device.type != "cuda":
            raise ConfigError(f"text encoder quantization {quant!r} (bitsandbytes) needs a CUDA device, not {device}")
        model = model_cls.from_pretrained(path, dtype=dtype, quantization_config=bnb, device_map={"": device})
    else:
        # a GPU's encoder is read straight onto it and quantized there: T5-XXL's 4.8B weights take seconds on the
        # GPU, tens of seconds on the CPU (the bf16 copy is freed layer by layer as quanto freezes the weights)
        on_gpu = device.type == "cuda"
        model = model_cls.from_pretrained(path, dtype=dtype, **({"device_map": {"": device}} if on_gpu else {}))
        if quant == "qfloat8":  # ours: no extension to build (quanto's is `quanto_qfloat8`)
            encoder_quantize.fp8_text_encoder(model)
        elif quant in encoder_quantize.QUANTO:  # the text encoders' qint4/qint8 are bitsandbytes'
            encoder_quantize.quanto_quantize(model, quant)
        if not on_gpu:
            model = model.to(device)
    return HFEmbedder(tokenizer, model, max_length=max_length, is_clip=is_clip)


def import_text_encoder_code() -> None:
    """Import what `load_text_encoders` needs from transformers (seconds: it is a large package)."""
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel  # noqa: F401


# T5-XXL is read onto its GPU in bf16 before it is quantized: beside a resident flow model that needs this much
TEXT_ENCODERS_AFTER_FLOW_GIB = 48


def text_encoders_after_flow(config: ModelSpec) -> bool:
    """Whether the text encoders can load after the flow model (and transformers be imported meanwhile): they do
    not share a GPU with it, or that GPU has room for the flow model beside T5's bf16 weights. On a 24 GB card the
    text encoders load first, so that T5 is quantized before the flow model takes its share."""
    text, flow = torch.device(config.text_enc_device), torch.device(config.flux_device)
    if text.type != "cuda" or flow.type != "cuda" or (text.index or 0) != (flow.index or 0):  # as `check_device`
        return True
    return torch.cuda.get_device_properties(text.index or 0).total_memory >= TEXT_ENCODERS_AFTER_FLOW_GIB * 2**30


def load_text_encoders(config: ModelSpec) -> tuple[HFEmbedder, HFEmbedder]:
    """(clip, t5), on `text_enc_device` in `text_enc_dtype`."""
    device = check_device(config.text_enc_device, "text_enc_device")
    dtype = TORCH_DTYPES[config.text_enc_dtype]
    clip = _load_encoder(config.clip_path, True, 77, dtype, device, config.clip_quantization_dtype)
    t5 = _load_encoder(
        config.text_enc_path, False, config.text_enc_max_length, dtype, device, config.text_enc_quantization_dtype
    )
    return clip, t5
