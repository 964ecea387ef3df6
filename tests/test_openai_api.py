"""The OpenAI Images API under /v1, driven by the official `openai` client against a real server with an API key:
generations, edits, n=2, a bad size, a wrong key, a full queue, the models list."""

import base64
import io
import threading
import time

import numpy as np
import openai
import pytest
from PIL import Image

import images
from tests.helpers import SLOW, running_server

KEY = "sk-local"


@pytest.fixture(scope="module")
def server():
    with running_server("--api-key", KEY, "--max-queue-size", "1") as s:
        yield s


def client(server, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=120)


def decoded(item) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(item.b64_json)))


def test_a_generation(server):
    extra = {"seed": 5, "num_steps": 3}
    result = client(server).images.generate(prompt="a lighthouse", size="128x160", extra_body=extra)
    (item,) = result.data
    image = decoded(item)
    assert image.size == (128, 160) and image.format == "PNG" and item.revised_prompt == "a lighthouse"
    assert "Seed: 5" in images.read_parameters(base64.b64decode(item.b64_json))
    # the same request on /generate: the same image
    body = {"prompt": "a lighthouse", "width": 128, "height": 160, "seed": 5, "num_steps": 3, "output_format": "png"}
    same = server.post("/generate", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(io.BytesIO(same.content))))


def test_n_2_quality_and_formats(server):
    result = client(server).images.generate(
        prompt="a kite", n=2, size="128x128", quality="low", output_format="jpeg", extra_body={"seed": 9}
    )
    assert len(result.data) == 2
    first, second = (decoded(item) for item in result.data)
    assert first.format == "JPEG" and not np.array_equal(np.asarray(first), np.asarray(second))
    text = images.read_parameters(base64.b64decode(result.data[0].b64_json))
    assert "Steps: 12" in text  # quality "low" on flux-dev
    urls = client(server).images.generate(
        prompt="x", size="128x128", response_format="url", extra_body={"num_steps": 1}
    )
    assert urls.data[0].url.startswith("data:image/png;base64,")


def test_an_edit(server):
    source = Image.new("RGB", (200, 150), (200, 30, 30))
    buffer = io.BytesIO()
    source.save(buffer, format="PNG")
    buffer.seek(0)
    extra = {"seed": 3, "num_steps": 4}
    edited = client(server).images.edit(
        image=("red.png", buffer, "image/png"),
        prompt="make it blue",
        size="128x128",
        extra_body=extra | {"strength": 0.5},
    )
    plain = client(server).images.generate(prompt="make it blue", size="128x128", extra_body=extra)
    assert decoded(edited.data[0]).size == (128, 128)
    assert not np.array_equal(np.asarray(decoded(edited.data[0])), np.asarray(decoded(plain.data[0])))


def test_errors_as_the_client_expects(server):
    with pytest.raises(openai.BadRequestError) as bad:
        client(server).images.generate(prompt="x", size="1000x7")
    assert bad.value.body["param"] == "size" and "size" in bad.value.body["message"]
    with pytest.raises(openai.AuthenticationError):
        client(server, key="wrong").images.generate(prompt="x", size="128x128")
    models = client(server).models.list()
    assert [m.id for m in models.data] == ["flux-dev"]
    # a full queue: one running, one waiting, the next refused
    slow = dict(prompt="slow", size="512x512", extra_body={"num_steps": SLOW["num_steps"], "seed": 1})
    threads = [threading.Thread(target=lambda: client(server).images.generate(**slow)) for _ in range(2)]
    for t in threads:
        t.start()
        time.sleep(1.0)
    try:
        with pytest.raises(openai.RateLimitError):
            client(server).images.generate(prompt="x", size="128x128", extra_body={"num_steps": 1})
    finally:
        for t in threads:
            t.join(120)
