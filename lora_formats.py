"""The key names of the LoRA formats FLUX users download, mapped to BFL module names: kohya
(`lora_unet_double_blocks_0_...`), diffusers/PEFT (`transformer_blocks.0.attn.to_q`), OneTrainer
(`lora_transformer_...`), and the files refused with a clear error (LyCORIS LoKr/LoHa/OFT, BFL's control LoRAs).
`lora_loading` reads the tensors and checks them."""

import re

from torch import Tensor

from errors import LoraError

_KOHYA = [  # underscore form -> dotted BFL form, for the parts after the block index
    ("img_attn_qkv", "img_attn.qkv"),
    ("img_attn_proj", "img_attn.proj"),
    ("txt_attn_qkv", "txt_attn.qkv"),
    ("txt_attn_proj", "txt_attn.proj"),
    ("img_mlp_0", "img_mlp.0"),
    ("img_mlp_2", "img_mlp.2"),
    ("txt_mlp_0", "txt_mlp.0"),
    ("txt_mlp_2", "txt_mlp.2"),
    ("img_mod_lin", "img_mod.lin"),
    ("txt_mod_lin", "txt_mod.lin"),
    ("modulation_lin", "modulation.lin"),
    ("linear1", "linear1"),
    ("linear2", "linear2"),
]
_KOHYA_TOP = {
    "img_in": "img_in",
    "txt_in": "txt_in",
    "time_in_in_layer": "time_in.in_layer",
    "time_in_out_layer": "time_in.out_layer",
    "vector_in_in_layer": "vector_in.in_layer",
    "vector_in_out_layer": "vector_in.out_layer",
    "guidance_in_in_layer": "guidance_in.in_layer",
    "guidance_in_out_layer": "guidance_in.out_layer",
    "final_layer_linear": "final_layer.linear",
    "final_layer_adaLN_modulation_1": "final_layer.adaLN_modulation.1",
}


def kohya_name(key: str) -> str | None:
    name = key.removeprefix("lora_unet_")
    if name in _KOHYA_TOP:
        return _KOHYA_TOP[name]
    m = re.fullmatch(r"(double_blocks|single_blocks)_(\d+)_(\w+)", name)
    if m:
        for under, dotted in _KOHYA:
            if m.group(3) == under:
                return f"{m.group(1)}.{m.group(2)}.{dotted}"
    return None


def diffusers_targets(name: str, hidden: int) -> list[tuple[str, tuple[int, int] | None, bool]]:
    """diffusers module name -> [(BFL module, row block, swap halves)]."""
    h = hidden
    if m := re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", name):
        b, rest = f"double_blocks.{m.group(1)}", m.group(2)
        qkv = {
            "attn.to_q": ("img_attn.qkv", 0),
            "attn.to_k": ("img_attn.qkv", 1),
            "attn.to_v": ("img_attn.qkv", 2),
            "attn.add_q_proj": ("txt_attn.qkv", 0),
            "attn.add_k_proj": ("txt_attn.qkv", 1),
            "attn.add_v_proj": ("txt_attn.qkv", 2),
        }
        if rest in qkv:
            target, i = qkv[rest]
            return [(f"{b}.{target}", (i * h, (i + 1) * h), False)]
        plain = {
            "attn.to_out.0": "img_attn.proj",
            "attn.to_add_out": "txt_attn.proj",
            "ff.net.0.proj": "img_mlp.0",
            "ff.net.2": "img_mlp.2",
            "ff_context.net.0.proj": "txt_mlp.0",
            "ff_context.net.2": "txt_mlp.2",
            "norm1.linear": "img_mod.lin",
            "norm1_context.linear": "txt_mod.lin",
        }
        return [(f"{b}.{plain[rest]}", None, False)] if rest in plain else []
    if m := re.fullmatch(r"single_transformer_blocks\.(\d+)\.(.+)", name):
        b, rest = f"single_blocks.{m.group(1)}", m.group(2)
        qkv = {"attn.to_q": 0, "attn.to_k": 1, "attn.to_v": 2}
        if rest in qkv:
            i = qkv[rest]
            return [(f"{b}.linear1", (i * h, (i + 1) * h), False)]
        if rest == "proj_mlp":
            return [(f"{b}.linear1", (3 * h, None), False)]  # up to the end: the MLP's rows
        plain = {"proj_out": "linear2", "norm.linear": "modulation.lin"}
        return [(f"{b}.{plain[rest]}", None, False)] if rest in plain else []
    top = {
        "x_embedder": "img_in",
        "context_embedder": "txt_in",
        "proj_out": "final_layer.linear",
        "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
        "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
        "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    }
    if name in top:
        return [(top[name], None, False)]
    if name == "norm_out.linear":
        return [("final_layer.adaLN_modulation.1", None, True)]
    return []


_LYCORIS = (".lokr_", ".hada_", ".oft_", ".boft_")
_CONTROL = (".norm.key_norm.scale", ".norm.query_norm.scale")  # BFL's Canny/Depth LoRAs replace these


def refuse_unsupported(sd: dict[str, Tensor]) -> None:
    lycoris = [k for k in sd if any(marker in k for marker in _LYCORIS)]
    if lycoris:
        raise LoraError(
            f"LyCORIS LoKr/LoHa/OFT weights are not supported (e.g. {lycoris[0]}): convert the file to a plain LoRA"
        )
    control = [k for k in sd if k.endswith(_CONTROL)]
    if control:
        raise LoraError(
            f"this is a FLUX.1 control LoRA (Canny/Depth: it replaces norm scales, e.g. {control[0]}, and widens "
            "img_in): it needs the control model, not this one"
        )


def _onetrainer_names(hidden_blocks: int = 128) -> dict[str, str]:
    """OneTrainer's key style: diffusers' module names with `_` for `.` after `lora_transformer_`."""
    names = [
        "x_embedder", "context_embedder", "proj_out", "norm_out.linear",
        *(f"time_text_embed.{e}.linear_{i}" for e in ("timestep_embedder", "text_embedder", "guidance_embedder")
          for i in (1, 2)),
    ]  # fmt: skip
    double = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
              "attn.to_out.0", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
              "ff_context.net.2", "norm1.linear", "norm1_context.linear"]  # fmt: skip
    single = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out", "norm.linear"]
    for i in range(hidden_blocks):
        names += [f"transformer_blocks.{i}.{rest}" for rest in double]
        names += [f"single_transformer_blocks.{i}.{rest}" for rest in single]
    return {"lora_transformer_" + n.replace(".", "_"): n for n in names}


ONETRAINER = _onetrainer_names()
