"""Components on separate GPUs: same seed, same image as on one GPU, and the end-to-end latency of each placement.

    python -m bench.bench_multi_gpu --out $OUT/multi_gpu.json     # two GPUs, full-size random weights

Builds one set of random full-size components (fp8 flow model, T5-XXL, CLIP-L, autoencoder) and moves them
between placements, so every placement runs the same weights. For each placement (flow, text encoders,
autoencoder): one warm-up image, then the median of `--reps` 1024x1024 images (`--steps` steps, prompt to
JPEG), and the decoded pixels of one seed compared with the single-GPU placement.
"""

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import float8_quantize as f8
from bench.bench_e2e import random_encoders
from bench.bench_flow import random_model, random_weights_config
from flux_pipeline import FluxPipeline, compile_flow_model
from modules.autoencoder import AutoEncoder, AutoEncoderParams
from util import spec_from_dict

ROOT = Path(__file__).resolve().parent.parent

PLACEMENTS = ["cuda:0,cuda:0,cuda:0", "cuda:0,cuda:1,cuda:1", "cuda:1,cuda:0,cuda:0", "cuda:0,cuda:1,cuda:0"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--placements", default=",".join(p.replace(",", "/") for p in PLACEMENTS))
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--size", default="1024x1024")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="tiny architecture (smoke test; any devices)")
    ap.add_argument("--out")
    args = ap.parse_args()
    placements = [p.split("/") for p in args.placements.split(",")]
    width, height = (int(v) for v in args.size.split("x"))
    cfg = random_weights_config(
        args.tiny, text_enc_max_length=512, text_enc_quantization_dtype=None, compile_blocks=False,
        compile_extras=False,
    )  # fmt: skip
    first = placements[0]
    torch.manual_seed(0)
    model = f8.quantize_flow_model(random_model(cfg["params"], first[0], torch.bfloat16), f8.F8Settings())
    with torch.device(first[2]):
        ae = AutoEncoder(AutoEncoderParams(**cfg["ae_params"])).to(torch.bfloat16).eval().requires_grad_(False)
    clip, t5 = random_encoders(args.tiny, first[1], torch.bfloat16)
    if args.compile:
        compile_flow_model(model)
    result, reference = {"steps": args.steps, "size": args.size, "placements": {}}, None
    for flux_dev, enc_dev, ae_dev in placements:
        model.to(flux_dev)
        ae.to(ae_dev)
        t5.hf_module.to(enc_dev)
        clip.hf_module.to(enc_dev)
        config = spec_from_dict(dict(cfg, flux_device=flux_dev, text_enc_device=enc_dev, ae_device=ae_dev))
        pipe = FluxPipeline(config, model, ae, clip, t5)
        pipe.generate("warm-up", width, height, args.steps, seed=0, silent=True)
        times = []
        for rep in range(args.reps):
            sync_all()
            t = time.perf_counter()
            pipe.generate(f"a lighthouse at dusk {rep}", width, height, args.steps, seed=rep, silent=True)
            sync_all()
            times.append(time.perf_counter() - t)
        images, _ = pipe.generate_images("a red fox in snow", width, height, args.steps, seed=7)
        pixels = np.asarray(images[0]).astype(np.int16)
        if reference is None:
            reference = pixels
        diff = np.abs(pixels - reference)
        key = f"flow {flux_dev}, text {enc_dev}, ae {ae_dev}"
        result["placements"][key] = {
            "end_to_end_s": statistics.median(times),
            "max_pixel_diff": int(diff.max()),
            "pixels_differing": float((diff > 0).mean()),
        }
        print(key, json.dumps(result["placements"][key]), flush=True)
        del pipe
        gc.collect()
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


def sync_all() -> None:
    for d in range(torch.cuda.device_count()):
        torch.cuda.synchronize(d)


if __name__ == "__main__":
    main()
