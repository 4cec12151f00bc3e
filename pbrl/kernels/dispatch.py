"""Which implementation runs: Triton on CUDA tensors, and on CPU tensors when TRITON_INTERPRET=1
(Triton's interpreter, which must be set before triton is imported); the PyTorch path otherwise, or
when triton is absent."""
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install without triton still has every PyTorch path
    triton = tl = None


def use_triton(t: torch.Tensor) -> bool:
    return triton is not None and (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")
