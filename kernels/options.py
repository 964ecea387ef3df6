"""Which kernels the model runs: one frozen object given to the flow model and the autoencoder when they are
built (benchmarks compare variants by passing other options, never by switching module state)."""

from dataclasses import dataclass


@dataclass(frozen=True)
class KernelOptions:
    """Each `True` runs a kernel where it can (CUDA with Triton/cuDNN); `False` runs its torch-op reference."""

    fused_norm: bool = True  # LayerNorm + modulation + e4m3 quantization in one pass before an fp8 linear
    fused_gelu: bool = True  # GELU + concatenation + e4m3 quantization in one pass before an fp8 linear
    fast_tanh: bool = True  # the GELU kernel's tanh as the GPU's approximate instruction (2^-11 relative error)
    qk_kernel: bool = True  # QK RMS norm + rotary embedding in one pass
    group_norm: bool = True  # the autoencoder's GroupNorm (+ swish) with statistics spread over the whole GPU
    cudnn_attention: bool = True  # cuDNN first among the exact attention backends (False: flash first)
    # the autoencoder's large 3x3 convolutions (and upsampling) made in bands of rows of this size (0: whole)
    decode_band_mib: int = 32
    fp8_attention: bool = False  # attention in e4m3 through cuDNN's fp8 kernel (opt-in: faster, not exact)
