"""Batching in the worker: images per minute with concurrent clients, and a lone request's latency, with batching on
and off in the same run, on a real server (our app under uvicorn on 127.0.0.1) over the full-size random pipeline.

    python -m bench.bench_batching --out $OUT/batching.json            # H200: 512, 768 and 1024 squared, 28 steps
    python -m bench.bench_batching --tiny --device cpu --steps 2 --sizes 128 --per-client 1 --lone 1   # smoke test

Per size: `--clients` clients each send `--per-client` requests back to back (a closed loop), batching off
(`max_batch` 1) then on (`--max-batch`); then one client alone, `--lone` requests, off then on (its p50 must not
get worse). Also the pixel difference between an image made in a batch of four and the same request alone.
"""

import argparse
import concurrent.futures
import json
import math
import socket
import statistics
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch
import uvicorn

import float8_quantize as f8
from api import create_app
from batching import ImageRequest
from bench import report
from bench.bench_e2e import random_encoders
from bench.bench_flow import random_model, random_weights_config
from bench.bench_t5 import quantized
from flux_pipeline import FluxPipeline
from modules.autoencoder import AutoEncoder, AutoEncoderParams
from serving.settings import ServerSettings
from util import spec_from_dict


def build(tiny: bool, device: str) -> FluxPipeline:
    cfg = random_weights_config(
        tiny, flux_device=device, ae_device=device, text_enc_device=device, text_enc_max_length=512,
        compile_blocks=not tiny, compile_extras=not tiny,
    )  # fmt: skip
    model = f8.quantize_flow_model(random_model(cfg["params"], device, torch.bfloat16), f8.F8Settings())
    with torch.device(device):
        ae = AutoEncoder(AutoEncoderParams(**cfg["ae_params"])).to(torch.bfloat16).eval().requires_grad_(False)
    clip, t5 = random_encoders(tiny, device, torch.bfloat16)
    quantized(t5.hf_module, "qfloat8")
    return FluxPipeline(spec_from_dict(cfg), model, ae, clip, t5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(pipeline: FluxPipeline, max_batch: int) -> tuple[str, uvicorn.Server]:
    settings = ServerSettings(max_queue_size=64, max_batch=max_batch, batch_max_pixels=4096 * 4096)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(pipeline, settings), host="127.0.0.1", port=port,
                                           log_level="warning"))  # fmt: skip
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:  # bounded
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server


def closed_loop(url: str, body: dict, clients: int, per_client: int) -> dict:
    latencies: list[float] = []

    def client(k: int) -> None:
        with httpx.Client(timeout=600) as http:
            for i in range(per_client):  # bounded
                t = time.perf_counter()
                r = http.post(f"{url}/generate", json=dict(body, seed=1000 * k + i))
                assert r.status_code == 200, r.text[:300]
                latencies.append(time.perf_counter() - t)

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    return {
        "images": len(latencies), "wall_s": round(wall, 2), "images_per_min": round(60 * len(latencies) / wall, 2),
        "p50_s": round(statistics.median(latencies), 3),
        "p95_s": round(sorted(latencies)[max(0, math.ceil(0.95 * len(latencies)) - 1)], 3),
    }  # fmt: skip


def batch_difference(pipe: FluxPipeline, size: int, steps: int) -> dict:
    """Pixel difference between images of a batch of four and the same requests alone."""
    requests = [ImageRequest(f"a lighthouse {i}", 3.5, 10 + i) for i in range(4)]
    batched = pipe.generate_batch(requests, size, size, steps)
    diffs = []
    for request, (images, _) in zip(requests, batched, strict=True):
        alone, _ = pipe.generate_images(request.prompt, size, size, steps, request.guidance, request.seed)
        diffs.append(np.abs(np.asarray(images[0], dtype=np.int16) - np.asarray(alone[0], dtype=np.int16)))
    d = np.stack(diffs)
    return {"max": int(d.max()), "mean": round(float(d.mean()), 3), "p99": float(np.percentile(d, 99))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sizes", default="512,768,1024")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--per-client", type=int, default=3)
    ap.add_argument("--lone", type=int, default=3)
    ap.add_argument("--max-batch", type=int, default=4)
    ap.add_argument("--out")
    ap.add_argument("--results", default=None)
    args = ap.parse_args()
    if args.results is None:
        args.results = report.default_path(args.tiny)
    sizes = [int(s) for s in args.sizes.split(",")]
    pipe = build(args.tiny, args.device)
    t = time.perf_counter()
    if pipe.config.compile_blocks:
        warm = tuple((s, s) for s in sorted(sizes, reverse=True))
        pipe.compile(warm, batch=args.max_batch)
    result: dict = {"compile_and_warm_up_s": round(time.perf_counter() - t, 1), "steps": args.steps, "sizes": {}}
    print(f"compiled and warmed up in {result['compile_and_warm_up_s']} s", flush=True)
    url, server = serve(pipe, args.max_batch)
    worker = server.config.app.state.worker
    try:
        for size in sizes:
            body = {"prompt": "a lighthouse at dusk, oil painting", "width": size, "height": size,
                    "num_steps": args.steps}  # fmt: skip
            closed_loop(url, body, args.clients, 1)  # every batch shape captured before timing
            row = {}
            for mode, max_batch in (("off", 1), ("on", args.max_batch)):
                worker.max_batch = max_batch
                row[f"load_{mode}"] = closed_loop(url, body, args.clients, args.per_client)
                print(size, mode, row[f"load_{mode}"], flush=True)
            for mode, max_batch in (("off", 1), ("on", args.max_batch)):
                worker.max_batch = max_batch
                row[f"lone_{mode}"] = closed_loop(url, body, 1, args.lone)
                print(size, "lone", mode, row[f"lone_{mode}"], flush=True)
            row["batch_vs_alone_pixels"] = batch_difference(pipe, size, args.steps)
            print(size, row["batch_vs_alone_pixels"], flush=True)
            result["sizes"][size] = row
    finally:
        server.should_exit = True
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    header = ["size", f"{args.clients} clients, off: img/min", "on: img/min", "gain", "p50 off / on s",
              "lone p50 off / on s", "batch vs alone px max / mean"]  # fmt: skip
    rows = []
    for size, r in result["sizes"].items():
        off, on = r["load_off"], r["load_on"]
        px = r["batch_vs_alone_pixels"]
        rows.append([f"{size}x{size}", off["images_per_min"], on["images_per_min"],
                     f"{on['images_per_min'] / off['images_per_min']:.2f}x", f"{off['p50_s']} / {on['p50_s']}",
                     f"{r['lone_off']['p50_s']} / {r['lone_on']['p50_s']}", f"{px['max']} / {px['mean']}"])  # fmt: skip
    title = (f"Batching (max {args.max_batch} images; {args.steps} steps; {args.clients} clients x {args.per_client} "
             f"requests, lone client x {args.lone}; compile {result['compile_and_warm_up_s']} s)")  # fmt: skip
    report.append(args.results, title, args.device, [report.table(header, rows)])


if __name__ == "__main__":
    main()
