"""CUDA checks of the cheaper-image features (run on the GPU machine with `python -m pytest -q -m gpu`): batches
after a batch warm-up compile nothing and give each request its own image; LoRA unloads restore bit for bit from
GPU copies, the checkpoint file, or both; a compile-cache artifact spares a fresh process every compile."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

import compile_cache
import float8_quantize as f8
import lora_fusing
from batching import ImageRequest
from flux_pipeline import FluxPipeline
from tests.helpers import ROOT, random_inputs

pytestmark = pytest.mark.gpu


@pytest.fixture
def cuda_cfg(tiny_cfg) -> dict:
    return dict(tiny_cfg, flux_device="cuda:0", ae_device="cuda:0", text_enc_device="cuda:0")


def test_batches_after_the_batch_warm_up_compile_nothing(cuda_cfg):
    cfg = dict(cuda_cfg, compile_blocks=True, compile_extras=True)
    pipe = FluxPipeline.load_pipeline_from_config(cfg, warm_up_batch=4)
    frames = counters["stats"]["unique_graphs"]
    requests = [ImageRequest("a fox", 3.5, 1), ImageRequest("a bird", 5.0, 2, num_images=2)]
    outcomes = pipe.generate_batch(requests, 1024, 720, 4)
    two = pipe.generate_batch([ImageRequest("a cat", 2.0, 3), ImageRequest("a fox", 3.5, 1)], 768, 768, 4)
    assert counters["stats"]["unique_graphs"] == frames  # batches of 3 and 2, new sizes: no compile
    alone, _ = pipe.generate_images("a bird", 1024, 720, 4, 5.0, 2, num_images=2)
    for image, single in zip(outcomes[1][0], alone, strict=True):
        diff = np.abs(np.asarray(image, dtype=np.int16) - np.asarray(single, dtype=np.int16))
        assert diff.mean() < 1.0 and diff.max() <= 24  # fp8 matmuls of another height round differently
    assert len(two) == 2


@pytest.mark.parametrize("where", ["file", "gpu", "both"])
def test_lora_unload_restores_exactly_from_gpu_copies_or_the_file(cuda_cfg, flow_params, where):
    # bf16 file, quantized on the GPU at load; the GPU copies: none, as many as fit (all: tiny), or half the bytes
    vram = {"file": 0, "gpu": None, "both": None}[where]
    pipe = FluxPipeline.load_pipeline_from_config(dict(cuda_cfg, lora_vram_gib=vram))
    linears = sorted(n for n, m in pipe.model.named_modules() if isinstance(m, (torch.nn.Linear, f8.F8Linear)))
    layer_bytes = {n: sum(t.numel() * t.element_size() for t in lora_fusing._state(pipe.model.get_submodule(n)))
                   for n in linears}  # fmt: skip
    if where == "both":
        pipe.loras.device_gib = sum(layer_bytes.values()) / 2 / 2**30
    assert pipe.loras.back_up() == len(linears)  # what prepare_loras does, counted
    copied = sorted(pipe.loras.pristine)
    assert pipe.loras.host_bytes() == 0 and sorted(copied + sorted(pipe.loras.file_backed)) == linears
    assert pipe.loras.device_bytes() == sum(layer_bytes[n] for n in copied)
    if where == "file":
        assert not copied
    elif where == "gpu":
        assert copied == linears and all(t.is_cuda for ts in pipe.loras.pristine.values() for t in ts)
    else:
        assert 0 < len(copied) < len(linears) and pipe.loras.device_bytes() <= sum(layer_bytes.values()) / 2
    before = {k: v.clone() for k, v in pipe.model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    lora = {}
    for name in linears:
        m = pipe.model.get_submodule(name)
        lora[f"{name}.lora_A.weight"] = torch.randn(4, m.in_features, generator=g) * 0.2
        lora[f"{name}.lora_B.weight"] = torch.randn(m.out_features, 4, generator=g) * 0.2
    inputs = {k: v.cuda() for k, v in random_inputs(flow_params).items()}
    for k in ("img", "txt", "y"):
        inputs[k] = inputs[k].to(torch.bfloat16)
    with torch.no_grad():
        out = pipe.model(**inputs)
        pipe.load_lora(lora, 1.0, name="a")
        pipe.load_lora(lora, 0.5, name="b")
        assert not torch.equal(pipe.model(**inputs), out)
        pipe.unload_lora("a")
        pipe.unload_lora("b")
        assert torch.equal(pipe.model(**inputs), out)
    for k, v in pipe.model.state_dict().items():
        assert torch.equal(v.reshape(-1).view(torch.uint8), before[k].reshape(-1).view(torch.uint8)), k


LOAD = """
import json, sys
from torch._dynamo.utils import counters
from flux_pipeline import FluxPipeline
cfg = json.loads(sys.argv[1])
FluxPipeline.load_pipeline_from_config(cfg, warm_up_sizes=((256, 256), (192, 192)), warm_up_batch=2)
print("COUNTERS", dict(counters["inductor"]))
"""


PYTHONPATH = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])  # the GPU machine's wheels too


def test_compile_cache_spares_a_fresh_process_the_compile(cuda_cfg, tmp_path):
    artifact = tmp_path / "flux.compile-cache"
    cfg = dict(cuda_cfg, compile_blocks=True, compile_extras=True, compile_cache=str(artifact))
    # in a subprocess too: this process may have compiled these graphs in another test
    env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "first" / "inductor"),
           "TRITON_CACHE_DIR": str(tmp_path / "first" / "triton"), "PYTHONPATH": PYTHONPATH}  # fmt: skip
    write = LOAD + "import compile_cache; compile_cache.save(sys.argv[2])\n"
    out = subprocess.run([sys.executable, "-c", write, json.dumps(cfg), str(artifact)], capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert compile_cache.TORCH_ENTRY in compile_cache.read_entries(artifact)
    env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "fresh" / "inductor"),
           "TRITON_CACHE_DIR": str(tmp_path / "fresh" / "triton"), "PYTHONPATH": PYTHONPATH}  # fmt: skip
    out = subprocess.run([sys.executable, "-c", LOAD, json.dumps(cfg)], capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    stats = eval(next(line for line in out.stdout.splitlines() if line.startswith("COUNTERS")).split(" ", 1)[1])
    assert stats.get("fxgraph_cache_hit", 0) > 0 and not stats.get("fxgraph_cache_miss"), stats
    assert "loaded the compile cache" in out.stderr
