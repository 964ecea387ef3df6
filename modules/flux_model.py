"""The FLUX.1 flow transformer, with black-forest-labs/flux's key names and forward signature."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels.options import KernelOptions
from modules.layers import DoubleStreamBlock, EmbedND, LastLayer, MLPEmbedder, SingleStreamBlock, timestep_embedding


@dataclass
class FluxParams:
    in_channels: int
    vec_in_dim: int
    context_in_dim: int
    hidden_size: int
    mlp_ratio: float
    num_heads: int
    depth: int
    depth_single_blocks: int
    axes_dim: list[int]
    theta: int
    qkv_bias: bool
    guidance_embed: bool


FP16_CLAMP = 32000.0  # float16 block outputs overflow past 65504; clamp well inside it


class Flux(nn.Module):
    """Flow transformer on packed latents: (B, L_img, in_channels) -> (B, L_img, in_channels)."""

    def __init__(self, params: FluxParams, options: KernelOptions = KernelOptions()):
        super().__init__()
        self.params = params
        self.options = options
        self.in_channels = params.in_channels
        self.out_channels = params.in_channels
        if params.hidden_size % params.num_heads != 0:
            raise ValueError(f"hidden_size {params.hidden_size} not divisible by num_heads {params.num_heads}")
        pe_dim = params.hidden_size // params.num_heads
        if sum(params.axes_dim) != pe_dim:
            raise ValueError(f"sum of axes_dim {params.axes_dim} must equal the head dim {pe_dim}")
        self.hidden_size = params.hidden_size
        self.num_heads = params.num_heads
        self.pe_embedder = EmbedND(dim=pe_dim, theta=params.theta, axes_dim=params.axes_dim)
        self.img_in = nn.Linear(self.in_channels, self.hidden_size, bias=True)
        self.time_in = MLPEmbedder(in_dim=256, hidden_dim=self.hidden_size)
        self.vector_in = MLPEmbedder(params.vec_in_dim, self.hidden_size)
        self.guidance_in = (
            MLPEmbedder(in_dim=256, hidden_dim=self.hidden_size) if params.guidance_embed else nn.Identity()
        )
        self.txt_in = nn.Linear(params.context_in_dim, self.hidden_size)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(self.hidden_size, self.num_heads, params.mlp_ratio, params.qkv_bias, options)
            for _ in range(params.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(self.hidden_size, self.num_heads, params.mlp_ratio, options)
            for _ in range(params.depth_single_blocks)
        )
        self.final_layer = LastLayer(self.hidden_size, 1, self.out_channels)

    @property
    def dtype(self) -> torch.dtype:
        return self.final_layer.linear.weight.dtype

    def set_kernel_options(self, options: KernelOptions) -> None:
        """Run other kernels on the same weights (benchmarks and tests compare variants so). Compiled blocks and
        captured CUDA graphs keep the kernels they were traced with: compile and capture after this."""
        self.options = options
        for block in [*self.double_blocks, *self.single_blocks]:
            block.options = options

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        y: Tensor,
        guidance: Tensor | None = None,
        pe: Tensor | None = None,
        mods: Tensor | None = None,
    ) -> Tensor:
        """`pe`: the rotary embedding of the ids, if the caller computed it already (it depends only on the ids,
        which stay the same for every step of an image); the ids are then not read. `mods`: this step's row of
        `modulation_table` (B, W); timesteps, y and guidance are then not read."""
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError("img and txt must be (batch, tokens, channels)")
        dtype = self.dtype
        img = self.img_in(img.to(dtype))
        vec = self.vector(timesteps, y, guidance) if mods is None else None
        txt = self.txt_in(txt.to(dtype))

        if pe is None:
            pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))
        widths = self.modulation_widths()
        parts = [None] * len(widths) if mods is None else mods.to(dtype).split(widths, dim=-1)
        img = self._blocks(img, txt, vec, pe, parts)
        return self.final_layer(img, vec, parts[-1])  # (B, L_img, in_channels)

    def vector(self, timesteps: Tensor, y: Tensor, guidance: Tensor | None) -> Tensor:
        """The conditioning vector (B, hidden): timestep, guidance (dev) and pooled text embeddings."""
        dtype = self.dtype
        vec = self.time_in(timestep_embedding(timesteps, 256).to(dtype))
        if self.params.guidance_embed:
            if guidance is None:
                raise ValueError("this model is guidance-distilled (flux-dev): pass guidance")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(dtype))
        return vec + self.vector_in(y.to(dtype))

    def modulation_widths(self) -> list[int]:
        """Each block's (then the final layer's) share of a `modulation_table` row."""
        return [sum(lin.out_features for lin in layers) for layers in self._modulation_layers()]

    def _modulation_layers(self) -> list[list[nn.Module]]:
        """Per block, then the final layer: the linears that map silu(vec) to its modulation, in table order."""
        return [
            *([b.img_mod.lin, b.txt_mod.lin] for b in self.double_blocks),
            *([b.modulation.lin] for b in self.single_blocks),
            [self.final_layer.adaLN_modulation[1]],  # its [0] is the SiLU
        ]

    @torch.no_grad()
    def modulation_table(self, timesteps: Tensor, y: Tensor, guidance: Tensor | None) -> Tensor:
        """Every block's modulation (and the final layer's) for all steps of a denoising loop at once:
        (S, B) step times -> (S, B, W), row s to pass as `mods` at step s.

        The modulations depend only on the conditioning vector, not on the image. Computed per step they are
        57 matrix-vector products reading 3.2 GB of weights (bench/RESULTS.md has their cost); computed for all
        steps at once, each weight is read once per image. Each row's values are those of its own step: the
        activations are quantized per row, and the rows are multiplied independently."""
        vec = torch.cat([self.vector(t, y, guidance) for t in timesteps])  # per step, as the forward would
        silu = F.silu(vec)
        out = torch.cat([lin(silu) for layers in self._modulation_layers() for lin in layers], dim=-1)
        return out.view(len(timesteps), y.shape[0], -1)

    def _blocks(self, img: Tensor, txt: Tensor, vec: Tensor | None, pe: Tensor, mods: list) -> Tensor:
        clamp = self.dtype == torch.float16
        n = len(self.double_blocks)
        for block, block_mods in zip(self.double_blocks, mods[:n], strict=True):
            img, txt = block(img=img, txt=txt, vec=vec, pe=pe, mods=block_mods)
            if clamp:
                img, txt = img.clamp(-FP16_CLAMP, FP16_CLAMP), txt.clamp(-FP16_CLAMP, FP16_CLAMP)
        img = torch.cat((txt, img), 1)
        for block, block_mods in zip(self.single_blocks, mods[n:-1], strict=True):
            img = block(img, vec=vec, pe=pe, mods=block_mods)
            if clamp:
                img = img.clamp(-FP16_CLAMP, FP16_CLAMP)
        return img[:, txt.shape[1] :, ...]
