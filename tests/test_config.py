import json

import pytest

import hub
from flux_pipeline import FluxPipeline
from tests.helpers import ROOT, TINY_CONFIG
from util import ModelSpec, load_config, spec_from_dict


def test_defaults(tiny_cfg):
    cfg = {
        k: v
        for k, v in tiny_cfg.items()
        if k in ("version", "params", "ae_params", "ckpt_path", "ae_path", "text_enc_path")
    }
    spec = ModelSpec(**cfg)
    assert spec.flow_dtype == "bfloat16" and spec.flow_quantization_dtype == "qfloat8"
    assert spec.flux_device == "cuda:0" and spec.text_enc_max_length == 512
    assert spec.clip_path == "openai/clip-vit-large-patch14" and spec.quantize_modulation
    assert ModelSpec(**dict(cfg, version="flux-schnell")).text_enc_max_length == 256
    assert spec.lora_vram_gib is None and ModelSpec(**dict(cfg, lora_vram_gib=0)).lora_vram_gib == 0


def test_unknown_key_is_named(tiny_cfg):
    with pytest.raises(ValueError, match="flow_dtypo"):
        spec_from_dict(dict(tiny_cfg, flow_dtypo="float16"))
    with pytest.raises(ValueError, match="params.hiden_size"):
        spec_from_dict(dict(tiny_cfg, params=dict(tiny_cfg["params"], hiden_size=3)))


def test_wrong_type_is_named(tiny_cfg):
    with pytest.raises(ValueError, match="compile_blocks"):
        spec_from_dict(dict(tiny_cfg, compile_blocks="sometimes"))
    with pytest.raises(ValueError, match="flow_dtype"):
        spec_from_dict(dict(tiny_cfg, flow_dtype="int8"))
    with pytest.raises(ValueError, match="lora_vram_gib"):
        spec_from_dict(dict(tiny_cfg, lora_vram_gib=-1))


def test_missing_file_names_key_and_path(tiny_cfg):
    with pytest.raises(ValueError, match=r"ae_path.*/nope/ae\.safetensors"):
        spec_from_dict(dict(tiny_cfg, ae_path="/nope/ae.safetensors"))
    with pytest.raises(ValueError, match=r"text_enc_path.*/nope/t5"):
        spec_from_dict(dict(tiny_cfg, text_enc_path="/nope/t5"))


def test_repo_ids_are_accepted(tiny_cfg):
    spec = ModelSpec(**dict(tiny_cfg, text_enc_path="city96/t5-v1_1-xxl-encoder-bf16"))
    assert spec.text_enc_path == "city96/t5-v1_1-xxl-encoder-bf16"


def test_aliases_warn_and_apply(tiny_cfg):
    with pytest.warns(DeprecationWarning, match="offload_ae"):
        spec = ModelSpec(**dict(tiny_cfg, offload_ae=True, flux_offload=True))
    assert spec.offload_vae and spec.offload_flow


def test_ignored_keys_are_dropped(tiny_cfg):
    spec = ModelSpec(**dict(tiny_cfg, num_to_quant=20, repo_id="black-forest-labs/FLUX.1-dev", quantize_extras=True))
    assert "num_to_quant" not in spec.model_dump()


def test_bad_device_is_named(tiny_cfg):
    with pytest.raises(ValueError, match="flux_device"):
        spec_from_dict(dict(tiny_cfg, flux_device="gpu0"))


def test_config_file_overrides_and_relative_paths(tmp_path, tiny_cfg):
    cfg = dict(tiny_cfg, ckpt_path="flux.safetensors")
    (tmp_path / "flux.safetensors").write_bytes(open(tiny_cfg["ckpt_path"], "rb").read())
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    spec = load_config(tmp_path / "c.json", flow_dtype="float32")
    assert spec.flow_dtype == "float32"
    assert spec.ckpt_path == str(tmp_path / "flux.safetensors")
    with pytest.raises(ValueError, match="guidance_scale: unknown key"):
        load_config(tmp_path / "c.json", guidance_scale=3)


def test_pipeline_loader_rejects_bad_override():
    with pytest.raises(ValueError, match="flux_device"):
        FluxPipeline.load_pipeline_from_config_path(str(TINY_CONFIG), flux_device="tpu:0")


def test_the_24_gb_config_keeps_everything_resident_with_t5_in_fp8():
    spec = spec_from_dict(json.loads((ROOT / "configs" / "config-dev-1-4090.json").read_text()))
    assert spec.text_enc_quantization_dtype == "qfloat8" and spec.flow_quantization_dtype == "qfloat8"
    assert not (spec.offload_text_encoder or spec.offload_vae or spec.offload_flow)
    assert spec.compile_blocks and spec.compile_extras


def test_shipped_gpu_configs_run_with_no_editing():
    names = ("config-dev-1-H100.json", "config-dev-1-4090.json", "config-dev-offload-1-4090.json",
             "config-schnell-1-H100.json")  # fmt: skip
    for name in names:
        spec = spec_from_dict(json.loads((ROOT / "configs" / name).read_text()))
        repo = "black-forest-labs/FLUX.1-schnell" if "schnell" in name else "black-forest-labs/FLUX.1-dev"
        assert hub.split(spec.ckpt_path, None, None)[0] == repo  # the checkpoints come from the hub
        assert hub.split(spec.ae_path, None, None) == (repo, "ae.safetensors")
