"""Configuration (`ModelSpec`), the generation defaults and limits, and the component loaders."""

import dataclasses
import json
import os
import warnings
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import torch
from loguru import logger
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from safetensors import safe_open
from torch import nn

import encoder_quantize
import float8_quantize
from errors import ConfigError
from float8_quantize import F8Settings
from kernels import fp8_attention
from kernels.options import KernelOptions
from modules.autoencoder import AutoEncoder, AutoEncoderParams
from modules.conditioner import HFEmbedder
from modules.flux_model import Flux, FluxParams


@dataclasses.dataclass(frozen=True)
class GenerationDefaults:
    """What a request leaves out gets these (the original's), in the CLI, the HTTP API and `FluxPipeline`."""

    width: int = 720
    height: int = 1024
    num_steps: int = 24
    guidance: float = 3.5
    strength: float = 1.0
    num_images: int = 1
    jpeg_quality: int = 99


@dataclasses.dataclass(frozen=True)
class GenerationLimits:
    """What the HTTP API accepts (the Python API floors sizes to multiples of 16 and leaves the rest to the caller)."""

    size_multiple: int = 16
    min_size: int = 128
    max_size: int = 2048
    max_pixels: int = 2048 * 2048
    max_steps: int = 100
    max_guidance: float = 20.0
    max_images: int = 4
    max_seed: int = 2**53 - 1  # exact in JSON numbers
    max_prompt_chars: int = 10_000
    max_init_image_bytes: int = 20 * 1024 * 1024


DEFAULTS = GenerationDefaults()
LIMITS = GenerationLimits()

# Keys of the original's configs: renamed (warned, then used) or informational (warned, then ignored).
RENAMED_KEYS = {
    "offload_ae": "offload_vae",
    "offload_text_enc": "offload_text_encoder",
    "ae_offload": "offload_vae",
    "text_enc_offload": "offload_text_encoder",
    "flux_offload": "offload_flow",
}
IGNORED_KEYS = ("num_to_quant", "quantize_extras", "repo_id", "repo_flow", "repo_ae")


class ModelVersion(str, Enum):
    flux_dev = "flux-dev"
    flux_schnell = "flux-schnell"


DType = Literal["bfloat16", "float16", "float32"]
TextQuant = Literal["qfloat8", "qint2", "qint4", "qint8", "bfloat16", "float16"]
Convert = Callable[[str, torch.Tensor], dict[str, torch.Tensor]]
TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class FluxParamsSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    in_channels: int = Field(gt=0)
    vec_in_dim: int = Field(gt=0)
    context_in_dim: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    mlp_ratio: float = Field(gt=0)
    num_heads: int = Field(gt=0)
    depth: int = Field(ge=0)
    depth_single_blocks: int = Field(ge=0)
    axes_dim: list[int]
    theta: int = Field(gt=0)
    qkv_bias: bool
    guidance_embed: bool


class AutoEncoderParamsSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    resolution: int = Field(gt=0)
    in_channels: int = Field(gt=0)
    ch: int = Field(gt=0)
    out_ch: int = Field(gt=0)
    ch_mult: list[int]
    num_res_blocks: int = Field(gt=0)
    z_channels: int = Field(gt=0)
    scale_factor: float
    shift_factor: float


class ModelSpec(BaseModel):
    """Everything needed to build a FluxPipeline; the keys of the JSON config files."""

    model_config = ConfigDict(extra="forbid", use_enum_values=True, validate_assignment=True)

    version: ModelVersion
    params: FluxParamsSpec
    ae_params: AutoEncoderParamsSpec
    ckpt_path: str
    ae_path: str
    text_enc_path: str
    clip_path: str = "openai/clip-vit-large-patch14"
    text_enc_max_length: int | None = Field(default=None, gt=0, le=4096)
    flux_device: str = "cuda:0"
    text_enc_device: str = "cuda:0"
    ae_device: str = "cuda:0"
    flow_dtype: DType = "bfloat16"
    ae_dtype: DType = "bfloat16"
    text_enc_dtype: DType = "bfloat16"
    text_enc_quantization_dtype: TextQuant | None = "qfloat8"
    clip_quantization_dtype: TextQuant | None = None
    ae_quantization_dtype: Literal["qfloat8", "bfloat16", "float16"] | None = None
    flow_quantization_dtype: Literal["qfloat8", "bfloat16", "float16"] | None = "qfloat8"
    compile_blocks: bool = False
    compile_extras: bool = False
    cuda_graphs: bool = True  # replay the flow model's forward as a CUDA graph (CUDA, flow not offloaded)
    offload_text_encoder: bool = False
    offload_vae: bool = False
    offload_flow: bool = False
    prequantized_flow: bool = False
    quantize_modulation: bool = True
    quantize_flow_embedder_layers: bool = False
    prompt_emphasis: bool = False  # A1111-style (word:1.3) weights on the T5 tokens
    # fp8 modes (float8_quantize.py); the defaults are chosen by measurement, see bench/RESULTS.md
    f8_weight_scaling: Literal["per_channel", "per_tensor"] = "per_channel"
    f8_activation_scaling: Literal["dynamic_per_token", "dynamic_per_tensor", "static_per_tensor"] = "dynamic_per_token"
    f8_fast_accum: bool = True
    f8_calibration_size: int = Field(default=float8_quantize.CALIBRATION_SIZE, ge=64, le=2048, multiple_of=16)
    fp8_attention: bool = False  # opt-in fast mode: attention in e4m3 too (not exact; kernels/fp8_attention.py)

    @model_validator(mode="before")
    @classmethod
    def _legacy_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for old, new in RENAMED_KEYS.items():
            if old in data:
                value = data.pop(old)
                if new in data and data[new] != value:
                    raise ValueError(f"config key '{old}' (deprecated alias of '{new}') conflicts with '{new}'")
                warnings.warn(f"config key '{old}' is deprecated; use '{new}'", DeprecationWarning, stacklevel=2)
                logger.warning(f"config key '{old}' is deprecated; use '{new}'")
                data.setdefault(new, value)
        for key in IGNORED_KEYS:
            if key in data:
                logger.warning(f"config key '{key}' is ignored (kept for compatibility with older configs)")
                data.pop(key)
        return data

    @field_validator("flux_device", "text_enc_device", "ae_device")
    @classmethod
    def _device(cls, value: str) -> str:
        try:
            torch.device(value)
        except RuntimeError as e:
            raise ValueError(f"not a torch device: {value!r}") from e
        return value

    @field_validator("ckpt_path", "ae_path")
    @classmethod
    def _file_exists(cls, value: str, info) -> str:
        if not Path(value).expanduser().is_file():
            raise ValueError(f"{info.field_name}: file not found: {value}")
        return str(Path(value).expanduser())

    @field_validator("text_enc_path", "clip_path")
    @classmethod
    def _dir_or_repo(cls, value: str, info) -> str:
        path = Path(value).expanduser()
        looks_local = value.startswith(("/", ".", "~")) or value.count("/") > 1 or os.sep in value.replace("/", "")
        if looks_local and not path.is_dir():
            raise ValueError(f"{info.field_name}: directory not found: {value}")
        return str(path) if path.is_dir() else value

    @model_validator(mode="after")
    def _consistent(self) -> "ModelSpec":
        head_dim = self.params.hidden_size // self.params.num_heads
        if self.params.hidden_size % self.params.num_heads or sum(self.params.axes_dim) != head_dim:
            raise ValueError(f"params.axes_dim {self.params.axes_dim} must sum to hidden_size / num_heads")
        if self.text_enc_max_length is None:
            self.text_enc_max_length = 256 if self.version == "flux-schnell" else 512
        return self

    @property
    def flow_torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.flow_dtype]

    @property
    def flow_fp8(self) -> bool:
        return self.flow_quantization_dtype == "qfloat8"

    @property
    def f8_settings(self) -> F8Settings:
        return F8Settings(
            weight_scaling=self.f8_weight_scaling,
            activation_scaling=self.f8_activation_scaling,
            quantize_modulation=self.quantize_modulation,
            quantize_flow_embedder_layers=self.quantize_flow_embedder_layers,
        )


def _resolve_relative(data: dict, base_dir: Path) -> dict:
    """Relative paths in a config file are tried against the working directory, then the file's folder."""
    data = dict(data)
    for key in ("ckpt_path", "ae_path", "text_enc_path", "clip_path"):
        value = data.get(key)
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            if not Path(value).exists() and (base_dir / value).exists():
                data[key] = str(base_dir / value)
    return data


def load_config(path: str | os.PathLike, **overrides: Any) -> ModelSpec:
    """Read a JSON config; `overrides` are config keys, validated like the file's."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a JSON object")
    data.update(overrides)
    return spec_from_dict(_resolve_relative(data, path.parent))


def spec_from_dict(data: dict) -> ModelSpec:
    """`ModelSpec(**data)` with errors that name every offending key in one line each."""
    try:
        return ModelSpec(**data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"]) or "config"
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"{key}: {msg}")
        raise ConfigError("invalid config: " + "; ".join(lines)) from None


def check_device(device: str, key: str) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{key} is {device!r} but CUDA is not available (use 'cpu')")
        if (dev.index or 0) >= torch.cuda.device_count():
            raise ConfigError(f"{key} is {device!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
    return dev


def read_metadata(path: str) -> dict[str, str]:
    with safe_open(path, framework="pt", device="cpu") as f:
        return f.metadata() or {}


CKPT_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def read_safetensors(path: str, device: torch.device, convert: Convert | None = None) -> dict[str, torch.Tensor]:
    """Stream a safetensors file tensor by tensor onto `device`.

    `convert(key, tensor) -> {key: tensor}` runs on each tensor as it arrives (cast, quantize), so the file's
    own dtype is never held for the whole model. A prefix that every key shares (ComfyUI's
    `model.diffusion_model.`) is dropped.
    """
    tensors = {}
    with safe_open(path, framework="pt", device=str(device)) as f:
        keys = list(f.keys())
        prefix = next((p for p in CKPT_PREFIXES if keys and all(k.startswith(p) for k in keys)), "")
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
        sd = read_safetensors(config.ckpt_path, device, lambda k, t: {k: t.to(dtype)})
        assign_state_dict(model, sd, f"flow model {config.ckpt_path}")
    if options.fp8_attention:
        logger.info("fp8 attention on: e4m3 q, k, v, probabilities and output (opt-in, not exact; see README)")
    return model.eval().requires_grad_(False)


def _load_fp8_weights(model: Flux, config: ModelSpec, device: torch.device) -> None:
    """Swap `model`'s (meta) linears for F8Linear and fill it from `config.ckpt_path`, quantizing tensor by tensor.

    A bf16 checkpoint is quantized as each weight arrives on `device`, so the peak is the fp8 model plus one bf16
    tensor; a prequantized one is read as is.
    """
    settings, dtype, path = config.f8_settings, config.flow_torch_dtype, config.ckpt_path
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


def write_prequantized(config_path: str, output: str, device: str | None = None) -> None:
    """Quantize the flow model a config names (on `device`, default its `flux_device`) and write it to `output`."""
    overrides: dict[str, Any] = {"flow_quantization_dtype": "qfloat8", "prequantized_flow": False}
    if device:
        overrides["flux_device"] = device
    config = load_config(config_path, **overrides)
    metadata = float8_quantize.metadata_for(config.f8_settings, config.params.model_dump(), config.flow_dtype)
    float8_quantize.save_prequantized(load_flow_model(config), output, metadata)


def load_autoencoder(config: ModelSpec, options: KernelOptions = KernelOptions()) -> AutoEncoder:
    device = check_device(config.ae_device, "ae_device")
    with torch.device("meta"):
        ae = AutoEncoder(AutoEncoderParams(**config.ae_params.model_dump()), options)
    dtype = TORCH_DTYPES[config.ae_dtype]
    sd = read_safetensors(config.ae_path, device, lambda k, t: {k: t.to(dtype)})
    assign_state_dict(ae, sd, f"autoencoder {config.ae_path}")
    if config.ae_quantization_dtype == "qfloat8":
        encoder_quantize.quantize_autoencoder(ae)
    return ae.eval().requires_grad_(False)


def _load_encoder(path: str, is_clip: bool, max_length: int, dtype: torch.dtype, device: torch.device, quant):
    # transformers takes seconds to import: only what loads the text encoders pays for it
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

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
        if quant in encoder_quantize.QUANTO:
            encoder_quantize.quanto_quantize(model, quant)
        if not on_gpu:
            model = model.to(device)
    return HFEmbedder(tokenizer, model, max_length=max_length, is_clip=is_clip)


def load_text_encoders(config: ModelSpec) -> tuple[HFEmbedder, HFEmbedder]:
    """(clip, t5), on `text_enc_device` in `text_enc_dtype`."""
    device = check_device(config.text_enc_device, "text_enc_device")
    dtype = TORCH_DTYPES[config.text_enc_dtype]
    clip = _load_encoder(config.clip_path, True, 77, dtype, device, config.clip_quantization_dtype)
    t5 = _load_encoder(
        config.text_enc_path, False, config.text_enc_max_length, dtype, device, config.text_enc_quantization_dtype
    )
    return clip, t5
