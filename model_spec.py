"""The configuration: `ModelSpec` (the keys of the JSON config files), the generation defaults and limits, and
reading a config file. `util` re-exports all of it, where the original project's users find it."""

import dataclasses
import json
import os
import warnings
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import torch
from loguru import logger
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

import float8_quantize
import hub
from errors import ConfigError
from float8_quantize import F8Settings


@dataclasses.dataclass(frozen=True)
class GenerationDefaults:
    """What a request leaves out gets these (the original's), in the CLI, the HTTP API and `FluxPipeline`."""

    width: int = 720
    height: int = 1024
    num_steps: int = 24
    schnell_steps: int = 4  # flux-schnell is distilled for 4 steps: its default, as in the original
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
IGNORED_KEYS = ("num_to_quant", "quantize_extras")


class ModelVersion(str, Enum):
    flux_dev = "flux-dev"
    flux_schnell = "flux-schnell"


class QuantizationDtype(str, Enum):
    """The original's names of the quantized weight types (quanto's; qint4/qint8 of a text encoder: bitsandbytes)."""

    qfloat8 = "qfloat8"
    qint2 = "qint2"
    qint4 = "qint4"
    qint8 = "qint8"


DType = Literal["bfloat16", "float16", "float32"]
TextQuant = Literal["qfloat8", "quanto_qfloat8", "qint2", "qint4", "qint8", "bfloat16", "float16"]
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
    # a local file, "org/repo:file.safetensors", or None with repo_id + repo_flow / repo_ae (hub.py)
    ckpt_path: str | None = None
    ae_path: str | None = None
    repo_id: str | None = None
    repo_flow: str | None = None
    repo_ae: str | None = None
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
    # qfloat8: fp8 conv weights (ours); qint8/qint4: optimum-quanto weights, as the original's gigaquant config asks
    ae_quantization_dtype: Literal["qfloat8", "qint8", "qint4", "bfloat16", "float16"] | None = None
    # qfloat8: true fp8 matmuls; qint8/qint4: optimum-quanto weight-only (GPUs without fp8, smaller cards)
    flow_quantization_dtype: Literal["qfloat8", "qint8", "qint4", "bfloat16", "float16"] | None = "qfloat8"
    compile_blocks: bool = False
    compile_extras: bool = False
    cuda_graphs: bool = True  # replay the flow model's forward as a CUDA graph (CUDA, flow not offloaded)
    # the compile-cache artifact loaded before compiling (compile_cache.py); None: `<ckpt_path>.compile-cache`;
    # "off": none
    compile_cache: str | None = None
    # GiB of the flow GPU's memory that pristine copies of LoRA-touched layers may take (lora_fusing.py); None: what
    # leaves the card 16 GiB or a quarter free; 0: none (unloads read the checkpoint file)
    lora_vram_gib: float | None = Field(default=None, ge=0)
    offload_text_encoder: bool = False
    offload_vae: bool = False
    offload_flow: bool = False
    prequantized_flow: bool = False
    quantize_modulation: bool = True
    quantize_flow_embedder_layers: bool = False
    # A1111-style (word:1.3) weights on the T5 tokens, on as in the original; a request may turn it off
    prompt_emphasis: bool = True
    # fp8 modes (float8_quantize.py); the defaults are chosen by measurement, see bench/RESULTS.md
    f8_weight_scaling: Literal["per_channel", "per_tensor"] = "per_channel"
    f8_activation_scaling: Literal["dynamic_per_token", "dynamic_per_tensor", "static_per_tensor"] = "dynamic_per_token"
    f8_fast_accum: bool = True
    f8_calibration_size: int = Field(default=float8_quantize.CALIBRATION_SIZE, ge=64, le=2048, multiple_of=16)
    fp8_attention: bool = False  # opt-in fast mode: attention in e4m3 too (not exact; kernels/fp8_attention.py)

    @model_validator(mode="before")
    @classmethod
    def _legacy_keys(cls, data: Any) -> Any:
        return renamed_keys(data) if isinstance(data, dict) else data

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
    def _expand_user(cls, value: str | None) -> str | None:
        if value is None or hub.is_reference(value):
            return value  # found (or downloaded) when the model loads
        return str(Path(value).expanduser())  # checked with the repo keys in `_consistent`

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
        for key, repo_file in (("ckpt_path", "repo_flow"), ("ae_path", "repo_ae")):
            value, in_repo = getattr(self, key), bool(self.repo_id and getattr(self, repo_file))
            if value is not None and not hub.is_reference(value) and not Path(value).is_file():
                if not in_repo:
                    raise ValueError(f"{key}: file not found: {value}")
                # the original's configs name the author's files and the repo they came from: the repo then
                logger.warning(f"{key} {value} not found: using {self.repo_id}:{getattr(self, repo_file)}")
                object.__setattr__(self, key, None)
            elif value is None and not in_repo:
                raise ValueError(f"{key}: give a file, 'org/repo:file.safetensors', or repo_id and {repo_file}")
        if self.text_enc_max_length is None:
            self.text_enc_max_length = 256 if self.version == "flux-schnell" else 512
        return self

    @property
    def flow_torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.flow_dtype]

    @property
    def compiles(self) -> bool:
        """Whether loading compiles anything (and warms up)."""
        return self.compile_blocks or self.compile_extras

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


def renamed_keys(data: dict) -> dict:
    """The original's keys in their current names (a warning each), its ignored keys dropped; an old key beside its
    new name with another value is an error. Applied to a file and to its overrides apart, an override of either
    name wins over the file's."""
    data = dict(data)
    for old, new in RENAMED_KEYS.items():
        if old in data:
            value = data.pop(old)
            if new in data and data[new] != value:
                raise ValueError(f"config key '{old}' (deprecated alias of '{new}') conflicts with '{new}'")
            warnings.warn(f"config key '{old}' is deprecated; use '{new}'", DeprecationWarning, stacklevel=3)
            logger.warning(f"config key '{old}' is deprecated; use '{new}'")
            data.setdefault(new, value)
    for key in IGNORED_KEYS:
        if key in data:
            logger.warning(f"config key '{key}' is ignored (kept for compatibility with older configs)")
            data.pop(key)
    return data


def _resolve_relative(data: dict, base_dir: Path) -> dict:
    """Relative paths in a config file are tried against the working directory, then the file's folder."""
    data = dict(data)
    for key in ("ckpt_path", "ae_path", "text_enc_path", "clip_path"):
        value = data.get(key)
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            if not Path(value).exists() and (base_dir / value).exists():
                data[key] = str(base_dir / value)
    return data


def load_config_file(path: str | os.PathLike, **overrides: Any) -> ModelSpec:
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
    try:
        data = {**renamed_keys(data), **renamed_keys(overrides)}
    except ValueError as e:
        raise ConfigError(f"invalid config {path}: {e}") from None
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
