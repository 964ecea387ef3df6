"""QK-norm + rotary embedding in one pass over the attention inputs, writing `(B, H, L, D)` tensors.

The unfused path reads the qkv projection's output three times (RMS statistics, normalization, rotation)
and, in a double block, copies q, k and v once more to join the text and image tokens, even inductor-fused
(bench/RESULTS.md). Here one Triton program per token normalizes and rotates all
heads of its q and k in registers and writes them (and v, when asked) straight into the joined sequence,
(B, H, L, D) tensors laid out as (B, L, H, D) in memory.

Same values as `rms_norm_rope_reference` (the model's torch ops): the RMS-normalized row is rounded to the
activation dtype before and after the gain, and rotated in float32, as the unfused ops do.
"""

import torch
from torch import Tensor

from kernels.common import ROUND as _ROUND
from kernels.common import SCALE_ROW, SCALE_ROWS, V_AMAX, available, scalar_offset, tl, triton

EPS = 1e-6  # the model's RMSNorm epsilon


def kernel_fits(streams: list[tuple[Tensor, Tensor, Tensor]], pe: Tensor) -> bool:
    """Whether the Triton kernels take these streams: CUDA with Triton, at most two streams of one dtype and
    batch size, float32 rotations."""
    qkv = streams[0][0]
    alike = all(s[0].dtype == qkv.dtype and s[0].shape[0] == qkv.shape[0] for s in streams)
    return available(qkv) and alike and len(streams) <= 2 and pe.dtype == torch.float32


def rms_norm(x: Tensor, gain: Tensor) -> Tensor:
    rrms = torch.rsqrt(torch.mean(x.float() ** 2, dim=-1, keepdim=True) + EPS)
    return (x.float() * rrms).to(x.dtype) * gain


def rotate(x: Tensor, pe: Tensor) -> Tensor:
    """(B, H, L, D) by (B, 1, L, D/2, 2, 2) rotation matrices of adjacent pairs, in float32."""
    x_ = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    return (pe[..., 0] * x_[..., 0] + pe[..., 1] * x_[..., 1]).reshape(*x.shape).type_as(x)


def split_heads(qkv: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """(B, L, 3*H*D) -> q, k, v views as (B, H, L, D)."""
    b, seq, width = qkv.shape
    q, k, v = qkv.view(b, seq, 3, heads, width // (3 * heads)).permute(2, 0, 3, 1, 4)
    return q, k, v


def rms_norm_rope_reference(
    streams: list[tuple[Tensor, Tensor, Tensor]], pe: Tensor, heads: int
) -> tuple[Tensor, Tensor, Tensor]:
    """`streams`: (qkv (B, L_i, 3*H*D), q gain (D,), k gain (D,)) per token group, joined along L in order.
    Returns rotated q, k and v as (B, H, sum L_i, D)."""
    qs, ks, vs = [], [], []
    for qkv, q_gain, k_gain in streams:
        q, k, v = split_heads(qkv, heads)
        qs.append(rms_norm(q, q_gain).to(v))
        ks.append(rms_norm(k, k_gain).to(v))
        vs.append(v)
    q, k = (t[0] if len(t) == 1 else torch.cat(t, dim=2) for t in (qs, ks))
    v = vs[0] if len(vs) == 1 else torch.cat(vs, dim=2)
    return rotate(q, pe), rotate(k, pe), v


def rms_norm_rope(
    streams: list[tuple[Tensor, Tensor, Tensor]], pe: Tensor, heads: int, use_kernel: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """`rms_norm_rope_reference`, as one kernel launch per stream where it runs and `use_kernel`."""
    if use_kernel and kernel_fits(streams, pe):
        (a, qa, ka), (b, qb, kb) = streams[0], streams[1] if len(streams) == 2 else (None, None, None)
        q, k, v = torch.ops.flux.rms_norm_rope(a, qa, ka, b, qb, kb, pe, heads)
        if b is None:  # one stream: v is read where the projection wrote it
            v = split_heads(a, heads)[2]
        return q, k, v
    return rms_norm_rope_reference(streams, pe, heads)


if triton is not None:

    @triton.jit
    def _norm_rotate(x, gain, c00, c01, c10, c11, D: tl.constexpr, HP: tl.constexpr, ROUND: tl.constexpr):
        """(HP, D) float32 rows -> RMS-normalized (rounded as the torch ops round), then rotated pairwise."""
        rrms = tl.rsqrt(tl.sum(x * x, axis=1) / D + 1e-6)
        x = (x * rrms[:, None]).to(ROUND).to(tl.float32)
        x = (x * gain[None, :]).to(ROUND).to(tl.float32)
        even, odd = tl.split(tl.reshape(x, (HP, D // 2, 2)))
        return tl.reshape(tl.join(c00 * even + c01 * odd, c10 * even + c11 * odd), (HP, D))

    @triton.jit
    def _rms_norm_rope_kernel(
        qkv_ptr, qg_ptr, kg_ptr, pe_ptr, q_ptr, k_ptr, v_ptr,
        seq, b_stride, l_stride, pe_b_stride, out_len, offset, H,
        D: tl.constexpr, HP: tl.constexpr, COPY_V: tl.constexpr, ROUND: tl.constexpr,
        FP8: tl.constexpr = False, qg2_ptr=None, kg2_ptr=None, scales_ptr=None,
        Q_AT: tl.constexpr = 0, K_AT: tl.constexpr = 0, V_AT: tl.constexpr = 0,
    ):  # fmt: skip
        # FP8: q and k written in e4m3 with one scale each for the whole joined sequence, 448 / (sqrt(D) * max|gain|)
        # over both streams' gains (`qg2_ptr`, `kg2_ptr`: the other stream's, or the same); program 0 writes their
        # inverses at `scales_ptr` + Q_AT and + K_AT, and every program folds its token's max|v| in at + V_AT (an
        # integer max: non-negative floats order as their bits); offsets from `kernels.common`'s buffer layout
        pid = tl.program_id(0).to(tl.int64)
        b, tok = pid // seq, pid % seq
        heads = tl.arange(0, HP)[:, None]
        dims = tl.arange(0, D)[None, :]
        mask = heads < H
        src = qkv_ptr + b * b_stride + tok * l_stride + heads * D + dims
        pos = offset + tok  # the token's place in the joined sequence
        dst = ((b * out_len + pos) * H + heads) * D + dims  # (B, L, H, D) in memory: one run of H*D per token
        pe = pe_ptr + b * pe_b_stride + pos * (2 * D) + tl.arange(0, D // 2)[None, :] * 4
        c00, c01 = tl.load(pe), tl.load(pe + 1)
        c10, c11 = tl.load(pe + 2), tl.load(pe + 3)
        d = tl.arange(0, D)
        qg, kg = tl.load(qg_ptr + d).to(tl.float32), tl.load(kg_ptr + d).to(tl.float32)
        q = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        q = _norm_rotate(q, qg, c00, c01, c10, c11, D, HP, ROUND)
        k = tl.load(src + H * D, mask=mask, other=0.0).to(tl.float32)
        k = _norm_rotate(k, kg, c00, c01, c10, c11, D, HP, ROUND)
        if FP8:
            root = tl.sqrt(tl.full([], D, tl.float32))
            bq = root * tl.maximum(tl.max(tl.abs(qg)), tl.max(tl.abs(tl.load(qg2_ptr + d).to(tl.float32))))
            bk = root * tl.maximum(tl.max(tl.abs(kg)), tl.max(tl.abs(tl.load(kg2_ptr + d).to(tl.float32))))
            bq, bk = tl.maximum(bq, 1e-30), tl.maximum(bk, 1e-30)
            tl.store(q_ptr + dst, (q * (448.0 / bq)).to(tl.float8e4nv), mask=mask)
            tl.store(k_ptr + dst, (k * (448.0 / bk)).to(tl.float8e4nv), mask=mask)
            if pid == 0:
                tl.store(scales_ptr + Q_AT, bq / 448.0)
                tl.store(scales_ptr + K_AT, bk / 448.0)
            v = tl.load(src + 2 * H * D, mask=mask, other=0.0)
            amax = tl.max(tl.max(tl.abs(v.to(tl.float32)), axis=1), axis=0)
            tl.atomic_max((scales_ptr + V_AT).to(tl.pointer_type(tl.int32)), amax.to(tl.int32, bitcast=True))
            if COPY_V:
                tl.store(v_ptr + dst, v, mask=mask)
        else:
            tl.store(q_ptr + dst, q.to(ROUND), mask=mask)
            tl.store(k_ptr + dst, k.to(ROUND), mask=mask)
            if COPY_V:
                tl.store(v_ptr + dst, tl.load(src + 2 * H * D, mask=mask), mask=mask)

    def _launch(qkv, q_gain, k_gain, pe, q, k, v, offset: int, heads: int, copy_v: bool, fp8=None) -> None:
        """`fp8`: (the other stream's q gain, its k gain, the scale buffer) for e4m3 q and k."""
        b, seq, width = qkv.shape
        if qkv.stride(-1) != 1:
            qkv = qkv.contiguous()
        dim = width // (3 * heads)
        qg2, kg2, scales = fp8 if fp8 else (None, None, None)
        _rms_norm_rope_kernel[(b * seq,)](
            qkv, q_gain, k_gain, pe, q, k, v, seq, qkv.stride(0), qkv.stride(1), pe.stride(0) if pe.shape[0] > 1 else 0,
            q.shape[1], offset,
            heads, D=dim, HP=triton.next_power_of_2(heads), COPY_V=copy_v, ROUND=_ROUND[qkv.dtype],
            FP8=fp8 is not None, qg2_ptr=qg2, kg2_ptr=kg2, scales_ptr=scales,
            Q_AT=scalar_offset("descale_q"), K_AT=scalar_offset("descale_k"), V_AT=V_AMAX,
            num_warps=4 if dim * heads <= 4096 else 8,
        )  # fmt: skip

    def _outputs(a: Tensor, b: Tensor | None, heads: int, qk_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """Empty q and k (in `qk_dtype`) and v as (B, L, H, D) over both streams' tokens; v empty for one stream
        (its v is read where the projection wrote it)."""
        batch, seq, width = a.shape
        seq += b.shape[1] if b is not None else 0
        shape = (batch, seq, heads, width // (3 * heads))
        v = a.new_empty(shape) if b is not None else a.new_empty((0,))
        return a.new_empty(shape, dtype=qk_dtype), a.new_empty(shape, dtype=qk_dtype), v

    def _launch_streams(a, gains_a, b, gains_b, pe, heads: int, q, k, v, scales=None) -> None:
        """One launch per stream, the second's tokens joined after the first's. `scales`: e4m3 q and k, each launch
        bounding them with both streams' gains."""
        gains_a = [g.contiguous() for g in gains_a]
        gains_b = [g.contiguous() for g in gains_b] if b is not None else gains_a
        fp8_a, fp8_b = (None, None) if scales is None else ((*gains_b, scales), (*gains_a, scales))
        pe = pe.contiguous()
        with torch.cuda.device(a.device):
            if a.shape[0] * a.shape[1]:
                _launch(a, *gains_a, pe, q, k, v, 0, heads, b is not None, fp8_a)
            if b is not None and b.shape[0] * b.shape[1]:
                _launch(b, *gains_b, pe, q, k, v, a.shape[1], heads, True, fp8_b)

    @torch.library.custom_op("flux::rms_norm_rope_fp8", mutates_args=())
    def _rms_norm_rope_fp8_op(
        a: Tensor, q_gain_a: Tensor, k_gain_a: Tensor,
        b: Tensor | None, q_gain_b: Tensor | None, k_gain_b: Tensor | None, pe: Tensor, heads: int,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
        """e4m3 q and k as (B, L, H, D), v in the activation dtype (`_outputs`), and the float32 scale buffer
        (`kernels.common`) holding q's and k's scales and max|v|."""
        q, k, v = _outputs(a, b, heads, torch.float8_e4m3fn)
        scales = _scale_buffer(a.device)
        _launch_streams(a, (q_gain_a, k_gain_a), b, (q_gain_b, k_gain_b), pe, heads, q, k, v, scales)
        return q, k, v, scales

    @_rms_norm_rope_fp8_op.register_fake
    def _(a, q_gain_a, k_gain_a, b, q_gain_b, k_gain_b, pe, heads):
        return *_outputs(a, b, heads, torch.float8_e4m3fn), a.new_empty((SCALE_ROWS, SCALE_ROW), dtype=torch.float32)

    def _scale_buffer(device: torch.device) -> Tensor:
        return torch.zeros((SCALE_ROWS, SCALE_ROW), dtype=torch.float32, device=device)

    @torch.library.custom_op("flux::rms_norm_rope", mutates_args=())
    def _rms_norm_rope_op(
        a: Tensor, q_gain_a: Tensor, k_gain_a: Tensor,
        b: Tensor | None, q_gain_b: Tensor | None, k_gain_b: Tensor | None, pe: Tensor, heads: int,
    ) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        q, k, v = _outputs(a, b, heads, a.dtype)
        _launch_streams(a, (q_gain_a, k_gain_a), b, (q_gain_b, k_gain_b), pe, heads, q, k, v)
        return _heads_first(q), _heads_first(k), _heads_first(v) if b is not None else v

    def _heads_first(x: Tensor) -> Tensor:
        # (B, H, L, D) over (B, L, H, D) memory, the layout the projection writes: the attention's output comes
        # back in it too, so joining the heads for the next matmul is a view, not a copy
        return x.permute(0, 2, 1, 3)

    @_rms_norm_rope_op.register_fake
    def _(a, q_gain_a, k_gain_a, b, q_gain_b, k_gain_b, pe, heads):
        q, k, v = _outputs(a, b, heads, a.dtype)
        return _heads_first(q), _heads_first(k), _heads_first(v) if b is not None else v
