import pytest
import torch
from safetensors.torch import save_file

import float8_quantize as f8
from configs.make_tiny_demo import flow_state_dict
from modules import sampling
from modules.flux_model import Flux, FluxParams, timestep_embedding
from tests.helpers import diffusers_flux, diffusers_forward, random_inputs
from util import ModelSpec, load_flow_model


def bfl_shapes(p: dict) -> dict[str, tuple[int, ...]]:
    """Every key of a BFL FLUX.1 checkpoint and its shape, written out from BFL's module tree."""
    h, mlp = p["hidden_size"], int(p["hidden_size"] * p["mlp_ratio"])
    head = h // p["num_heads"]
    shapes = {}

    def linear(name, n_in, n_out, bias=True):
        shapes[f"{name}.weight"] = (n_out, n_in)
        if bias:
            shapes[f"{name}.bias"] = (n_out,)

    linear("img_in", p["in_channels"], h)
    linear("txt_in", p["context_in_dim"], h)
    for emb, n_in in (("time_in", 256), ("vector_in", p["vec_in_dim"]), ("guidance_in", 256)):
        linear(f"{emb}.in_layer", n_in, h)
        linear(f"{emb}.out_layer", h, h)
    for i in range(p["depth"]):
        for s in ("img", "txt"):
            b = f"double_blocks.{i}.{s}"
            linear(f"{b}_mod.lin", h, 6 * h)
            linear(f"{b}_attn.qkv", h, 3 * h, p["qkv_bias"])
            shapes[f"{b}_attn.norm.query_norm.scale"] = (head,)
            shapes[f"{b}_attn.norm.key_norm.scale"] = (head,)
            linear(f"{b}_attn.proj", h, h)
            linear(f"{b}_mlp.0", h, mlp)
            linear(f"{b}_mlp.2", mlp, h)
    for i in range(p["depth_single_blocks"]):
        b = f"single_blocks.{i}"
        linear(f"{b}.linear1", h, 3 * h + mlp)
        linear(f"{b}.linear2", h + mlp, h)
        shapes[f"{b}.norm.query_norm.scale"] = (head,)
        shapes[f"{b}.norm.key_norm.scale"] = (head,)
        linear(f"{b}.modulation.lin", h, 3 * h)
    linear("final_layer.linear", h, p["in_channels"])
    linear("final_layer.adaLN_modulation.1", h, 2 * h)
    return shapes


def test_state_dict_matches_bfl_layout(flow_params):
    model = Flux(FluxParams(**flow_params))
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == bfl_shapes(flow_params)


@pytest.fixture
def fp32_checkpoint(tmp_path, flow_params):
    sd = flow_state_dict(flow_params, seed=3, dtype=torch.float32)
    path = tmp_path / "flux.safetensors"
    save_file(sd, path)
    return path, sd


def test_checkpoint_reloads_and_matches_diffusers(tiny_cfg, flow_params, fp32_checkpoint):
    path, sd = fp32_checkpoint
    cfg = dict(tiny_cfg, ckpt_path=str(path), flow_dtype="float32", flow_quantization_dtype="bfloat16")
    model = load_flow_model(ModelSpec(**cfg))
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in model.state_dict().values())
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    reference = diffusers_flux(flow_params, sd)  # an independent implementation, diffusers' own
    inputs = random_inputs(flow_params)
    with torch.no_grad():
        ours = model(**inputs)
        theirs = diffusers_forward(reference, **inputs)
    assert ours.shape == inputs["img"].shape
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_rope_positions_matter(flow_params, fp32_checkpoint):
    """Guards the comparison above: swapping row/column ids must change the output."""
    _, sd = fp32_checkpoint
    model = Flux(FluxParams(**flow_params))
    model.load_state_dict(sd)
    inputs = random_inputs(flow_params)
    swapped = dict(inputs, img_ids=inputs["img_ids"][..., [0, 2, 1]])
    with torch.no_grad():
        diff = (model(**inputs) - model(**swapped)).norm() / model(**inputs).norm()
    assert diff > 1e-4


def test_checkpoint_with_missing_keys_is_an_error(tiny_cfg, tmp_path, flow_params):
    sd = flow_state_dict(flow_params)
    del sd["single_blocks.1.linear2.weight"]
    save_file(sd, tmp_path / "partial.safetensors")
    cfg = dict(tiny_cfg, ckpt_path=str(tmp_path / "partial.safetensors"), flow_quantization_dtype="bfloat16")
    with pytest.raises(ValueError, match="single_blocks.1.linear2.weight"):
        load_flow_model(ModelSpec(**cfg))


def test_comfyui_prefix_and_unexpected_keys(tiny_cfg, tmp_path, flow_params):
    sd = flow_state_dict(flow_params)
    sd["extra.thing"] = torch.zeros(2)
    save_file({f"model.diffusion_model.{k}": v for k, v in sd.items()}, tmp_path / "comfy.safetensors")
    cfg = dict(tiny_cfg, ckpt_path=str(tmp_path / "comfy.safetensors"), flow_quantization_dtype="bfloat16")
    model = load_flow_model(ModelSpec(**cfg))
    assert torch.equal(model.img_in.weight, sd["img_in.weight"])


def test_timestep_embedding_is_float32_cos_first():
    emb = timestep_embedding(torch.tensor([3.5], dtype=torch.bfloat16), 256)
    assert emb.dtype == torch.float32
    assert emb[0, 0] == pytest.approx(torch.cos(torch.tensor(3500.0)).item(), abs=1e-5)  # not 3504 (bf16)
    assert emb[0, 128] == pytest.approx(torch.sin(torch.tensor(3500.0)).item(), abs=1e-5)


def test_float16_clamps_block_outputs(flow_params):
    torch.manual_seed(0)
    model = Flux(FluxParams(**flow_params)).to(torch.float16)
    # block 0 emits values past the clamp (but inside fp16's range); block 1 must see them clamped
    model.double_blocks[0].register_forward_hook(lambda m, i, o: (torch.full_like(o[0], 50000.0), o[1]))
    seen = []
    model.double_blocks[1].register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["img"].abs().max().item()), with_kwargs=True
    )
    with torch.no_grad():
        model(**{k: v.half() if v.is_floating_point() else v for k, v in random_inputs(flow_params).items()})
    assert seen == [32000.0]


def test_bfloat16_is_not_clamped(flow_params):
    model = Flux(FluxParams(**flow_params)).to(torch.bfloat16)
    model.double_blocks[0].register_forward_hook(lambda m, i, o: (torch.full_like(o[0], 50000.0), o[1]))
    seen = []
    model.double_blocks[1].register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["img"].abs().max().item()), with_kwargs=True
    )
    with torch.no_grad():
        model(**{k: v.bfloat16() if v.is_floating_point() else v for k, v in random_inputs(flow_params).items()})
    assert seen[0] > 32000  # 50000 rounded to bf16


def test_precomputed_rotary_embedding_gives_the_same_output(flow_params, fp32_checkpoint):
    """CUDA graph replay passes `pe` computed once per image instead of the ids: same output, ids unused."""
    model = Flux(FluxParams(**flow_params))
    model.load_state_dict(fp32_checkpoint[1])
    x = random_inputs(flow_params)
    pe = model.pe_embedder(torch.cat((x["txt_ids"], x["img_ids"]), dim=1))
    with torch.no_grad():
        reference = model(**x)
        given = model(**dict(x, img_ids=None, txt_ids=None), pe=pe)
        other = model(**x, pe=model.pe_embedder(torch.cat((x["txt_ids"], x["img_ids"] + 5), dim=1)))
    assert torch.equal(given, reference)
    assert not torch.equal(other, reference)  # the embedding given is the one used


@pytest.mark.parametrize("quantized", [False, True])
def test_modulation_table_gives_each_steps_output(flow_params, fp32_checkpoint, quantized):
    """Precomputed modulations (all steps at once) give each step the output it gets computing them itself."""

    model = Flux(FluxParams(**flow_params))
    model.load_state_dict(fp32_checkpoint[1])
    if quantized:
        model = f8.quantize_flow_model(model.bfloat16(), f8.F8Settings())
    dtype = model.dtype
    x = {k: v.to(dtype) if v.is_floating_point() else v for k, v in random_inputs(flow_params).items()}
    times = torch.tensor([[1.0], [0.55], [0.1]])
    with torch.no_grad():
        table = model.modulation_table(times, x["y"], x["guidance"])
        assert table.shape == (3, 1, sum(model.modulation_widths())) and table.dtype == dtype
        for step, t in enumerate(times):
            direct = model(**dict(x, timesteps=t))
            given = model(**dict(x, timesteps=None, y=None, guidance=None), mods=table[step])
            # the same math; a matmul of 3 rows may round its sums differently from one of 1 row
            err = ((given.double() - direct.double()).norm() / direct.double().norm()).item()
            assert err < (1e-6 if dtype == torch.float32 else 1e-3)
        # the row given is the one used
        assert not torch.equal(model(**x, mods=table[0]), model(**x, mods=table[2]))


def test_denoise_computes_modulations_once_per_image(flow_params, fp32_checkpoint):
    model = Flux(FluxParams(**flow_params))
    model.load_state_dict(fp32_checkpoint[1])
    layers = [model.double_blocks[0].img_mod.lin, model.single_blocks[-1].modulation.lin]
    calls = []
    hooks = [m.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0])) for m in layers]
    x = random_inputs(flow_params)
    steps = [1.0, 0.75, 0.5, 0.25, 0.0]
    vec, g = x["y"], 3.5
    with torch.no_grad():
        out = sampling.denoise(model, x["img"], x["img_ids"], x["txt"], x["txt_ids"], vec, steps, g)
        for h in hooks:
            h.remove()
        img = x["img"]
        for t_curr, t_prev in zip(steps[:-1], steps[1:], strict=True):  # the loop without the table
            pred = model(**dict(x, img=img, timesteps=torch.tensor([t_curr]), guidance=torch.tensor([g])))
            img = img + (t_prev - t_curr) * pred
    assert calls == [4, 4]  # one call per layer for the 4 steps, not 4 calls
    torch.testing.assert_close(out, img, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("h, w, c", [(7, 5, 3), (8, 8, 4), (2, 3, 1), (33, 17, 5)])
def test_banded_upsampling_equals_the_whole_tensor(h, w, c):
    """The autoencoder's upsampling made in bands of rows (any band height) is the convolution of the whole
    upsampled tensor, its zero padding at the image's edges included."""
    from modules.autoencoder import Upsample

    torch.manual_seed(0)
    up = Upsample(c).double()
    x = torch.randn(2, c, h, w, dtype=torch.float64)
    whole = up(x)
    full = 4 * x.numel() * x.element_size()  # the upsampled tensor's bytes
    for rows in range(1, h + 1):
        up.band_bytes = max(1, rows * full // h) if rows < h else full - 1
        torch.testing.assert_close(up(x), whole, rtol=0, atol=1e-12)


@pytest.mark.parametrize("h, w", [(7, 5), (8, 8), (2, 3), (33, 17)])
def test_convolution_in_bands_equals_the_whole(h, w):
    from modules.autoencoder import conv_in_bands

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1).double()
    x = torch.randn(2, 3, h, w, dtype=torch.float64)
    whole = conv(x)
    size = x.numel() * x.element_size()
    for rows in range(1, h + 1):
        band = max(1, rows * size // h) if rows < h else size - 1
        torch.testing.assert_close(conv_in_bands(conv, x, band), whole, rtol=0, atol=1e-12)
    assert conv_in_bands(conv, x, 0) is not None
