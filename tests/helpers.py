"""Shared test helpers: paths, seeded model inputs, fp8 layers from linears, the real server on a free
127.0.0.1 port, and diffusers' FLUX.1 transformer as an independent reference (with BFL -> diffusers keys)."""

import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import torch
from torch import nn

import float8_quantize as f8
from cuda_graphs import GraphedFlow
from float8_quantize import F8Linear, quantize_weight
from flux_pipeline import FluxPipeline
from modules import sampling

ROOT = Path(__file__).resolve().parent.parent
TINY_CONFIG = ROOT / "configs" / "config-tiny-cpu.json"


# ---- model inputs and fp8 layers ---------------------------------------------------------------------------


def random_inputs(params: dict, height: int = 256, width: int = 384, txt_len: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        img=sampling.pack(torch.randn(1, params["in_channels"] // 4, height // 8, width // 8, generator=g)),
        img_ids=sampling.img_ids(1, height, width),
        txt=torch.randn(1, txt_len, params["context_in_dim"], generator=g),
        txt_ids=sampling.txt_ids(1, txt_len),
        timesteps=torch.tensor([0.7]),
        y=torch.randn(1, params["vec_in_dim"], generator=g),
        guidance=torch.tensor([3.5]),
    )


MODES = list(itertools.product(f8.WEIGHT_SCALINGS, f8.ACTIVATION_SCALINGS))
# e4m3 keeps 3 mantissa bits: rounding one operand costs ~2.6% RMS, both ~3.7%. Per-token scales keep the
# rows that do not hold the outlier channels away from the subnormal range; measured: 2.9% per token, 3.8%
# per tensor (bf16: 0.28%) on this data.
BOUNDS = {"dynamic_per_token": 0.033, "dynamic_per_tensor": 0.042, "static_per_tensor": 0.042}


def f8_from(linear: nn.Linear, weight_scaling: str, activation_scaling: str) -> F8Linear:
    layer = F8Linear(
        linear.in_features, linear.out_features, True, weight_scaling, activation_scaling, False, torch.float32
    )
    q, s = quantize_weight(linear.weight.detach(), weight_scaling == "per_channel")
    layer.weight.data, layer.bias.data = q, linear.bias.detach().clone()
    layer.weight_scale.copy_(s)
    return layer


# ---- the real server ---------------------------------------------------------------------------------------

SMALL = {"prompt": "a lighthouse", "width": 128, "height": 128, "num_steps": 3, "seed": 7}  # a request in ~0.2 s
SLOW = {"prompt": "slow", "width": 512, "height": 512, "num_steps": 30, "seed": 1}  # one that runs for seconds


def tiny_lora(hidden: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A small LoRA on one attention projection of the tiny model: enough to change its images."""
    g = torch.Generator().manual_seed(seed)
    return {
        "double_blocks.0.img_attn.proj.lora_A.weight": torch.randn(4, hidden, generator=g),
        "double_blocks.0.img_attn.proj.lora_B.weight": torch.randn(hidden, 4, generator=g),
    }


def wait_healthy(url: str, seconds: float, alive=lambda: True) -> bool:
    """Poll `url`/health until it answers 200 (True), `alive()` turns false, or `seconds` pass (False)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and alive():
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *args: str, env: dict | None = None, log_path: Path | None = None):
        self.args = args
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "main.py", "--config-path", str(TINY_CONFIG), "--port", str(self.port), *args]
        self.log = open(log_path or os.devnull, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
        if not wait_healthy(self.url, 120, alive=lambda: self.proc.poll() is None):
            code = self.proc.poll()
            self.stop()
            raise RuntimeError(f"server exited with {code}" if code is not None else "server not healthy in 120 s")

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=5).json()

    def post(self, path: str, timeout: float = 120, **kwargs) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", timeout=timeout, **kwargs)

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        return self.proc.returncode


@contextmanager
def running_server(*args: str, env: dict | None = None, log_path: Path | None = None):
    server = Server(*args, env=env, log_path=log_path)
    try:
        yield server
    finally:
        server.stop()


# ---- diffusers' FLUX.1 transformer as a reference --------------------------------------------------------


def swap_scale_shift(weight: torch.Tensor) -> torch.Tensor:
    shift, scale = weight.chunk(2, dim=0)  # BFL final layer: shift first; diffusers: scale first
    return torch.cat([scale, shift], dim=0)


def bfl_to_diffusers(sd: dict[str, torch.Tensor], params: dict) -> dict[str, torch.Tensor]:
    h = params["hidden_size"]
    mlp = int(h * params["mlp_ratio"])
    out = {}

    def copy(src: str, dst: str, fn=lambda t: t):
        for leaf in ("weight", "bias"):
            if f"{src}.{leaf}" in sd:
                out[f"{dst}.{leaf}"] = fn(sd[f"{src}.{leaf}"])

    def split(src: str, dsts: list[str], sizes: list[int]):
        for leaf in ("weight", "bias"):
            if f"{src}.{leaf}" in sd:
                for dst, part in zip(dsts, torch.split(sd[f"{src}.{leaf}"], sizes, dim=0), strict=True):
                    out[f"{dst}.{leaf}"] = part

    copy("img_in", "x_embedder")
    copy("txt_in", "context_embedder")
    for bfl, dif in (
        ("time_in", "timestep_embedder"),
        ("vector_in", "text_embedder"),
        ("guidance_in", "guidance_embedder"),
    ):
        copy(f"{bfl}.in_layer", f"time_text_embed.{dif}.linear_1")
        copy(f"{bfl}.out_layer", f"time_text_embed.{dif}.linear_2")
    for i in range(params["depth"]):
        b, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        copy(f"{b}.img_mod.lin", f"{d}.norm1.linear")
        copy(f"{b}.txt_mod.lin", f"{d}.norm1_context.linear")
        split(f"{b}.img_attn.qkv", [f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"], [h, h, h])
        split(f"{b}.txt_attn.qkv", [f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"], [h, h, h])
        out[f"{d}.attn.norm_q.weight"] = sd[f"{b}.img_attn.norm.query_norm.scale"]
        out[f"{d}.attn.norm_k.weight"] = sd[f"{b}.img_attn.norm.key_norm.scale"]
        out[f"{d}.attn.norm_added_q.weight"] = sd[f"{b}.txt_attn.norm.query_norm.scale"]
        out[f"{d}.attn.norm_added_k.weight"] = sd[f"{b}.txt_attn.norm.key_norm.scale"]
        copy(f"{b}.img_mlp.0", f"{d}.ff.net.0.proj")
        copy(f"{b}.img_mlp.2", f"{d}.ff.net.2")
        copy(f"{b}.txt_mlp.0", f"{d}.ff_context.net.0.proj")
        copy(f"{b}.txt_mlp.2", f"{d}.ff_context.net.2")
        copy(f"{b}.img_attn.proj", f"{d}.attn.to_out.0")
        copy(f"{b}.txt_attn.proj", f"{d}.attn.to_add_out")
    for i in range(params["depth_single_blocks"]):
        b, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        copy(f"{b}.modulation.lin", f"{d}.norm.linear")
        split(f"{b}.linear1", [f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp"], [h, h, h, mlp])
        out[f"{d}.attn.norm_q.weight"] = sd[f"{b}.norm.query_norm.scale"]
        out[f"{d}.attn.norm_k.weight"] = sd[f"{b}.norm.key_norm.scale"]
        copy(f"{b}.linear2", f"{d}.proj_out")
    copy("final_layer.linear", "proj_out")
    copy("final_layer.adaLN_modulation.1", "norm_out.linear", swap_scale_shift)
    return out


def diffusers_flux(params: dict, bfl_sd: dict[str, torch.Tensor]):
    """A diffusers FluxTransformer2DModel with the weights of a BFL state dict (float32)."""
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=params["in_channels"],
        num_layers=params["depth"],
        num_single_layers=params["depth_single_blocks"],
        attention_head_dim=params["hidden_size"] // params["num_heads"],
        num_attention_heads=params["num_heads"],
        joint_attention_dim=params["context_in_dim"],
        pooled_projection_dim=params["vec_in_dim"],
        guidance_embeds=params["guidance_embed"],
        axes_dims_rope=tuple(params["axes_dim"]),
    )
    model.load_state_dict({k: v.float() for k, v in bfl_to_diffusers(bfl_sd, params).items()}, strict=True)
    return model.eval()


def diffusers_forward(model, img, img_ids, txt, txt_ids, timesteps, y, guidance):
    return model(
        hidden_states=img,
        encoder_hidden_states=txt,
        pooled_projections=y,
        timestep=timesteps,
        img_ids=img_ids[0],
        txt_ids=txt_ids[0],
        guidance=guidance,
        return_dict=False,
    )[0]


# ---- CUDA-graph replay under LoRA changes (both attention modes' GPU tests) ---------------------------


def _random_bfl_lora(model, rank: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, m in model.named_modules():
        if isinstance(m, f8.F8Linear):
            sd[f"{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=gen) * 0.1
            sd[f"{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=gen) * 0.1
    return sd


def check_graph_replay_follows_loras(cfg: dict) -> None:
    """A graphed pipeline draws what an eager one draws, before, with and after a LoRA, without recapturing."""
    graphed = FluxPipeline.load_pipeline_from_config(cfg)
    eager = FluxPipeline.load_pipeline_from_config(dict(cfg, cuda_graphs=False))
    assert isinstance(graphed.step_model, GraphedFlow) and eager.step_model is eager.model

    def pixels(pipe, seed=3):
        return np.asarray(pipe.generate_images("a fox", 256, 256, 4, seed=seed)[0][0]).astype(int)

    assert np.array_equal(pixels(graphed), pixels(eager))
    assert len(graphed.step_model.graphs) == 1  # captured once, replayed for every step since
    lora = _random_bfl_lora(graphed.model)
    for pipe in (graphed, eager):
        pipe.load_lora(lora, scale=1.0, name="r")
    with_lora = pixels(graphed)
    assert np.array_equal(with_lora, pixels(eager))  # the graph reads the fused weights, no recapture
    assert len(graphed.step_model.graphs) == 1
    graphed.unload_lora("r")
    assert not np.array_equal(with_lora, pixels(graphed))
    assert np.array_equal(pixels(graphed, seed=4), pixels(FluxPipeline.load_pipeline_from_config(cfg), seed=4))


@contextmanager
def nginx_front(tmp_path: Path, ports: list[int]):
    """deploy/nginx.conf run by a real nginx on 127.0.0.1 in front of the servers on `ports`; yields its URL."""
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    conf = conf.replace("worker_processes auto;", f"worker_processes 1;\npid {tmp_path}/nginx.pid;")
    upstream = [line for line in conf.splitlines() if line.strip().startswith("server flux-gpu")]
    servers = "\n".join(f"        server 127.0.0.1:{port} max_fails=2 fail_timeout=10s;" for port in ports)
    conf = conf.replace("\n".join(upstream), servers)
    port = free_port()
    conf = conf.replace("listen 8088;", f"listen 127.0.0.1:{port};")
    conf = conf.replace("http {", f"http {{\n    access_log off;\n    client_body_temp_path {tmp_path};", 1)
    (tmp_path / "nginx.conf").write_text(conf)
    (tmp_path / "logs").mkdir(exist_ok=True)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    cmd = [nginx, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-g", "daemon off; error_log stderr;"]
    check = subprocess.run([*cmd[:-2], "-t"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)
