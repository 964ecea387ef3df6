import hashlib
import subprocess
import sys

import pytest
from loguru import logger
from PIL import Image

from tests.helpers import ROOT, TINY_CONFIG

SMALL = dict(width=128, height=96, num_steps=3)


def test_same_seed_same_bytes_other_seed_differs(bf16_pipeline):
    a = bf16_pipeline.generate("a red fox", seed=5, silent=True, **SMALL).getvalue()
    b = bf16_pipeline.generate("a red fox", seed=5, silent=True, **SMALL).getvalue()
    c = bf16_pipeline.generate("a red fox", seed=6, silent=True, **SMALL).getvalue()
    assert a == b and a != c


def test_prompt_changes_the_image(bf16_pipeline):
    a = bf16_pipeline.generate("a red fox", seed=5, silent=True, **SMALL).getvalue()
    b = bf16_pipeline.generate("a blue owl", seed=5, silent=True, **SMALL).getvalue()
    assert a != b


def test_jpeg_has_requested_size_and_seed_is_returned(bf16_pipeline):
    jpeg, seed = bf16_pipeline.generate("", width=144, height=80, num_steps=2, return_seed=True, silent=True)
    image = Image.open(jpeg)
    assert image.format == "JPEG" and image.size == (144, 80) and image.mode == "RGB"
    assert isinstance(seed, int) and 0 <= seed < 2**53
    again = bf16_pipeline.generate("", width=144, height=80, num_steps=2, seed=seed, silent=True)
    assert again.getvalue() == jpeg.getvalue()


def test_size_floored_to_multiple_of_16(bf16_pipeline, caplog):

    messages = []
    handler = logger.add(messages.append, level="WARNING")
    try:
        jpeg = bf16_pipeline.generate("x", width=150, height=99, num_steps=1, seed=1, silent=True)
    finally:
        logger.remove(handler)
    assert Image.open(jpeg).size == (144, 96)
    assert any("150x99" in m for m in messages)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(width=8),
        dict(height=15),
        dict(num_steps=0),
        dict(seed=float("inf")),
        dict(seed=True),
        dict(guidance=float("nan")),
        dict(num_images=0),
        dict(jpeg_quality=0),
    ],
)
def test_bad_arguments_are_value_errors(bf16_pipeline, kwargs):
    args = dict(SMALL, seed=1, silent=True)
    args.update(kwargs)
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        bf16_pipeline.generate("x", **args)


def test_several_images_differ_and_reproduce(bf16_pipeline):
    first = bf16_pipeline.generate("a cat", num_images=2, seed=3, silent=True, **SMALL)
    again = bf16_pipeline.generate("a cat", num_images=2, seed=3, silent=True, **SMALL)
    assert len(first) == 2 and first[0].getvalue() != first[1].getvalue()
    assert [j.getvalue() for j in first] == [j.getvalue() for j in again]


def test_long_prompt_is_truncated_with_a_warning(bf16_pipeline):

    messages = []
    handler = logger.add(messages.append, level="WARNING")
    try:
        bf16_pipeline.generate("red cat " * 100, seed=1, silent=True, **SMALL)
    finally:
        logger.remove(handler)
    assert any("T5" in m and "dropped" in m for m in messages)


def test_attributes(bf16_pipeline):
    p = bf16_pipeline
    assert p.model is not None and p.ae is not None and p.clip.is_clip and not p.t5.is_clip
    assert p.config.flow_quantization_dtype == "bfloat16"


HASH_SCRIPT = """
import hashlib
from flux_pipeline import FluxPipeline
p = FluxPipeline.load_pipeline_from_config_path({config!r}{extra})
print(hashlib.sha256(p.generate("a lighthouse", width=128, height=96, num_steps=3, seed=11, silent=True)
                     .getvalue()).hexdigest())
"""


def image_hashes_in_subprocesses(count: int, extra: str = "") -> list[str]:
    """The hash printed by `count` fresh processes, run side by side."""
    script = HASH_SCRIPT.format(config=str(TINY_CONFIG), extra=extra)
    cmd = [sys.executable, "-c", script]
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT) for _ in range(count)
    ]
    hashes = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        hashes.append(out.strip().splitlines()[-1])
    return hashes


def test_two_processes_give_the_same_jpeg(fp8_pipeline):
    (there,) = image_hashes_in_subprocesses(1)  # a fresh process against this one
    here = fp8_pipeline.generate("a lighthouse", width=128, height=96, num_steps=3, seed=11, silent=True)
    assert hashlib.sha256(here.getvalue()).hexdigest() == there


@pytest.mark.parametrize("enabled_before", [True, False])
def test_loading_pauses_the_garbage_collector_and_restores_it(tiny_cfg, enabled_before):
    import gc

    from flux_pipeline import FluxPipeline
    from util import spec_from_dict

    spec = spec_from_dict(dict(tiny_cfg, flow_quantization_dtype="bfloat16"))
    passes = []
    loading = FluxPipeline._load.__func__.__code__

    def count(phase, info):  # collections that start while the loading code is running
        frame = sys._getframe()
        while frame is not None and frame.f_code is not loading:
            frame = frame.f_back
        if phase == "start" and frame is not None:
            passes.append(info["generation"])

    gc.enable() if enabled_before else gc.disable()
    gc.callbacks.append(count)
    try:
        pipeline = FluxPipeline.load_pipeline_from_config(spec)
        assert gc.isenabled() is enabled_before
    finally:
        gc.callbacks.remove(count)
        gc.enable()
    # loading allocates hundreds of thousands of objects: with the collector on, it would have run many times
    assert passes == []
    assert Image.open(pipeline.generate("a red fox", seed=5, silent=True, **SMALL)).size == (128, 96)


def test_text_encoders_before_or_after_the_flow_model_give_the_same_image(tiny_cfg, bf16_pipeline, monkeypatch):
    import flux_pipeline
    import util

    cpu = util.spec_from_dict(dict(tiny_cfg))
    assert util.text_encoders_after_flow(cpu)  # nothing shares a GPU: transformers imports while the flow loads
    monkeypatch.setattr(flux_pipeline, "text_encoders_after_flow", lambda config: False)
    before = flux_pipeline.FluxPipeline.load_pipeline_from_config(dict(tiny_cfg, flow_quantization_dtype="bfloat16"))
    image = before.generate("a red fox", seed=5, silent=True, **SMALL).getvalue()
    assert image == bf16_pipeline.generate("a red fox", seed=5, silent=True, **SMALL).getvalue()
