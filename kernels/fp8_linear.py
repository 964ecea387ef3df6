"""Activation quantization for the fp8 linears: inductor-fused quantizers, and one-pass kernels for the inputs of
the MLPs' second layers (GELU + concat + quantization) and of every layer after a modulated LayerNorm
(LayerNorm + modulation + quantization).

The input of a single block's `linear2` is `cat(attention, gelu(mlp))` (4608 x 15360 at 1024x1024) and that
of a double block's `mlp.2` is `gelu(mlp)`. Quantizing them per token with plain ops (even fused by
inductor) reads the activations twice from memory and computes the GELU twice. Here one Triton program per row
computes the GELU, the row's absolute maximum and the e4m3 values, reading the row the second time from cache
and writing only the fp8 result.

The LayerNorm kernel does for `(1 + scale) * layer_norm(x) + shift` what inductor does in a looped reduction
reading each row three times: one read, one fp8 write. Its values agree with the torch ops' to within the
roundings to the activation dtype on the way (its statistics are summed in another order), with the same
accuracy against float64 (GPU tests). Timings of both against the torch ops: bench/RESULTS.md.

On CUDA with Triton the kernels run as torch custom ops (opaque to `torch.compile`, capturable in CUDA
graphs); everywhere else the `*_reference` functions compute the same values with torch ops.
"""

import functools
import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.common import E4M3, E4M3_MAX, MIN_SCALE, available, tl, triton
from kernels.common import ROUND as _ROUND


def dynamic_quantize(x: Tensor, per_token: bool) -> tuple[Tensor, Tensor]:
    """(M, K) -> e4m3 and the float32 scale, (M, 1) per token or () per tensor."""
    amax = x.abs().amax(dim=1, keepdim=True) if per_token else x.abs().amax()
    scale = (amax.float() / E4M3_MAX).clamp(min=MIN_SCALE)  # scales in fp32: fp8's range is narrow
    return quantize(x, scale), scale


def quantize(x: Tensor, scale: Tensor) -> Tensor:
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def dequantize(xq: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """e4m3 values and their float32 scale -> `dtype` (the fp8 attention's output, where no fp8 matmul takes it)."""
    return (xq.float() * scale).to(dtype)


@functools.lru_cache(maxsize=2)  # one entry per quantizer below
def _fused(fn: Callable) -> Callable:
    # one Triton kernel instead of five passes over the activations; inlined when the caller is compiled
    return torch.compile(fn, dynamic=True, fullgraph=True)


def dynamic_quantizer(cuda: bool) -> Callable:
    return _fused(dynamic_quantize) if cuda else dynamic_quantize


def quantizer(cuda: bool) -> Callable:
    return _fused(quantize) if cuda else quantize


def gelu_concat_quantize_reference(a: Tensor | None, b: Tensor, a_scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(..., Ka) and (..., Kb) -> e4m3 rows of `cat(a, gelu_tanh(b))` as (M, Ka + Kb), and (M, 1) float32 scales.
    `a_scale`: `a` is e4m3 with this float32 scale (the fp8 attention's output)."""
    x = F.gelu(b, approximate="tanh")
    if a_scale is not None:
        x = torch.cat((a.float() * a_scale, x.float()), dim=-1)
    elif a is not None:
        x = torch.cat((a, x), dim=-1)
    x = x.reshape(-1, x.shape[-1])
    return dynamic_quantize(x, per_token=True)


def layernorm_modulate_quantize_reference(
    x: Tensor, scale: Tensor, shift: Tensor, eps: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """(B, L, D) -> e4m3 rows of `(1 + scale) * layer_norm(x) + shift` as (B*L, D), and (B*L, 1) float32 scales;
    `scale` and `shift` are (B, 1, D)."""
    y = (1 + scale) * F.layer_norm(x, x.shape[-1:], eps=eps) + shift
    return dynamic_quantize(y.reshape(-1, y.shape[-1]), per_token=True)


def layernorm_modulate_quantize(x: Tensor, scale: Tensor, shift: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """`layernorm_modulate_quantize_reference`, as one kernel where it runs."""
    if available(x) and x.ndim == 3 and scale.shape == shift.shape == (x.shape[0], 1, x.shape[2]):
        return torch.ops.flux.layernorm_modulate_quantize(x, scale, shift, eps)
    return layernorm_modulate_quantize_reference(x, scale, shift, eps)


def gelu_concat_quantize(
    a: Tensor | None, b: Tensor, a_scale: Tensor | None = None, fast_tanh: bool = True
) -> tuple[Tensor, Tensor]:
    """`gelu_concat_quantize_reference`, as one kernel where it runs (`fast_tanh`: the GPU's approximate tanh)."""
    if available(b):
        return torch.ops.flux.gelu_concat_quantize(a, b, a_scale, fast_tanh)
    return gelu_concat_quantize_reference(a, b, a_scale)


if triton is not None:
    # These kernels are bound by instruction issue as much as by memory (~3.8e9 GELU elements per 1024x1024 step,
    # on a GPU that lowers its clock under its power cap), so each element costs as few instructions as the math
    # allows:
    # - quantizing multiplies by the row's reciprocal scale, computed once per row with IEEE division, where
    #   `x / scale` was an approximate division per element (a special-function-unit op plus fix-ups);
    # - no clamp to +-448: |x| <= amax makes |x / scale| <= 448 up to a few float32 ulps, which round to 448
    #   (e4m3's largest value; the next rounding boundary is 464);
    # - the GELU's polynomial with two multiplies fewer (below).
    # (each kernel alone before and after: bench/RESULTS.md). Exact ties of the e4m3 rounding (~1% of elements)
    # round the other way from torch's division, half a step from the value either way.

    @triton.jit
    def _gelu_tanh(x, ROUND: tl.constexpr, FAST: tl.constexpr):
        u = x * (0.7978845608028654 + 0.0356774081363001 * (x * x))  # sqrt(2/pi) (x + 0.044715 x^3)
        h = 0.5 * x
        if FAST:  # the hardware's tanh: one instruction, relative error <= 2^-11 (a bf16 step is 2^-8)
            t = tl.inline_asm_elementwise(
                "tanh.approx.f32 $0, $1;", "=r,r", [u], dtype=tl.float32, is_pure=True, pack=1
            )
            y = h + h * t
        else:
            y = x * tl.sigmoid(2.0 * u)  # (1 + tanh(u)) / 2 = sigmoid(2u)
        return y.to(ROUND).to(tl.float32)  # rounded to the activation dtype, as the unfused GELU is

    @triton.jit
    def _reciprocal(scale):
        return tl.math.div_rn(1.0, scale)  # once per row: exact

    def autotune(**kwargs):
        """`triton.autotune` that keeps its choice in the Triton cache where this Triton can (3.2 and later), so
        a warm start-up does not benchmark the configurations again."""
        if "cache_results" in inspect.signature(triton.autotune).parameters:
            kwargs["cache_results"] = True
        return triton.autotune(**kwargs)

    def _configs() -> list:
        resident = [triton.Config({"RESIDENT": True, "BLOCK": 1}, num_warps=w) for w in (8, 16, 32)]
        looped = [
            triton.Config({"RESIDENT": False, "BLOCK": b}, num_warps=w) for b, w in ((2048, 8), (4096, 8), (1024, 4))
        ]
        return resident + looped

    def _prune(configs, named_args, **kwargs):
        # a row held in registers only while it is small enough (FLUX: 3072 + 12288 at most)
        args = {**named_args, **kwargs}
        small = args["BLOCK_A"] + args["BLOCK_B"] <= 32768
        return [c for c in configs if small or not c.kwargs["RESIDENT"]]

    # The configurations differ in speed only: every one computes the same values bit for bit.
    @autotune(configs=_configs(), key=["KA", "KB"], prune_configs_by={"early_config_prune": _prune})
    @triton.jit
    def _gelu_concat_quantize_kernel(
        a_ptr, b_ptr, q_ptr, s_ptr, a_stride, b_stride, KA, KB,
        HAS_A: tl.constexpr, ROUND: tl.constexpr, FAST: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
        RESIDENT: tl.constexpr, BLOCK: tl.constexpr, a_scale_ptr=None, A_SCALED: tl.constexpr = False,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        if A_SCALED:  # `a` in e4m3 with one float32 scale
            sa = tl.load(a_scale_ptr)
        else:
            sa = 1.0
        a_row = a_ptr + row * a_stride
        b_row = b_ptr + row * b_stride
        q_row = q_ptr + row * (KA + KB)
        if RESIDENT:  # the whole row in registers: one read
            cb = tl.arange(0, BLOCK_B)
            xb = _gelu_tanh(tl.load(b_row + cb, mask=cb < KB, other=0.0).to(tl.float32), ROUND, FAST)
            amax = tl.max(tl.abs(xb), axis=0)
            if HAS_A:
                ca = tl.arange(0, BLOCK_A)
                xa = tl.load(a_row + ca, mask=ca < KA, other=0.0).to(tl.float32) * sa
                amax = tl.maximum(amax, tl.max(tl.abs(xa), axis=0))
            scale = tl.maximum(amax / 448.0, 1e-12)
            tl.store(s_ptr + row, scale)
            r = _reciprocal(scale)
            if HAS_A:
                tl.store(q_row + ca, (xa * r).to(tl.float8e4nv), mask=ca < KA)
            tl.store(q_row + KA + cb, (xb * r).to(tl.float8e4nv), mask=cb < KB)
        else:  # chunks: the second read comes from cache
            cols = tl.arange(0, BLOCK)
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            if HAS_A:
                for start in range(0, KA, BLOCK):
                    mask = start + cols < KA
                    x = tl.load(a_row + start + cols, mask=mask, other=0.0).to(tl.float32) * sa
                    acc = tl.maximum(acc, tl.abs(x))
            for start in range(0, KB, BLOCK):
                mask = start + cols < KB
                x = _gelu_tanh(tl.load(b_row + start + cols, mask=mask, other=0.0).to(tl.float32), ROUND, FAST)
                acc = tl.maximum(acc, tl.abs(x))
            scale = tl.maximum(tl.max(acc, axis=0) / 448.0, 1e-12)
            tl.store(s_ptr + row, scale)
            r = _reciprocal(scale)
            if HAS_A:
                for start in range(0, KA, BLOCK):
                    mask = start + cols < KA
                    x = tl.load(a_row + start + cols, mask=mask, other=0.0).to(tl.float32) * sa
                    tl.store(q_row + start + cols, (x * r).to(tl.float8e4nv), mask=mask)
            for start in range(0, KB, BLOCK):
                mask = start + cols < KB
                x = _gelu_tanh(tl.load(b_row + start + cols, mask=mask, other=0.0).to(tl.float32), ROUND, FAST)
                tl.store(q_row + KA + start + cols, (x * r).to(tl.float8e4nv), mask=mask)

    @autotune(
        configs=[triton.Config({"ROWS": r}, num_warps=w) for r, w in ((1, 2), (1, 4), (2, 4), (1, 8), (2, 8), (4, 16))],
        key=["D"],
    )
    @triton.jit
    def _layernorm_modulate_quantize_kernel(
        x_ptr, scale_ptr, shift_ptr, q_ptr, s_ptr, M, L, D, x_stride, mod_stride, eps,
        ROUND: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)[:, None]  # (ROWS, 1)
        cols = tl.arange(0, BLOCK_D)[None, :]
        mask = (rows < M) & (cols < D)
        x = tl.load(x_ptr + rows * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1)[:, None] / D
        xc = tl.where(mask, x - mean, 0.0)
        rstd = tl.rsqrt(tl.sum(xc * xc, axis=1)[:, None] / D + eps)
        xn = (xc * rstd).to(ROUND).to(tl.float32)  # the LayerNorm's output in the activation dtype
        mod = (rows // L) * mod_stride + cols  # the row's batch element
        sc = tl.load(scale_ptr + mod, mask=mask, other=0.0).to(tl.float32)
        sh = tl.load(shift_ptr + mod, mask=mask, other=0.0).to(tl.float32)
        # rounded after each op, as the unfused `(1 + scale) * norm(x) + shift` is
        y = ((1.0 + sc).to(ROUND).to(tl.float32) * xn).to(ROUND).to(tl.float32)
        y = (y + sh).to(ROUND).to(tl.float32)
        s = tl.maximum(tl.max(tl.abs(y), axis=1)[:, None] / 448.0, 1e-12)
        tl.store(s_ptr + rows, s, mask=rows < M)
        tl.store(q_ptr + rows * D + cols, (y * _reciprocal(s)).to(tl.float8e4nv), mask=mask)

    @torch.library.custom_op("flux::layernorm_modulate_quantize", mutates_args=())
    def _layernorm_modulate_quantize_op(x: Tensor, scale: Tensor, shift: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        b, seq, d = x.shape
        if x.stride(-1) != 1 or x.stride(0) != seq * x.stride(1):
            x = x.contiguous()
        scale, shift = scale.reshape(b, d), shift.reshape(b, d)
        if scale.stride(-1) != 1 or shift.stride() != scale.stride():
            scale, shift = scale.contiguous(), shift.contiguous()
        m = b * seq
        q = torch.empty((m, d), dtype=E4M3, device=x.device)
        s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
        if m:
            with torch.cuda.device(x.device):
                grid = lambda meta: (triton.cdiv(m, meta["ROWS"]),)  # noqa: E731
                _layernorm_modulate_quantize_kernel[grid](
                    x, scale, shift, q, s, m, seq, d, x.stride(1), scale.stride(0), eps, ROUND=_ROUND[x.dtype],
                    BLOCK_D=triton.next_power_of_2(d),
                )  # fmt: skip
        return q, s

    @_layernorm_modulate_quantize_op.register_fake
    def _(x: Tensor, scale: Tensor, shift: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        m = x.numel() // x.shape[-1]
        return x.new_empty((m, x.shape[-1]), dtype=E4M3), x.new_empty((m, 1), dtype=torch.float32)

    def _rows(x: Tensor) -> Tensor:
        x = x.reshape(-1, x.shape[-1])  # a view when the rows are evenly strided (split outputs are)
        return x if x.stride(-1) == 1 else x.contiguous()

    @torch.library.custom_op("flux::gelu_concat_quantize", mutates_args=())
    def _gelu_concat_quantize_op(
        a: Tensor | None, b: Tensor, a_scale: Tensor | None, fast_tanh: bool
    ) -> tuple[Tensor, Tensor]:
        b2 = _rows(b)
        a2 = _rows(a) if a is not None else b2
        ka = a2.shape[1] if a is not None else 0
        m, kb = b2.shape
        q = torch.empty((m, ka + kb), dtype=E4M3, device=b.device)
        scale = torch.empty((m, 1), dtype=torch.float32, device=b.device)
        if m:
            with torch.cuda.device(b.device):
                _gelu_concat_quantize_kernel[(m,)](
                    a2, b2, q, scale, a2.stride(0), b2.stride(0), ka, kb, HAS_A=a is not None, ROUND=_ROUND[b.dtype],
                    FAST=fast_tanh, a_scale_ptr=a_scale, A_SCALED=a_scale is not None,
                    BLOCK_A=triton.next_power_of_2(max(ka, 1)), BLOCK_B=triton.next_power_of_2(kb),
                )  # fmt: skip
        return q, scale

    @_gelu_concat_quantize_op.register_fake
    def _(a: Tensor | None, b: Tensor, a_scale: Tensor | None, fast_tanh: bool) -> tuple[Tensor, Tensor]:
        m = b.numel() // b.shape[-1]
        k = b.shape[-1] + (a.shape[-1] if a is not None else 0)
        return b.new_empty((m, k), dtype=E4M3), b.new_empty((m, 1), dtype=torch.float32)
