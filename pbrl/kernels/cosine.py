"""Batched cosine similarity for the semantic rewards (forward only: rewards are not
differentiated).

Convention (the one pbrl/kernels/reference.py states): each row is divided by its largest magnitude
before its norm is taken, so the result is exact for any finite input, from subnormal to fp32-max
entries, and a row with no non-zero entry (a zero vector) has cosine 0 with everything, never NaN.
Accumulation is fp32 whatever the input dtype.
"""
from __future__ import annotations

import torch

from pbrl.kernels.dispatch import tl, triton, use_triton
from pbrl.kernels.reference import cosine_similarity_ref

if triton is not None:
    @triton.jit
    def _row_stats(x_ptr, row, stride, D, BLOCK_D: tl.constexpr):
        """(scale, norm of row / scale) of one row, two passes over D in blocks."""
        base = x_ptr + row * stride
        scale = tl.zeros((), tl.float32)
        for start in range(0, D, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            x = tl.load(base + cols, mask=cols < D, other=0.0).to(tl.float32)
            scale = tl.maximum(scale, tl.max(tl.abs(x), 0))
        scale = tl.where(scale > 0, scale, 1.0)
        ss = tl.zeros((), tl.float32)
        for start in range(0, D, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            x = tl.load(base + cols, mask=cols < D, other=0.0).to(tl.float32) / scale
            ss += tl.sum(x * x, 0)
        norm = tl.sqrt(ss)
        return scale, tl.where(norm > 0, norm, 1.0)

    @triton.jit
    def _cosine_rows_kernel(a_ptr, a_stride, b_ptr, b_stride, out_ptr, D, BLOCK_D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        sa, na = _row_stats(a_ptr, row, a_stride, D, BLOCK_D)
        sb, nb = _row_stats(b_ptr, row, b_stride, D, BLOCK_D)
        dot = tl.zeros((), tl.float32)
        for start in range(0, D, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            a = tl.load(a_ptr + row * a_stride + cols, mask=cols < D, other=0.0).to(tl.float32) / sa
            b = tl.load(b_ptr + row * b_stride + cols, mask=cols < D, other=0.0).to(tl.float32) / sb
            dot += tl.sum(a * b, 0)
        tl.store(out_ptr + row, dot / (na * nb))


def _block_d(d: int) -> int:
    return min(1024, triton.next_power_of_2(d))


def _check(a, b):
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"cosine similarity needs [N, D] and [N, D], got {list(a.shape)} and "
                         f"{list(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"a and b must be on one device, got {a.device} and {b.device}")


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of paired rows: a, b [N, D] -> [N] fp32."""
    _check(a, b)
    if not use_triton(a):
        return cosine_similarity_ref(a, b)
    a, b = _rows(a), _rows(b)
    out = torch.empty(a.shape[0], dtype=torch.float32, device=a.device)
    if a.shape[0]:
        _cosine_rows_kernel[(a.shape[0],)](a, a.stride(0), b, b.stride(0), out, a.shape[1],
                                           BLOCK_D=_block_d(a.shape[1]))
    return out
