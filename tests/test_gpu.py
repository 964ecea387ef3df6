"""CUDA-only checks (run on the GPU machine with `python -m pytest -q -m gpu`)."""

import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file

import float8_quantize as f8
from configs.make_tiny_demo import flow_state_dict
from tests.conftest import ROOT
from tests.test_fp8 import BOUNDS, MODES, f8_from
from util import ModelSpec, load_flow_model

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("weight_scaling,activation_scaling", MODES)
@pytest.mark.parametrize("fast_accum", [False, True])
def test_f8linear_on_cuda(weight_scaling, activation_scaling, dtype, fast_accum):
    torch.manual_seed(0)
    linear = torch.nn.Linear(1024, 768)
    x = torch.randn(2, 300, 1024)
    x[..., [5, 99, 700]] *= 40
    ref = (x.double() @ linear.weight.double().t() + linear.bias.double()).cuda()
    layer = f8_from(linear, weight_scaling, activation_scaling)
    layer.out_dtype, layer.fast_accum = dtype, fast_accum
    layer.bias.data = layer.bias.data.to(dtype)
    layer = layer.cuda()
    xc = x.cuda().to(dtype)
    if activation_scaling == "static_per_tensor":
        layer.calibrating = True
        layer.input_scale.zero_()
        layer(xc)
        layer.calibrating = False
    out = layer(xc)
    assert out.dtype == dtype and out.shape == (2, 300, 768)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert 0.005 < err < BOUNDS[activation_scaling] + 0.005


def test_load_to_fp8_on_cuda_peak_memory(tmp_path, tiny_cfg):
    """Full-width model (hidden 3072), few blocks: loading peaks at the fp8 model plus one bf16 tensor."""
    params = dict(
        json.loads(open(ROOT / "configs" / "config-dev-1-H100.json").read())["params"], depth=2, depth_single_blocks=4
    )
    path = tmp_path / "flux.safetensors"
    save_file(flow_state_dict(params, dtype=torch.bfloat16), path)
    cfg = ModelSpec(**dict(tiny_cfg, params=params, ckpt_path=str(path), flux_device="cuda:0"))
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    model = load_flow_model(cfg)
    peak = torch.cuda.max_memory_allocated() - before
    resident = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    largest_bf16_tensor = 3072 * (3 * 3072 + 4 * 3072) * 2  # single block linear1
    print(f"fp8 model {resident / 2**20:.0f} MiB, load peak {peak / 2**20:.0f} MiB")
    assert peak <= resident + largest_bf16_tensor + 128 * 2**20  # + quantization scratch
    assert model.double_blocks[0].img_attn.qkv.weight.dtype == f8.E4M3


def test_tiny_pipeline_on_cuda_is_deterministic(tiny_cfg):
    from flux_pipeline import FluxPipeline

    cfg = dict(tiny_cfg, flux_device="cuda:0", ae_device="cuda:0", text_enc_device="cuda:0")
    pipe = FluxPipeline.load_pipeline_from_config(cfg)
    hashes = {
        hashlib.sha256(pipe.generate("a fox", 256, 256, 4, seed=3, silent=True).getvalue()).hexdigest()
        for _ in range(2)
    }
    assert len(hashes) == 1


def test_offload_round_trip_on_cuda(tiny_cfg):
    from flux_pipeline import FluxPipeline

    cfg = dict(
        tiny_cfg,
        flux_device="cuda:0",
        ae_device="cuda:0",
        text_enc_device="cuda:0",
        offload_text_encoder=True,
        offload_vae=True,
        offload_flow=True,
    )
    pipe = FluxPipeline.load_pipeline_from_config(cfg)
    seen = {}

    def record(module, args, kwargs):
        seen["flow"] = module.img_in.weight.device

    pipe.model.register_forward_pre_hook(record, with_kwargs=True)
    pipe.generate("a fox", 128, 128, 2, seed=1, silent=True)
    assert seen["flow"].type == "cuda"
    for module in (pipe.model, pipe.ae, pipe.t5.hf_module, pipe.clip.hf_module):
        assert all(p.device.type == "cpu" for p in module.parameters())


def test_compile_at_load_then_no_recompile_across_sizes(tiny_cfg):
    from torch._dynamo.utils import counters

    from flux_pipeline import FluxPipeline

    cfg = dict(
        tiny_cfg,
        flux_device="cuda:0",
        ae_device="cuda:0",
        text_enc_device="cuda:0",
        compile_blocks=True,
        compile_extras=True,
    )
    pipe = FluxPipeline.load_pipeline_from_config(cfg)  # compiles and warms up
    frames = counters["stats"]["unique_graphs"]
    for width, height in ((1024, 1024), (768, 768), (1024, 720), (720, 1024), (1360, 768)):
        pipe.generate_images("a fox", width, height, 1, seed=1)
    assert counters["stats"]["unique_graphs"] == frames


@pytest.mark.parametrize("quant", ["qint4", "qint8"])
def test_bitsandbytes_text_encoder(tiny_cfg, quant):
    import bitsandbytes  # noqa: F401 - carried to the GPU machine with device-wheels.sh --with-bnb

    from flux_pipeline import FluxPipeline

    cfg = dict(
        tiny_cfg, flux_device="cuda:0", ae_device="cuda:0", text_enc_device="cuda:0", text_enc_quantization_dtype=quant
    )
    pipe = FluxPipeline.load_pipeline_from_config(cfg)
    assert pipe.generate("a fox", 128, 128, 2, seed=1, silent=True).getvalue()
