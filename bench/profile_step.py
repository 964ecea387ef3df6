"""Where one compiled 1024x1024 denoising step spends its GPU time, per kernel, for a few fp8 modes.

python -m bench.profile_step --modes "fp8 ch/tok,fp8 ten/ten"
"""

import argparse
import copy

import torch
from torch.profiler import ProfilerActivity, profile

import float8_quantize as f8
from bench.bench_flow import MODES, inputs, params, random_model
from flux_pipeline import compile_flow_model


def classify(name: str) -> str:
    n = name.lower()
    if "flash" in n or "fmha" in n or "cudnn" in n and "attn" in n or "sdpa" in n:
        return "attention"
    if "gemm" in n or "cutlass" in n or "sm90_xmma" in n or "nvjet" in n or "matmul" in n:
        return "gemm"
    if "triton" in n or "quantize_kernel" in n:
        return "triton (fused elementwise/quant)"
    return "other"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", default="fp8 ch/tok,fp8 ten/ten")
    ap.add_argument("--size", default="1024x1024")
    ap.add_argument("--top", type=int, default=22, help="how many kernels to list, longest first")
    args = ap.parse_args()
    p = params(False)
    h, w = (int(v) for v in args.size.split("x"))
    base = random_model(p, "cuda", torch.bfloat16)
    x = inputs(p, h, w, "cuda", torch.bfloat16)
    for label in args.modes.split(","):
        torch._dynamo.reset()
        if label == "bf16":
            model = base
        else:
            ws, acts, fast = MODES[label]
            model = f8.quantize_flow_model(copy.deepcopy(base), f8.F8Settings(ws, acts), fast_accum=fast)
        compile_flow_model(model)
        with torch.no_grad():
            for _ in range(3):
                model(**x)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
                model(**x)
                torch.cuda.synchronize()
        totals: dict[str, float] = {}
        kernels = []
        for e in prof.key_averages(group_by_input_shape=True):
            if e.key == "aten::_scaled_mm":
                print(f"_scaled_mm {e.input_shapes[:2]}: {e.count}x, {e.device_time_total / 1000:.2f} ms")
        for e in prof.key_averages():
            t = e.device_time_total / 1000  # ms
            if t <= 0 or e.device_type != torch.autograd.DeviceType.CUDA:
                continue
            totals[classify(e.key)] = totals.get(classify(e.key), 0) + t
            kernels.append((t, e.count, e.key[:150]))
        print(
            f"\n== {label}: total {sum(totals.values()):.1f} ms GPU; "
            + ", ".join(f"{k} {v:.1f}" for k, v in sorted(totals.items(), key=lambda kv: -kv[1]))
        )
        for t, c, k in sorted(kernels, reverse=True)[: args.top]:
            print(f"{t:8.2f} ms {c:5d}x  {k}")
        if label != "bf16":
            del model
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
