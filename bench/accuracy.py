"""Accuracy of flow-model variants against the bf16 model, two ways that do not depend on the random init: per
Linear (each quantized layer on the exact input it receives in a bf16 forward, against a float64 matmul) and per
block (each block's residual update from a float32 block input cast to bf16, against the float32 block)."""

import copy
import statistics

import torch
import torch.nn.functional as F

import float8_quantize as f8
from modules.flux_model import Flux, timestep_embedding


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@torch.no_grad()
def per_linear_errors(bf16: Flux, fp8_models: dict, x: dict) -> dict[str, list[float]]:
    """Each layer that is fp8 in the default flags, on its exact bf16-forward input, against float64."""
    settings = f8.F8Settings()
    errors = {"bf16": [], **{name: [] for name in fp8_models}}
    layers = {n: m for n, m in fp8_models[next(iter(fp8_models))].named_modules() if isinstance(m, f8.F8Linear)}
    by_name = {name: dict(model.named_modules()) for name, model in fp8_models.items()}
    hooks = []
    for name, linear in bf16.named_modules():
        if name not in layers or not f8.quantized_layer(name, settings):
            continue

        def hook(module, args, out, name=name):
            inp = args[0]
            ref = F.linear(inp.double(), module.weight.double(), module.bias.double())
            errors["bf16"].append(rel(out, ref))
            for mode, modules in by_name.items():
                errors[mode].append(rel(modules[name](inp), ref))

        hooks.append(linear.register_forward_hook(hook))
    try:
        bf16(**x)
    finally:
        for h in hooks:
            h.remove()
    return errors


@torch.no_grad()
def per_block_errors(bf16: Flux, variants: dict, x: dict) -> dict[str, list[float]]:
    """Residual update of every block from a float32 input cast to bf16, against the float32 block."""
    device = x["img"].device
    f32 = {k: v.float() if v.is_floating_point() else v for k, v in x.items()}
    ext = copy.deepcopy(bf16).float()  # only the embedders and final layer are used from this copy
    ext.double_blocks, ext.single_blocks = torch.nn.ModuleList(), torch.nn.ModuleList()
    vec = ext.time_in(timestep_embedding(f32["timesteps"], 256))
    vec = vec + ext.guidance_in(timestep_embedding(f32["guidance"], 256)) + ext.vector_in(f32["y"])
    img, txt = ext.img_in(f32["img"]), ext.txt_in(f32["txt"])
    pe = ext.pe_embedder(torch.cat((f32["txt_ids"], f32["img_ids"]), dim=1))
    errors = {name: [] for name in variants}
    for i in range(len(bf16.double_blocks)):
        ref_block = copy.deepcopy(bf16.double_blocks[i]).float()
        img_out, txt_out = ref_block(img=img, txt=txt, vec=vec, pe=pe)
        ref = torch.cat([img_out - img, txt_out - txt], dim=1)
        for name, model in variants.items():
            ib, tb, vb = img.to(model.dtype), txt.to(model.dtype), vec.to(model.dtype)
            io, to = model.double_blocks[i](img=ib, txt=tb, vec=vb, pe=pe)
            errors[name].append(rel(torch.cat([io.float() - ib.float(), to.float() - tb.float()], dim=1), ref))
        img, txt = img_out, txt_out
        del ref_block
    h = torch.cat((txt, img), 1)
    for i in range(len(bf16.single_blocks)):
        ref_block = copy.deepcopy(bf16.single_blocks[i]).float()
        out = ref_block(h, vec=vec, pe=pe)
        for name, model in variants.items():
            hb = h.to(model.dtype)
            errors[name].append(
                rel(model.single_blocks[i](hb, vec=vec.to(model.dtype), pe=pe).float() - hb.float(), out - h)
            )
        h = out
        del ref_block
    del ext
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return errors


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "max": max(values), "n": len(values)}
