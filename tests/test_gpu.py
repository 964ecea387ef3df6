"""CUDA-only checks (run on the GPU machine with `python -m pytest -q -m gpu`)."""

import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file
from torch._dynamo.utils import counters

import float8_quantize as f8
from configs.make_tiny_demo import flow_state_dict
from encoder_quantize import weight_bytes
from flux_pipeline import FluxPipeline
from kernels import fp8_linear, qk_norm_rope
from modules import sampling
from modules.layers import EmbedND
from tests.helpers import BOUNDS, MODES, ROOT, check_graph_replay_follows_loras, f8_from
from util import ModelSpec, load_flow_model, load_text_encoders

pytestmark = pytest.mark.gpu


@pytest.fixture
def cuda_cfg(tiny_cfg) -> dict:
    """The demo config with every component on the first GPU."""
    return dict(tiny_cfg, flux_device="cuda:0", ae_device="cuda:0", text_enc_device="cuda:0")


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


def test_tiny_pipeline_on_cuda_is_deterministic(cuda_cfg):

    pipe = FluxPipeline.load_pipeline_from_config(cuda_cfg)
    hashes = {
        hashlib.sha256(pipe.generate("a fox", 256, 256, 4, seed=3, silent=True).getvalue()).hexdigest()
        for _ in range(2)
    }
    assert len(hashes) == 1


def test_offload_round_trip_on_cuda(cuda_cfg):

    cfg = dict(
        cuda_cfg,
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


def test_compile_at_load_then_no_recompile_across_sizes(cuda_cfg):

    cfg = dict(
        cuda_cfg,
        compile_blocks=True,
        compile_extras=True,
    )
    pipe = FluxPipeline.load_pipeline_from_config(cfg)  # compiles and warms up
    frames = counters["stats"]["unique_graphs"]
    for width, height in ((1024, 1024), (768, 768), (1024, 720), (720, 1024), (1360, 768)):
        pipe.generate_images("a fox", width, height, 1, seed=1)
    assert counters["stats"]["unique_graphs"] == frames


def test_one_image_warm_up_at_its_own_size_then_no_recompile(cuda_cfg):
    """main.py's one-image mode warms up at the image's size only (one step, then two); the image then runs
    from the compiled graphs, 28 steps included (the modulation table's many-row graph)."""

    cfg = dict(cuda_cfg, compile_blocks=True, compile_extras=True)
    pipe = FluxPipeline.load_pipeline_from_config(cfg, warm_up_sizes=((720, 1024), (720, 1024)))
    frames = counters["stats"]["unique_graphs"]
    pipe.generate_images("a fox", 720, 1024, 28, seed=1)
    assert counters["stats"]["unique_graphs"] == frames


@pytest.mark.parametrize("quant", ["qint4", "qint8"])
def test_bitsandbytes_text_encoder(cuda_cfg, quant):
    import bitsandbytes  # noqa: F401 - carried to the GPU machine with device-wheels.sh --with-bnb

    cfg = dict(cuda_cfg, text_enc_quantization_dtype=quant)
    pipe = FluxPipeline.load_pipeline_from_config(cfg)
    assert pipe.generate("a fox", 128, 128, 2, seed=1, silent=True).getvalue()


def test_fp8_text_encoder_on_the_gpu_matches_the_cpu(tiny_cfg):
    """Our fp8 T5 quantized on the GPU holds the e4m3 weights of one quantized on the CPU, up to values on a rounding
    boundary (the two devices' float32 arithmetic may differ in the last bit of a scale), and embeds the same."""
    from encoder_quantize import F8EncoderLinear

    cfg = dict(tiny_cfg, text_enc_quantization_dtype="qfloat8")
    _, t5_gpu = load_text_encoders(ModelSpec(**dict(cfg, text_enc_device="cuda:0")))
    _, t5_cpu = load_text_encoders(ModelSpec(**dict(cfg, text_enc_device="cpu")))
    gpu_layers = {n: m for n, m in t5_gpu.hf_module.named_modules() if isinstance(m, F8EncoderLinear)}
    cpu_layers = {n: m for n, m in t5_cpu.hf_module.named_modules() if isinstance(m, F8EncoderLinear)}
    assert gpu_layers.keys() == cpu_layers.keys() and gpu_layers
    for name, m in cpu_layers.items():
        gpu = gpu_layers[name].fp8
        assert gpu.weight.device.type == "cuda" and gpu.weight.dtype == torch.float8_e4m3fn
        torch.testing.assert_close(m.fp8.weight_scale, gpu.weight_scale.cpu(), rtol=1e-5, atol=0)
        differ = (m.fp8.weight.view(torch.uint8) != gpu.weight.cpu().view(torch.uint8)).float().mean().item()
        assert differ < 0.01, (name, differ)
    ids, _ = t5_gpu.tokenize(["a fox in the snow"])
    with torch.no_grad():
        on_gpu = t5_gpu(ids.cuda()).float().cpu()
        t5_cpu.hf_module.cuda()
        reference = t5_cpu(ids.cuda()).float().cpu()
    assert ((on_gpu - reference).norm() / reference.norm()).item() < 0.01


def test_quanto_text_encoder_is_quantized_on_the_gpu(tiny_cfg):
    """A CUDA text encoder is read onto the GPU and quantized there; it embeds as one quantized on the CPU."""

    cfg = dict(tiny_cfg, text_enc_quantization_dtype="quanto_qfloat8")
    _, t5_gpu = load_text_encoders(ModelSpec(**dict(cfg, text_enc_device="cuda:0")))
    _, t5_cpu = load_text_encoders(ModelSpec(**dict(cfg, text_enc_device="cpu")))
    weight = t5_gpu.hf_module.encoder.block[0].layer[0].SelfAttention.q.weight
    assert weight.device.type == "cuda" and type(weight).__name__ != "Parameter"  # a quanto tensor
    ids, _ = t5_gpu.tokenize(["a fox in the snow"])
    with torch.no_grad():
        on_gpu = t5_gpu(ids.cuda()).float().cpu()
        t5_cpu.hf_module.cuda()  # quantized on the CPU, then moved: the path CPU devices take
        reference = t5_cpu(ids.cuda()).float().cpu()
    torch.testing.assert_close(on_gpu, reference, rtol=1e-2, atol=1e-2)
    # quanto packs e4m3 weights as int32 words on CUDA (Marlin): the byte count sees through the packing
    assert weight_bytes(t5_gpu.hf_module) == weight_bytes(t5_cpu.hf_module)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("with_a", [True, False])
@pytest.mark.parametrize("fast_tanh", [False, True])
def test_one_pass_gelu_concat_quantize_matches_torch_ops(dtype, with_a, fast_tanh):
    torch._dynamo.reset()  # each case compiles the op anew below: twelve cases would pass dynamo's recompile limit
    torch.manual_seed(0)
    fused = torch.randn(3, 129, 96 + 400, device="cuda", dtype=dtype) * 3  # a split view, like linear1's output
    fused[..., 7] *= 50  # an outlier channel
    a = torch.randn(3, 129, 64, device="cuda", dtype=dtype) if with_a else None
    b = fused[..., 96:]
    q, scale = fp8_linear.gelu_concat_quantize(a, b, None, fast_tanh)
    q_ref, scale_ref = fp8_linear.gelu_concat_quantize_reference(a, b)
    assert q.shape == q_ref.shape == (3 * 129, 400 + (64 if with_a else 0)) and scale.shape == (3 * 129, 1)
    torch.testing.assert_close(scale, scale_ref, rtol=1e-2 if fast_tanh else 2e-6, atol=0)
    diff = (q.float() - q_ref.float()).abs()
    # An e4m3 value may round the other way, by one e4m3 step (1/8 relative at most), where the value sits on or
    # next to a rounding boundary: the kernel multiplies by the row's reciprocal scale where torch divides, so at
    # exact ties (frequent: 448 x / amax of bf16 values often has few significant bits) the two round to
    # different neighbours, each half a step away; its tanh may differ in the last float32 bit (the approximate
    # tanh, 2^-11 relative, moves ~1 in 10 bf16 GELU values by one bf16 step)
    assert (diff > 0).float().mean() < 2e-2
    one_step = torch.maximum(q.float().abs(), q_ref.float().abs()) / 8 + 2**-9  # e4m3: 3 mantissa bits
    assert (diff <= one_step).all()
    # and as accurate as torch's rounding of the GELU values torch computes
    gelu = torch.nn.functional.gelu(b, approximate="tanh")
    value = (torch.cat((a, gelu), -1) if with_a else gelu).reshape(q.shape).double() / scale_ref.double()
    err, err_ref = ((t.double() - value).norm() for t in (q, q_ref))
    assert err <= err_ref * (1.02 if fast_tanh else 1.001), (err, err_ref)
    compiled = torch.compile(fp8_linear.gelu_concat_quantize, fullgraph=True)
    q_c, scale_c = compiled(a, b, None, fast_tanh)
    assert torch.equal(q_c.view(torch.uint8), q.view(torch.uint8)) and torch.equal(scale_c, scale)


def test_forward_gelu_concat_matches_unfused_f8linear():
    torch.manual_seed(0)
    layer = f8_from(torch.nn.Linear(64 + 256, 128), "per_channel", "dynamic_per_token").cuda()
    layer.bias.data = layer.bias.data.bfloat16()
    a = torch.randn(2, 50, 64, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(2, 50, 256, device="cuda", dtype=torch.bfloat16)
    out = layer.forward_gelu_concat(a, b, None, fast_tanh=True)
    ref = layer(torch.cat((a, torch.nn.functional.gelu(b, approximate="tanh")), dim=-1))
    assert out.shape == ref.shape == (2, 50, 128)
    assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layernorm_modulate_quantize_kernel(dtype):
    """Against the exact values (float64): each row's scale is its absolute maximum / 448, each element is within
    one e4m3 rounding of its value (plus the roundings to the activation dtype on the way, as in the torch ops),
    and the whole is as accurate as the torch ops."""

    torch.manual_seed(0)
    x = torch.randn(2, 300, 96, device="cuda", dtype=dtype) * 4 + 1
    x[1, 5, 17] = 200  # an outlier
    mod = torch.randn(2, 1, 6 * 96, device="cuda", dtype=dtype)  # chunks of it, as Modulation hands them over
    scale, shift = mod[..., 96:192], mod[..., 288:384]
    q, s = fp8_linear.layernorm_modulate_quantize(x, scale, shift)
    assert q.shape == (600, 96) and q.dtype == torch.float8_e4m3fn and s.shape == (600, 1)
    normed = torch.nn.functional.layer_norm(x.double(), (96,), eps=1e-6)
    exact = ((1 + scale.double()) * normed + shift.double()).reshape(600, 96)
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(s.double(), exact.abs().amax(1, keepdim=True) / 448, rtol=2 * ulp, atol=0)
    # four roundings to the activation dtype (LayerNorm output, 1 + scale, product, sum), half an ulp each
    rounding = (2 * ulp * ((1 + scale.double()).abs() * normed.abs() + shift.double().abs())).reshape(600, 96)
    got = q.double() * s.double()
    assert ((got - exact).abs() <= (exact.abs() + rounding) * 2**-4 + rounding + s.double() * 2**-9).all()
    q_ref, s_ref = fp8_linear.layernorm_modulate_quantize_reference(x, scale, shift)
    err, err_ref = ((t - exact).norm() / exact.norm() for t in (got, q_ref.double() * s_ref.double()))
    assert err <= err_ref * 1.05, (err, err_ref)  # as accurate as the torch ops
    compiled = torch.compile(fp8_linear.layernorm_modulate_quantize, fullgraph=True)
    q_c, s_c = compiled(x, scale, shift)
    assert torch.equal(q_c.view(torch.uint8), q.view(torch.uint8)) and torch.equal(s_c, s)


def test_forward_modulated_is_as_accurate_as_unfused_f8linear():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128)
    layer = f8_from(linear, "per_channel", "dynamic_per_token").cuda()
    layer.bias.data = layer.bias.data.bfloat16()
    x = torch.randn(2, 50, 256, device="cuda", dtype=torch.bfloat16)
    scale, shift = torch.randn(2, 2, 1, 256, device="cuda", dtype=torch.bfloat16).unbind(0)
    out = layer.forward_modulated(x, scale, shift, 1e-6)
    unfused = layer((1 + scale) * torch.nn.functional.layer_norm(x, (256,), eps=1e-6) + shift)
    y = (1 + scale.double()) * torch.nn.functional.layer_norm(x.double(), (256,), eps=1e-6) + shift.double()
    exact = torch.nn.functional.linear(y, linear.weight.double().cuda(), linear.bias.double().cuda())
    assert out.shape == unfused.shape == (2, 50, 128)
    err, err_unfused = ((t.double() - exact).norm() / exact.norm() for t in (out, unfused))
    assert err <= err_unfused * 1.05 + 1e-3, (err, err_unfused)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rms_norm_rope_kernel_matches_torch_ops(dtype):

    torch.manual_seed(0)
    heads, dim = 3, 32
    pe = EmbedND(dim, 10000, [8, 12, 12])(torch.cat([sampling.txt_ids(2, 7), sampling.img_ids(2, 64, 80)], 1).cuda())
    n_txt, n_img = 7, pe.shape[2] - 7
    txt = torch.randn(2, n_txt, 3 * heads * dim, device="cuda", dtype=dtype) * 3
    joined = torch.randn(2, n_img, 3 * heads * dim + 40, device="cuda", dtype=dtype)  # a split view, as linear1's
    img = joined[..., : 3 * heads * dim]
    gains = [torch.rand(dim, device="cuda", dtype=dtype) + 0.5 for _ in range(4)]
    double = [(txt, *gains[:2]), (img, *gains[2:])]
    for streams, rows in ((double, pe), (double[1:], pe[:, :, n_txt:])):  # double block, then single block
        out = qk_norm_rope.rms_norm_rope(streams, rows, heads)
        ref = qk_norm_rope.rms_norm_rope_reference(streams, rows, heads)
        for o, r in zip(out, ref, strict=True):
            assert o.shape == r.shape == (2, heads, rows.shape[2], dim)
            # last-bit float32 differences (rsqrt, fused multiply-add) round to the neighbouring value at most
            ulp = torch.finfo(dtype).eps * 2
            assert ((o.float() - r.float()).abs() <= r.float().abs() * ulp + 1e-6).all()
            if dtype != torch.float32:  # float32 outputs keep every last-bit difference
                assert (o != r).float().mean() < 1e-2
        assert torch.equal(out[2], ref[2])  # v is copied, not changed
        assert out[0].transpose(1, 2).is_contiguous()  # (B, L, H, D) memory: the attention output's heads join freely
        compiled = torch.compile(qk_norm_rope.rms_norm_rope, fullgraph=True)
        assert all(torch.equal(c, o) for c, o in zip(compiled(streams, rows, heads), out, strict=True))


def test_cuda_graph_replay_matches_eager_and_follows_loras(cuda_cfg):
    check_graph_replay_follows_loras(cuda_cfg)
