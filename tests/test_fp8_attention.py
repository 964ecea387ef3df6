"""The opt-in fp8 attention's math on the CPU (torch ops; the CUDA kernels are checked against the same functions
in tests/test_gpu_fp8_attention.py)."""

import math

import pytest
import torch
from loguru import logger

from kernels import fp8_attention, qk_norm_rope
from kernels.common import E4M3
from kernels.options import KernelOptions
from modules import sampling
from modules.layers import EmbedND, quantized_linear
from tests.helpers import f8_from, random_inputs
from util import ModelSpec, load_flow_model


def streams(n_txt=5, h=32, w=48, heads=2, dim=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    pe = EmbedND(dim, 10000, [8, 28, 28])(torch.cat([sampling.txt_ids(1, n_txt), sampling.img_ids(1, h, w)], 1))
    n_img = pe.shape[2] - n_txt
    txt = torch.randn(1, n_txt, 3 * heads * dim, generator=g) * 3
    img = torch.randn(1, n_img, 3 * heads * dim, generator=g)
    gains = [torch.rand(dim, generator=g) + 0.5 for _ in range(4)]
    gains[3][7] = 5.0  # a strong k channel in the image stream
    return [(txt, *gains[:2]), (img, *gains[2:])], pe, heads


def test_qk_bound_holds_and_is_reached():
    group, pe, heads = streams()
    q, k, _ = qk_norm_rope.rms_norm_rope_reference(group, pe, heads)
    bound_q = fp8_attention.qk_bound([s[1] for s in group])
    bound_k = fp8_attention.qk_bound([s[2] for s in group])
    assert bound_k == pytest.approx(5.0 * math.sqrt(64))  # the strong channel's gain sets it
    assert q.abs().max() <= bound_q and k.abs().max() <= bound_k
    # a token with all its energy in the strong channel, at position 0 (no rotation), reaches the bound
    qkv = torch.zeros(1, 1, 3 * heads * 64)
    qkv[0, 0, heads * 64 + 7] = 3.0
    at_zero = EmbedND(64, 10000, [8, 28, 28])(sampling.txt_ids(1, 1))  # text positions are all 0
    _, k1, _ = qk_norm_rope.rms_norm_rope_reference([(qkv, group[1][1], group[1][2])], at_zero, heads)
    assert k1.abs().max() == pytest.approx(bound_k.item(), rel=1e-5)  # less only by the norm's epsilon


def test_emulation_is_close_to_exact_attention_and_in_range():
    group, pe, heads = streams()
    o8, scale = fp8_attention.attention_reference(group, pe, heads)
    q, k, v = qk_norm_rope.rms_norm_rope_reference(group, pe, heads)
    exact = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
    assert o8.dtype == E4M3 and o8.shape == exact.shape
    assert scale == v.abs().max() / 448  # |o| <= max|v|: o keeps v's scale
    err = ((o8.float() * scale - exact).norm() / exact.norm()).item()
    assert 0.005 < err < 0.1


def test_probabilities_and_output_are_quantized():
    """Each quantization the emulation makes costs accuracy (so the CPU path is the fp8 math, not exact math)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 200, 64) for _ in range(3))
    bound = torch.tensor(30.0)
    q8, k8, v8, scales = fp8_attention.quantize(q, k, v, bound, bound)
    assert q8.shape == (1, 200, 2, 64) and q8.is_contiguous()
    assert scales[:, 0].tolist() == pytest.approx(
        [30 / 448, 30 / 448, v.abs().max().item() / 448, 1 / 448, 448, 448 / v.abs().max().item()]
    )
    out = fp8_attention.emulate(q8, k8, v8, scales).float()
    dq = [x.float().transpose(1, 2) * s for x, s in zip((q8, k8, v8), scales[:3, 0], strict=True)]
    exact_of_quantized = torch.nn.functional.scaled_dot_product_attention(*dq).transpose(1, 2) / scales[2, 0]
    err = ((out - exact_of_quantized).norm() / exact_of_quantized.norm()).item()
    assert 0.005 < err < 0.05  # e4m3 probabilities and output


def test_model_blocks_switch_to_fp8_attention(tiny_cfg, flow_params, monkeypatch):
    inputs = random_inputs(flow_params)
    model = load_flow_model(ModelSpec(**dict(tiny_cfg, flow_dtype="float32")))
    calls = []
    original = fp8_attention.attention_reference

    def counting(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(fp8_attention, "attention_reference", counting)  # a spy: counts the blocks that call it
    with torch.no_grad():
        default = model(**inputs)
        assert not calls
        model.set_kernel_options(KernelOptions(fp8_attention=True))
        fast = model(**inputs)
        model.set_kernel_options(KernelOptions())
        again = model(**inputs)
    assert len(calls) == flow_params["depth"] + flow_params["depth_single_blocks"]
    assert torch.equal(again, default) and not torch.equal(fast, default)
    assert ((fast - default).norm() / default.norm()).item() < 0.02


def test_config_key_turns_it_on_with_a_warning_off_cuda(tiny_cfg, flow_params):

    assert ModelSpec(**tiny_cfg).fp8_attention is False
    messages = []
    handler = logger.add(messages.append, level="INFO")
    try:
        model = load_flow_model(ModelSpec(**dict(tiny_cfg, fp8_attention=True)))
    finally:
        logger.remove(handler)
    assert all(b.options.fp8_attention for b in [*model.double_blocks, *model.single_blocks])
    assert any("torch ops emulate" in m for m in messages) and any("fp8 attention on" in m for m in messages)
    assert "CUDA" in fp8_attention.unsupported(torch.device("cpu"), 128)


@pytest.mark.parametrize("use_fp8", [True, False])
def test_linear_takes_the_e4m3_attention_output_as_it_is(use_fp8):
    torch.manual_seed(0)
    layer = f8_from(torch.nn.Linear(128, 64), "per_channel", "dynamic_per_token")
    layer.use_fp8 = use_fp8
    xq = (torch.randn(3, 40, 128) * 100).clamp(-448, 448).to(E4M3)
    scale = torch.tensor(0.02)
    x = xq.float() * scale
    w = layer.weight.float() * layer.weight_scale.reshape(-1, 1)
    exact = (x.double() @ w.double().t() + layer.bias.double()).float()
    out = quantized_linear(layer, xq, scale, torch.float32)  # the model's entry: e4m3 as it is where it can
    assert out.shape == (3, 40, 64)
    # the input is taken as it is: only the matmul's accumulation differs from the exact product of the operands
    assert ((out - exact).norm() / exact.norm()).item() < 1e-5
