"""What users of the original flux-fp8-api bring: its configs, its defaults, its Python names, its server start-up
(`from api import app`), and its prequantized checkpoints, which run with its recipe and give its outputs."""

import io
import json
import subprocess
import sys
import textwrap
import time

import httpx
import numpy as np
import pytest
import torch
from loguru import logger
from PIL import Image
from safetensors.torch import load_file, save_file

import util
from flux_pipeline import FluxPipeline
from main import config_overrides, flags_only, parse_args
from model_spec import ModelSpec, spec_from_dict
from modules import sampling
from modules.flux_model import Flux, FluxParams
from tests.helpers import ROOT, TINY_CONFIG, free_port, random_inputs

# The original's configs by what sets them apart (its `configs/`, paths and devices aside); the rest of each is
# the tiny model's.
ORIGINAL_CONFIGS = {
    "config-dev.json": dict(ae_quantization_dtype="qfloat8", compile_blocks=True, offload_ae=False),
    "config-dev-1-RTX6000ADA.json": dict(offload_text_encoder=False, offload_vae=False, offload_flow=False),
    "config-dev-cuda0.json": dict(offload_text_enc=False, offload_ae=False),
    "config-dev-eval.json": dict(text_enc_quantization_dtype="qfloat8"),
    "config-dev-gigaquant.json": dict(
        flow_quantization_dtype="qint4", ae_quantization_dtype="qint4", clip_quantization_dtype="qint4",
        text_enc_quantization_dtype="qint4", num_to_quant=220, quantize_extras=True,
    ),
    "config-dev-offload-1-4080.json": dict(offload_text_encoder=True, offload_vae=True, offload_flow=True),
    "config-dev-offload-1-4090.json": dict(offload_text_encoder=True, offload_vae=True, offload_flow=False),
    "config-dev-offload.json": dict(offload_text_enc=True, offload_ae=True, offload_flow=True),
    "config-dev-prequant.json": dict(prequantized_flow=False, offload_ae=False),
    "config-schnell.json": dict(version="flux-schnell", text_enc_max_length=256),
    "config-schnell-cuda0.json": dict(version="flux-schnell", ae_quantization_dtype="qfloat8"),
}  # fmt: skip
COMMON = dict(repo_id="black-forest-labs/FLUX.1-dev", repo_flow="flux1-dev.sft", repo_ae="ae.sft", flow_dtype="float16")


def original_config(tiny_cfg: dict, keys: dict) -> dict:
    data = dict(tiny_cfg, **COMMON, **keys)
    if data["version"] == "flux-schnell":
        data["params"] = dict(data["params"], guidance_embed=False)
    return data


@pytest.mark.parametrize("name", ORIGINAL_CONFIGS)
def test_the_originals_configs_load_and_mean_what_they_meant(name, tiny_cfg, write_json):
    keys = ORIGINAL_CONFIGS[name]
    warnings = []
    handler = logger.add(lambda m: warnings.append(m.record["message"]), level="WARNING")
    try:
        spec = util.load_config(write_json(original_config(tiny_cfg, keys), name))
    finally:
        logger.remove(handler)
    assert not any("repo_" in w for w in warnings)  # informational keys, accepted quietly
    renamed = {"offload_ae": "offload_vae", "offload_text_enc": "offload_text_encoder"}
    for key, value in keys.items():
        if key in ("num_to_quant", "quantize_extras"):
            continue
        assert getattr(spec, renamed.get(key, key)) == value, key


def test_gigaquant_runs_with_quanto_weights(tiny_cfg):
    # qint4 for the flow model and the autoencoder as the original's gigaquant config asks (the text encoders'
    # qint4 is bitsandbytes, CUDA only, so they stay unquantized on this CPU)
    keys = dict(ORIGINAL_CONFIGS["config-dev-gigaquant.json"], clip_quantization_dtype=None)
    keys["text_enc_quantization_dtype"] = None
    pipe = FluxPipeline.load_pipeline_from_config(original_config(tiny_cfg, keys) | {"flow_dtype": "bfloat16"})
    # 4-bit groups of 128 inputs: the MLPs' second layers (256 in) are quantized, the 64-input ones are not
    assert type(pipe.model.double_blocks[0].img_mlp[2]).__name__ == "QLinear"
    assert type(pipe.model.double_blocks[0].img_attn.qkv).__name__ == "Linear"
    images, _ = pipe.generate_images("a cat", 128, 128, 2, seed=1)
    assert images[0].size == (128, 128) and np.asarray(images[0]).std() > 0


def test_an_override_of_a_renamed_key_wins(tiny_cfg, write_json):
    path = write_json(dict(tiny_cfg, offload_ae=True, offload_text_enc=True))
    spec = util.load_config(path, offload_vae=False)
    assert spec.offload_vae is False and spec.offload_text_encoder is True
    assert util.load_config(path, offload_ae=False).offload_vae is False


def test_schnell_runs_4_steps_unless_asked(tiny_cfg, tmp_path):
    schnell = dict(tiny_cfg, version="flux-schnell", params=dict(tiny_cfg["params"], guidance_embed=False))
    sd = {k: v for k, v in load_file(tiny_cfg["ckpt_path"]).items() if not k.startswith("guidance_in.")}
    save_file(sd, str(tmp_path / "schnell.safetensors"))  # a schnell model has no guidance embedder
    schnell["ckpt_path"] = str(tmp_path / "schnell.safetensors")
    pipe = FluxPipeline.load_pipeline_from_config(schnell)
    steps = []
    pipe.generate_images("a cat", 128, 128, seed=1, callback=lambda step, total: steps.append(total))
    assert steps == [4] * 4
    steps.clear()
    pipe.generate_images("a cat", 128, 128, 6, seed=1, callback=lambda step, total: steps.append(total))
    assert steps == [6] * 6
    assert FluxPipeline.load_pipeline_from_config(dict(tiny_cfg)).default_steps == 24


def test_prompt_weighting_is_on_by_default_and_switchable(tiny_cfg):
    pipe = FluxPipeline.load_pipeline_from_config(dict(tiny_cfg, flow_quantization_dtype="bfloat16"))

    def pixels(prompt, **kw):
        return np.asarray(pipe.generate_images(prompt, 128, 128, 2, seed=3, **kw)[0][0])

    weighted, plain = pixels("a (red:1.8) cat"), pixels("a red cat")
    assert not np.array_equal(weighted, plain)
    literal = pixels("a (red:1.8) cat", prompt_emphasis=False)  # the parentheses are text then
    assert not np.array_equal(literal, weighted) and not np.array_equal(literal, plain)
    off = FluxPipeline.load_pipeline_from_config(
        dict(tiny_cfg, flow_quantization_dtype="bfloat16", prompt_emphasis=False)
    )
    assert np.array_equal(np.asarray(off.generate_images("a (red:1.8) cat", 128, 128, 2, seed=3)[0][0]), literal)


def test_flags_only_launch_compiles_only_when_asked_and_offloads(tiny_cfg):
    keys = flags_only(config_overrides(parse_args(["-f", "x.sft", "-a", "ae.sft"])))
    assert keys["compile_blocks"] is keys["compile_extras"] is False
    assert keys["offload_vae"] is keys["offload_text_encoder"] is True
    keys = flags_only(config_overrides(parse_args(["-f", "x", "-a", "y", "--compile", "-OA", "-OT"])))
    assert keys["compile_blocks"] and not keys["offload_vae"] and not keys["offload_text_encoder"]


def test_the_originals_python_names(tiny_cfg, tmp_path, fp8_pipeline):
    pipe = FluxPipeline.load_pipeline_from_config_path(
        str(TINY_CONFIG), flow_model_path=tiny_cfg["ckpt_path"], debug=True
    )
    assert pipe.name == "flux-dev" and pipe.dtype == torch.bfloat16 and pipe.device_flux == torch.device("cpu")
    assert (pipe.offload_flow, pipe.offload_vae, pipe.offload_text_encoder) == (False, False, False)
    # seeds as the original took them; lossy ones are warned about
    assert pipe.set_seed("123") == 123 and pipe.set_seed(-5) == 5 and pipe.set_seed(3.0) == 3
    assert isinstance(pipe.set_seed("not a number"), int)
    a = pipe.generate("x", width=128, height=128, num_steps=2, seed=123, silent=True).getvalue()
    assert pipe.generate("x", width=128, height=128, num_steps=2, seed="123", silent=True).getvalue() == a
    assert pipe.generate("x", width=128, height=128, num_steps=2, seed=-123, silent=True).getvalue() == a
    # the helpers
    assert pipe.get_schedule(4, 256) == sampling.get_schedule(4, 256)
    noise = pipe.get_noise(1, 128, 128, torch.Generator().manual_seed(0))
    assert noise.shape == (1, 16, 16, 16) and noise.dtype == torch.bfloat16
    pixels = pipe.vae_decode(sampling.pack(noise.float()), 128, 128)
    assert pixels.shape == (1, 3, 128, 128)
    assert Image.open(pipe.into_bytes(pixels)).format == "JPEG"
    # LoRA keywords
    lora = {"double_blocks.0.img_attn.qkv.lora_A.weight": torch.randn(4, 64) * 0.1,
            "double_blocks.0.img_attn.qkv.lora_B.weight": torch.randn(192, 4) * 0.1}  # fmt: skip
    path = tmp_path / "mine.safetensors"
    save_file(lora, str(path))
    name = pipe.load_lora(lora_path=str(path), scale=0.5)
    assert pipe.list_loras()[0]["scale"] == 0.5
    pipe.unload_lora(path_or_identifier=name)
    assert pipe.list_loras() == []


def test_the_originals_util_entry_points(tiny_cfg, write_json):
    spec = util.load_config(
        "flux-schnell", flux_path=tiny_cfg["ckpt_path"], ae_path=tiny_cfg["ae_path"],
        text_enc_path=tiny_cfg["text_enc_path"], quant_text_enc="float8", offload_ae=True, flux_device="cpu",
    )  # fmt: skip
    assert isinstance(spec, ModelSpec) and spec.version == "flux-schnell" and spec.ckpt_path == tiny_cfg["ckpt_path"]
    assert spec.text_enc_quantization_dtype == "qfloat8" and spec.offload_vae and not spec.compile_blocks
    assert spec.params.guidance_embed is False and spec.text_enc_max_length == 256
    path = write_json(tiny_cfg)
    assert util.load_config_from_path(path) == util.load_config(path)
    models = util.load_models_from_config_path(path)
    assert models.config.version == "flux-dev" and models.flow is not None and models.t5.max_length == 64
    assert util.into_device(1) == torch.device("cuda:1") and util.into_dtype("float16") == torch.float16
    assert [q.value for q in util.QuantizationDtype] == ["qfloat8", "qint2", "qint4", "qint8"]


def test_from_api_import_app_serves_app_state_model():
    port = free_port()
    script = textwrap.dedent(f"""
        import uvicorn
        from api import app
        from flux_pipeline import FluxPipeline
        app.state.model = FluxPipeline.load_pipeline_from_config_path({str(TINY_CONFIG)!r})
        uvicorn.run(app, host="127.0.0.1", port={port})
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    try:
        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, "the server exited"
            time.sleep(0.2)
        request = {"prompt": "a cat", "width": 128, "height": 128, "num_steps": 2, "seed": 3}
        r = httpx.post(f"http://127.0.0.1:{port}/generate", json=request, timeout=60)
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(r.content)).size == (128, 128)
    finally:
        proc.terminate()
        proc.wait(30)


# ---- the original's prequantized checkpoints ------------------------------------------------------------------


def write_original_prequantized(tiny_cfg, path, input_amax: float = 6.0) -> dict:
    """A checkpoint in the original's F8Linear format, written from its description: per-tensor e4m3 weights with
    scale = min(448 / amax, 448), static input scales min(57344 / input amax, 57344), fp16 elsewhere."""
    out = {}
    for key, t in load_file(tiny_cfg["ckpt_path"]).items():
        module, _, leaf = key.rpartition(".")
        if leaf == "weight" and t.ndim == 2 and module.startswith(("double_blocks.", "single_blocks.")):
            scale = torch.clamp(448.0 / t.float().abs().max().clamp(min=1e-12), max=448.0)
            input_scale = torch.clamp(torch.tensor(57344.0 / input_amax), max=57344.0)
            out[f"{module}.float8_data"] = (t.float() * scale).clamp(-448, 448).to(torch.float8_e4m3fn)
            out[f"{module}.scale"], out[f"{module}.scale_reciprocal"] = scale, 1 / scale
            out[f"{module}.input_scale"], out[f"{module}.input_scale_reciprocal"] = input_scale, 1 / input_scale
            out[f"{module}.weight"] = torch.zeros(1, dtype=torch.float16)
        else:
            out[key] = t.to(torch.float16)
    save_file(out, str(path))
    return out


def original_linear(sd: dict, module: str, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """The original's F8Linear forward, from its description: e5m2 inputs x * input_scale, a fast-accumulating
    scaled matmul with the reciprocals, the bias fused."""
    xq = x.mul(sd[f"{module}.input_scale"]).clamp(-57344, 57344).to(torch.float8_e5m2)
    return torch._scaled_mm(
        xq, sd[f"{module}.float8_data"].t(), scale_a=sd[f"{module}.input_scale_reciprocal"],
        scale_b=sd[f"{module}.scale_reciprocal"], bias=sd[f"{module}.bias"].to(out_dtype), out_dtype=out_dtype,
        use_fast_accum=True,
    )  # fmt: skip


def test_the_originals_prequantized_file_runs_with_its_recipe(tiny_cfg, tmp_path):
    path = tmp_path / "flux_fp8.safetensors"
    sd = write_original_prequantized(tiny_cfg, path)
    messages = []
    handler = logger.add(lambda m: messages.append(m.record["message"]), level="WARNING")
    try:
        pipe = FluxPipeline.load_pipeline_from_config(dict(tiny_cfg, ckpt_path=str(path), prequantized_flow=True))
    finally:
        logger.remove(handler)
    assert any("original flux-fp8-api" in m and "float8_quantize.py" in m for m in messages)
    for module in ("double_blocks.0.img_attn.qkv", "single_blocks.1.linear2", "double_blocks.1.img_mod.lin"):
        layer = pipe.model.get_submodule(module)
        x = torch.randn(7, layer.in_features, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16) * 3
        assert torch.equal(layer(x), original_linear(sd, module, x, torch.bfloat16)), module
    images, _ = pipe.generate_images("a cat", 128, 128, 3, seed=1)
    bf16 = FluxPipeline.load_pipeline_from_config(dict(tiny_cfg, flow_quantization_dtype="bfloat16"))
    reference = np.asarray(bf16.generate_images("a cat", 128, 128, 3, seed=1)[0][0], dtype=float)
    assert np.abs(np.asarray(images[0], dtype=float) - reference).mean() < 2.0  # an fp8 copy of the same model


def test_the_originals_prequantized_file_converts_to_ours(tiny_cfg, tmp_path, write_json):
    original = tmp_path / "flux_fp8.safetensors"
    sd = write_original_prequantized(tiny_cfg, original)
    # read without prequantized_flow: dequantized and quantized with this project's recipe
    pipe = FluxPipeline.load_pipeline_from_config(dict(tiny_cfg, ckpt_path=str(original)))
    layer = pipe.model.double_blocks[0].img_attn.qkv
    assert layer.activation_scaling == "dynamic_per_token"
    dequantized = (
        sd["double_blocks.0.img_attn.qkv.float8_data"].float() * sd["double_blocks.0.img_attn.qkv.scale_reciprocal"]
    )
    ours = layer.weight.float() * layer.weight_scale.reshape(-1, 1)
    assert torch.allclose(ours, dequantized.to(torch.bfloat16).float(), rtol=0.07, atol=1e-6)
    # and written out as ours, which then loads as a prequantized file of this project
    converted = tmp_path / "ours.safetensors"
    util.write_prequantized(str(write_json(dict(tiny_cfg, ckpt_path=str(original)))), str(converted))
    again = FluxPipeline.load_pipeline_from_config(dict(tiny_cfg, ckpt_path=str(converted), prequantized_flow=True))
    a = np.asarray(pipe.generate_images("a cat", 128, 128, 2, seed=2)[0][0])
    assert np.array_equal(np.asarray(again.generate_images("a cat", 128, 128, 2, seed=2)[0][0]), a)
    assert json.loads(json.dumps(util.read_metadata(str(converted))))["format"] == "flux-fp8-api/f8"


@pytest.mark.gpu
@pytest.mark.parametrize("flow_dtype", ["float16", "bfloat16"])
def test_the_originals_recipe_on_cuda_is_its_math(tiny_cfg, tmp_path, flow_dtype):
    path = tmp_path / "flux_fp8.safetensors"
    sd = {k: v.cuda() for k, v in write_original_prequantized(tiny_cfg, path).items()}
    cuda = dict(flux_device="cuda:0", text_enc_device="cuda:0", ae_device="cuda:0", flow_dtype=flow_dtype)
    pipe = FluxPipeline.load_pipeline_from_config(
        dict(tiny_cfg, **cuda, ckpt_path=str(path), prequantized_flow=True, cuda_graphs=False)
    )
    dtype = getattr(torch, flow_dtype)
    for module in ("double_blocks.0.img_attn.qkv", "single_blocks.1.linear2", "double_blocks.1.txt_mlp.2"):
        layer = pipe.model.get_submodule(module)
        x = torch.randn(33, layer.in_features, generator=torch.Generator().manual_seed(2)).to("cuda", dtype) * 3
        assert torch.equal(layer(x), original_linear(sd, module, x, dtype)), module
    images, _ = pipe.generate_images("a cat", 256, 256, 3, seed=1)
    assert np.asarray(images[0]).std() > 0


@pytest.mark.gpu
@pytest.mark.parametrize("quant, bound", [("qint8", 0.02), ("qint4", 0.05)])
def test_quanto_flow_weights_on_cuda(tiny_cfg, tmp_path, quant, bound):
    # wide enough for quanto's 4-bit groups of 128 inputs (the tiny model's 64 are left unquantized)
    params = dict(tiny_cfg["params"], hidden_size=256, num_heads=2, axes_dim=[16, 56, 56])
    torch.manual_seed(0)
    model = Flux(FluxParams(**params))
    save_file({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, str(tmp_path / "flow.safetensors"))
    config = dict(tiny_cfg, params=params, ckpt_path=str(tmp_path / "flow.safetensors"), flux_device="cuda:0")
    reference = util.load_flow_model(spec_from_dict(dict(config, flow_quantization_dtype="bfloat16")))
    quantized = util.load_flow_model(spec_from_dict(dict(config, flow_quantization_dtype=quant)))
    assert type(quantized.double_blocks[0].img_attn.qkv).__name__ == "QLinear"
    inputs = {k: v.to("cuda", torch.bfloat16) for k, v in random_inputs(params).items()}
    with torch.no_grad():
        ref, out = reference(**inputs).float(), quantized(**inputs).float()
    assert ((out - ref).norm() / ref.norm()).item() < bound
