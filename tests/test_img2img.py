import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from images import cover_crop, load_image

SMALL = dict(width=128, height=96, num_steps=4, silent=True)


def gradient(width: int, height: int, mode: str = "RGB") -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.uint8)[None, :].repeat(height, 0)
    y = np.linspace(255, 0, height, dtype=np.uint8)[:, None].repeat(width, 1)
    rgb = np.stack([x, y, (x // 2 + y // 2)], axis=-1)
    return Image.fromarray(rgb).convert(mode)


def pixels(jpeg) -> np.ndarray:
    return np.asarray(Image.open(jpeg).convert("RGB"), dtype=np.float32)


def test_strength_one_is_txt2img(bf16_pipeline):
    a = bf16_pipeline.generate("a boat", seed=4, **SMALL)
    b = bf16_pipeline.generate("a boat", seed=4, init_image=gradient(200, 80), strength=1.0, **SMALL)
    assert np.array_equal(pixels(a), pixels(b))  # the files differ: their parameters name the strength


def test_strength_zero_is_the_reconstruction(bf16_pipeline):
    init = gradient(128, 96)
    out = bf16_pipeline.generate("a boat", seed=4, init_image=init, strength=0.0, **SMALL)
    with torch.no_grad():
        latent = bf16_pipeline.encode_image(init, 128, 96)
        expected = bf16_pipeline.decode(__import__("modules.sampling", fromlist=["pack"]).pack(latent), 96, 128)[0]
    assert np.abs(pixels(out) - np.asarray(expected, dtype=np.float32)).mean() < 2.0  # JPEG rounding only


def test_partial_strength_is_between(bf16_pipeline):
    init = gradient(128, 96)
    zero = pixels(bf16_pipeline.generate("a boat", seed=4, init_image=init, strength=0.0, **SMALL))
    half = pixels(bf16_pipeline.generate("a boat", seed=4, init_image=init, strength=0.25, **SMALL))
    full = pixels(bf16_pipeline.generate("a boat", seed=4, init_image=init, strength=1.0, **SMALL))
    assert 0 < np.abs(half - zero).mean() < np.abs(full - zero).mean()


def test_cover_crop_has_no_border():
    image = Image.new("RGB", (300, 60), (200, 30, 30))  # much wider than the target
    out = cover_crop(image, 128, 96)
    assert out.size == (128, 96)
    array = np.asarray(out)
    assert (np.abs(array.astype(int) - [200, 30, 30]) <= 2).all()  # no padded (black) rows or columns
    tall = cover_crop(gradient(40, 400), 128, 96)
    assert tall.size == (128, 96)


def test_crop_is_centred():
    image = Image.new("RGB", (400, 96), (0, 0, 0))
    image.paste((255, 255, 255), (100, 0, 300, 96))  # white middle half
    out = np.asarray(cover_crop(image, 128, 96))
    assert out[:, 5:-5].min() > 200  # the centre survives


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "CMYK", "I;16"])
def test_any_mode_works(bf16_pipeline, mode):
    init = gradient(64, 64, "RGB").convert(mode)
    jpeg = bf16_pipeline.generate("x", seed=1, init_image=init, strength=0.6, **SMALL)
    assert Image.open(jpeg).size == (128, 96)


def test_input_kinds_agree(bf16_pipeline, tmp_path):
    init = gradient(80, 60)
    buffer = io.BytesIO()
    init.save(buffer, format="PNG")
    b64 = base64.b64encode(buffer.getvalue()).decode()
    path = tmp_path / "init.png"
    path.write_bytes(buffer.getvalue())
    array = np.asarray(init)
    kinds = [
        init,
        array,
        torch.from_numpy(array.copy()),
        torch.from_numpy(array.copy()).permute(2, 0, 1),
        b64,
        f"data:image/png;base64,{b64}",
        str(path),
    ]
    outputs = {bf16_pipeline.generate("x", seed=2, init_image=k, strength=0.7, **SMALL).getvalue() for k in kinds}
    assert len(outputs) == 1


def test_paths_only_when_allowed(tmp_path):
    path = tmp_path / "init.png"
    gradient(10, 10).save(path)
    assert load_image(str(path)).size == (10, 10)
    with pytest.raises(ValueError, match="base64"):
        load_image(str(path), allow_path=False)


@pytest.mark.parametrize(
    "bad,match",
    [
        ("not base64!!", "base64"),
        (base64.b64encode(b"hello").decode(), "decoded"),
        (np.zeros((4, 4), dtype=np.float32), "uint8"),
        (42, "not supported"),
    ],
)
def test_bad_images_are_value_errors(bf16_pipeline, bad, match):
    with pytest.raises(ValueError, match=match):
        bf16_pipeline.generate("x", seed=1, init_image=bad, **SMALL)


@pytest.mark.parametrize("strength", [-0.1, 1.5, float("nan")])
def test_strength_out_of_range(bf16_pipeline, strength):
    with pytest.raises(ValueError, match="strength"):
        bf16_pipeline.generate("x", seed=1, init_image=gradient(8, 8), strength=strength, **SMALL)
