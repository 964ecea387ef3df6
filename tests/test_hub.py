"""Checkpoints from the Hugging Face Hub (hub.py), with no network: a local cache laid out as huggingface_hub lays
it out (read with HF_HUB_OFFLINE=1), and a stub endpoint on 127.0.0.1 that answers as the Hub does for a gated or
missing repo. Each case runs the real CLI in a fresh process, since huggingface_hub reads its environment once."""

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading

import pytest

import hub
from tests.helpers import ROOT

REVISION = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root, repo: str, files: dict) -> None:
    """`files` (name -> local file) as the cached snapshot of `repo` at `main`."""
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(REVISION)
    snapshot = folder / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    for name, source in files.items():
        shutil.copy(source, snapshot / name)


def config(tmp_path, tiny_cfg, **keys) -> str:
    path = tmp_path / "hub-config.json"
    path.write_text(json.dumps(dict(tiny_cfg, **keys)))
    return str(path)


def make_image(config_path: str, out, env: dict) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "main.py", "--config-path", config_path, "--prompt", "a boat", "--width", "128",
           "--height", "128", "--num-steps", "2", "--seed", "3", "--output", str(out)]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def hub_env(monkeypatch, cache, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return {**env, "HF_HUB_CACHE": str(cache), **extra}


def test_checkpoints_from_the_hub_cache_give_the_same_image(tmp_path, tiny_cfg, monkeypatch):
    cache = tmp_path / "hub"
    files = {"flux.safetensors": tiny_cfg["ckpt_path"], "ae.safetensors": tiny_cfg["ae_path"]}
    hub_cache(cache, "tiny-org/flux-tiny", files)
    env = hub_env(monkeypatch, cache, HF_HUB_OFFLINE="1")
    local = make_image(config(tmp_path, tiny_cfg), tmp_path / "local.jpg", env)
    assert local.returncode == 0, local.stderr[-2000:]
    # "org/repo:file" for the flow model; the original's repo_id + repo_ae for the autoencoder
    keys = dict(ckpt_path="tiny-org/flux-tiny:flux.safetensors", ae_path=None, repo_id="tiny-org/flux-tiny",
                repo_ae="ae.safetensors")  # fmt: skip
    from_hub = make_image(config(tmp_path, tiny_cfg, **keys), tmp_path / "hub.jpg", env)
    assert from_hub.returncode == 0, from_hub.stderr[-2000:]
    assert (tmp_path / "hub.jpg").read_bytes() == (tmp_path / "local.jpg").read_bytes()
    # the original's configs: the author's missing file, then the repo it came from
    keys = dict(ckpt_path="/big/generator-ui/flux1-dev.sft", repo_id="tiny-org/flux-tiny")
    keys["repo_flow"] = "flux.safetensors"
    fallback = make_image(config(tmp_path, tiny_cfg, **keys), tmp_path / "fallback.jpg", env)
    assert fallback.returncode == 0 and "using tiny-org/flux-tiny:flux.safetensors" in fallback.stderr


def test_offline_without_the_file_is_one_line(tmp_path, tiny_cfg, monkeypatch):
    env = hub_env(monkeypatch, tmp_path / "empty", HF_HUB_OFFLINE="1")
    path = config(tmp_path, tiny_cfg, ckpt_path="tiny-org/absent:flux.safetensors")
    run = make_image(path, tmp_path / "x.jpg", env)
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "HF_HUB_OFFLINE" in last and "tiny-org/absent:flux.safetensors" in last


class FakeHub(http.server.BaseHTTPRequestHandler):
    """Answers as the Hub does: a gated repo 401 (GatedRepo), anything else 404 (RepoNotFound)."""

    def do_HEAD(self):  # noqa: N802 - the http.server API
        gated = "/gated-org/" in self.path
        self.send_response(401 if gated else 404)
        self.send_header("X-Error-Code", "GatedRepo" if gated else "RepoNotFound")
        self.send_header("X-Error-Message", "Access to this repo is restricted" if gated else "Repository not found")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD  # noqa: N815

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("repo, words", [("gated-org/flux", ("gated", "HF_TOKEN")), ("nobody/none", ("not found",))])
def test_gated_or_missing_repos_are_one_line_naming_the_repo(tmp_path, tiny_cfg, monkeypatch, repo, words):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = hub_env(monkeypatch, tmp_path / "cache", HF_ENDPOINT=f"http://127.0.0.1:{server.server_port}")
        path = config(tmp_path, tiny_cfg, ckpt_path=f"{repo}:flux.safetensors")
        run = make_image(path, tmp_path / "x.jpg", env)
    finally:
        server.shutdown()
    last = run.stderr.strip().splitlines()[-1]
    assert run.returncode != 0 and last.startswith("error:") and repo in last, run.stderr[-1500:]
    assert all(word in last for word in words), last


def test_what_counts_as_a_hub_reference(tmp_path):
    assert hub.split("org/repo:dir/file.safetensors", None, None) == ("org/repo", "dir/file.safetensors")
    assert hub.split("org/repo", None, "flux1-dev.safetensors") == ("org/repo", "flux1-dev.safetensors")
    assert hub.split(None, "org/repo", "ae.safetensors") == ("org/repo", "ae.safetensors")
    assert hub.split("models/flux.safetensors", "org/repo", "x") is None  # a (missing) local file stays local
    local = tmp_path / "org"
    local.mkdir()
    (local / "repo").write_text("")
    assert not hub.is_reference(str(local / "repo"))
