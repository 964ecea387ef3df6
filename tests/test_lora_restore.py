"""LoRA unloads restore the flow model's pristine weights from its checkpoint file, read back as loading read it,
with no host copies: for a bf16 file quantized at load, a prequantized fp8 file, an unquantized model and a ComfyUI
file with its key prefix; a layer the file does not give back exactly keeps a host copy; a checkpoint replaced on
disk stops LoRA changes cleanly; and the reader returns the file's tensors across chunk boundaries."""

import shutil

import pytest
import torch
from loguru import logger
from safetensors.torch import load_file, save_file

import checkpoint_source
import float8_quantize as f8
from errors import LoraError
from flux_pipeline import FluxPipeline
from tests.helpers import random_inputs
from util import write_prequantized


def linear_names(pipe) -> list[str]:
    return sorted(n for n, m in pipe.model.named_modules() if isinstance(m, (torch.nn.Linear, f8.F8Linear)))


def whole_model_lora(pipe, seed: int, rank: int = 4) -> dict[str, torch.Tensor]:
    """A LoRA on every linear layer of the model."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, m in pipe.model.named_modules():
        if isinstance(m, (torch.nn.Linear, f8.F8Linear)):
            sd[f"{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g) * 0.2
            sd[f"{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.2
    return sd


def state(pipe) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in pipe.model.state_dict().items()}


def assert_bits_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)), k


def checkpoint(kind: str, tiny_cfg, tmp_path) -> dict:
    """A config for the tiny model loaded from a checkpoint of `kind`."""
    cfg = dict(tiny_cfg)
    if kind == "prequantized fp8":
        path = tmp_path / "flux-fp8.safetensors"
        config = tmp_path / "config.json"
        import json

        config.write_text(json.dumps(tiny_cfg))
        write_prequantized(str(config), str(path), "cpu")
        cfg.update(ckpt_path=str(path), prequantized_flow=True)
    elif kind == "unquantized float32":
        cfg.update(flow_quantization_dtype="bfloat16", flow_dtype="float32")
    elif kind == "ComfyUI prefix":
        sd = load_file(tiny_cfg["ckpt_path"])
        path = tmp_path / "comfy.safetensors"
        save_file({f"model.diffusion_model.{k}": v for k, v in sd.items()}, path)
        cfg.update(ckpt_path=str(path))
    return cfg


KINDS = ["bf16 quantized at load", "prequantized fp8", "unquantized float32", "ComfyUI prefix"]


@pytest.mark.parametrize("kind", KINDS)
def test_unloads_restore_from_the_checkpoint_without_host_copies(tiny_cfg, flow_params, tmp_path, kind):
    pipe = FluxPipeline.load_pipeline_from_config(checkpoint(kind, tiny_cfg, tmp_path))
    before, inputs = state(pipe), random_inputs(flow_params)
    with torch.no_grad():
        out_before = pipe.model(**inputs)
    pipe.load_lora(whole_model_lora(pipe, 1), 0.9, name="a")
    assert sorted(pipe.loras.file_backed) == linear_names(pipe)
    assert pipe.loras.pristine == {} and pipe.loras.host_bytes() == 0
    pipe.load_lora(whole_model_lora(pipe, 2), 0.7, name="b")  # stacked: every layer re-read from the file
    with torch.no_grad():
        stacked = pipe.model(**inputs)
    pipe.unload_lora("a")
    with torch.no_grad():
        only_b = pipe.model(**inputs)
    assert not torch.equal(only_b, stacked) and not torch.equal(only_b, out_before)
    pipe.load_lora(whole_model_lora(pipe, 1), 0.9, name="a")
    pipe.unload_lora("a")
    with torch.no_grad():
        assert torch.equal(pipe.model(**inputs), only_b)  # b alone again, from the file, exactly
    pipe.unload_lora("b")
    assert_bits_equal(state(pipe), before)
    with torch.no_grad():
        assert torch.equal(pipe.model(**inputs), out_before)
    assert pipe.loras.pristine == {}


def test_a_layer_the_file_does_not_match_keeps_a_host_copy(tiny_cfg, flow_params):
    pipe = FluxPipeline.load_pipeline_from_config(tiny_cfg)
    layer = pipe.model.double_blocks[0].img_attn.proj
    with torch.no_grad():
        layer.bias.add_(0.5)  # no longer what the file holds
    before = state(pipe)
    messages = []
    handler = logger.add(lambda m: messages.append(str(m)), level="WARNING")
    try:
        pipe.load_lora(whole_model_lora(pipe, 3), 1.0, name="a")
    finally:
        logger.remove(handler)
    assert list(pipe.loras.pristine) == ["double_blocks.0.img_attn.proj"]
    assert any("1 layers differ" in m for m in messages)
    pipe.unload_lora("a")
    assert_bits_equal(state(pipe), before)  # the altered layer came back as it was, from its copy


def test_a_replaced_checkpoint_stops_lora_changes_cleanly(tiny_cfg, flow_params, tmp_path):
    path = tmp_path / "flux.safetensors"
    shutil.copy(tiny_cfg["ckpt_path"], path)
    pipe = FluxPipeline.load_pipeline_from_config(dict(tiny_cfg, ckpt_path=str(path)))
    pipe.load_lora(whole_model_lora(pipe, 4), 1.0, name="a")
    with_lora = state(pipe)
    sd = load_file(path)
    save_file({k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}, path)  # another model now
    with pytest.raises(LoraError, match="changed on disk"):
        pipe.unload_lora("a")
    assert [lora["name"] for lora in pipe.list_loras()] == ["a"]  # nothing half-done
    assert_bits_equal(state(pipe), with_lora)


def test_reader_gives_the_files_tensors_across_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_source, "CHUNK", 1000)  # many chunks per tensor, and the ring reused
    monkeypatch.setattr(checkpoint_source, "BUFFERS", 3)
    g = torch.Generator().manual_seed(0)
    sd = {
        "a.weight": torch.randn(37, 129, generator=g).to(torch.bfloat16),
        "a.bias": torch.randn(37, generator=g),
        "b.weight": (torch.randn(64, 48, generator=g) * 10).to(torch.float8_e4m3fn),
        "b.weight_scale": torch.rand(1, 64, generator=g),
        "c.weight": torch.randn(3, 5, generator=g, dtype=torch.float64),
    }
    path = tmp_path / "x.safetensors"
    save_file({f"diffusion_model.{k}": v for k, v in sd.items()}, path)
    source = checkpoint_source.CheckpointSource(path, lambda k, t: {k: t}, torch.device("cpu"))
    got = dict(source.read(["b", "a", "c"]))
    assert list(got) == ["b", "a", "c"]
    for key, tensor in sd.items():
        name, _, leaf = key.rpartition(".")
        assert got[name][leaf].dtype == tensor.dtype and got[name][leaf].shape == tensor.shape
        assert torch.equal(got[name][leaf].view(torch.uint8), tensor.view(torch.uint8))
    assert not source.changed()
    path.write_bytes(path.read_bytes() + b" ")
    assert source.changed()


def test_set_loras_changes_the_whole_set_in_one_pass(tiny_cfg, flow_params, tmp_path):
    pipe = FluxPipeline.load_pipeline_from_config(tiny_cfg)
    before = state(pipe)
    paths = {}
    for seed, name in ((1, "a"), (2, "b")):
        paths[name] = str(tmp_path / f"{name}.safetensors")
        save_file(whole_model_lora(pipe, seed), paths[name])
    assert pipe.set_loras({"a": (paths["a"], 0.8)}) == 1
    with_a = state(pipe)
    assert pipe.set_loras({"a": (paths["a"], 0.8)}) == 0  # nothing to do
    assert pipe.set_loras({"b": (paths["b"], 1.0)}) == 2  # a swap: one unload, one load
    with_b = state(pipe)
    pipe.set_loras({})
    assert_bits_equal(state(pipe), before)
    pipe.load_lora(paths["b"], 1.0, name="b")  # the same set made the other way: the same weights
    assert_bits_equal(state(pipe), with_b)
    bad = tmp_path / "bad.safetensors"
    save_file({"double_blocks.0.img_attn.proj.lora_A.weight": torch.ones(4, 3)}, bad)  # no matching B
    with pytest.raises(LoraError):
        pipe.set_loras({"a": (paths["a"], 0.8), "bad": (str(bad), 1.0)})
    assert [lora["name"] for lora in pipe.list_loras()] == ["b"]  # all or nothing
    assert_bits_equal(state(pipe), with_b)
    pipe.set_loras({"a": (paths["a"], 0.8)})
    assert_bits_equal(state(pipe), with_a)
