"""Opt-in fp8 attention (config `fp8_attention`): cuDNN's fp8 flash attention (Hopper and newer) through the
cuDNN frontend's Python API (`pip install nvidia-cudnn-frontend`). Faster than the default bf16 attention and
not exact: its per-block error is in bench/RESULTS.md beside the default's.

cuDNN's fp8 attention takes one scale per tensor (e4m3 values times the scale are the real values):
- q and k: after the RMS norm and the rotation no element exceeds sqrt(D) * max|gain| (|x_i| <= sqrt(D) rms(x),
  and a rotation keeps each pair's length), so each block's norm gains fix its scale: no pass over the tensor.
  e4m3 keeps 3 mantissa bits from 2^-6 up to 448, so the headroom this bound leaves costs no precision.
- v: its absolute maximum, measured per call.
- the probabilities: x448 (they are at most 1 before the row's normalization).
- the output: each row is a convex combination of v's rows, so |o| <= max|v| and o comes back in e4m3 with v's
  scale, in range by construction.
"""

import functools
import math

import torch
from torch import Tensor

from kernels import qk_norm_rope
from kernels.common import E4M3, E4M3_MAX, MIN_SCALE, SCALARS, SCALE_ROW, SCALE_ROWS, V_AMAX, scalar_offset, tl, triton

HEAD_DIMS = range(8, 129, 8)  # cuDNN's fp8 attention: head size a multiple of 8, at most 128


@functools.lru_cache(maxsize=1)
def _cudnn():
    import cudnn  # nvidia-cudnn-frontend: imported on first use only (it is an optional dependency)

    return cudnn


def unsupported(device: torch.device, head_dim: int) -> str | None:
    """Why fp8 attention cannot run on `device` with heads of `head_dim` (None: it can)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"needs a CUDA GPU (compute capability 9.0+), not {device}"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 9:
        name = torch.cuda.get_device_name(device)
        return f"needs compute capability 9.0+ (Hopper or newer); {name} is {major}.{minor}"
    if head_dim not in HEAD_DIMS:
        return f"needs a head size that is a multiple of 8 up to 128, not {head_dim}"
    try:
        _cudnn()
    except ImportError as e:
        return f"needs the cuDNN frontend: pip install nvidia-cudnn-frontend ({e})"
    try:  # a small graph of this head size: cuDNN says whether it has a kernel for it
        _plan(1, 1, 256, head_dim, device)
    except Exception as e:
        return f"cuDNN {_cudnn().backend_version()} has no fp8 attention for heads of {head_dim} here: {e}"
    return None


def qk_bound(gains: list[Tensor]) -> Tensor:
    """The largest |element| of RMS-normalized, rotated q or k with these norm gains: sqrt(D) * max|gain|."""
    return torch.stack([g.detach().abs().amax().float() for g in gains]).amax() * math.sqrt(gains[0].shape[-1])


def attention(streams: list[tuple[Tensor, Tensor, Tensor]], pe: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    """Joint attention over the token groups `streams` ((qkv (B, L_i, 3*H*D), q gain, k gain) each, as
    `qk_norm_rope.rms_norm_rope` takes them) -> the e4m3 output (B, sum L_i, H*D) and its float32 scale ()."""
    if not qk_norm_rope.kernel_fits(streams, pe):  # `unsupported` checked the GPU and cuDNN at load
        return attention_reference(streams, pe, heads)
    (a, qa, ka), (b, qb, kb) = streams[0], streams[1] if len(streams) == 2 else (None, None, None)
    q8, k8, v, scales = torch.ops.flux.rms_norm_rope_fp8(a, qa, ka, b, qb, kb, pe, heads)
    width = a.shape[-1] // 3
    rows = a[..., 2 * width :] if b is None else v.flatten(2)  # (B, L, H*D): one stream's v where it was written
    v8, scales = torch.ops.flux.fp8_quantize_v(rows, scales)
    o8 = torch.ops.flux.cudnn_fp8_sdpa(q8, k8, v8.view(q8.shape), scales)
    return o8.flatten(2), scales[SCALARS.index("descale_v"), 0]


def quantize(
    q: Tensor, k: Tensor, v: Tensor, bound_q: Tensor, bound_k: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(B, H, L, D) q, k, v -> e4m3 copies as (B, L, H, D) memory, and the float32 scale buffer cuDNN reads
    (`kernels.common`: column 0 of each row, in the order of `SCALARS`), in torch ops."""
    sv = (v.abs().amax().float() / E4M3_MAX).clamp(min=MIN_SCALE)
    sq, sk = (b.float().clamp(min=MIN_SCALE) / E4M3_MAX for b in (bound_q, bound_k))

    def e4m3(x: Tensor, scale: Tensor) -> Tensor:
        return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).transpose(1, 2).contiguous()

    one = torch.ones((), dtype=torch.float32, device=v.device)
    scales = torch.zeros((SCALE_ROWS, SCALE_ROW), dtype=torch.float32, device=v.device)
    scales[:, 0] = torch.stack([sq, sk, sv, one / E4M3_MAX, one * E4M3_MAX, 1 / sv])
    return e4m3(q, sq), e4m3(k, sk), e4m3(v, sv), scales


def emulate(q8: Tensor, k8: Tensor, v8: Tensor, scales: Tensor) -> Tensor:
    """cuDNN's fp8 attention in torch ops (any device): (B, L, H, D) e4m3 q, k, v -> e4m3 (B, L, H, D) output,
    probabilities in e4m3 x448, normalized by their unrounded row sums."""
    s = scales[:, 0]
    qf, kf, vf = (x.float().transpose(1, 2) for x in (q8, k8, v8))
    logits = (qf @ kf.transpose(-1, -2)) * (s[0] * s[1] / math.sqrt(q8.shape[-1]))
    p = torch.exp(logits - logits.amax(-1, keepdim=True))
    p8 = (p * s[4]).to(E4M3).float() * s[3]
    o = (p8 @ vf) / p.sum(-1, keepdim=True)  # in v8's units: descale_v and scale_o cancel
    return o.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).transpose(1, 2).contiguous()


def attention_reference(streams: list[tuple[Tensor, Tensor, Tensor]], pe: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    """`attention` in torch ops (any device; the CPU's path and the tests' reference)."""
    q, k, v = qk_norm_rope.rms_norm_rope_reference(streams, pe, heads)
    bound_q, bound_k = qk_bound([s[1] for s in streams]), qk_bound([s[2] for s in streams])
    q8, k8, v8, scales = quantize(q, k, v, bound_q, bound_k)
    return emulate(q8, k8, v8, scales).flatten(2), scales[SCALARS.index("descale_v"), 0]


class _Plan:
    """cuDNN's fp8 attention graph for one shape on one device, built once."""

    def __init__(self, b: int, h: int, seq: int, d: int, device: torch.device):
        cudnn = _cudnn()
        with torch.cuda.device(device):
            self.handle = cudnn.create_handle()
        e4m3, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
        g = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=f32, compute_data_type=f32, handle=self.handle)
        shape, stride = (b, h, seq, d), (seq * h * d, d, h * d, 1)  # (B, H, L, D) over (B, L, H, D) memory
        self.q, self.k, self.v = (g.tensor(name=n, dim=shape, stride=stride, data_type=e4m3) for n in "qkv")
        self.scalars = [g.tensor(name=n, dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=f32) for n in SCALARS]
        self.o, _, amax_s, amax_o = g.sdpa_fp8(
            q=self.q, k=self.k, v=self.v, **dict(zip(SCALARS, self.scalars, strict=True)),
            generate_stats=False, attn_scale=1.0 / math.sqrt(d), name="flux_fp8_attention",
        )  # fmt: skip
        self.o.set_output(True).set_dim(shape).set_stride(stride).set_data_type(e4m3)
        for amax in (amax_s, amax_o):  # not needed: the output's scale is known beforehand
            amax.set_output(False).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)).set_data_type(f32)
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        g.check_support()
        g.build_plans()
        self.graph = g
        self.workspace = g.get_workspace_size()

    def __call__(self, q8: Tensor, k8: Tensor, v8: Tensor, scales: Tensor, out: Tensor) -> None:
        cudnn = _cudnn()
        cudnn.set_stream(self.handle, torch.cuda.current_stream(q8.device).cuda_stream)
        pack = {self.q: q8, self.k: k8, self.v: v8, self.o: out}
        pack.update({t: scales[i, :1] for i, t in enumerate(self.scalars)})  # rows of 4: 16-byte aligned
        workspace = torch.empty(max(self.workspace, 1), dtype=torch.uint8, device=q8.device)
        self.graph.execute(pack, workspace, handle=self.handle)


@functools.lru_cache(maxsize=16)  # a server sees a handful of image sizes; each plan holds a cuDNN handle
def _plan(b: int, h: int, seq: int, d: int, device: torch.device) -> _Plan:
    return _Plan(b, h, seq, d, device)


@torch.library.custom_op("flux::cudnn_fp8_sdpa", mutates_args=())
def cudnn_fp8_sdpa(q8: Tensor, k8: Tensor, v8: Tensor, scales: Tensor) -> Tensor:
    """(B, L, H, D) contiguous e4m3 q, k, v and the scale buffer (`quantize`) -> e4m3 (B, L, H, D) output."""
    b, seq, h, d = q8.shape
    q8, k8, v8 = (x.contiguous() for x in (q8, k8, v8))  # the plan's strides (no copy when they are)
    out = torch.empty_like(q8)
    if q8.numel():
        with torch.cuda.device(q8.device):
            _plan(b, h, seq, d, q8.device)(q8, k8, v8, scales, out)
    return out


@cudnn_fp8_sdpa.register_fake
def _(q8: Tensor, k8: Tensor, v8: Tensor, scales: Tensor) -> Tensor:
    return torch.empty_like(q8)


if triton is not None:

    @triton.jit
    def _quantize_v_kernel(
        v_ptr, v8_ptr, s_in, s_out, M, L, b_stride, l_stride,
        W: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
        Q_AT: tl.constexpr, K_AT: tl.constexpr, V_AT: tl.constexpr, VD_AT: tl.constexpr, SD_AT: tl.constexpr,
        SS_AT: tl.constexpr, SO_AT: tl.constexpr,
    ):  # fmt: skip
        # *_AT: offsets in the scale buffer (`kernels.common`): q's, k's and v's descales, max|v| from the QK kernel,
        # the probabilities' descale and scale, and the output's scale
        pid = tl.program_id(0)
        amax = tl.maximum(tl.load(s_in + V_AT), 448.0 * 1e-12)
        sv = amax / 448.0
        if pid == 0:  # the buffer cuDNN reads
            tl.store(s_out + Q_AT, tl.load(s_in + Q_AT))
            tl.store(s_out + K_AT, tl.load(s_in + K_AT))
            tl.store(s_out + VD_AT, sv)
            tl.store(s_out + SD_AT, 1.0 / 448.0)
            tl.store(s_out + SS_AT, 448.0)
            tl.store(s_out + SO_AT, tl.math.div_rn(1.0, sv))
        r = tl.math.div_rn(448.0, amax)
        rows = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)[:, None]
        cols = tl.arange(0, BLOCK)[None, :]
        mask = (rows < M) & (cols < W)
        x = tl.load(v_ptr + (rows // L) * b_stride + (rows % L) * l_stride + cols, mask=mask, other=0.0)
        tl.store(v8_ptr + rows * W + cols, (x.to(tl.float32) * r).to(tl.float8e4nv), mask=mask)

    _OFFSETS = dict(
        Q_AT=scalar_offset("descale_q"), K_AT=scalar_offset("descale_k"), V_AT=V_AMAX,
        VD_AT=scalar_offset("descale_v"), SD_AT=scalar_offset("descale_s"), SS_AT=scalar_offset("scale_s"),
        SO_AT=scalar_offset("scale_o"),
    )  # fmt: skip

    @torch.library.custom_op("flux::fp8_quantize_v", mutates_args=())
    def _quantize_v_op(v: Tensor, scales: Tensor) -> tuple[Tensor, Tensor]:
        """(B, L, W) v (rows may be strided) and the QK kernel's scale buffer -> e4m3 (B, L, W) v scaled by
        448 / max|v|, and the complete scale buffer."""
        b, seq, width = v.shape
        if v.stride(-1) != 1:
            v = v.contiguous()
        v8 = torch.empty((b, seq, width), dtype=E4M3, device=v.device)
        out = torch.zeros_like(scales)
        rows = 4
        with torch.cuda.device(v.device):
            _quantize_v_kernel[(max(triton.cdiv(b * seq, rows), 1),)](
                v, v8, scales, out, b * seq, seq, v.stride(0), v.stride(1),
                W=width, BLOCK=triton.next_power_of_2(width), ROWS=rows, num_warps=8, **_OFFSETS,
            )  # fmt: skip
        return v8, out

    @_quantize_v_op.register_fake
    def _(v: Tensor, scales: Tensor) -> tuple[Tensor, Tensor]:
        return v.new_empty(v.shape, dtype=E4M3), torch.empty_like(scales)
