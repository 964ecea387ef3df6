"""LoRA formats beyond the plain pair: DoRA (checked against PEFT/diffusers applying the same adapter), OneTrainer
key names, `.diff` full-weight deltas, PEFT's per-module `alpha_pattern`, and the files that are refused with a
clear error (LyCORIS LoKr/LoHa, BFL's control LoRAs). Keys that are not applied are reported, never dropped
silently."""

import json

import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from errors import LoraError
from flux_pipeline import FluxPipeline
from tests.helpers import diffusers_flux, diffusers_forward, random_inputs

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2", "proj_out", "norm1.linear", "proj_mlp"]


def pipeline(tiny_cfg, base) -> FluxPipeline:
    cfg = dict(tiny_cfg, ckpt_path=str(base[0]), flow_dtype="float32", flow_quantization_dtype="bfloat16")
    return FluxPipeline.load_pipeline_from_config(cfg)


def peft_adapter(flow_params, base, use_dora: bool, seed: int = 0):
    """An adapter on diffusers' FLUX transformer, made by PEFT: (its state dict in diffusers' file layout, the
    adapted model, the PEFT config)."""
    torch.manual_seed(seed)
    model = diffusers_flux(flow_params, base[1])
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, use_dora=use_dora)
    model.add_adapter(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.normal_(0, 0.3)
            elif "lora_magnitude_vector" in name:
                p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))  # a magnitude that is not the weight's own norm
    sd = {f"transformer.{k}": v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    return sd, model, config


def rel(a, b) -> float:
    return ((a - b).double().norm() / b.double().norm()).item()


def forward(pipe, inputs):
    with torch.no_grad():
        return pipe.model(**inputs)


def test_dora_matches_peft_and_unloads_exactly(tiny_cfg, flow_params, base, tmp_path):
    sd, reference, config = peft_adapter(flow_params, base, use_dora=True)
    assert any(k.endswith("lora_magnitude_vector") for k in sd)
    path = tmp_path / "dora.safetensors"
    save_file(sd, path, metadata={"lora_adapter_metadata": json.dumps(config.to_dict(), default=list)})
    pipe = pipeline(tiny_cfg, base)
    inputs = random_inputs(flow_params)
    before = forward(pipe, inputs)
    pipe.load_lora(str(path), name="dora")
    with torch.no_grad():
        theirs = diffusers_forward(reference, **inputs)
    assert rel(before, theirs) > 0.05  # the adapter changes the output ...
    assert rel(forward(pipe, inputs), theirs) <= 1e-4  # ... and ours is PEFT's DoRA
    plain = {k: v for k, v in sd.items() if "magnitude" not in k}  # the same without DoRA: a different model
    metadata = {"lora_adapter_metadata": json.dumps(config.to_dict(), default=list)}
    save_file(plain, tmp_path / "plain.safetensors", metadata=metadata)
    pipe.unload_lora("dora")
    assert torch.equal(forward(pipe, inputs), before)  # exact unload
    pipe.load_lora(str(tmp_path / "plain.safetensors"), name="plain")
    assert rel(forward(pipe, inputs), theirs) > 1e-3


def test_kohya_dora_scale_is_the_same_magnitude(tiny_cfg, flow_params, base, tmp_path):
    g = torch.Generator().manual_seed(1)
    h = flow_params["hidden_size"]
    down, up = torch.randn(4, h, generator=g) * 0.3, torch.randn(h, 4, generator=g) * 0.3
    magnitude = torch.rand(h, generator=g) + 0.5
    key = "lora_unet_double_blocks_0_img_attn_proj"
    kohya = {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(4.0),
             f"{key}.dora_scale": magnitude[:, None]}  # fmt: skip
    peft = {"double_blocks.0.img_attn.proj.lora_A.weight": down, "double_blocks.0.img_attn.proj.lora_B.weight": up,
            "double_blocks.0.img_attn.proj.lora_magnitude_vector": magnitude}  # fmt: skip
    pipe, inputs = pipeline(tiny_cfg, base), random_inputs(flow_params)
    pipe.load_lora(kohya, name="a")
    a = forward(pipe, inputs)
    pipe.unload_lora("a")
    pipe.load_lora(peft, name="b")
    assert torch.allclose(forward(pipe, inputs), a, rtol=0, atol=1e-6)


def test_onetrainer_keys_equal_the_diffusers_file(tiny_cfg, flow_params, base):
    sd, _, config = peft_adapter(flow_params, base, use_dora=False, seed=3)
    onetrainer = {}
    for key, t in sd.items():
        module, kind = key.removeprefix("transformer.").rsplit(".lora_", 1)
        name = "lora_transformer_" + module.replace(".", "_")
        onetrainer[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = t
        onetrainer[f"{name}.alpha"] = torch.tensor(float(config.lora_alpha))
    pipe, inputs = pipeline(tiny_cfg, base), random_inputs(flow_params)
    pipe.load_lora(onetrainer, name="onetrainer")
    ours = forward(pipe, inputs)
    pipe.unload_lora("onetrainer")
    pipe.load_lora(sd, name="peft")
    pipe_alpha = forward(pipe, inputs)  # no metadata: alpha = rank, so compare with the alpha applied
    pipe.unload_lora("peft")
    scaled = {k: v * (config.lora_alpha / 4) if ".lora_B." in k else v for k, v in sd.items()}
    pipe.load_lora(scaled, name="scaled")
    assert torch.allclose(forward(pipe, inputs), ours, rtol=0, atol=1e-5) and rel(pipe_alpha, ours) > 1e-3


def test_diff_deltas_add_the_full_weight(tiny_cfg, flow_params, base):
    g = torch.Generator().manual_seed(2)
    h = flow_params["hidden_size"]
    diff, diff_b = torch.randn(h, h, generator=g) * 0.05, torch.randn(h, generator=g) * 0.05
    pipe, inputs = pipeline(tiny_cfg, base), random_inputs(flow_params)
    layer = pipe.model.double_blocks[0].img_attn.proj
    with torch.no_grad():
        layer.weight += diff
        layer.bias += diff_b
        expected = forward(pipe, inputs)
        layer.weight -= diff
        layer.bias -= diff_b
    pipe.load_lora({"diffusion_model.double_blocks.0.img_attn.proj.diff": diff,
                    "diffusion_model.double_blocks.0.img_attn.proj.diff_b": diff_b}, name="diff")  # fmt: skip
    assert torch.allclose(forward(pipe, inputs), expected, rtol=0, atol=1e-5)


def test_alpha_pattern_sets_one_modules_alpha(tiny_cfg, flow_params, base, tmp_path):
    sd, _, config = peft_adapter(flow_params, base, use_dora=False, seed=4)
    meta = dict(config.to_dict(), alpha_pattern={"to_out.0": 2.0})
    metadata = {"lora_adapter_metadata": json.dumps(meta, default=list)}
    save_file(sd, tmp_path / "pattern.safetensors", metadata=metadata)
    explicit = dict(sd)
    for key in [k for k in sd if "to_out.0.lora_A" in k]:
        explicit[key.replace(".lora_A.weight", ".alpha")] = torch.tensor(2.0)
    for key in [k for k in sd if ".lora_A." in k and "to_out.0" not in k]:
        explicit[key.replace(".lora_A.weight", ".alpha")] = torch.tensor(float(config.lora_alpha))
    pipe, inputs = pipeline(tiny_cfg, base), random_inputs(flow_params)
    pipe.load_lora(str(tmp_path / "pattern.safetensors"), name="pattern")
    a = forward(pipe, inputs)
    pipe.unload_lora("pattern")
    pipe.load_lora(explicit, name="explicit")
    assert torch.allclose(forward(pipe, inputs), a, rtol=0, atol=1e-6)


def test_refused_formats_and_reported_keys(tiny_cfg, flow_params, base):
    pipe = pipeline(tiny_cfg, base)
    h = flow_params["hidden_size"]
    lokr = {"lora_unet_double_blocks_0_img_attn_proj.lokr_w1": torch.ones(8, 8)}
    with pytest.raises(LoraError, match="LyCORIS"):
        pipe.load_lora(lokr)
    control = {"double_blocks.0.img_attn.norm.key_norm.scale": torch.ones(32),
               "img_in.lora_A.weight": torch.ones(4, 128), "img_in.lora_B.weight": torch.ones(h, 4)}  # fmt: skip
    with pytest.raises(LoraError, match="control"):
        pipe.load_lora(control)
    assert pipe.list_loras() == []
    partial = {"double_blocks.0.img_attn.proj.lora_A.weight": torch.ones(4, h) * 0.01,
               "double_blocks.0.img_attn.proj.lora_B.weight": torch.ones(h, 4) * 0.01,
               "transformer_blocks.0.unknown.lora_A.weight": torch.ones(4, h),
               "transformer_blocks.0.unknown.lora_B.weight": torch.ones(h, 4)}  # fmt: skip
    name = pipe.load_lora(partial, name="partial")
    assert pipe.loras.loaded[name].ignored == ["transformer_blocks.0.unknown"]
