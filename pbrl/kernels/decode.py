"""Decode attention (flash-decoding): one query token per row over that row's filled KV-cache slots.

    decode_attention(q [B, Hq, D], k, v [B, Hkv, S, D], lengths [B]) -> [B, Hq, D]

Row b attends to its slots 0..lengths[b] - 1 and reads nothing beyond them, so a cache sized for the
longest possible sequence costs only what is filled. The slots are cut into splits, one program
per (row, key/value head, split); a program loads the group of Hq / Hkv query heads that share its
key/value head (GQA: each key is read once for the whole group) and keeps an online softmax (running
max m, sum l, weighted values) over its slots in blocks, then writes its partial output and log-sum-
exp m + log l. A second kernel merges the splits of each (row, head) by their log-sum-exps. Splits
past a row's length exit at once; the grid depends only on shapes, so a CUDA graph can hold it, the
lengths being a tensor. Scores and accumulators are fp32; probabilities meet the values in the
values' dtype, as flash attention does (under Triton's interpreter, whose bf16 matrix products are
wrong in Triton 3.9, everything is fp32 first).
"""
from __future__ import annotations

import os

import torch

from pbrl.kernels.dispatch import tl, triton, use_triton
from pbrl.kernels.reference import decode_attention_ref

PROGRAMS = 1024   # splits are added until (rows x key/value heads x splits) reaches this

if triton is not None:
    @triton.jit
    def _decode_split_kernel(q_ptr, k_ptr, v_ptr, lengths_ptr, o_ptr, lse_ptr,
                             sq_b, sq_h, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, split_slots, D, scale,
                             GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
        b, kv, split = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
        splits = tl.num_programs(2)
        g, d = tl.arange(0, BLOCK_G), tl.arange(0, BLOCK_D)
        heads = kv * GROUP + g
        q = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + d[None],
                    mask=(g[:, None] < GROUP) & (d[None] < D), other=0.0)
        q = q.to(tl.float32) if UPCAST else q
        m = tl.full((BLOCK_G,), float("-inf"), tl.float32)
        total = tl.zeros((BLOCK_G,), tl.float32)
        acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
        start = split * split_slots
        end = tl.minimum(start + split_slots, tl.load(lengths_ptr + b))
        k_row, v_row = k_ptr + b * sk_b + kv * sk_h, v_ptr + b * sv_b + kv * sv_h
        for first in range(start, end, BLOCK_N):
            n = first + tl.arange(0, BLOCK_N)
            valid = n < end
            k = tl.load(k_row + n[:, None] * sk_s + d[None], mask=valid[:, None] & (d[None] < D),
                        other=0.0)
            k = k.to(tl.float32) if UPCAST else k
            scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # [G, N]
            scores = tl.where(valid[None], scores, float("-inf"))
            new_m = tl.maximum(m, tl.max(scores, 1))
            p = tl.exp(scores - new_m[:, None])
            rescale = tl.exp(m - new_m)
            v = tl.load(v_row + n[:, None] * sv_s + d[None], mask=valid[:, None] & (d[None] < D),
                        other=0.0)
            v = v.to(tl.float32) if UPCAST else v
            acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            total = total * rescale + tl.sum(p, 1)
            m = new_m
        out = (b * tl.num_programs(1) * GROUP + heads) * splits + split  # (row, head, split)
        some = total > 0
        tl.store(o_ptr + out[:, None] * BLOCK_D + d[None],
                 acc / tl.where(some, total, 1.0)[:, None], mask=(g[:, None] < GROUP))
        tl.store(lse_ptr + out, tl.where(some, m + tl.log(total), float("-inf")),
                 mask=g < GROUP)

    @triton.jit
    def _decode_merge_kernel(o_ptr, lse_ptr, out_ptr, so_b, so_h, splits, D,
                             BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
        row, head = tl.program_id(0).to(tl.int64), tl.program_id(1)
        s, d = tl.arange(0, BLOCK_S), tl.arange(0, BLOCK_D)
        base = (row * tl.num_programs(1) + head) * splits
        lse = tl.load(lse_ptr + base + s, mask=s < splits, other=float("-inf"))
        weight = tl.exp(lse - tl.max(lse, 0))
        parts = tl.load(o_ptr + (base + s[:, None]) * BLOCK_D + d[None], mask=s[:, None] < splits,
                        other=0.0)
        out = tl.sum(parts * weight[:, None], 0) / tl.sum(weight, 0)
        tl.store(out_ptr + row * so_b + head * so_h + d, out.to(out_ptr.dtype.element_ty),
                 mask=d < D)


def block_n(dtype: str) -> int:
    """Slots per block: 64 of 16-bit keys, 32 of fp32 ones (whose products take twice the
    registers: 64 spill at sm_80)."""
    return 32 if dtype == "fp32" else 64


def split_slots(rows: int, kv_heads: int, slots: int, block: int) -> int:
    """Slots per split, a multiple of the block: enough splits that rows x kv_heads x splits
    programs reach PROGRAMS (a GPU's worth of work at batch 1), no more than the blocks there
    are."""
    blocks = -(-slots // block)
    splits = min(blocks, max(1, -(-PROGRAMS // (rows * kv_heads))))
    return -(-blocks // splits) * block


def _check(q, k, v, lengths):
    if q.dim() != 3 or k.dim() != 4 or k.shape != v.shape or k.shape[0] != q.shape[0] \
            or k.shape[3] != q.shape[2] or q.shape[1] % k.shape[1] or lengths.shape != q.shape[:1]:
        raise ValueError(f"decode attention needs q [B, Hq, D], k and v [B, Hkv, S, D] with Hkv "
                         f"dividing Hq, lengths [B]; got q {list(q.shape)}, k {list(k.shape)}, "
                         f"v {list(v.shape)}, lengths {list(lengths.shape)}")


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     lengths: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v of each row over its slots 0..lengths[b] - 1 (each at least 1,
    at most S), the Hq / Hkv query heads of a group sharing a key/value head: [B, Hq, D] in q's
    dtype. The kernels run as one custom operator, which torch.compile keeps whole in its graph."""
    _check(q, k, v, lengths)
    if not use_triton(q):
        return decode_attention_ref(q, k, v, lengths)
    return torch.ops.pbrl.decode_attention(q, k, v, lengths)


@torch.library.custom_op("pbrl::decode_attention", mutates_args=())
def _launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            lengths: torch.Tensor) -> torch.Tensor:
    (rows, heads, dim), kv_heads, slots = q.shape, k.shape[1], k.shape[2]
    k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (k, v))
    q = q if q.stride(-1) == 1 else q.contiguous()
    block = block_n("fp32" if k.dtype == torch.float32 else "16-bit")
    per_split = split_slots(rows, kv_heads, slots, block)
    splits, block_d = -(-slots // per_split), max(16, triton.next_power_of_2(dim))
    parts = torch.empty(rows, heads, splits, block_d, dtype=torch.float32, device=q.device)
    lse = torch.empty(rows, heads, splits, dtype=torch.float32, device=q.device)
    _decode_split_kernel[(rows, kv_heads, splits)](
        q, k, v, lengths, parts, lse, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        k.stride(2), v.stride(0), v.stride(1), v.stride(2), per_split, dim, dim ** -0.5,
        GROUP=heads // kv_heads, BLOCK_G=max(16, triton.next_power_of_2(heads // kv_heads)),
        BLOCK_N=block, BLOCK_D=block_d, UPCAST=os.environ.get("TRITON_INTERPRET") == "1")
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _decode_merge_kernel[(rows, heads)](parts, lse, out, out.stride(0), out.stride(1), splits, dim,
                                        BLOCK_S=max(2, triton.next_power_of_2(splits)),
                                        BLOCK_D=block_d)
    return out


@_launch.register_fake
def _(q, k, v, lengths):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)
