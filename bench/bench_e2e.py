"""End-to-end timing: prompt -> JPEG with random full-size T5-XXL, CLIP-L, FLUX.1-dev flow model and autoencoder.

    python -m bench.bench_e2e --out $OUT/e2e.json                 # H200: 28 steps at 1024x1024
    python -m bench.bench_e2e --tiny --device cpu --steps 2 --size 256x256  # smoke test of the script

Splits the time into text encoding, denoising and decoding (the pipeline logs the same split), after one
warm-up image. The tokenizers are the tiny demo's (ids fit any vocabulary); weights are random, which costs
the same time as real ones.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import float8_quantize as f8
from bench import report
from bench.bench_flow import random_model, random_weights_config
from flux_pipeline import FluxPipeline, compile_flow_model
from kernels.options import KernelOptions
from modules import sampling
from modules.autoencoder import AutoEncoder, AutoEncoderParams
from modules.conditioner import HFEmbedder
from util import spec_from_dict

ROOT = Path(__file__).resolve().parent.parent


def random_encoders(tiny: bool, device: str, dtype: torch.dtype) -> tuple[HFEmbedder, HFEmbedder]:
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    if tiny:
        t5 = T5EncoderModel.from_pretrained(ROOT / "configs/tiny/t5", dtype=dtype)
        clip = CLIPTextModel.from_pretrained(ROOT / "configs/tiny/clip", dtype=dtype)
    else:
        with torch.device(device):
            t5 = T5EncoderModel(
                T5Config(
                    vocab_size=32128,
                    d_model=4096,
                    d_kv=64,
                    d_ff=10240,
                    num_layers=24,
                    num_heads=64,
                    feed_forward_proj="gated-gelu",
                    is_encoder_decoder=False,
                )
            )
            clip = CLIPTextModel(
                CLIPTextConfig(
                    vocab_size=49408,
                    hidden_size=768,
                    intermediate_size=3072,
                    num_hidden_layers=12,
                    num_attention_heads=12,
                    max_position_embeddings=77,
                    eos_token_id=1,
                )
            )
        t5, clip = t5.to(dtype), clip.to(dtype)
    t5_tok = AutoTokenizer.from_pretrained(ROOT / "configs/tiny/t5")
    clip_tok = AutoTokenizer.from_pretrained(ROOT / "configs/tiny/clip")
    return (HFEmbedder(clip_tok, clip.to(device), 77, True), HFEmbedder(t5_tok, t5.to(device), 512, False))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--size", default="1024x1024")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="compile blocks and extras (warm-up included)")
    ap.add_argument("--offload", action="store_true", help="offload_text_encoder + offload_vae")
    ap.add_argument("--fp8-attention", action="store_true", help="the opt-in fp8 attention (config fp8_attention)")
    ap.add_argument("--t5", default="bf16", help="T5 weights: bf16, qfloat8, 'fp8 matmul' or quanto_qfloat8")
    ap.add_argument("--decode-band-mib", type=int, default=KernelOptions().decode_band_mib,
                    help="the autoencoder's large convolutions in bands of this size (0: whole)")  # fmt: skip
    ap.add_argument("--ae-fp8", action="store_true", help="fp8 autoencoder weights (ae_quantization_dtype qfloat8)")
    ap.add_argument("--text-enc-device", help="default: --device")
    ap.add_argument("--ae-device", help="default: --device")
    ap.add_argument("--out")
    ap.add_argument("--results", default=None, help="append the table here ('' for nowhere; default RESULTS.md)")
    args = ap.parse_args()
    if args.results is None:
        args.results = report.default_path(args.tiny)
    width, height = (int(v) for v in args.size.split("x"))
    enc_dev, ae_dev = args.text_enc_device or args.device, args.ae_device or args.device
    cfg = random_weights_config(
        args.tiny, flux_device=args.device, ae_device=ae_dev, text_enc_device=enc_dev, text_enc_max_length=512,
        text_enc_quantization_dtype=None, compile_blocks=False, compile_extras=False,
        offload_text_encoder=args.offload, offload_vae=args.offload,
    )  # fmt: skip
    config = spec_from_dict(cfg)
    model = f8.quantize_flow_model(random_model(cfg["params"], args.device, torch.bfloat16), f8.F8Settings())
    model.set_kernel_options(KernelOptions(fp8_attention=args.fp8_attention))
    with torch.device(ae_dev):
        ae = AutoEncoder(AutoEncoderParams(**cfg["ae_params"]), KernelOptions(decode_band_mib=args.decode_band_mib))
        ae = ae.to(torch.bfloat16).eval().requires_grad_(False)
    clip, t5 = random_encoders(args.tiny, enc_dev, torch.bfloat16)
    if args.t5 != "bf16":
        from bench.bench_t5 import quantized

        quantized(t5.hf_module, args.t5)
    if args.ae_fp8:
        from encoder_quantize import quantize_autoencoder

        quantize_autoencoder(ae)
    if args.offload:  # offloaded components live on the CPU and visit their device while they run
        ae.to("cpu")
        clip.hf_module.to("cpu")
        t5.hf_module.to("cpu")
    cuda = args.device.startswith("cuda")
    resident = torch.cuda.memory_allocated(args.device) / 2**30 if cuda else 0.0
    pipe = FluxPipeline(config, model, ae, clip, t5)
    if args.compile:
        t = time.perf_counter()
        compile_flow_model(pipe.model)
        pipe.generate_images("warm-up", width, height, 2, seed=0)
        print(f"compile + warm-up {time.perf_counter() - t:.1f} s", flush=True)
    pipe.generate("warm-up", width, height, args.steps, seed=0, silent=True)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        for d in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(d)
    totals, phases = [], {"text": [], "denoise": [], "decode": []}
    phase_peak = {"text": 0.0, "denoise": 0.0, "decode": 0.0}

    def peak(phase: str, start: bool) -> None:
        """The largest allocation of each phase, on the flow model's GPU."""
        if not cuda:
            return
        if start:
            torch.cuda.reset_peak_memory_stats(args.device)
        else:
            phase_peak[phase] = max(phase_peak[phase], torch.cuda.max_memory_allocated(args.device) / 2**30)

    for rep in range(args.reps):
        sync()
        t0 = time.perf_counter()
        peak("text", True)
        txt, vec = pipe.encode_prompt(f"a lighthouse at dusk {rep}", 1)
        sync()
        peak("text", False)
        t1 = time.perf_counter()
        jpeg = pipe.generate(f"a lighthouse at dusk {rep}", width, height, args.steps, seed=rep, silent=True)
        sync()
        t2 = time.perf_counter()
        totals.append(t2 - t1)
        phases["text"].append(t1 - t0)
        assert jpeg.getvalue()[:2] == b"\xff\xd8"
    e2e_peak = [torch.cuda.max_memory_allocated(d) / 2**30 for d in range(torch.cuda.device_count())] if cuda else []
    # denoise alone, to split the end-to-end time
    img = sampling.pack(sampling.get_noise(1, height, width, 0)).to(args.device)
    ids, tids = sampling.img_ids(1, height, width).to(args.device), sampling.txt_ids(1, txt.shape[1]).to(args.device)
    steps = sampling.get_schedule(args.steps, img.shape[1])

    def decode_s(latents: torch.Tensor) -> float:
        t = time.perf_counter()
        with torch.inference_mode(), pipe._on(pipe.ae, pipe.ae_device, args.offload):
            pipe.decode(latents, height, width)
        sync()
        return time.perf_counter() - t

    for _ in range(args.reps):
        sync()
        t = time.perf_counter()
        peak("denoise", True)
        with torch.inference_mode():
            out = sampling.denoise(pipe.step_model, img, ids, txt, tids, vec, steps, 3.5)
        sync()
        peak("denoise", False)
        phases["denoise"].append(time.perf_counter() - t)
        peak("decode", True)
        phases["decode"].append(decode_s(out))
        peak("decode", False)
    # the same decode with PyTorch's GroupNorm (the kernel off), for the same-run comparison
    pipe.ae.set_kernel_options(KernelOptions(group_norm=False))
    try:
        torch_norm = [decode_s(out) for _ in range(args.reps)]
    finally:
        pipe.ae.set_kernel_options(KernelOptions())
    result = {
        "size": args.size,
        "steps": args.steps,
        "compiled": args.compile,
        "fp8_attention": args.fp8_attention,
        "offload": args.offload,
        "devices": {"flux": args.device, "text_enc": enc_dev, "ae": ae_dev},
        "t5": args.t5,
        "ae_fp8": args.ae_fp8,
        "peak_gib_per_gpu": e2e_peak,
        "resident_gib": resident,
        "phase_peak_gib": phase_peak,
        "end_to_end_s": statistics.median(totals),
        **{f"{k}_s": statistics.median(v) for k, v in phases.items()},
        "decode_torch_group_norm_s": statistics.median(torch_norm),
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    row = [
        f"{args.size}, {args.steps} steps",
        ("compiled" if args.compile else "eager") + (", fp8 attention" if args.fp8_attention else ""),
        args.t5 + (", fp8 autoencoder" if args.ae_fp8 else "") + f", decode bands {args.decode_band_mib} MiB",
        f"{result['end_to_end_s']:.3f}",
        *(f"{result[k]:.3f}" for k in ("text_s", "denoise_s", "decode_s", "decode_torch_group_norm_s")),
        " / ".join(f"{g:.2f}" for g in result["peak_gib_per_gpu"]) or "-",
        f"{resident:.2f}",
        " / ".join(f"{phase_peak[k]:.2f}" for k in ("text", "denoise", "decode")),
    ]
    header = ["image", "flow model", "T5", "prompt -> JPEG s", "text s", "denoise s", "decode s",
              "decode with PyTorch's GroupNorm s", "peak GiB", "resident GiB",
              "peak GiB text / denoise / decode"]  # fmt: skip
    devices = ", ".join(f"{k} {v}" for k, v in result["devices"].items())
    title = f"End-to-end image (median of {args.reps}; {devices}{', offloaded' if args.offload else ''})"
    report.append(args.results, title, args.device, [report.table(header, [row])])


if __name__ == "__main__":
    main()
