import numpy as np
import pytest
import torch
from PIL import Image

from flux_pipeline import FluxPipeline
from modules.emphasis import parse_emphasis


@pytest.mark.parametrize("text,expected", [
    ("plain text", [("plain text", 1.0)]),
    ("a (red:1.5) [cat]", [("a ", 1.0), ("red", 1.5), (" ", 1.0), ("cat", 1 / 1.1)]),
    ("((nested))", [("nested", 1.1 * 1.1)]),
    ("(a (b:2) c:0.5)", [("a ", 0.5), ("b", 1.0), (" c", 0.5)]),
    (r"literal \(paren\)", [("literal (paren)", 1.0)]),
    ("(unclosed", [("unclosed", 1.1)]),
    ("time: 3 pm", [("time: 3 pm", 1.0)]),
])  # fmt: skip
def test_parse(text, expected):
    got = parse_emphasis(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


@pytest.fixture(scope="module")
def emphasis_pipeline(tiny_cfg):
    return FluxPipeline.load_pipeline_from_config(
        dict(tiny_cfg, flow_quantization_dtype="bfloat16", prompt_emphasis=True)
    )


def test_weights_scale_the_t5_tokens(emphasis_pipeline):
    t5 = emphasis_pipeline.t5
    ids, weights, dropped = t5.tokenize_weighted(parse_emphasis("a (red:1.5) fox"))
    plain_ids, _ = t5.tokenize(["a red fox"])
    assert dropped == 0 and torch.equal(ids, plain_ids)  # same tokens as the plain text
    assert weights.max().item() == pytest.approx(1.5) and (weights == 1.0).sum() > 0
    hidden = t5(ids)
    weighted = t5.apply_weights(hidden, weights)
    mean_shift = (weighted.float().mean() - hidden.float().mean()).abs()
    assert mean_shift < 1e-2 * hidden.float().abs().mean()  # the mean is restored (to bf16 rounding)
    changed = (weighted.float() - hidden.float()).abs().sum(-1)[0] > 0
    assert changed.any()


def test_on_by_default_and_off_keeps_brackets_literal(bf16_pipeline):
    def image(prompt, **kw):
        jpeg = bf16_pipeline.generate(prompt, 128, 96, 2, seed=1, silent=True, **kw)
        return np.asarray(Image.open(jpeg).convert("RGB"))

    literal = image("a (red:1.5) fox", prompt_emphasis=False)
    emphasised, neutral = image("a (red:1.5) fox"), image("a (red:1.0) fox")
    plain = image("a red fox")
    assert not np.array_equal(literal, plain)  # parentheses and ':1.5' are prompt text when emphasis is off
    assert not np.array_equal(emphasised, neutral)
    assert np.array_equal(neutral, plain)  # weight 1.0 is the plain prompt
