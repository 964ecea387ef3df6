"""LoRA hot swap on the full-size fp8 flow model: load/unload times, no recompiles, exact restore.

    python -m bench.bench_lora --out $OUT/lora.json      # H200 (random weights, rank 64, every linear)

Builds the full-size FLUX.1-dev flow model with random weights, quantizes it to fp8 (default settings),
compiles its blocks and runs one 1024x1024 step. Then, through `FluxPipeline.load_lora/unload_lora` and a
BFL-format rank-64 LoRA file covering every linear layer: the first load (which also settles each touched
layer's way back once, unless `--prepare` did), unload, a second LoRA, stacking both, a scale change, and
unloading everything. Checks that no block was recompiled and that the output after the last unload is
bit-identical to the output before the first load.

With `--checkpoint FILE` (a prequantized full-size file, e.g. the one `bench_serving` writes), the model is loaded
from it by the real loader. `--restore` picks where unloads restore from: GPU copies (`gpu`, the default where
the card has room), the file (`file`: `checkpoint_source`, no copies) or host copies (`host`, the old way). Host
memory (RSS, and its anonymous part, where pinned copies live) is recorded before and after; a swap is also timed
in its two halves (reading the new file, fusing).
"""

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch._dynamo.utils import counters

import float8_quantize as f8
from bench.bench_flow import inputs, params, random_model, random_weights_config
from flux_pipeline import FluxPipeline, compile_flow_model
from lora_fusing import LoadedLora
from lora_loading import read_lora
from util import checkpoint_source, load_flow_model, spec_from_dict

ROOT = Path(__file__).resolve().parent.parent


def lora_file(model: torch.nn.Module, rank: int, seed: int, path: Path) -> tuple[int, int]:
    """A BFL-native LoRA (lora_A/lora_B) on every linear layer; returns (layers, bytes)."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Linear, f8.F8Linear)):
            sd[f"{name}.lora_A.weight"] = (torch.randn(rank, m.in_features, generator=gen) * 0.01).bfloat16()
            sd[f"{name}.lora_B.weight"] = (torch.randn(m.out_features, rank, generator=gen) * 0.01).bfloat16()
    save_file(sd, path)
    return len(sd) // 2, path.stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--tiny", action="store_true", help="tiny architecture on any device (smoke test)")
    ap.add_argument("--size", default="1024x1024")
    ap.add_argument("--workdir", default="/tmp")
    ap.add_argument("--pageable", action="store_true", help="pageable host backups (pin_lora_backups=False)")
    ap.add_argument("--prepare", action="store_true", help="FluxPipeline.prepare_loras() first, timed (the server "
                    "does it at start-up with --lora-dir)")  # fmt: skip
    ap.add_argument("--no-compile", action="store_true", help="eager blocks (LoRA times do not depend on it)")
    ap.add_argument("--checkpoint", help="a prequantized flow checkpoint to load the model from")
    ap.add_argument("--restore", choices=["gpu", "file", "host"], default="gpu", help="where unloads restore from: "
                    "GPU copies (as much as the card has room for: FLUX.1 all on an H200), the --checkpoint file (no "
                    "GPU copies), or host copies (neither)")  # fmt: skip
    ap.add_argument("--out")
    args = ap.parse_args()
    dev = args.device
    p = params(args.tiny)
    cfg = random_weights_config(args.tiny, flux_device=dev, ae_device=dev, text_enc_device=dev)
    rss_start = host_memory()
    source = None
    if args.checkpoint:
        cfg.update(ckpt_path=args.checkpoint, prequantized_flow=True)
        spec = spec_from_dict(cfg)
        model = load_flow_model(spec)
        source = checkpoint_source(spec, model) if args.restore != "host" else None
    else:
        model = f8.quantize_flow_model(random_model(p, dev, torch.bfloat16), f8.F8Settings())
    cfg["lora_vram_gib"] = None if args.restore == "gpu" else 0
    pipe = FluxPipeline(
        spec_from_dict(cfg), model, None, None, None, pin_lora_backups=not args.pageable, lora_source=source
    )
    if not args.no_compile:
        compile_flow_model(model)
    height, width = (int(v) for v in args.size.split("x"))
    x = inputs(p, height, width, dev, torch.bfloat16)
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)

    def forward() -> torch.Tensor:
        with torch.inference_mode():
            out = model(**x)
        sync()
        return out

    t = time.perf_counter()
    before = forward()
    compile_s = time.perf_counter() - t
    graphs = counters["stats"]["unique_graphs"]
    work = Path(args.workdir)
    layers, size = lora_file(model, args.rank, 1, work / "lora_a.safetensors")
    lora_file(model, args.rank, 2, work / "lora_b.safetensors")
    result = {"pinned": not args.pageable, "prepared": args.prepare, "layers": layers, "rank": args.rank,
              "restore": args.restore if args.checkpoint or args.restore != "file" else "host",
              "rss_at_start": rss_start,
              "rss_before_loras": host_memory()}  # fmt: skip
    result["lora_file_mib"] = size / 2**20
    result["compile_s"] = compile_s

    def timed(label: str, fn) -> None:
        sync()
        t = time.perf_counter()
        fn()
        sync()
        result[label] = time.perf_counter() - t
        print(f"{label}: {result[label]:.3f} s", flush=True)

    if args.prepare:
        timed("prepare_loras_s", pipe.prepare_loras)
    timed("load_a_first_s", lambda: pipe.load_lora(work / "lora_a.safetensors", 1.0, "a"))
    result["rss_after_first_lora"] = host_memory()
    with_a = forward()
    timed("unload_a_s", lambda: pipe.unload_lora("a"))
    timed("load_b_s", lambda: pipe.load_lora(work / "lora_b.safetensors", 0.8, "b"))
    timed("stack_a_on_b_s", lambda: pipe.load_lora(work / "lora_a.safetensors", 1.0, "a"))
    timed("rescale_a_s", lambda: pipe.load_lora(work / "lora_a.safetensors", 0.5, "a"))
    forward()
    timed("unload_b_s", lambda: pipe.unload_lora("b"))
    timed("unload_a_again_s", lambda: pipe.unload_lora("a"))
    timed("load_a_again_s", lambda: pipe.load_lora(work / "lora_a.safetensors", 1.0, "a"))
    again = forward()

    # what the server does between requests of two LoRA sets: one change (`set_loras`), or unload then load
    timed("swap_a_to_b_s", lambda: pipe.set_loras({"b": (str(work / "lora_b.safetensors"), 1.0)}))
    timed("swap_b_to_a_s", lambda: pipe.set_loras({"a": (str(work / "lora_a.safetensors"), 1.0)}))

    def unload_then_load(old: str, new: str, path: Path) -> None:
        pipe.unload_lora(old)
        pipe.load_lora(path, 1.0, new)

    # the swap's two halves: reading and checking the new file (read_lora, convert_lora, to the GPU), and fusing
    timed("swap_read_s", lambda: pipe._read_deltas(*read_lora(str(work / "lora_b.safetensors"))))
    deltas, _ = pipe._read_deltas(*read_lora(str(work / "lora_b.safetensors")))
    timed("swap_fuse_s", lambda: pipe.loras.replace({"b": LoadedLora("b", "b", 1.0, deltas)}))
    timed("swap_fuse_back_s", lambda: pipe.set_loras({"a": (str(work / "lora_a.safetensors"), 1.0)}))
    timed("unload_a_load_b_s", lambda: unload_then_load("a", "b", work / "lora_b.safetensors"))
    timed("unload_b_load_a_s", lambda: unload_then_load("b", "a", work / "lora_a.safetensors"))
    pipe.unload_lora("a")
    after = forward()
    result["rss_at_end"] = host_memory()
    result["host_copies_gib"] = pipe.loras.host_bytes() / 2**30
    result["gpu_copies_gib"] = pipe.loras.device_bytes() / 2**30
    if dev.startswith("cuda"):
        result["gpu_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    result.update(
        recompiled_graphs=counters["stats"]["unique_graphs"] - graphs,
        lora_changes_output=not torch.equal(before, with_a),
        same_output_after_reload=torch.equal(with_a, again),
        bit_identical_after_unload=torch.equal(before, after),
    )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


def host_memory() -> dict[str, float]:
    """This process's resident host memory in GiB: all of it, its anonymous part (pinned copies), its file part."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            fields[key] = round(int(value.split()[0]) / 2**20, 2)
    return fields


if __name__ == "__main__":
    main()
