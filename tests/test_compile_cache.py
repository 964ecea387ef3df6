"""The compile-cache artifact: written by one process, it spares a fresh one (empty caches) the compile; a damaged
file is skipped with a warning; `main.py --write-compile-cache` refuses a config that does not compile."""

import json
import subprocess
import sys
import zipfile

import compile_cache
from tests.helpers import ROOT, TINY_CONFIG

SCRIPT = """
import sys, torch
from torch._dynamo.utils import counters
import compile_cache
mode, path = sys.argv[1], sys.argv[2]
if mode == "load":
    assert compile_cache.load(path)
f = torch.compile(lambda x: torch.sin(x) * 2 + torch.cos(x).sum())
f(torch.randn(64))
print("COUNTERS", dict(counters["inductor"]))
if mode == "write":
    compile_cache.save(path)
"""


def run(mode: str, artifact, cache_dir, log: list | None = None) -> dict:
    env = {"TORCHINDUCTOR_CACHE_DIR": str(cache_dir / "inductor"), "TRITON_CACHE_DIR": str(cache_dir / "triton"),
           "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode, str(artifact)], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    if log is not None:
        log.append(out.stderr)
    line = next(line for line in out.stdout.splitlines() if line.startswith("COUNTERS"))
    return eval(line.removeprefix("COUNTERS "))  # a dict of ints printed by the script above


def test_an_artifact_spares_a_fresh_process_the_compile(tmp_path):
    artifact = tmp_path / "model.safetensors.compile-cache"
    first = run("write", artifact, tmp_path / "caches-1")
    assert first.get("fxgraph_cache_miss", 0) >= 1 and not first.get("fxgraph_cache_hit")
    assert compile_cache.TORCH_ENTRY in zipfile.ZipFile(artifact).namelist()
    logs: list[str] = []
    fresh = run("load", artifact, tmp_path / "caches-2", logs)  # empty caches: only the artifact can give the graph
    assert fresh.get("fxgraph_cache_hit", 0) >= 1 and not fresh.get("fxgraph_cache_miss")
    assert "loaded the compile cache" in logs[0]
    # a restart on the same caches: the artifact's entries are there already, so it is not loaded again
    again = run("load", artifact, tmp_path / "caches-2", logs)
    assert "already in this machine's caches" in logs[1] and "loaded the compile cache" not in logs[1]
    assert again.get("fxgraph_cache_hit", 0) >= 1 and not again.get("fxgraph_cache_miss")
    # other bytes (a rewritten artifact) are loaded
    artifact.write_bytes(artifact.read_bytes() + b"\0")  # a zip ignores bytes after its end record
    run("load", artifact, tmp_path / "caches-2", logs)
    assert "loaded the compile cache" in logs[2]


def test_a_damaged_artifact_is_skipped(tmp_path):
    bad = tmp_path / "x.compile-cache"
    bad.write_bytes(b"not a zip")
    assert compile_cache.load(bad) is False
    assert compile_cache.load(tmp_path / "missing.compile-cache") is False
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr(compile_cache.TORCH_ENTRY, b"garbage")
    assert compile_cache.load(bad) is False


def test_default_place_is_next_to_the_checkpoint():
    assert str(compile_cache.default_path("/data/flux1-dev-fp8.safetensors")) == (
        "/data/flux1-dev-fp8.safetensors.compile-cache"
    )


def test_write_compile_cache_needs_a_compiling_config(tmp_path):
    config = json.loads(TINY_CONFIG.read_text())
    for key in ("ckpt_path", "ae_path", "text_enc_path", "clip_path"):
        config[key] = str(TINY_CONFIG.parent / config[key])
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    out = subprocess.run(
        [sys.executable, "main.py", "-c", str(path), "--write-compile-cache", str(tmp_path / "a")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode != 0 and "needs a config that compiles" in out.stderr
    assert not (tmp_path / "a").exists()


def test_the_config_names_the_artifact_or_turns_it_off():
    beside = compile_cache.artifact_path(None, lambda: "/data/flux.safetensors")
    assert str(beside) == "/data/flux.safetensors.compile-cache"
    assert str(compile_cache.artifact_path("/c/x.zip", lambda: "/unused")) == "/c/x.zip"
    assert compile_cache.artifact_path("off", lambda: "/unused") is None
