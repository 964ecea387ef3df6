"""The one-pass GELU+concat+quantize kernel against the same math as torch ops compiled by inductor (two passes),
on the FLUX.1 shapes at 1024x1024 (single block linear2, double block img and txt mlp.2).

    python -m bench.bench_kernels
"""

import statistics

import torch

from kernels import fp8_linear

SHAPES = {
    "single linear2": (4608, 3072, 12288),
    "double img mlp.2": (4096, 0, 12288),
    "double txt mlp.2": (512, 0, 12288),
}


def timed(fn, reps: int = 50) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return statistics.median(times)


def main() -> None:
    two_pass = torch.compile(fp8_linear.gelu_concat_quantize_reference, dynamic=False)
    print("| shape | one-pass us | inductor us | one-pass GB/s | config |")
    print("| --- | --- | --- | --- | --- |")
    for name, (m, ka, kb) in SHAPES.items():
        linear1 = torch.randn(m, 9216 + kb, device="cuda", dtype=torch.bfloat16)
        b = linear1[:, 9216:]
        a = torch.randn(m, ka, device="cuda", dtype=torch.bfloat16) if ka else None
        ours = timed(lambda a=a, b=b: fp8_linear.gelu_concat_quantize(a, b))
        theirs = timed(lambda a=a, b=b: two_pass(a, b))
        q1, s1 = fp8_linear.gelu_concat_quantize(a, b)
        q2, s2 = two_pass(a, b)
        same = (q1.view(torch.uint8) == q2.view(torch.uint8)).float().mean().item()
        moved = m * (ka + kb) * 2 + m * (ka + kb)  # bf16 in, e4m3 out
        config = fp8_linear._gelu_concat_quantize_kernel.best_config
        print(
            f"| {name} {m}x({ka}+{kb}) | {ours:.1f} | {theirs:.1f} | {moved / ours / 1e3:.0f} | {config} "
            f"(equal bytes {100 * same:.3f}%) |"
        )


if __name__ == "__main__":
    main()
