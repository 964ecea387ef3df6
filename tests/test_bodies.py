"""Request bodies parsed with short holds of the interpreter lock (serving.bodies, images.b64decode_chunked): the
same documents and images as a plain `json.loads` and `base64.b64decode` give, for every chunking, and the bodies
that would be expensive to parse refused as the 422 of invalid input."""

import base64
import json
import random

import pytest
from fastapi.exceptions import RequestValidationError

import images
from errors import InvalidInput
from serving import bodies

B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def big_body(image: str, prompt: str = "a lighthouse", first: bool = False) -> bytearray:
    fields = [("prompt", prompt), ("init_image", image), ("seed", 3)]
    if first:
        fields.reverse()
    return bytearray(json.dumps(dict(fields)).encode())


@pytest.mark.parametrize("first", [False, True])
@pytest.mark.parametrize("prompt", ["plain", 'he said "hi" \\ and left \\', "\\\\\\", '"', "a\\", "x" * 5000])
def test_a_large_init_image_is_cut_out_of_the_document(prompt, first):
    image = "".join(random.Random(1).choice(B64) for _ in range(bodies.BIG_STRING + 17)) + "=="
    document, literal = bodies.parse_json(big_body(image, prompt, first))
    assert document == {"prompt": prompt, "init_image": "", "seed": 3}
    assert bytes(literal) == image.encode()


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 1 << 20])
def test_escapes_of_wrapped_base64_are_undone_at_any_chunking(chunk, monkeypatch):
    monkeypatch.setattr(bodies, "CHUNK", chunk)
    rng = random.Random(chunk)
    text = "".join(rng.choice(B64 + "\n\r\t/") for _ in range(bodies.BIG_STRING + 500))
    raw = big_body(text)  # json.dumps writes \n, \r, \t as escapes
    _, literal = bodies.parse_json(raw)
    assert bytes(literal) == text.encode()


@pytest.mark.parametrize("chunk", [4, 5, 1024, 256 * 1024])
def test_chunked_base64_matches_the_one_call_decode(chunk, monkeypatch):
    monkeypatch.setattr(images, "B64_CHUNK", chunk)
    rng = random.Random(chunk)
    data = bytes(rng.randrange(256) for _ in range(30_001))
    encoded = base64.encodebytes(data)  # lines of 76 and a newline: whitespace the decoder skips
    assert images.b64decode_chunked(encoded) == data
    assert images.b64decode_chunked(memoryview(encoded.replace(b"\n", b" "))) == data
    for bad in (encoded[:-2], encoded + b"A", encoded.replace(b"A", b"*", 1), b"\\n" + encoded):
        with pytest.raises(InvalidInput, match="base64"):
            images.b64decode_chunked(bad)


BIG = "A" * (bodies.BIG_STRING + 4)
EXPENSIVE = {
    "an array of millions of numbers": b'{"prompt": [' + b"1," * 2_000_000 + b"1]}",
    "deep nesting": b"[" * 50_000 + b"]" * 50_000,
    "deep nesting, small": b'{"prompt": ' + b"[" * 5_000 + b"]" * 5_000 + b"}",
    "millions of strings": b'{"prompt": [' + b'"",' * 1_000_000 + b'""]}',
    "a large prompt": json.dumps({"prompt": BIG}).encode(),
    "two large strings": json.dumps({"prompt": BIG, "init_image": BIG}).encode(),
    "init_image not at the top": json.dumps({"prompt": {"init_image": BIG}}).encode(),
    "init_image as a key": json.dumps({"prompt": "x", BIG: "init_image"}).encode(),
    "large without an image": json.dumps({"prompt": ["x" * 1000] * 2000}).encode(),
    "invalid JSON around an image": b'{"init_image": "' + BIG.encode() + b'", }',
}


@pytest.mark.parametrize("name", EXPENSIVE)
def test_bodies_expensive_to_parse_are_invalid_input(name):
    with pytest.raises(RequestValidationError) as refused:
        bodies.parse_json(bytearray(EXPENSIVE[name]))
    (error,) = refused.value.errors()
    assert error["type"] in ("too_complex", "too_deep", "too_long", "json_invalid", "body_invalid"), error
