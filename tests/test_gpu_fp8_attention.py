"""CUDA-only checks of the opt-in fp8 attention (`fp8_attention`): its kernels against the torch ops that define
them, cuDNN against the emulation, and the model under compile and CUDA graphs (`python -m pytest -q -m gpu`)."""

import json

import pytest
import torch
from safetensors.torch import save_file

from configs.make_tiny_demo import flow_state_dict
from cuda_graphs import GraphedFlow
from flux_pipeline import FluxPipeline
from kernels import fp8_attention, fp8_linear, qk_norm_rope
from modules import sampling
from modules.layers import EmbedND
from tests.helpers import ROOT, check_graph_replay_follows_loras
from util import ModelSpec, load_flow_model

pytestmark = pytest.mark.gpu
HEADS, DIM = 3, 128


@pytest.fixture(autouse=True)
def cudnn_frontend():
    """The fp8 attention's optional dependency (the GPU machine's runs install it from its wheel)."""
    pytest.importorskip("cudnn", reason="the fp8 attention needs nvidia-cudnn-frontend")


def streams_and_pe(n_txt=7, h=48, w=80, dtype=torch.bfloat16, seed=0):
    """Double-block streams (txt, img as a split view like linear1's output) with gains, and the rotary rows."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    ids = torch.cat([sampling.txt_ids(2, n_txt), sampling.img_ids(2, h, w)], 1).cuda()
    pe = EmbedND(DIM, 10000, [16, 56, 56])(ids)
    n_img = pe.shape[2] - n_txt
    txt = torch.randn(2, n_txt, 3 * HEADS * DIM, device="cuda", generator=gen).to(dtype) * 3
    joined = torch.randn(2, n_img, 3 * HEADS * DIM + 40, device="cuda", generator=gen).to(dtype)
    img = joined[..., : 3 * HEADS * DIM]
    gains = [(torch.rand(DIM, device="cuda", generator=gen) + 0.5).to(dtype) for _ in range(4)]
    gains[2][5] = 4.0  # one strong channel in the image stream's q: it sets the joint scale
    return [(txt, *gains[:2]), (img, *gains[2:])], pe, n_txt


def close_in_e4m3(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise: within one e4m3 step (3 mantissa bits) of each other, or both in the subnormal range."""
    return (a.float() - b.float()).abs() <= torch.maximum(a.float().abs(), b.float().abs()) / 8 + 2**-9


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_qk_kernel_writes_e4m3_q_k_and_the_scales(dtype):
    streams, pe, n_txt = streams_and_pe(dtype=dtype)
    for group, rows in ((streams, pe), (streams[1:], pe[:, :, n_txt:])):  # double block, then single block
        a, qa, ka = group[0]
        b, qb, kb = group[1] if len(group) == 2 else (None, None, None)
        q8, k8, v, scales = torch.ops.flux.rms_norm_rope_fp8(a, qa, ka, b, qb, kb, rows, HEADS)
        q, k, v_ref = qk_norm_rope.rms_norm_rope_reference(group, rows, HEADS)
        bound_q = fp8_attention.qk_bound([s[1] for s in group])
        bound_k = fp8_attention.qk_bound([s[2] for s in group])
        torch.testing.assert_close(scales[0, 0], bound_q / 448, rtol=1e-6, atol=0)
        torch.testing.assert_close(scales[1, 0], bound_k / 448, rtol=1e-6, atol=0)
        assert scales[2, 1] == v_ref.abs().amax().float()  # max|v|, folded in by every token
        for x8, x, scale in ((q8, q, scales[0, 0]), (k8, k, scales[1, 0])):
            assert x8.dtype == torch.float8_e4m3fn and x8.shape == (2, rows.shape[2], HEADS, DIM)
            ref = (x.float() / scale).transpose(1, 2)  # the bound holds: nothing is clipped
            assert ref.abs().max() <= 448 and (x.float().abs().amax() > 0.2 * 448 * scale)
            assert close_in_e4m3(x8, ref).all()
        if b is not None:
            assert torch.equal(v, v_ref.transpose(1, 2))  # joined v, in the activation dtype


def test_v_quantization_completes_the_scales():
    streams, pe, _ = streams_and_pe()
    (a, qa, ka), (b, qb, kb) = streams
    q8, k8, v, scales = torch.ops.flux.rms_norm_rope_fp8(a, qa, ka, b, qb, kb, pe, HEADS)
    v8, full = torch.ops.flux.fp8_quantize_v(v.flatten(2), scales)
    sv = v.abs().amax().float() / 448
    expected = torch.stack([scales[0, 0], scales[1, 0], sv, sv.new_tensor(1 / 448), sv.new_tensor(448.0), 1 / sv])
    torch.testing.assert_close(full[:, 0], expected, rtol=1e-6, atol=0)
    assert v8.shape == v.flatten(2).shape and close_in_e4m3(v8, v.flatten(2).float() / sv).all()
    assert v8.float().abs().max() == 448  # the largest |v| lands on e4m3's largest value


def test_cudnn_matches_the_emulation_and_the_exact_attention():
    torch.manual_seed(0)
    b, seq, h, d = 1, 1024, 4, 128

    def normed():
        x = torch.randn(b, seq, h, d, device="cuda")
        return (2 * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True))).bfloat16().transpose(1, 2)

    q, k, v = normed(), normed(), torch.randn(b, seq, h, d, device="cuda").bfloat16().transpose(1, 2)
    bound = torch.tensor(2 * d**0.5, device="cuda")
    packed = fp8_attention.quantize(q, k, v, bound, bound)
    out = torch.ops.flux.cudnn_fp8_sdpa(*packed)
    emulated = fp8_attention.emulate(*packed)
    assert out.dtype == torch.float8_e4m3fn and out.shape == (b, seq, h, d)
    sv = packed[3][2, 0]
    exact = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float()).transpose(1, 2)

    def rel(x, y):
        return ((x.float() * sv - y).norm() / y.norm()).item()

    assert rel(out, emulated.float() * sv) < 0.02  # the emulation is cuDNN's math (probe: equal errors to 0.01%)
    assert 0.03 < rel(out, exact) < 0.15  # sharp rows (logits' std ~4): the emulation's error is 9.5% on the CPU
    compiled = torch.compile(lambda *t: torch.ops.flux.cudnn_fp8_sdpa(*t), fullgraph=True)
    assert torch.equal(compiled(*packed).view(torch.uint8), out.view(torch.uint8))  # deterministic, opaque op


def test_fp8_attention_matches_its_reference_eager_and_compiled():
    streams, pe, _ = streams_and_pe()
    for group, rows in ((streams, pe), (streams[1:], pe[:, :, streams[0][0].shape[1] :])):
        o8, scale = fp8_attention.attention(group, rows, HEADS)
        r8, r_scale = fp8_attention.attention_reference(group, rows, HEADS)
        assert o8.shape == r8.shape == (2, rows.shape[2], HEADS * DIM) and o8.dtype == torch.float8_e4m3fn
        torch.testing.assert_close(scale, r_scale, rtol=1e-6, atol=0)
        q, k, v = qk_norm_rope.rms_norm_rope_reference(group, rows, HEADS)
        exact = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
        exact = exact.transpose(1, 2).flatten(2)
        err, err_ref = (((x.float() * s - exact).norm() / exact.norm()).item() for x, s in ((o8, scale), (r8, r_scale)))
        # the same math: as accurate as the emulation (which rounds q and k to bf16 first, and sums in another
        # order, so single e4m3 roundings differ: measured 3.4% apart on this data)
        assert err <= 1.1 * err_ref + 0.002, (err, err_ref)
        assert ((o8.float() * scale - r8.float() * r_scale).norm() / exact.norm()).item() < 0.06
        compiled = torch.compile(fp8_attention.attention, fullgraph=True)
        c8, c_scale = compiled(group, rows, HEADS)
        assert torch.equal(c8.view(torch.uint8), o8.view(torch.uint8)) and torch.equal(c_scale, scale)


def test_gelu_kernel_takes_the_e4m3_attention_output():

    torch.manual_seed(0)
    a8 = (torch.randn(2, 129, 256, device="cuda") * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    a_scale = torch.tensor(0.01, device="cuda")
    b = torch.randn(2, 129, 512 + 64, device="cuda", dtype=torch.bfloat16)[..., 64:] * 2
    q, scale = fp8_linear.gelu_concat_quantize(a8, b, a_scale)
    q_ref, scale_ref = fp8_linear.gelu_concat_quantize_reference(a8, b, a_scale)
    assert q.shape == q_ref.shape == (2 * 129, 256 + 512)
    torch.testing.assert_close(scale, scale_ref, rtol=1e-2, atol=0)  # the approximate tanh
    assert close_in_e4m3(q, q_ref).all() and (q.view(torch.uint8) != q_ref.view(torch.uint8)).float().mean() < 0.02


@pytest.fixture(scope="module")
def wide_cfg(tiny_cfg, tmp_path_factory) -> dict:
    """The demo config with heads of 128 (cuDNN's fp8 attention takes 128 on every Hopper build) on the GPU."""
    params = dict(tiny_cfg["params"], hidden_size=256, num_heads=2, axes_dim=[16, 56, 56])
    path = tmp_path_factory.mktemp("wide") / "flux.safetensors"
    save_file(flow_state_dict(params, dtype=torch.bfloat16), path)
    return dict(
        tiny_cfg, params=params, ckpt_path=str(path), flux_device="cuda:0", ae_device="cuda:0", text_enc_device="cuda:0"
    )


def test_pipeline_with_fp8_attention_graphs_and_compiles(wide_cfg):
    import numpy as np

    def pixels(cfg: dict) -> np.ndarray:
        pipe = FluxPipeline.load_pipeline_from_config(cfg)
        return np.asarray(pipe.generate_images("a fox", 256, 256, 4, seed=3)[0][0]).astype(int), pipe

    fast = dict(wide_cfg, fp8_attention=True)
    graphed, pipe = pixels(fast)
    assert isinstance(pipe.step_model, GraphedFlow) and all(b.options.fp8_attention for b in pipe.model.single_blocks)
    eager, _ = pixels(dict(fast, cuda_graphs=False))
    compiled, _ = pixels(dict(fast, compile_blocks=True, compile_extras=True))
    default, _ = pixels(wide_cfg)
    assert np.array_equal(graphed, eager)  # the graph replays the same kernels
    assert np.abs(compiled - eager).mean() < 2.0
    assert 0 < np.abs(default - eager).mean() < 8  # not exact, close to the default


def test_graphs_follow_loras_with_fp8_attention(wide_cfg):

    check_graph_replay_follows_loras(dict(wide_cfg, fp8_attention=True))


def test_config_rejects_fp8_attention_cudnn_cannot_run(wide_cfg):

    odd = dict(wide_cfg["params"], hidden_size=2 * 136, axes_dim=[16, 60, 60])  # heads of 136: above 128
    with pytest.raises(ValueError, match="fp8_attention: needs a head size"):  # before the (mismatched) weights
        load_flow_model(ModelSpec(**dict(wide_cfg, params=odd, fp8_attention=True)))


def test_full_size_head_config_is_supported():
    params = json.loads((ROOT / "configs" / "config-dev-1-H100.json").read_text())["params"]
    head_dim = params["hidden_size"] // params["num_heads"]
    assert fp8_attention.unsupported(torch.device("cuda:0"), head_dim) is None
