"""Where a back-to-back denoising step's time goes beyond its kernels: clocks, power and the library floor.

    python -m bench.probe_power --size 1024x1024 --out $OUT/power.json

On the GPU, for the compiled fp8 model replayed as a CUDA graph (as the pipeline runs it), four phases, each
with `nvidia-smi` sampling SM clock, power and the active clock-limit reasons every 100 ms:
1. spaced: single steps with a 0.3 s pause before each (the GPU cools between them);
2. sustained: steps back to back (as in a 28-step image);
3. floor: only the step's GEMMs (`torch._scaled_mm` at the model's shapes, per-token x per-channel scales),
   only its attention calls (SDPA, cuDNN), and both, each as one CUDA graph replayed back to back;
4. kernels: a profile of back-to-back steps: the sum of kernel times per step by kind, and what is left
   between them.
Achieved TFLOP/s of the GEMMs and the attention come from the model's FLOP count.
"""

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

import float8_quantize as f8
from bench.bench_flow import MODES, inputs, params, random_model
from bench.profile_step import classify
from cuda_graphs import GraphedFlow
from flux_pipeline import compile_flow_model


def smi_fields() -> str:
    """Older drivers name the clock-limit reasons 'throttle', newer ones 'event'."""
    for reasons in ("clocks_event_reasons.active", "clocks_throttle_reasons.active"):
        probe = subprocess.run(["nvidia-smi", f"--query-gpu={reasons}", "--format=csv"], capture_output=True)
        if probe.returncode == 0:
            return f"clocks.sm,power.draw,temperature.gpu,{reasons}"
    return "clocks.sm,power.draw,temperature.gpu,name"


class Smi:
    """`nvidia-smi` sampling in the background for the duration of a `with` block."""

    def __enter__(self):
        self.file = tempfile.NamedTemporaryFile("w+", suffix=".csv")
        cmd = ["nvidia-smi", "-i", "0", f"--query-gpu={smi_fields()}", "--format=csv,noheader,nounits", "-lms", "100"]
        self.proc = subprocess.Popen(cmd, stdout=self.file, stderr=subprocess.DEVNULL)
        time.sleep(0.3)
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(10)
        self.file.seek(0)
        rows = [line.split(", ") for line in self.file.read().splitlines() if line.count(",") == 3]
        self.file.close()
        numbers = [(float(r[0]), float(r[1]), float(r[2]), r[3]) for r in rows if r[0].strip().isdigit()]
        if numbers:
            self.summary = {
                "samples": len(numbers),
                "sm_mhz_median": statistics.median(n[0] for n in numbers),
                "sm_mhz_min": min(n[0] for n in numbers),
                "power_w_median": statistics.median(n[1] for n in numbers),
                "power_w_max": max(n[1] for n in numbers),
                "temp_c_max": max(n[2] for n in numbers),
                "limit_reasons": sorted({n[3] for n in numbers}),
            }
        else:
            self.summary = {"samples": 0}


def timed(fn, reps: int, pause: float = 0.0) -> list[float]:
    """ms per call; back to back (events only, one sync at the end) unless `pause` > 0."""
    events = []
    for _ in range(reps):
        if pause:
            torch.cuda.synchronize()
            time.sleep(pause)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in events]


def gemm_shapes(p: dict, img_tokens: int, txt_tokens: int = 512) -> list[tuple[int, int, int, int]]:
    """(count, M, K, N) of every fp8 linear of one step."""
    d, mlp = p["hidden_size"], int(p["hidden_size"] * p["mlp_ratio"])
    shapes = []
    for m in (img_tokens, txt_tokens):
        shapes += [(p["depth"], m, d, 3 * d), (p["depth"], m, d, d), (p["depth"], m, d, mlp), (p["depth"], m, mlp, d)]
    m = img_tokens + txt_tokens
    shapes += [(p["depth_single_blocks"], m, d, 3 * d + mlp), (p["depth_single_blocks"], m, d + mlp, d)]
    return shapes


def graphed(fn):
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def floor_calls(p: dict, img_tokens: int):
    """Callables running only the step's GEMMs, only its attention, and the FLOP count of each."""
    dev = "cuda"
    gemms, gemm_flop = [], 0
    for count, m, k, n in gemm_shapes(p, img_tokens):
        a = torch.randn(m, k, device=dev).to(torch.float8_e4m3fn)
        b = torch.randn(n, k, device=dev).to(torch.float8_e4m3fn).t()
        sa, sb = torch.rand(m, 1, device=dev) + 0.5, torch.rand(1, n, device=dev) + 0.5
        bias = torch.randn(n, device=dev, dtype=torch.bfloat16)
        gemms.append((a, b, sa, sb, bias))
        for _ in range(count - 1):  # every layer its own weight, as in the model (no help from the L2 cache)
            gemms.append((a, torch.randn(n, k, device=dev).to(torch.float8_e4m3fn).t(), sa, sb, bias))
        gemm_flop += 2 * m * k * n * count
    heads, dim = p["num_heads"], p["hidden_size"] // p["num_heads"]
    seq = img_tokens + 512
    q, k, v = (torch.randn(1, heads, seq, dim, device=dev, dtype=torch.bfloat16) for _ in range(3))
    blocks = p["depth"] + p["depth_single_blocks"]
    attn_flop = 4 * seq * seq * dim * heads * blocks

    def run_gemms():
        for a, b, sa, sb, bias in gemms:
            torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, bias=bias, out_dtype=torch.bfloat16, use_fast_accum=True)

    def run_attention():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            for _ in range(blocks):
                F.scaled_dot_product_attention(q, k, v)

    def run_both():
        run_gemms()
        run_attention()

    return run_gemms, run_attention, run_both, gemm_flop, attn_flop


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1024x1024")
    ap.add_argument("--reps", type=int, default=60)
    ap.add_argument("--out")
    args = ap.parse_args()
    h, w = (int(v) for v in args.size.split("x"))
    p = params(False)
    result: dict = {"size": args.size, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}

    def report(key, times=None, smi=None, **extra):
        entry = dict(extra)
        if times:
            entry.update(ms_median=statistics.median(times), ms_first5=statistics.median(times[:5]),
                         ms_last10=statistics.median(times[-10:]))  # fmt: skip
        if smi:
            entry["smi"] = smi.summary
        result[key] = entry
        print(key, json.dumps(entry), flush=True)

    img_tokens = (h // 16) * (w // 16)
    run_gemms, run_attention, run_both, gemm_flop, attn_flop = floor_calls(p, img_tokens)
    for name, fn, flop in (("floor_gemms", run_gemms, gemm_flop), ("floor_attention", run_attention, attn_flop),
                           ("floor_both", run_both, gemm_flop + attn_flop)):  # fmt: skip
        replay = graphed(fn)
        timed(replay, 3)
        with Smi() as smi:
            times = timed(replay, args.reps // 2)
        report(name, times, smi, tflops=flop / statistics.median(times) / 1e9)
    del run_gemms, run_attention, run_both
    torch.cuda.empty_cache()

    ws, acts, fast = MODES["fp8 ch/tok"]
    model = f8.quantize_flow_model(random_model(p, "cuda", torch.bfloat16), f8.F8Settings(ws, acts), fast_accum=fast)
    compile_flow_model(model)
    x = inputs(p, h, w, "cuda", torch.bfloat16)
    step = GraphedFlow(model)
    with torch.no_grad():
        timed(lambda: step(**x), 3)
        with Smi() as smi:
            times = timed(lambda: step(**x), 10, pause=0.3)
        report("spaced", times, smi)
        with Smi() as smi:
            times = timed(lambda: step(**x), args.reps)
        report("sustained", times, smi)
        timed(lambda: step(**x), 20)
        n = 5
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            times = timed(lambda: step(**x), n)
        kinds: dict[str, float] = {}
        for e in prof.key_averages():
            if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time_total > 0:
                kind = classify(e.key)
                kinds[kind] = kinds.get(kind, 0.0) + e.device_time_total / 1000 / n
        kernels = sum(kinds.values())
        report("kernels", times, per_step_ms={k: round(v, 2) for k, v in kinds.items()}, kernel_sum_ms=kernels,
               gemm_tflops=gemm_flop / kinds.get("gemm", float("nan")) / 1e9,
               attention_tflops=attn_flop / kinds.get("attention", float("nan")) / 1e9)  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
