import copy
import threading

import numpy as np
import pytest
import torch
from loguru import logger
from PIL import Image

from encoder_quantize import F8Conv2d, weight_bytes
from errors import Cancelled
from flux_pipeline import FluxPipeline

SMALL = dict(width=128, height=96, num_steps=3, silent=True)


@pytest.mark.parametrize(
    "quant, bound",
    [("qfloat8", 0.045), ("quanto_qfloat8", 0.06)],  # measured 0.030 (ours) and 0.046 (quanto's) on the tiny T5
)
def test_fp8_t5_runs_and_stays_close(tiny_cfg, bf16_pipeline, quant, bound):
    from optimum.quanto import QLinear

    from encoder_quantize import F8EncoderLinear

    pipe = FluxPipeline.load_pipeline_from_config(
        dict(tiny_cfg, flow_quantization_dtype="bfloat16", text_enc_quantization_dtype=quant)
    )

    layer_type = F8EncoderLinear if quant == "qfloat8" else QLinear
    assert any(isinstance(m, layer_type) for m in pipe.t5.modules())
    assert not any(type(m) is torch.nn.Linear for m in pipe.t5.modules())
    linears = [m for m in bf16_pipeline.t5.modules() if isinstance(m, torch.nn.Linear)]
    linear_bytes = sum(m.weight.numel() * 2 for m in linears)  # bf16 weights, no biases in T5
    saved = weight_bytes(bf16_pipeline.t5.hf_module) - weight_bytes(pipe.t5.hf_module)
    if quant == "qfloat8":  # 2 -> 1 byte per weight, plus one float32 scale per output row
        assert saved == linear_bytes // 2 - 4 * sum(m.out_features for m in linears)
    else:
        assert 0.45 * linear_bytes < saved <= 0.5 * linear_bytes
    ids, _ = pipe.t5.tokenize(["a red fox in the snow"])
    quantized, reference = pipe.t5(ids).float(), bf16_pipeline.t5(ids).float()
    err = ((quantized - reference).norm() / reference.norm()).item()
    assert 0 < err < bound
    assert Image.open(pipe.generate("a fox", seed=1, **SMALL)).size == (128, 96)


def test_fp8_t5_keeps_the_feed_forward_input_in_bf16(tiny_cfg, bf16_pipeline):
    """transformers' T5 casts `wo`'s input to `wo.weight.dtype`: our layer must not make it e4m3. The fp8 layers
    compute what bf16 layers holding the dequantized weights compute, up to one more bf16 rounding."""
    from encoder_quantize import F8EncoderLinear, fp8_text_encoder
    from float8_quantize import dequantize_weight

    reference = copy.deepcopy(bf16_pipeline.t5.hf_module)
    quantized = fp8_text_encoder(copy.deepcopy(bf16_pipeline.t5.hf_module))
    ref_modules = dict(reference.named_modules())
    for name, m in quantized.named_modules():
        if isinstance(m, F8EncoderLinear):
            w = dequantize_weight(m.fp8.weight, m.fp8.weight_scale).to(torch.bfloat16)
            ref_modules[name].weight.data = w
    ids, _ = bf16_pipeline.t5.tokenize(["a red fox in the snow"])
    with torch.inference_mode():
        out = quantized(input_ids=ids).last_hidden_state
        expected = reference(input_ids=ids).last_hidden_state
    assert out.dtype == torch.bfloat16
    # the same weights, rounded to bf16 once more at the output scale: far below fp8's own error (3-4%)
    err = ((out.float() - expected.float()).norm() / expected.float().norm()).item()
    assert err < 0.01, err


def test_bitsandbytes_needs_cuda(tiny_cfg):
    with pytest.raises(ValueError, match="qint4"):
        FluxPipeline.load_pipeline_from_config(dict(tiny_cfg, text_enc_quantization_dtype="qint4"))


def test_autoencoder_qfloat8_stores_fp8_and_reports_savings(tiny_cfg, bf16_pipeline):

    messages = []
    handler = logger.add(messages.append, level="INFO")
    try:
        pipe = FluxPipeline.load_pipeline_from_config(
            dict(tiny_cfg, flow_quantization_dtype="bfloat16", ae_quantization_dtype="qfloat8")
        )
    finally:
        logger.remove(handler)
    convs = [m for m in pipe.ae.modules() if isinstance(m, F8Conv2d)]
    assert convs and all(m.weight.dtype == torch.float8_e4m3fn for m in convs)
    assert not any(isinstance(m, torch.nn.Conv2d) and m.weight[0].numel() >= 16 for m in pipe.ae.modules())
    assert any("MiB saved" in m for m in messages)
    a, _ = pipe.generate_images("a fox", 128, 96, 3, seed=1)
    b, _ = bf16_pipeline.generate_images("a fox", 128, 96, 3, seed=1)
    diff = np.abs(np.asarray(a[0], dtype=float) - np.asarray(b[0], dtype=float)).mean()
    assert 0 < diff < 12  # fp8 weight rounding, not a different image


def test_offloaded_components_are_back_on_cpu(tiny_cfg):
    pipe = FluxPipeline.load_pipeline_from_config(
        dict(tiny_cfg, offload_text_encoder=True, offload_vae=True, offload_flow=True)
    )
    seen = {}

    def record(module, args, kwargs):
        seen["flow"] = module.img_in.weight.device

    pipe.model.register_forward_pre_hook(record, with_kwargs=True)
    pipe.generate("a fox", seed=1, **SMALL)
    assert seen["flow"].type == "cpu"  # this machine's device; on CUDA the GPU test checks the round trip
    for module in (pipe.model, pipe.ae, pipe.t5.hf_module, pipe.clip.hf_module):
        assert all(p.device.type == "cpu" for p in module.parameters())


def test_cancel_stops_within_one_step(bf16_pipeline):
    cancel = threading.Event()
    steps = []

    def callback(step, total):
        steps.append(step)
        if step == 2:
            cancel.set()

    with pytest.raises(Cancelled):
        bf16_pipeline.generate_images("a fox", 128, 96, 10, seed=1, callback=callback, cancel=cancel)
    assert steps == [1, 2]


def test_progress_callback_counts_every_step(bf16_pipeline):
    seen = []
    bf16_pipeline.generate_images("a fox", 128, 96, 5, seed=1, callback=lambda s, n: seen.append((s, n)))
    assert seen == [(i, 5) for i in range(1, 6)]


def test_two_threads_match_their_single_thread_results(bf16_pipeline):
    expected = {s: bf16_pipeline.generate(f"prompt {s}", seed=s, **SMALL).getvalue() for s in (1, 2)}
    results = {}
    threads = [
        threading.Thread(
            target=lambda s=s: results.update({s: bf16_pipeline.generate(f"prompt {s}", seed=s, **SMALL).getvalue()})
        )
        for s in (1, 2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == expected
