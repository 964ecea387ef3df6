"""Loading the full-size flow model straight to fp8: peak GPU memory and time, bf16 and prequantized files.

    python -m bench.bench_load --dir /tmp/flux-load --out $OUT/load.json

Writes a random full-size FLUX.1-dev checkpoint in bf16 (about 24 GB) to --dir, then, each in a fresh
process: loads it into the fp8 model (quantizing tensor by tensor on the GPU), writes the prequantized file,
and loads that.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CHILD = """
import json, sys, time, torch
import float8_quantize as f8
from util import load_config, load_flow_model
cfg = load_config({config!r}, ckpt_path={ckpt!r}, ae_path={ckpt!r}, prequantized_flow={pre}, flux_device="cuda:0")
torch.cuda.synchronize(); t = time.perf_counter()
model = load_flow_model(cfg)
torch.cuda.synchronize(); seconds = time.perf_counter() - t
resident = sum(x.numel() * x.element_size() for x in [*model.parameters(), *model.buffers()])
if {save!r}:
    f8.save_prequantized(model, {save!r}, f8.metadata_for(cfg.f8_settings, cfg.params.model_dump(), cfg.flow_dtype))
print(json.dumps(dict(seconds=seconds, peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                      model_gib=resident / 2**30)))
"""


def child(config: str, ckpt: str, pre: bool, save: str | None) -> dict:
    code = CHILD.format(config=config, ckpt=ckpt, pre=pre, save=save)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=900)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from safetensors.torch import save_file

    from bench.bench_flow import params, random_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/flux-load")
    ap.add_argument("--out")
    args = ap.parse_args()
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    bf16_path, fp8_path = Path(args.dir) / "flux-bf16.safetensors", Path(args.dir) / "flux-fp8.safetensors"
    config = str(ROOT / "configs" / "config-dev-1-H100.json")
    t = time.perf_counter()
    model = random_model(params(False), "cuda", torch.bfloat16)
    save_file({k: v.cpu() for k, v in model.state_dict().items()}, bf16_path)
    del model
    torch.cuda.empty_cache()
    print(f"wrote {bf16_path} ({bf16_path.stat().st_size / 2**30:.1f} GiB) in {time.perf_counter() - t:.0f} s")
    # the config's text encoder paths are repo ids: only the flow model is loaded here
    result = {"bf16 checkpoint -> fp8": child(config, str(bf16_path), False, str(fp8_path))}
    result["prequantized -> fp8"] = child(config, str(fp8_path), True, None)
    result["file_gib"] = {"bf16": bf16_path.stat().st_size / 2**30, "fp8": fp8_path.stat().st_size / 2**30}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
