import json
import os
import subprocess
import sys

import pytest
import torch
from loguru import logger
from safetensors import safe_open
from torch import nn

import float8_quantize as f8
from errors import ConfigError
from float8_quantize import E4M3, F8Linear, F8Settings, quantize_weight
from modules.flux_model import Flux, FluxParams
from tests.helpers import BOUNDS, MODES, ROOT, f8_from, random_inputs
from util import ModelSpec, load_flow_model, write_prequantized


@pytest.fixture(scope="module")
def outlier_data():
    torch.manual_seed(0)
    linear = nn.Linear(256, 192)
    x = torch.randn(4, 32, 256)
    x[..., [3, 77, 200]] *= 40  # a few large outlier channels, as in real transformer activations
    return linear, x, (x.double() @ linear.weight.double().t() + linear.bias.double())


@pytest.mark.parametrize("weight_scaling,activation_scaling", MODES)
def test_f8linear_error_against_float64(outlier_data, weight_scaling, activation_scaling):
    linear, x, ref = outlier_data
    layer = f8_from(linear, weight_scaling, activation_scaling)
    if activation_scaling == "static_per_tensor":
        layer.calibrating = True
        layer.input_scale.zero_()
        layer(x)
        layer.calibrating = False
    out = layer(x)
    assert out.shape == (4, 32, 192) and out.dtype == torch.float32
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert 0.005 < err < BOUNDS[activation_scaling]  # lower bound: it really ran in fp8


def test_weight_quantization():
    w = torch.randn(32, 64)
    w[3] *= 100
    q, s = quantize_weight(w, per_channel=True)
    assert q.dtype == E4M3 and s.shape == (1, 32) and s.dtype == torch.float32
    assert torch.allclose(q.float().abs().amax(dim=1), torch.full((32,), 448.0))
    torch.testing.assert_close(f8.dequantize_weight(q, s), w, rtol=0.07, atol=0)
    q, s = quantize_weight(w, per_channel=False)
    assert s.shape == () and q.float().abs().max() == 448.0
    q, s = quantize_weight(torch.zeros(16, 16), per_channel=True)  # no NaN from an all-zero row
    assert torch.count_nonzero(q.float()) == 0 and torch.isfinite(s).all()


def test_dequantize_fallback_matches(outlier_data):
    linear, x, ref = outlier_data
    layer = f8_from(linear, "per_channel", "dynamic_per_token")
    layer.use_fp8 = False
    out = layer(x)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < 0.03  # weight rounding only


def test_one_scaled_mm_per_layer_per_forward(tiny_cfg, flow_params, monkeypatch):
    model = load_flow_model(ModelSpec(**tiny_cfg))
    layers = [m for m in model.modules() if isinstance(m, F8Linear)]
    calls = []
    real = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        model(**random_inputs(flow_params))
    assert len(layers) > 0 and len(calls) == len(layers)


def linear_names(model: nn.Module, cls) -> set[str]:
    return {n for n, m in model.named_modules() if type(m) is cls}


@pytest.mark.parametrize("modulation,embedders", [(True, False), (False, False), (True, True), (False, True)])
def test_flags_choose_exactly_the_intended_layers(tiny_cfg, flow_params, modulation, embedders):
    cfg = dict(tiny_cfg, quantize_modulation=modulation, quantize_flow_embedder_layers=embedders)
    model = load_flow_model(ModelSpec(**cfg))
    quantized = linear_names(model, F8Linear)
    everything = linear_names(Flux(FluxParams(**flow_params)), nn.Linear)
    assert quantized | linear_names(model, nn.Linear) == everything
    p = flow_params
    blocks = {
        f"double_blocks.{i}.{s}_{n}"
        for i in range(p["depth"])
        for s in ("img", "txt")
        for n in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2")
    }
    blocks |= {f"single_blocks.{i}.linear{j}" for i in range(p["depth_single_blocks"]) for j in (1, 2)}
    mods = {f"double_blocks.{i}.{s}_mod.lin" for i in range(p["depth"]) for s in ("img", "txt")}
    mods |= {f"single_blocks.{i}.modulation.lin" for i in range(p["depth_single_blocks"])}
    embeds = {"img_in", "txt_in"} | {
        f"{e}.{la}" for e in ("time_in", "vector_in", "guidance_in") for la in ("in_layer", "out_layer")
    }
    assert quantized == blocks | (mods if modulation else set()) | (embeds if embedders else set())
    assert not any(n.startswith("final_layer") for n in quantized)


def test_bfloat16_keeps_every_layer_unquantized(tiny_cfg):
    model = load_flow_model(ModelSpec(**dict(tiny_cfg, flow_quantization_dtype="bfloat16")))
    assert not any(isinstance(m, F8Linear) for m in model.modules())
    model = load_flow_model(ModelSpec(**dict(tiny_cfg, flow_quantization_dtype=None)))
    assert not any(isinstance(m, F8Linear) for m in model.modules())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_flow_dtypes_run(tiny_cfg, flow_params, dtype):
    model = load_flow_model(ModelSpec(**dict(tiny_cfg, flow_dtype=dtype)))
    with torch.no_grad():
        out = model(**random_inputs(flow_params))
    assert out.dtype == getattr(torch, dtype) and torch.isfinite(out).all()


def test_fp8_model_close_to_bf16_reference(tiny_cfg, flow_params):
    ref = load_flow_model(ModelSpec(**dict(tiny_cfg, flow_quantization_dtype="bfloat16", flow_dtype="float32")))
    model = load_flow_model(ModelSpec(**dict(tiny_cfg, flow_dtype="float32")))
    inputs = random_inputs(flow_params)
    with torch.no_grad():
        a, b = model(**inputs), ref(**inputs)
    err = ((a - b).norm() / b.norm()).item()
    assert 0 < err < 0.08


def test_static_calibration_is_deterministic(tiny_cfg):
    cfg = ModelSpec(**dict(tiny_cfg, f8_activation_scaling="static_per_tensor"))
    scales = [
        [m.input_scale.item() for m in load_flow_model(cfg).modules() if isinstance(m, F8Linear)] for _ in range(2)
    ]
    assert scales[0] == scales[1] and all(s > 1e-6 for s in scales[0])


@pytest.mark.parametrize("activation_scaling", ["dynamic_per_token", "static_per_tensor"])
@pytest.mark.parametrize("weight_scaling", ["per_channel", "per_tensor"])
def test_prequantized_round_trip_is_bit_identical(tiny_cfg, flow_params, tmp_path, weight_scaling, activation_scaling):
    cfg = dict(tiny_cfg, f8_weight_scaling=weight_scaling, f8_activation_scaling=activation_scaling)
    path = tmp_path / "flux-fp8.safetensors"
    write_prequantized(str(write_config(tmp_path, cfg)), str(path))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert f.get_tensor("double_blocks.0.img_attn.qkv.weight").dtype == E4M3
    assert meta["format"] == f8.METADATA_FORMAT and weight_scaling in meta["settings"]
    assert path.stat().st_size < 0.75 * os.path.getsize(tiny_cfg["ckpt_path"])
    fresh = load_flow_model(ModelSpec(**cfg))
    pre = load_flow_model(ModelSpec(**dict(cfg, ckpt_path=str(path), prequantized_flow=True)))
    inputs = random_inputs(flow_params)
    with torch.no_grad():
        assert torch.equal(fresh(**inputs), pre(**inputs))


def test_the_script_writes_a_prequantized_checkpoint(tiny_cfg, tmp_path):
    path = tmp_path / "flux-fp8.safetensors"
    config = str(write_config(tmp_path, tiny_cfg))
    cmd = [sys.executable, "float8_quantize.py", "--config-path", config, "-o", str(path)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=120)
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["format"] == f8.METADATA_FORMAT
    with pytest.raises(ConfigError, match="config file not found"):  # what the script reports in one line
        write_prequantized(str(tmp_path / "missing.json"), str(path))


def write_config(tmp_path, cfg):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    return path


def test_prequantized_mismatch_errors(tiny_cfg, tmp_path):
    path = tmp_path / "flux-fp8.safetensors"
    write_prequantized(str(write_config(tmp_path, tiny_cfg)), str(path))
    pre = dict(tiny_cfg, ckpt_path=str(path), prequantized_flow=True)
    with pytest.raises(ValueError, match="f8_weight_scaling.*per_channel.*per_tensor"):
        load_flow_model(ModelSpec(**dict(pre, f8_weight_scaling="per_tensor")))
    with pytest.raises(ValueError, match="quantize_modulation"):
        load_flow_model(ModelSpec(**dict(pre, quantize_modulation=False)))
    with pytest.raises(ValueError, match="set prequantized_flow to true"):
        load_flow_model(ModelSpec(**dict(pre, prequantized_flow=False)))
    with pytest.raises(ValueError, match="not a prequantized"):
        load_flow_model(ModelSpec(**dict(tiny_cfg, prequantized_flow=True)))


def test_settings_reject_unknown_modes():
    with pytest.raises(ValueError, match="f8_activation_scaling"):
        F8Settings(activation_scaling="per_block")


def test_fallback_without_fp8_tensor_cores(tiny_cfg, flow_params, monkeypatch):

    inputs = random_inputs(flow_params)
    with torch.no_grad():
        expected = load_flow_model(ModelSpec(**tiny_cfg))(**inputs)
    monkeypatch.setattr(f8, "fp8_supported", lambda device: False)
    messages = []
    handler = logger.add(messages.append, level="WARNING")
    try:
        model = load_flow_model(ModelSpec(**tiny_cfg))
    finally:
        logger.remove(handler)
    assert sum("compute capability < 8.9" in m for m in messages) == 1
    assert all(not m.use_fp8 for m in model.modules() if isinstance(m, F8Linear))
    calls = []
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: calls.append(1))
    with torch.no_grad():
        out = model(**inputs)
    assert not calls and torch.isfinite(out).all()
    assert 0 < ((out - expected).float().norm() / out.float().norm()).item() < 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_weight_leaves_its_input_alone(dtype):
    w = torch.randn(2048 + 5, 32).to(dtype)  # more than one chunk of rows
    copy = w.clone()
    q, s = quantize_weight(w, per_channel=True)
    assert torch.equal(w, copy)
    torch.testing.assert_close(f8.dequantize_weight(q, s), w.float(), rtol=0.07, atol=1e-4)  # subnormals


@pytest.mark.parametrize("per_channel", [True, False])
def test_weight_quantization_does_not_depend_on_its_chunks(per_channel):
    """LoRA fusing quantizes whole weights where loading goes 1024 rows at a time: the same bits either way."""
    w = torch.randn(2500, 64, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 2, 2500)[:, None]
    ref_q, ref_s = f8.quantize_weight(w, per_channel)
    for chunk in (1, 7, 1024, 2500, 10_000):
        q, s = f8.quantize_weight(w, per_channel, chunk=chunk)
        assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8)) and torch.equal(s, ref_s)
