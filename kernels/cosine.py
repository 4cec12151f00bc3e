"""Batched cosine similarity for the semantic rewards (forward only: rewards are not differentiated).

Convention (the one kernels/reference.py states): each row is divided by its largest magnitude before its norm is
taken, so the result is exact for any finite input, from subnormal to fp32-max entries, and a row with no non-zero
entry (a zero vector) has cosine 0 with everything, never NaN. Accumulation is fp32 whatever the input dtype.
"""
from __future__ import annotations

import torch

from kernels.dispatch import triton, tl, use_triton
from kernels.reference import cosine_similarity_ref, pairwise_cosine_similarity_ref

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

    @triton.jit
    def _unit_rows_kernel(x_ptr, stride, out_ptr, D, BLOCK_D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        scale, norm = _row_stats(x_ptr, row, stride, D, BLOCK_D)
        for start in range(0, D, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            x = tl.load(x_ptr + row * stride + cols, mask=cols < D, other=0.0).to(tl.float32)
            tl.store(out_ptr + row * D + cols, x / scale / norm, mask=cols < D)

    @triton.jit
    def _pairwise_dot_kernel(u_ptr, v_ptr, out_ptr, N, M, D, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_K: tl.constexpr):
        """out [N, M] = u [N, D] @ v [M, D].T for contiguous fp32 unit rows; one BLOCK_N x BLOCK_M tile a program."""
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
        for start in range(0, D, BLOCK_K):
            k = start + tl.arange(0, BLOCK_K)
            u = tl.load(u_ptr + rn[:, None].to(tl.int64) * D + k[None, :], mask=(rn[:, None] < N) & (k[None, :] < D),
                        other=0.0)
            v = tl.load(v_ptr + rm[None, :].to(tl.int64) * D + k[:, None], mask=(rm[None, :] < M) & (k[:, None] < D),
                        other=0.0)
            acc += tl.dot(u, v, input_precision="ieee")  # full fp32: TF32 would cost ~3 digits on GPU
        tl.store(out_ptr + rn[:, None].to(tl.int64) * M + rm[None, :], acc, mask=(rn[:, None] < N) & (rm[None, :] < M))


def _block_d(d: int) -> int:
    return min(1024, triton.next_power_of_2(d))


def _check(a, b, paired: bool):
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1] or (paired and a.shape[0] != b.shape[0]):
        want = "[N, D] and [N, D]" if paired else "[N, D] and [M, D]"
        raise ValueError(f"cosine similarity needs {want}, got {list(a.shape)} and {list(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"a and b must be on one device, got {a.device} and {b.device}")


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of paired rows: a, b [N, D] -> [N] fp32."""
    _check(a, b, paired=True)
    if not use_triton(a):
        return cosine_similarity_ref(a, b)
    a, b = _rows(a), _rows(b)
    out = torch.empty(a.shape[0], dtype=torch.float32, device=a.device)
    if a.shape[0]:
        _cosine_rows_kernel[(a.shape[0],)](a, a.stride(0), b, b.stride(0), out, a.shape[1],
                                           BLOCK_D=_block_d(a.shape[1]))
    return out


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    x = _rows(x)
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    if x.shape[0]:
        _unit_rows_kernel[(x.shape[0],)](x, x.stride(0), out, x.shape[1], BLOCK_D=_block_d(x.shape[1]))
    return out


def pairwise_cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """All pairs: a [N, D], b [M, D] -> [N, M] fp32 (e.g. every response against every reference)."""
    _check(a, b, paired=False)
    if not use_triton(a):
        return pairwise_cosine_similarity_ref(a, b)
    u, v = _unit_rows(a), _unit_rows(b)
    n, m, d = u.shape[0], v.shape[0], u.shape[1]
    out = torch.empty(n, m, dtype=torch.float32, device=a.device)
    if n and m:
        grid = (triton.cdiv(n, 32), triton.cdiv(m, 32))
        _pairwise_dot_kernel[grid](u, v, out, n, m, d, BLOCK_N=32, BLOCK_M=32, BLOCK_K=32)
    return out
