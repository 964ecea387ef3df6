import base64
import io
import os
import random
import re
import shutil
import socket
import struct
import subprocess
import time
import zlib
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from tests.helpers import ROOT, SMALL, running_server


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, tiny_cfg):
    root = tmp_path_factory.mktemp("loras")
    (root / "loras").mkdir()
    h = tiny_cfg["params"]["hidden_size"]
    g = torch.Generator().manual_seed(0)
    lora = {
        "double_blocks.0.img_attn.proj.lora_A.weight": torch.randn(4, h, generator=g),
        "double_blocks.0.img_attn.proj.lora_B.weight": torch.randn(h, 4, generator=g),
        "single_blocks.1.linear2.lora_A.weight": torch.randn(4, 5 * h, generator=g),
        "single_blocks.1.linear2.lora_B.weight": torch.randn(h, 4, generator=g),
    }
    save_file(lora, root / "loras" / "good.safetensors")
    save_file(lora, root / "outside.safetensors")
    (root / "loras" / "escape.safetensors").symlink_to(root / "outside.safetensors")
    (root / "loras" / "notes.txt").write_text("not a lora")
    (root / "loras" / "loop.safetensors").symlink_to(root / "loras" / "loop.safetensors")
    (root / "loras" / "broken.safetensors").write_text("not tensors")
    nan = dict(lora, **{"single_blocks.1.linear2.lora_A.weight": torch.full((4, 5 * h), float("nan"))})
    save_file(nan, root / "loras" / "nan.safetensors")
    return root / "loras"


@pytest.fixture(scope="module")
def server(lora_dir):
    with running_server("--lora-dir", str(lora_dir)) as s:
        yield s


def test_generate_returns_the_asked_image_and_seed(server):
    r = server.post("/generate", json=SMALL, headers={"X-Request-Id": "abc-123"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert r.headers["x-seed"] == "7" and r.headers["x-request-id"] == "abc-123"
    assert float(r.headers["x-inference-time"]) > 0
    image = Image.open(io.BytesIO(r.content))
    assert image.format == "JPEG" and image.size == (128, 128)
    again = server.post("/generate", json=SMALL)
    assert again.content == r.content
    other = server.post("/generate", json=dict(SMALL, seed=8))
    assert other.content != r.content


def test_random_seed_is_echoed_and_reproducible(server):
    r = server.post("/generate", json={k: v for k, v in SMALL.items() if k != "seed"})
    seed = int(r.headers["x-seed"])
    assert server.post("/generate", json=dict(SMALL, seed=seed)).content == r.content


@pytest.mark.parametrize("fmt,content_type", [("png", "image/png"), ("webp", "image/webp")])
def test_output_formats(server, fmt, content_type):
    r = server.post("/generate", json=dict(SMALL, output_format=fmt))
    assert r.headers["content-type"] == content_type
    assert Image.open(io.BytesIO(r.content)).format == fmt.upper()


def test_several_images_as_json(server):
    r = server.post("/generate", json=dict(SMALL, num_images=2))
    body = r.json()
    assert body["seed"] == 7 and len(body["images"]) == 2
    images = [base64.b64decode(i) for i in body["images"]]
    assert images[0] != images[1] and all(Image.open(io.BytesIO(i)).size == (128, 128) for i in images)


def test_img2img_over_http(server):
    buffer = io.BytesIO()
    Image.new("RGB", (300, 200), (10, 200, 30)).save(buffer, format="PNG")
    b64 = base64.b64encode(buffer.getvalue()).decode()
    a = server.post("/generate", json=dict(SMALL, init_image=b64, strength=0.5))
    b = server.post("/generate", json=dict(SMALL, init_image=f"data:image/png;base64,{b64}", strength=0.5))
    assert a.status_code == 200 and a.content == b.content and a.content != server.post("/generate", json=SMALL).content
    wrapped = "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76))  # as `base64` tools print it
    assert server.post("/generate", json=dict(SMALL, init_image=wrapped, strength=0.5)).content == a.content


def test_a_large_init_image_over_http(server):
    # a noise PNG of ~300 KB: its base64 is cut out of the JSON and decoded in chunks (serving.bodies)
    noise = Image.frombytes("RGB", (320, 320), random.Random(0).randbytes(320 * 320 * 3))
    buffer = io.BytesIO()
    noise.save(buffer, format="PNG")
    b64 = base64.b64encode(buffer.getvalue()).decode()
    assert len(b64) > 4 * 2**16
    request = dict(SMALL, prompt='a "quoted" \\ prompt', init_image=b64, strength=0.5)
    a = server.post("/generate", json=request)
    assert (
        a.status_code == 200
        and a.content != server.post("/generate", json=dict(SMALL, prompt=request["prompt"])).content
    )
    variants = [
        dict(request, init_image=f"data:image/png;base64,{b64}"),
        dict(request, init_image="\n".join(b64[i : i + 76] for i in range(0, len(b64), 76))),  # JSON escapes \n
        dict(reversed(list(request.items()))),  # the image first
    ]
    for variant in variants:
        assert server.post("/generate", json=variant).content == a.content
    half_dark = noise.copy()
    half_dark.paste((0, 0, 0), (0, 0, 160, 320))
    buffer = io.BytesIO()
    half_dark.save(buffer, format="PNG")
    other = server.post("/generate", json=dict(request, init_image=base64.b64encode(buffer.getvalue()).decode()))
    assert other.status_code == 200 and other.content != a.content


@pytest.mark.parametrize(
    "raw",
    [
        b'{"prompt": [' + b"1," * 2_000_000 + b"1]}",
        b"[" * 100_000 + b"]" * 100_000,
        b'{"prompt": "x", "init_image": {"nested": "' + b"A" * 100_000 + b'"}}',
        b'{"prompt": "' + b"A" * 100_000 + b'"}',
    ],
    ids=["numbers", "nesting", "nested image", "long prompt"],
)
def test_bodies_expensive_to_parse_are_422(server, raw):
    start = time.monotonic()
    r = server.post("/generate", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and len(r.content) < 4096, r.text[:200]
    assert time.monotonic() - start < 5


BAD = [
    ("width", {"width": 120}),
    ("width", {"width": 2064}),
    ("width", {"width": 1000}),
    ("height", {"height": 100}),
    ("height", {"height": "tall"}),
    ("num_steps", {"num_steps": 0}),
    ("num_steps", {"num_steps": 101}),
    ("guidance", {"guidance": -1}),
    ("guidance", {"guidance": 20.5}),
    ("seed", {"seed": -1}),
    ("seed", {"seed": 2**53}),
    ("strength", {"strength": 1.01}),
    ("num_images", {"num_images": 5}),
    ("prompt", {"prompt": "x" * 10_001}),
    ("init_image", {"init_image": "%%% not base64"}),
    ("init_image", {"init_image": base64.b64encode(b"definitely not an image").decode()}),
    ("output_format", {"output_format": "gif"}),
    ("jpeg_quality", {"jpeg_quality": 0}),
    ("colour", {"colour": 1}),
    ("num_steps", {"num_steps": True}),  # no bool-as-int: `true` is not one step
    ("seed", {"seed": "7"}),
    ("width", {"width": 256.0}),
    ("init_image", {"init_image": None}),  # replaced below: an image 16x1048576 (23 KB of base64)
    ("init_image", {"init_image": None}),  # replaced below: a PNG declaring 8192x8192
    ("init_image", {"init_image": None}),  # replaced below: a format outside the common raster ones (ICO)
]


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height (its pixels are never read: the size check comes first)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))


def _strip() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (16, 1_048_576)).save(buffer, format="PNG")
    return buffer.getvalue()


def _ico() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buffer, format="ICO")
    return buffer.getvalue()


for _i, _raw in zip(range(-3, 0), (_strip(), _png_header(8192, 8192), _ico()), strict=True):
    BAD[_i] = ("init_image", {"init_image": base64.b64encode(_raw).decode()})


@pytest.mark.parametrize("field,change", BAD, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD)])
def test_limits_give_422_naming_the_field_and_never_run(server, field, change):
    before = server.health()["completed"]
    r = server.post("/generate", json=dict(SMALL, **change))
    assert r.status_code == 422
    assert field in r.json()["error"]["message"] and r.json()["error"]["type"] == "invalid_request"
    assert server.health()["completed"] == before


@pytest.mark.parametrize(
    "raw",
    [
        '{"prompt": "a", "guidance": NaN}',
        '{"prompt": "a", "guidance": Infinity}',
        '{"prompt": "a", "strength": -Infinity}',
        "not json",
        '["list"]',
        '{"width": 256}',
    ],
)
def test_malformed_json_is_422(server, raw):
    r = server.post("/generate", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "error" in r.json()
    assert "Traceback" not in r.text and "/" not in r.json()["error"]["message"].replace("N/A", "")


def test_oversized_bodies_are_413_before_being_read(server):
    # declared too large: answered from the headers alone, nothing of the body read
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 34603008\r\n\r\n")  # fmt: skip
        reply = b""
        while chunk := sock.recv(4096):  # to the close the response announces
            reply += chunk
        reply = reply.decode("latin-1")
    assert reply.startswith("HTTP/1.1 413") and '"too_large"' in reply and "connection: close" in reply.lower()

    def chunks():  # no Content-Length: counted as it streams
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"x" * (1024 * 1024)
        yield b'"}'

    # the server answers 413 and closes once 32 MB have come; a client still sending may see the close first
    try:
        r = server.post("/generate", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413
    except (httpx.RemoteProtocolError, httpx.WriteError, httpx.ReadError):
        pass
    assert server.post("/generate", json=SMALL).status_code == 200


def test_unknown_routes_are_json(server):
    r = httpx.get(f"{server.url}/nope")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
    assert httpx.get(f"{server.url}/generate").status_code == 405


@pytest.mark.parametrize(
    "path,status",
    [
        ("../outside.safetensors", 400),
        ("loras/../../outside.safetensors", 400),
        ("/etc/passwd", 400),
        ("escape.safetensors", 403),
        ("notes.txt", 400),
        ("missing.safetensors", 404),
        ("..\\outside.safetensors", 400),
        ("x" * 300 + ".safetensors", 400),
        ("loop.safetensors", 400),
    ],
)
def test_lora_paths_outside_the_directory_are_refused(server, path, status, lora_dir):
    r = server.post("/lora", json={"path": path})
    assert r.status_code == status, r.text
    assert str(lora_dir) not in r.text
    assert httpx.get(f"{server.url}/lora").json() == {"loras": []}


@pytest.mark.parametrize("name", ["broken.safetensors", "nan.safetensors"])
def test_unusable_lora_files_are_400_and_change_nothing(server, name):
    before = server.post("/generate", json=SMALL).content
    with httpx.Client(base_url=server.url, timeout=60) as client:  # one keep-alive connection throughout
        r = client.post("/lora", json={"path": name})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request", r.text
        assert client.get("/lora").json() == {"loras": []}
        assert client.post("/generate", json=SMALL).content == before


def test_unload_by_name_does_not_confirm_server_paths(server):
    assert server.post("/lora", json={"path": "good.safetensors"}).status_code == 200
    try:
        full = str(server_lora_dir(server).resolve() / "good.safetensors")
        assert server.post("/lora", json={"name": full, "action": "unload"}).status_code == 404
        assert [lora["name"] for lora in httpx.get(f"{server.url}/lora").json()["loras"]] == ["good"]
    finally:
        assert server.post("/lora", json={"name": "good", "action": "unload"}).status_code == 200


def server_lora_dir(server) -> Path:
    return Path(server.args[server.args.index("--lora-dir") + 1])


def test_lora_changes_the_image_and_unload_restores_the_exact_bytes(server):
    before = server.post("/generate", json=SMALL).content
    r = server.post("/lora", json={"path": "good.safetensors", "scale": 1.5})
    assert r.status_code == 200 and r.json()["name"] == "good"
    assert r.json()["status"] == "success"  # what the original's clients check
    assert httpx.get(f"{server.url}/lora").json() == {
        "loras": [{"name": "good", "path": "good.safetensors", "scale": 1.5}]
    }
    with_lora = server.post("/generate", json=SMALL).content
    assert with_lora != before
    unloaded = server.post("/lora", json={"name": "good", "action": "unload"})
    assert unloaded.status_code == 200 and unloaded.json()["status"] == "success"
    assert server.post("/generate", json=SMALL).content == before
    assert server.post("/lora", json={"name": "good", "action": "unload"}).status_code == 404
    assert server.post("/lora", json={"path": "good.safetensors", "scale": "big"}).status_code == 422


def test_schema_fuzz_finds_no_server_errors(server):
    """schemathesis against /openapi.json, bounded in examples and time: no 5xx on /generate or /lora."""

    st = shutil.which("schemathesis") or shutil.which("st")
    if st is None:
        pytest.fail("schemathesis is in requirements-test.txt; install it")
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.st_hooks", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [
            st,
            "run",
            f"{server.url}/openapi.json",
            "--checks",
            "not_a_server_error",
            "--max-examples",
            "20",
            "--phases",
            "examples,coverage,fuzzing",
            "--include-path-regex",
            "^/(generate|lora)$",
            "--request-timeout",
            "60",
            "--no-color",
            "--generation-database",
            "none",  # every run the same: no examples replayed from an earlier run's store
        ],
        capture_output=True,
        text=True,
        timeout=420,
        cwd=ROOT,
        env=env,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "Tested: 3" in out.stdout  # POST /generate, GET and POST /lora
    assert re.search(r"\d+ generated, \d+ passed\s", out.stdout) and "failed" not in out.stdout.split("SUMMARY")[-1]
    assert server.health()["completed"] > 0  # valid requests did reach the pipeline
