"""Two-GPU checks (run on the two-GPU device kind; skipped with fewer GPUs)."""

import numpy as np
import pytest
import torch

from flux_pipeline import FluxPipeline

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs"),
]

PLACEMENTS = [
    ("cuda:0", "cuda:1", "cuda:1"),
    ("cuda:1", "cuda:0", "cuda:0"),
    ("cuda:0", "cuda:1", "cuda:0"),
    ("cuda:1", "cuda:1", "cuda:1"),
]


def _pixels(cfg: dict, flux: str, enc: str, ae: str, **kw) -> np.ndarray:

    pipe = FluxPipeline.load_pipeline_from_config(dict(cfg, flux_device=flux, text_enc_device=enc, ae_device=ae, **kw))
    assert pipe.model.img_in.weight.device == torch.device(flux)
    if not kw:  # offloaded components wait on the CPU
        assert pipe.ae.decoder.conv_in.weight.device == torch.device(ae)
        assert pipe.t5.device == torch.device(enc) and pipe.clip.device == torch.device(enc)
    images, _ = pipe.generate_images("a red fox in snow", 256, 256, 4, seed=11)
    return np.asarray(images[0]).astype(int)


@pytest.mark.parametrize("placement", PLACEMENTS, ids=lambda p: "-".join(p))
def test_split_placement_gives_the_single_gpu_image(tiny_cfg, placement):
    single = _pixels(tiny_cfg, "cuda:0", "cuda:0", "cuda:0")
    assert np.array_equal(_pixels(tiny_cfg, *placement), single)


def test_split_placement_with_offload(tiny_cfg):
    single = _pixels(tiny_cfg, "cuda:0", "cuda:0", "cuda:0")
    offloaded = _pixels(tiny_cfg, "cuda:1", "cuda:0", "cuda:1", offload_text_encoder=True, offload_vae=True)
    assert np.abs(offloaded - single).max() <= 1
