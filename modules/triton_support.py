"""What the Triton kernels share: Triton where it is installed (CUDA builds of torch bring it; CPU-only installs
do without it, and each kernel's torch-op reference runs instead), and the Triton type that each activation
dtype rounds to."""

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = tl = None

ROUND = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32} if tl else {}


def available(x: Tensor) -> bool:
    """Whether the kernels can run on `x`: Triton installed and `x` on a CUDA device."""
    return triton is not None and x.is_cuda
