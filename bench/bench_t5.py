"""T5-XXL quantization choices: embedding error against bf16, memory and encode time, on random full-size weights
(GPU) and on the tiny demo's T5 (any device).

    python -m bench.bench_t5 --out $OUT/t5.json          # H200: full-size T5-XXL, 512 tokens
    python -m bench.bench_t5 --tiny --device cpu          # the tiny demo's T5 only

Variants: bf16 (the reference), our fp8 weights dequantized per matmul (`qfloat8`), our fp8 weights with fp8
matmuls (per-token activation scales), and optimum-quanto's qfloat8 (`quanto_qfloat8`). Error: relative L2 of the
last hidden states against bf16 over a few prompts of random token ids; float32 against bf16 for context.
"""

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

import encoder_quantize as eq
from bench import report
from bench.bench_e2e import ROOT

VARIANTS = ("qfloat8", "fp8 matmul", "quanto_qfloat8")


def full_size_t5(device: str):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False,
    )  # fmt: skip
    with torch.device(device):
        return T5EncoderModel(config).to(torch.bfloat16).eval().requires_grad_(False)


def quantized(model, variant: str):
    if variant == "qfloat8":
        return eq.fp8_text_encoder(model)
    if variant == "fp8 matmul":
        return eq.fp8_text_encoder(model, matmul=True)
    return eq.quanto_quantize(model, variant)


def encode(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=None).last_hidden_state.float()


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


def timed(model, ids: torch.Tensor, reps: int, cuda: bool) -> float:
    times = []
    for _ in range(reps + 1):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        encode(model, ids)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def measure(base, ids: torch.Tensor, reps: int, cuda: bool, variants: tuple[str, ...]) -> list[dict]:
    ref = encode(base, ids)
    rows = [
        {
            "variant": "bf16",
            "rel_l2": 0.0,
            "gib": eq.weight_bytes(base) / 2**30,
            "encode_s": timed(base, ids, reps, cuda),
        }
    ]
    f32 = copy.deepcopy(base).float()
    rows.append({"variant": "float32 (context)", "rel_l2": rel(encode(f32, ids), ref),
                 "gib": eq.weight_bytes(f32) / 2**30, "encode_s": timed(f32, ids, reps, cuda)})  # fmt: skip
    del f32
    for variant in variants:
        try:
            t = time.perf_counter()
            q = quantized(copy.deepcopy(base), variant)
            if cuda:
                torch.cuda.synchronize()
            load_s = time.perf_counter() - t
            out = encode(q, ids)
            rows.append({"variant": variant, "rel_l2": rel(out, ref), "gib": eq.weight_bytes(q) / 2**30,
                         "encode_s": timed(q, ids, reps, cuda), "quantize_s": load_s})  # fmt: skip
            del q
        except Exception as e:  # noqa: BLE001 - a variant that cannot run here is reported, not fatal
            rows.append({"variant": variant, "error": f"{type(e).__name__}: {e}"[:200]})
        if cuda:
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="the tiny demo's T5 only")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out")
    ap.add_argument("--results", default=None)
    args = ap.parse_args()
    if args.results is None:
        args.results = report.default_path(args.tiny)
    from transformers import T5EncoderModel

    cuda = args.device.startswith("cuda")
    variants = tuple(v for v in args.variants.split(",") if v)
    gen = torch.Generator().manual_seed(0)
    result = {}
    models = {"tiny demo T5": lambda: T5EncoderModel.from_pretrained(ROOT / "configs/tiny/t5", dtype=torch.bfloat16)}
    if not args.tiny:
        models["full-size T5-XXL (random)"] = lambda: full_size_t5(args.device)
    for name, build in models.items():
        base = build().to(args.device).eval().requires_grad_(False)
        vocab = base.config.vocab_size
        ids = torch.randint(2, vocab, (args.prompts, args.tokens), generator=gen).to(args.device)
        result[name] = measure(base, ids, args.reps, cuda, variants)
        del base
        if cuda:
            torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    header = [
        "model",
        "T5 weights",
        "rel. L2 vs bf16",
        "weights GiB",
        f"encode {args.prompts}x{args.tokens} s",
        "quantize s",
    ]
    rows = [
        [name, r["variant"], r.get("error") or f"{100 * r['rel_l2']:.2f}%", f"{r.get('gib', 0):.3f}",
         f"{r.get('encode_s', 0):.4f}", f"{r['quantize_s']:.1f}" if "quantize_s" in r else "-"]
        for name, rs in result.items() for r in rs
    ]  # fmt: skip
    report.append(args.results, "T5 quantization (median encode time)", args.device, [report.table(header, rows)])


if __name__ == "__main__":
    main()
