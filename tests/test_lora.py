import pytest
import torch
from safetensors.torch import save_file

import float8_quantize as f8
from flux_pipeline import FluxPipeline, LoraNotLoaded
from lora_loading import convert_lora, read_lora
from tests.helpers import diffusers_flux, diffusers_forward, random_inputs

ALL_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff.net.0.proj",
    "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out", "norm1.linear",
    "norm1_context.linear", "norm.linear", "norm_out.linear", "x_embedder", "context_embedder", "linear_1", "linear_2",
]  # fmt: skip


def make_pipeline(tiny_cfg, base, **overrides) -> FluxPipeline:
    cfg = dict(tiny_cfg, ckpt_path=str(base[0]), flow_dtype="float32", flow_quantization_dtype="bfloat16")
    cfg.update(overrides)
    return FluxPipeline.load_pipeline_from_config(cfg)


def diffusers_lora(flow_params, base, tmp_path, targets, rank=4, alpha=8.0, seed=0, blocks=None):
    """A LoRA made the way users get them: PEFT adapter on diffusers' model, saved by diffusers' saver."""
    from diffusers import FluxPipeline as DiffusersFlux
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    model = diffusers_flux(flow_params, base[1])
    if blocks is not None:  # only these double blocks
        targets = [rf"transformer_blocks\.{b}\.attn\.{t}" for b in blocks for t in targets]
        targets = "|".join(targets)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    model.add_adapter(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    DiffusersFlux.save_lora_weights(
        tmp_path,
        transformer_lora_layers=get_peft_model_state_dict(model),
        transformer_lora_adapter_metadata=config.to_dict(),
    )
    return tmp_path / "pytorch_lora_weights.safetensors", model


def rel(a, b) -> float:
    return ((a - b).double().norm() / b.double().norm()).item()


def test_diffusers_lora_matches_diffusers(tiny_cfg, flow_params, base, tmp_path):
    path, reference = diffusers_lora(flow_params, base, tmp_path, ALL_TARGETS)
    pipe = make_pipeline(tiny_cfg, base)
    inputs = random_inputs(flow_params)
    with torch.no_grad():
        before = pipe.model(**inputs)
        pipe.load_lora(path, scale=1.0, name="style")
        ours = pipe.model(**inputs)
        theirs = diffusers_forward(reference, **inputs)
    assert rel(before, theirs) > 0.05  # the adapter has a large effect ...
    assert rel(ours, theirs) <= 1e-4  # ... and ours reproduces it
    assert pipe.list_loras() == [{"name": "style", "path": str(path), "scale": 1.0}]


def test_partial_loras(tiny_cfg, flow_params, base, tmp_path):
    inputs = random_inputs(flow_params)
    for i, (targets, blocks) in enumerate([(["to_q"], None), (["to_q", "to_v", "add_k_proj"], [0])]):
        path, reference = diffusers_lora(flow_params, base, tmp_path / str(i), targets, blocks=blocks, seed=i)
        pipe = make_pipeline(tiny_cfg, base)
        pipe.load_lora(path)
        with torch.no_grad():
            assert rel(pipe.model(**inputs), diffusers_forward(reference, **inputs)) <= 1e-4


def to_bfl_native(deltas: dict, base_sd: dict) -> dict[str, torch.Tensor]:
    """Merge our converted parts into one (A, B) per BFL module: A stacked, B block-diagonal over row blocks."""
    out = {}
    for name, parts in deltas.items():
        rank = sum(p.down.shape[0] for p in parts)
        rows = base_sd[f"{name}.weight"].shape[0]
        down = torch.cat([p.down for p in parts])
        up = torch.zeros(rows, rank)
        r = 0
        for p in parts:
            lo, hi = p.rows or (0, p.up.shape[0])
            factor = (p.alpha or p.down.shape[0]) / p.down.shape[0]
            up_p = p.up * factor
            if p.swap_halves:
                up_p = torch.cat(up_p.chunk(2)[::-1])
            up[lo:hi, r : r + p.down.shape[0]] = up_p
            r += p.down.shape[0]
        out[f"{name}.lora_A.weight"], out[f"{name}.lora_B.weight"] = down, up
        out[f"{name}.alpha"] = torch.tensor(float(rank))  # alpha = rank: the factors are folded into B
    return out


def weights(pipe) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in pipe.model.state_dict().items()}


def test_every_format_gives_the_same_weights(tiny_cfg, flow_params, base, tmp_path):
    path, _ = diffusers_lora(flow_params, base, tmp_path, ALL_TARGETS)
    sd, metadata = read_lora(path)
    native = to_bfl_native(convert_lora(sd, flow_params["hidden_size"], metadata), base[1])
    pipe = make_pipeline(tiny_cfg, base)
    pipe.load_lora(path)
    expected = weights(pipe)
    pipe.unload_lora(str(path))

    kohya = {}
    for key, t in native.items():
        module, leaf = key.rsplit(".lora_", 1) if ".lora_" in key else (key.removesuffix(".alpha"), "alpha")
        new = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight", "alpha": "alpha"}[leaf]
        kohya[f"lora_unet_{module.replace('.', '_')}.{new}"] = t
    kohya["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(4, 8)  # ignored
    kohya["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.zeros(8, 4)
    comfy = {f"diffusion_model.{k}": v for k, v in native.items()}
    for fmt, sd_fmt in (("native", native), ("kohya", kohya), ("comfy", comfy)):
        file = tmp_path / f"{fmt}.safetensors"
        save_file(sd_fmt, file)
        pipe.load_lora(file)
        got = weights(pipe)
        for k in expected:
            torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6, msg=f"{fmt}: {k}")
        pipe.unload_lora(file.stem)


def test_xlabs_format(tiny_cfg, flow_params, base, tmp_path):
    g = torch.Generator().manual_seed(0)
    h = flow_params["hidden_size"]
    native, xlabs = {}, {}
    for block in range(flow_params["depth"]):
        for kind, n_out in (("qkv", 3 * h), ("proj", h)):
            for idx, stream in (("1", "img"), ("2", "txt")):
                down, up = torch.randn(4, h, generator=g), torch.randn(n_out, 4, generator=g)
                xlabs[f"double_blocks.{block}.processor.{kind}_lora{idx}.down.weight"] = down
                xlabs[f"double_blocks.{block}.processor.{kind}_lora{idx}.up.weight"] = up
                native[f"double_blocks.{block}.{stream}_attn.{kind}.lora_A.weight"] = down
                native[f"double_blocks.{block}.{stream}_attn.{kind}.lora_B.weight"] = up
    save_file(xlabs, tmp_path / "xlabs.safetensors")
    save_file(native, tmp_path / "native.safetensors")
    pipe = make_pipeline(tiny_cfg, base)
    pipe.load_lora(tmp_path / "native.safetensors", scale=0.5)
    expected = weights(pipe)
    pipe.unload_lora("native")
    pipe.load_lora(tmp_path / "xlabs.safetensors", scale=0.5)
    for k, v in weights(pipe).items():
        assert torch.equal(v, expected[k]), k
    assert not torch.equal(
        expected["double_blocks.1.txt_attn.proj.weight"], base[1]["double_blocks.1.txt_attn.proj.weight"]
    )


def test_math_and_bias(tiny_cfg, flow_params, base):
    h = flow_params["hidden_size"]
    g = torch.Generator().manual_seed(1)
    A, B, bias = torch.randn(8, h, generator=g), torch.randn(h, 8, generator=g), torch.randn(h, generator=g)
    sd = {
        "img_in.lora_A.weight": torch.randn(8, 64, generator=g),
        "img_in.lora_B.weight": torch.randn(h, 8, generator=g),
        "double_blocks.0.img_attn.proj.lora_A.weight": A,
        "double_blocks.0.img_attn.proj.lora_B.weight": B,
        "double_blocks.0.img_attn.proj.lora_B.bias": bias,
        "double_blocks.0.img_attn.proj.alpha": torch.tensor(2.0),
    }
    pipe = make_pipeline(tiny_cfg, base)
    pipe.load_lora(sd, scale=0.7, name="m")
    w = pipe.model.double_blocks[0].img_attn.proj
    base_w, base_b = base[1]["double_blocks.0.img_attn.proj.weight"], base[1]["double_blocks.0.img_attn.proj.bias"]
    torch.testing.assert_close(w.weight, base_w + 0.7 * (2.0 / 8) * B @ A)
    torch.testing.assert_close(w.bias, base_b + 0.7 * (2.0 / 8) * bias)


def test_stacking_equals_merged_sum_and_unload_one(tiny_cfg, flow_params, base, tmp_path):
    p1, _ = diffusers_lora(flow_params, base, tmp_path / "a", ["to_q", "proj_mlp", "ff.net.2"], seed=1)
    p2, _ = diffusers_lora(flow_params, base, tmp_path / "b", ["to_q", "to_k", "proj_out"], seed=2)
    pipe = make_pipeline(tiny_cfg, base)
    pipe.load_lora(p1, scale=0.6, name="a")
    only_a = weights(pipe)
    pipe.load_lora(p2, scale=1.3, name="b")
    stacked = weights(pipe)
    pipe.unload_lora("a")
    pipe.unload_lora("b")
    d1, d2 = (convert_lora(read_lora(p)[0], flow_params["hidden_size"], read_lora(p)[1]) for p in (p1, p2))
    merged = {}
    for deltas, scale in ((d1, 0.6), (d2, 1.3)):
        for k, v in to_bfl_native(deltas, base[1]).items():
            if k.endswith("lora_B.weight"):
                v = v * scale
            if k in merged and not k.endswith(".alpha"):
                v = torch.cat([merged[k], v], dim=0 if "lora_A" in k else 1)
            elif k.endswith(".alpha") and k in merged:
                v = merged[k] + v
            merged[k] = v
    pipe.load_lora(merged, name="merged")
    for k, v in weights(pipe).items():
        torch.testing.assert_close(v, stacked[k], rtol=1e-5, atol=1e-6)
    pipe.unload_lora("merged")
    pipe.load_lora(p1, scale=0.6, name="a")
    pipe.load_lora(p2, scale=1.3, name="b")
    pipe.unload_lora("b")
    for k, v in weights(pipe).items():
        torch.testing.assert_close(v, only_a[k], rtol=1e-6, atol=1e-6)
    pipe.load_lora(p1, scale=0.0, name="a")  # same file, new scale: only the scale changes
    assert pipe.list_loras()[0]["scale"] == 0.0
    for k, v in weights(pipe).items():
        torch.testing.assert_close(v, base[1][k])


def test_fp8_unload_restores_bit_identical_outputs(tiny_cfg, flow_params, tmp_path):
    pipe = FluxPipeline.load_pipeline_from_config(tiny_cfg)  # the shipped bf16 checkpoint, fp8 layers
    path = tmp_path / "l.safetensors"
    g = torch.Generator().manual_seed(3)
    h = flow_params["hidden_size"]
    save_file(
        {
            "single_blocks.0.linear1.lora_A.weight": torch.randn(4, h, generator=g),
            "single_blocks.0.linear1.lora_B.weight": torch.randn(7 * h, 4, generator=g),
            "double_blocks.1.img_mlp.0.lora_A.weight": torch.randn(4, h, generator=g),
            "double_blocks.1.img_mlp.0.lora_B.weight": torch.randn(4 * h, 4, generator=g),
        },
        path,
    )
    inputs = random_inputs(flow_params)
    with torch.no_grad():
        before = pipe.model(**inputs)
        state = weights(pipe)
        for _ in range(5):
            pipe.load_lora(path, scale=0.8)
            with_lora = pipe.model(**inputs)
            assert not torch.equal(with_lora, before)
            pipe.unload_lora("l")
        assert torch.equal(pipe.model(**inputs), before)
    assert all(torch.equal(v, state[k]) for k, v in weights(pipe).items())


def test_prepared_backups_serve_every_later_load_exactly(tiny_cfg, flow_params):
    """prepare_loras() settles every linear once (from the checkpoint file here: no host copies); loads after it read
    nothing new and unloads stay exact. Without a file to restore from, the same holds with host copies."""

    loaded = FluxPipeline.load_pipeline_from_config(tiny_cfg)
    bare = FluxPipeline(loaded.config, loaded.model, loaded.ae, loaded.clip, loaded.t5)  # no lora_source
    for pipe in (loaded, bare):
        linears = [n for n, m in pipe.model.named_modules() if isinstance(m, (torch.nn.Linear, f8.F8Linear))]
        pipe.prepare_loras()
        held = pipe.loras.pristine if pipe is bare else pipe.loras.file_backed
        assert sorted(held) == sorted(linears)
        assert (pipe.loras.host_bytes() > 0) == (pipe is bare)
        copies = {n: [t.data_ptr() for t in ts] for n, ts in pipe.loras.pristine.items()}
        g = torch.Generator().manual_seed(4)
        h = flow_params["hidden_size"]
        lora = {
            "double_blocks.0.img_attn.qkv.lora_A.weight": torch.randn(4, h, generator=g),
            "double_blocks.0.img_attn.qkv.lora_B.weight": torch.randn(3 * h, 4, generator=g),
            "final_layer.linear.lora_A.weight": torch.randn(4, h, generator=g),
            "final_layer.linear.lora_B.weight": torch.randn(flow_params["in_channels"], 4, generator=g),
        }
        inputs = random_inputs(flow_params)
        with torch.no_grad():
            before = pipe.model(**inputs)
            pipe.load_lora(lora, scale=1.0, name="x")
            assert not torch.equal(pipe.model(**inputs), before)
            pipe.unload_lora("x")
            assert torch.equal(pipe.model(**inputs), before)
        assert {n: [t.data_ptr() for t in ts] for n, ts in pipe.loras.pristine.items()} == copies  # none taken again
        pipe.prepare_loras()  # idempotent
        assert len(pipe.loras.pristine) + len(pipe.loras.file_backed) == len(linears)


def test_errors(tiny_cfg, base, tmp_path):
    pipe = make_pipeline(tiny_cfg, base)
    with pytest.raises(LoraNotLoaded):
        pipe.unload_lora("nothing")
    save_file({"some.random.key": torch.zeros(2)}, tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match="no usable LoRA keys.*some.random.key"):
        pipe.load_lora(tmp_path / "junk.safetensors")
    (tmp_path / "x.ckpt").write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match=".safetensors"):
        pipe.load_lora(tmp_path / "x.ckpt")
    bad = {"img_in.lora_A.weight": torch.zeros(4, 3), "img_in.lora_B.weight": torch.zeros(64, 4)}
    with pytest.raises(ValueError, match="img_in"):
        pipe.load_lora(bad)
    with pytest.raises(ValueError, match="scale"):
        pipe.load_lora(tmp_path / "junk.safetensors", scale=float("inf"))
    assert pipe.list_loras() == []
