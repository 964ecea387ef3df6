"""Where the autoencoder's decode holds its GPU memory: the peak while each convolution and GroupNorm runs, above what
was allocated before the decode, for a full-size random autoencoder; with the banded convolutions and upsampling
on and off, and the largest difference between their outputs.

    python -m bench.profile_decode --size 1024
"""

import argparse
import dataclasses

import torch
from torch import nn

from bench.bench_flow import architecture_config
from kernels.options import KernelOptions
from modules.autoencoder import AutoEncoder, AutoEncoderParams, GroupNorm


def profile(ae: AutoEncoder, z: torch.Tensor, top: int) -> tuple[float, torch.Tensor, list]:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    marks = []

    def pre(module, args):
        torch.cuda.synchronize()
        marks.append([module._profile_name, torch.cuda.memory_allocated() - base])
        torch.cuda.reset_peak_memory_stats()

    def post(module, args, out):
        torch.cuda.synchronize()
        marks[-1].append(torch.cuda.max_memory_allocated() - base)

    hooks = []
    for name, m in ae.decoder.named_modules():
        if isinstance(m, (nn.Conv2d, GroupNorm)):
            m._profile_name = name
            hooks += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        out = ae.decode(z)
    torch.cuda.synchronize()
    for h in hooks:
        h.remove()
    marks.sort(key=lambda m: -m[2])
    peak = max(m[2] for m in marks)
    return peak / 2**30, out, marks[:top]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--top", type=int, default=6)
    args = ap.parse_args()
    cfg = architecture_config(False)
    with torch.device("cuda"):
        ae = AutoEncoder(AutoEncoderParams(**cfg["ae_params"])).to(torch.bfloat16).eval().requires_grad_(False)
    z = torch.randn(1, 16, args.size // 8, args.size // 8, device="cuda", dtype=torch.bfloat16)
    outs = {}
    for band in (0, 128, 32):
        ae.set_kernel_options(dataclasses.replace(KernelOptions(), decode_band_mib=band))
        profile(ae, z, args.top)  # warm (cuDNN's choices, allocator)
        peak, out, marks = profile(ae, z, args.top)
        outs[band] = out
        print(f"bands {band} MiB: decode peak {peak:.3f} GiB above the model", flush=True)
        for name, before, top in marks:
            print(f"   {name:40s} live before {before / 2**30:.3f}  peak {top / 2**30:.3f}")
    for band in (128, 32):
        diff = (outs[band].float() - outs[0].float()).abs().max().item()
        print(f"bands {band} MiB against whole: max abs difference {diff:.3g}")


if __name__ == "__main__":
    main()
