"""diffusers' FLUX.1 transformer as an independent reference, and BFL -> diffusers key conversion."""

import torch


def swap_scale_shift(weight: torch.Tensor) -> torch.Tensor:
    shift, scale = weight.chunk(2, dim=0)  # BFL final layer: shift first; diffusers: scale first
    return torch.cat([scale, shift], dim=0)


def bfl_to_diffusers(sd: dict[str, torch.Tensor], params: dict) -> dict[str, torch.Tensor]:
    h = params["hidden_size"]
    mlp = int(h * params["mlp_ratio"])
    out = {}

    def copy(src: str, dst: str, fn=lambda t: t):
        for leaf in ("weight", "bias"):
            if f"{src}.{leaf}" in sd:
                out[f"{dst}.{leaf}"] = fn(sd[f"{src}.{leaf}"])

    def split(src: str, dsts: list[str], sizes: list[int]):
        for leaf in ("weight", "bias"):
            if f"{src}.{leaf}" in sd:
                for dst, part in zip(dsts, torch.split(sd[f"{src}.{leaf}"], sizes, dim=0), strict=True):
                    out[f"{dst}.{leaf}"] = part

    copy("img_in", "x_embedder")
    copy("txt_in", "context_embedder")
    for bfl, dif in (
        ("time_in", "timestep_embedder"),
        ("vector_in", "text_embedder"),
        ("guidance_in", "guidance_embedder"),
    ):
        copy(f"{bfl}.in_layer", f"time_text_embed.{dif}.linear_1")
        copy(f"{bfl}.out_layer", f"time_text_embed.{dif}.linear_2")
    for i in range(params["depth"]):
        b, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        copy(f"{b}.img_mod.lin", f"{d}.norm1.linear")
        copy(f"{b}.txt_mod.lin", f"{d}.norm1_context.linear")
        split(f"{b}.img_attn.qkv", [f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"], [h, h, h])
        split(f"{b}.txt_attn.qkv", [f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"], [h, h, h])
        out[f"{d}.attn.norm_q.weight"] = sd[f"{b}.img_attn.norm.query_norm.scale"]
        out[f"{d}.attn.norm_k.weight"] = sd[f"{b}.img_attn.norm.key_norm.scale"]
        out[f"{d}.attn.norm_added_q.weight"] = sd[f"{b}.txt_attn.norm.query_norm.scale"]
        out[f"{d}.attn.norm_added_k.weight"] = sd[f"{b}.txt_attn.norm.key_norm.scale"]
        copy(f"{b}.img_mlp.0", f"{d}.ff.net.0.proj")
        copy(f"{b}.img_mlp.2", f"{d}.ff.net.2")
        copy(f"{b}.txt_mlp.0", f"{d}.ff_context.net.0.proj")
        copy(f"{b}.txt_mlp.2", f"{d}.ff_context.net.2")
        copy(f"{b}.img_attn.proj", f"{d}.attn.to_out.0")
        copy(f"{b}.txt_attn.proj", f"{d}.attn.to_add_out")
    for i in range(params["depth_single_blocks"]):
        b, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        copy(f"{b}.modulation.lin", f"{d}.norm.linear")
        split(f"{b}.linear1", [f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp"], [h, h, h, mlp])
        out[f"{d}.attn.norm_q.weight"] = sd[f"{b}.norm.query_norm.scale"]
        out[f"{d}.attn.norm_k.weight"] = sd[f"{b}.norm.key_norm.scale"]
        copy(f"{b}.linear2", f"{d}.proj_out")
    copy("final_layer.linear", "proj_out")
    copy("final_layer.adaLN_modulation.1", "norm_out.linear", swap_scale_shift)
    return out


def diffusers_flux(params: dict, bfl_sd: dict[str, torch.Tensor]):
    """A diffusers FluxTransformer2DModel with the weights of a BFL state dict (float32)."""
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=params["in_channels"],
        num_layers=params["depth"],
        num_single_layers=params["depth_single_blocks"],
        attention_head_dim=params["hidden_size"] // params["num_heads"],
        num_attention_heads=params["num_heads"],
        joint_attention_dim=params["context_in_dim"],
        pooled_projection_dim=params["vec_in_dim"],
        guidance_embeds=params["guidance_embed"],
        axes_dims_rope=tuple(params["axes_dim"]),
    )
    model.load_state_dict({k: v.float() for k, v in bfl_to_diffusers(bfl_sd, params).items()}, strict=True)
    return model.eval()


def diffusers_forward(model, img, img_ids, txt, txt_ids, timesteps, y, guidance):
    return model(
        hidden_states=img,
        encoder_hidden_states=txt,
        pooled_projections=y,
        timestep=timesteps,
        img_ids=img_ids[0],
        txt_ids=txt_ids[0],
        guidance=guidance,
        return_dict=False,
    )[0]
