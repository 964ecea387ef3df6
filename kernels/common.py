"""What the kernels share: Triton where it is installed (CUDA builds of torch bring it; CPU-only installs do
without it, and each kernel's torch-op reference runs instead), the Triton type each activation dtype rounds to,
the e4m3 constants, and the layout of the fp8 attention's scale buffer."""

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = tl = None

ROUND = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32} if tl else {}

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448
MIN_SCALE = 1e-12  # keeps the scales of all-zero rows and tensors finite

# The fp8 attention's scale buffer: (SCALE_ROWS, SCALE_ROW) float32, one scalar per row in column 0 (rows of
# four floats keep each scalar 16-byte aligned, as cuDNN wants its scalar tensors), in the order cuDNN reads them
# (descale: e4m3 -> real; scale: real -> e4m3). The QK kernel leaves max|v| in a spare column for the v pass.
SCALARS = ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")
SCALE_ROW = 4
SCALE_ROWS = len(SCALARS)
V_AMAX = 2 * SCALE_ROW + 1  # flat offset of max|v|: row descale_v, column 1


def scalar_offset(name: str) -> int:
    """Flat offset of a scalar of `SCALARS` in the scale buffer."""
    return SCALARS.index(name) * SCALE_ROW


def available(x: Tensor) -> bool:
    """Whether the Triton kernels can run on `x`: Triton installed and `x` on a CUDA device."""
    return triton is not None and x.is_cuda
