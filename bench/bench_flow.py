"""Flow transformer benchmark: bf16 against each fp8 mode, eager and compiled, same weights and inputs.

Builds the full-size FLUX.1-dev architecture with random weights (std 0.02) on the GPU, then measures:
median ms/step and it/s per image size, peak memory, compile time, and accuracy two ways that do not depend
on the random init: per Linear (each quantized layer on the exact input it receives in a bf16 forward,
against a float64 matmul) and per block (each block's residual update from a float32 block input cast to
bf16, against the float32 block). Guidance 4.0 (exact in bf16). Variants take options after '@' (see
`options` and `measure`); by default the compiled ones replay CUDA graphs ('@graph'), as the pipeline does, and
'@loop' times whole 28-step denoising loops.

    python -m bench.bench_flow --out $OUT/flow.json            # H200
    python -m bench.bench_flow --tiny --device cpu --reps 2     # smoke test of the script itself
"""

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

import float8_quantize as f8
from bench import report
from bench.accuracy import per_block_errors, per_linear_errors, summary
from cuda_graphs import GraphedFlow
from flux_pipeline import compile_flow_model
from kernels import fp8_attention
from kernels.options import KernelOptions
from modules import sampling
from modules.flux_model import Flux, FluxParams

ROOT = Path(__file__).resolve().parent.parent
MODES = {  # name: (weight scaling, activation scaling, fast accumulation)
    "fp8 ch/tok": ("per_channel", "dynamic_per_token", True),
    "fp8 ch/tok exact-acc": ("per_channel", "dynamic_per_token", False),
    "fp8 ten/ten": ("per_tensor", "dynamic_per_tensor", True),
    "fp8 ten/static": ("per_tensor", "static_per_tensor", True),
    "fp8 ch/static": ("per_channel", "static_per_tensor", True),
}

FP8_ATTN = "fp8 ch/tok + fp8 attention"  # the opt-in fast mode (`--fp8-attention`)


def architecture_config(tiny: bool) -> dict:
    """The shipped config of the tiny demo or of full-size FLUX.1-dev, as a dict."""
    name = "config-tiny-cpu.json" if tiny else "config-dev-1-H100.json"
    return json.loads((ROOT / "configs" / name).read_text())


def params(tiny: bool) -> dict:
    return architecture_config(tiny)["params"]


def random_weights_config(tiny: bool, **overrides) -> dict:
    """A config for a pipeline the benchmark fills with random weights itself: its file paths name the demo's
    files, which exist, so the config's path checks pass."""
    files = ROOT / "configs" / "tiny"
    return dict(
        architecture_config(tiny), ckpt_path=str(files / "flux-tiny.safetensors"),
        ae_path=str(files / "ae-tiny.safetensors"), text_enc_path=str(files / "t5"), clip_path=str(files / "clip"),
        **overrides,
    )  # fmt: skip


@torch.no_grad()
def random_model(p: dict, device: str, dtype: torch.dtype, seed: int = 0) -> Flux:
    with torch.device("meta"):
        model = Flux(FluxParams(**p))
    model = model.to_empty(device=device).to(dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, t in model.named_parameters():
        if name.endswith(".scale"):
            t.fill_(1.0)  # RMSNorm gains: real checkpoints hold O(1) values
        else:
            t.copy_(torch.randn(t.shape, generator=gen, device=device, dtype=torch.float32) * 0.02)
    return model.eval().requires_grad_(False)


def inputs(p: dict, height: int, width: int, device: str, dtype: torch.dtype, seed: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    img = sampling.pack(torch.randn(1, 16, height // 8, width // 8, generator=gen))
    return dict(
        img=img.to(device, dtype),
        img_ids=sampling.img_ids(1, height, width).to(device),
        txt=torch.randn(1, 512, p["context_in_dim"], generator=gen).to(device, dtype),
        txt_ids=sampling.txt_ids(1, 512).to(device),
        timesteps=torch.full((1,), 0.5, device=device),
        y=torch.randn(1, p["vec_in_dim"], generator=gen).to(device, dtype),
        guidance=torch.full((1,), 4.0, device=device),
    )


def kernel_options(label: str) -> KernelOptions:
    """The kernels a variant runs: the fp8 attention for the fast mode (`FP8_ATTN`), and the label's options:
    '@flash': flash attention first instead of cuDNN; '@twopass': the MLP outputs' GELU+concat+quantization as
    torch ops (inductor-fused when compiled) instead of the one-pass kernel; '@nonorm': the same for
    LayerNorm+modulation+quantization; '@noqk': the QK-norm + rotary embedding as torch
    ops instead of `kernels.qk_norm_rope`; '@exacttanh' / '@fasttanh': the GELU kernel's tanh computed exactly /
    as the GPU's approximate instruction (the default)."""
    tags = {"@flash": "cudnn_attention", "@twopass": "fused_gelu", "@nonorm": "fused_norm", "@noqk": "qk_kernel"}
    changes = {field: False for tag, field in tags.items() if tag in label}
    if "@exacttanh" in label or "@fasttanh" in label:
        changes["fast_tanh"] = "@fasttanh" in label
    return KernelOptions(fp8_attention=label.split("@")[0] == FP8_ATTN, **changes)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def time_forward(model, x: dict, reps: int, device: str) -> float:
    """Median ms per forward (one denoising step)."""
    for _ in range(3):
        model(**x)
    times = []
    for _ in range(reps):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(**x)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            model(**x)
            times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


@torch.no_grad()
def time_loop(model, x: dict, reps: int, device: str, table: bool, steps: int = 28) -> float:
    """Median ms per step of whole `steps`-step denoising loops (`sampling.denoise`, as the pipeline runs it):
    everything done once per image (the modulation table, the rotary embedding) is shared among the steps.
    `table=False` hides `modulation_table` from the loop, which then computes the modulations every step."""
    schedule = sampling.get_schedule(steps, x["img"].shape[1])
    call = model if table else (lambda **kw: model(**kw))
    img = x["img"].float()

    def run():
        return sampling.denoise(call, img, x["img_ids"], x["txt"], x["txt_ids"], x["y"], schedule, 4.0)

    run()  # warm-up (and graph capture)
    times = []
    for _ in range(max(2, reps // 5)):
        sync(device)
        t = time.perf_counter()
        run()
        sync(device)
        times.append(1000 * (time.perf_counter() - t) / steps)
    return statistics.median(times)


def measure(model, x: dict, reps: int, device: str, label: str = "") -> tuple[float, float]:
    """Median ms per step and peak GiB (the model's own bytes plus what the forward allocates on top).
    '@graph' in the label: the forward replays as a CUDA graph (`cuda_graphs.GraphedFlow`), as the pipeline
    runs it. '@loop': per step of a 28-step denoising loop (`time_loop`); '@loop@notable' without the
    modulation table."""
    model.set_kernel_options(kernel_options(label))
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    step_model = GraphedFlow(model) if "@graph" in label else model
    if "@loop" in label:
        ms = time_loop(step_model, x, reps, device, table="@notable" not in label)
    else:
        ms = time_forward(step_model, x, reps, device)
    peak = (torch.cuda.max_memory_allocated() - base + model_bytes(model)) if device.startswith("cuda") else 0
    return ms, peak / 2**30


def model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="tiny architecture (smoke test)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sizes", default="1024x1024,768x768,1024x720")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument(
        "--compile",
        default=f"fp8 ch/tok@graph,{FP8_ATTN}@graph,bf16@graph,fp8 ch/tok@graph@loop,fp8 ch/tok,fp8 ten/ten@graph,"
        "fp8 ten/static@graph",
        help="comma-separated variants to also time compiled ('' for none); '@graph' is how the pipeline runs them",
    )
    ap.add_argument(
        "--eager-extra",
        default="fp8 ch/tok@flash,bf16@flash",
        help="more eager variants: a mode with '@flash', '@twopass', '@nonorm', '@noqk' and/or '@graph'",
    )
    ap.add_argument("--modes", default=",".join(MODES), help="fp8 modes to build (accuracy and eager timing)")
    ap.add_argument("--eager", default=None, help="variants to time eagerly (default: every built one)")
    ap.add_argument(
        "--fp8-attention",
        nargs="?",
        const="on",
        default="auto",
        choices=["auto", "on", "off"],
        help=f"build '{FP8_ATTN}', the default fp8 mode with the opt-in fp8 attention (config fp8_attention); "
        "auto (default): where the GPU and the cuDNN frontend can run it",
    )
    ap.add_argument("--budget-s", type=float, default=480, help="skip compiled variants once this much time passed")
    ap.add_argument("--out", default=None)
    ap.add_argument("--results", default=None, help="append the tables here ('' for nowhere; default RESULTS.md)")
    args = ap.parse_args()
    if args.results is None:
        args.results = report.default_path(args.tiny)
    t0 = time.perf_counter()
    p, dev = params(args.tiny), args.device
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    result = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if dev.startswith("cuda") else dev,
        "sizes": args.sizes,
        "timing": {},
        "accuracy": {},
    }

    bf16 = random_model(p, dev, torch.bfloat16)
    variants = {"bf16": bf16}
    for name, (w, a, fast) in MODES.items():
        if name not in args.modes.split(","):
            continue
        model = f8.quantize_flow_model(copy.deepcopy(bf16), f8.F8Settings(w, a), fast_accum=fast)
        if a == "static_per_tensor":
            f8.calibrate(model, torch.bfloat16)
        variants[name] = model
    if fp8_attention_wanted(args.fp8_attention, dev, p):
        w, a, fast = MODES["fp8 ch/tok"]
        variants[FP8_ATTN] = f8.quantize_flow_model(copy.deepcopy(bf16), f8.F8Settings(w, a), fast_accum=fast)
        variants[FP8_ATTN].set_kernel_options(KernelOptions(fp8_attention=True))
    sync(dev)
    print(f"built {len(variants)} variants in {time.perf_counter() - t0:.0f} s", flush=True)

    x = inputs(p, *sizes[0], dev, torch.bfloat16)
    lin = per_linear_errors(bf16, {k: v for k, v in variants.items() if k != "bf16"}, x)
    blk = per_block_errors(bf16, variants, x)
    result["accuracy"] = {k: {"per_linear": summary(lin[k]), "per_block": summary(blk[k])} for k in variants}
    print(f"accuracy done at {time.perf_counter() - t0:.0f} s", flush=True)

    eager = [*variants, *[e for e in args.eager_extra.split(",") if e]]
    if args.eager is not None:
        eager = [e for e in args.eager.split(",") if e]
    for label in eager:
        if label.split("@")[0] not in variants:
            print(f"skipped {label}: not built", flush=True)
            continue
        model = variants[label.split("@")[0]]
        for size in sizes:
            x = inputs(p, *size, dev, torch.bfloat16)
            ms, peak = measure(model, x, args.reps, dev, label)
            result["timing"][f"{label} eager {size[0]}x{size[1]}"] = {"ms": ms, "it_s": 1000 / ms, "peak_gib": peak}
        print(f"{label} eager done at {time.perf_counter() - t0:.0f} s", flush=True)
    for label in [c for c in args.compile.split(",") if c]:
        if time.perf_counter() - t0 > args.budget_s or label.split("@")[0] not in variants:
            print(f"skipped compiled {label}: over the time budget or not built", flush=True)
            continue
        torch._dynamo.reset()
        model = compile_flow_model(variants[label.split("@")[0]])
        model.set_kernel_options(kernel_options(label))  # before compiling: they are traced in
        for size in sizes:
            x = inputs(p, *size, dev, torch.bfloat16)
            t = time.perf_counter()
            with torch.no_grad():
                model(**x)  # compiles at this size
            sync(dev)
            first = time.perf_counter() - t
            ms, peak = measure(model, x, args.reps, dev, label)
            result["timing"][f"{label} compiled {size[0]}x{size[1]}"] = {
                "ms": ms,
                "it_s": 1000 / ms,
                "peak_gib": peak,
                "first_call_s": first,
            }
        print(f"{label} compiled done at {time.perf_counter() - t0:.0f} s", flush=True)

    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    tables = results_tables(result)
    print("\n" + "\n\n".join(tables))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    report.append(args.results, f"Flow transformer ({args.reps} timed steps, median)", dev, tables)


def fp8_attention_wanted(choice: str, device: str, p: dict) -> bool:
    """Whether to build the fast mode's variant: `on`, or `auto` where it can run (it says why not)."""
    if choice != "auto":
        return choice == "on"
    problem = fp8_attention.unsupported(torch.device(device), p["hidden_size"] // p["num_heads"])
    if problem:
        print(f"not building '{FP8_ATTN}': fp8_attention {problem}", flush=True)
    return problem is None


def results_tables(result: dict) -> list[str]:
    def pct(s: dict) -> str:
        return f"{100 * s['median']:.2f}% / {100 * s['max']:.2f}%"

    accuracy = report.table(
        ["variant", "per-Linear median / max", "per-block median / max"],
        [[k, pct(v["per_linear"]), pct(v["per_block"])] for k, v in result["accuracy"].items()],
    )
    timing = report.table(
        ["variant", "ms/step", "it/s", "peak GiB", "first call s"],
        [
            [k, f"{v['ms']:.1f}", f"{v['it_s']:.2f}", f"{v['peak_gib']:.2f}", f"{v.get('first_call_s', 0):.1f}"]
            for k, v in result["timing"].items()
        ],
    )
    return [accuracy, timing]


if __name__ == "__main__":
    main()
