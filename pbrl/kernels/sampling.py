"""Sampling one token per row, and its log-prob, in one pass over the vocabulary.

    sample_tokens(logits [B, V], temperature, keys [B]) -> (tokens [B] long, logprobs [B] fp32)
    gumbel_noise(keys [B], V) -> [B, V] fp32        the noise sample_tokens adds (for top-k, top-p)
    row_keys(seeds [B], step) -> keys [B] int32     one 32-bit key per row and decoding step

Gumbel-max: argmax_j (x_j + g_j) with x = logits / T and g_j = -log(-log u_j), u_j uniform in (0,
1), is an exact draw from softmax(x). The noise is counter-based: u_j is a hash of (the row's key,
j), and the key a hash of (the row's seed, the step), so a row's sample depends on nothing else in
the batch, and no generator state exists. The hash is `mix32` (a 32-bit integer finaliser,
bijective, good avalanche); u takes its top 24 bits, centred in their bin: u = (h >> 8 + 0.5) /
2^24. The log-prob is that of the chosen token under the tempered, untruncated distribution, log
softmax(x)_token, through an online log-sum-exp (running max m and sum s rescaled when m grows).
Temperature 0 is greedy: the argmax of the logits and its log-prob under softmax(logits).
"""
from __future__ import annotations

import torch

from pbrl.kernels.dispatch import tl, triton, use_triton


def mix32(x: torch.Tensor) -> torch.Tensor:
    """The hash on int32 tensors holding the bits of uint32 values: multiplication wraps as uint32's
    does, and the right shifts are made logical by masking the copies of the sign bit an arithmetic
    shift brings in."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * 0x7FEB352D
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * (0x846CA68B - 2**32)  # the uint32 constant's bits as an int32
    return x ^ ((x >> 16) & 0xFFFF)


def row_keys(seeds: torch.Tensor, step: int | torch.Tensor) -> torch.Tensor:
    """seeds [B] int64 (any value), step (an int, or a tensor broadcasting with seeds) -> keys [B]
    int32."""
    step = torch.as_tensor(step, device=seeds.device).to(torch.int32)
    return mix32(mix32(seeds.to(torch.int32) ^ mix32(step)) ^ (seeds >> 32).to(torch.int32))


def gumbel_noise(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """keys [B] -> g [B, V] fp32: the Gumbel noise of token j of each row."""
    h = mix32(torch.arange(vocab, dtype=torch.int32, device=keys.device)[None] ^ keys[:, None])
    u = (((h >> 8) & 0xFFFFFF).float() + 0.5) * (1.0 / 16777216)
    return -torch.log(-torch.log(u))


def sample_tokens_ref(logits: torch.Tensor, temperature: float, keys: torch.Tensor):
    """The specification: materialises x, the noise and log_softmax(x)."""
    x = logits.float() / (temperature or 1.0)
    tokens = (x + gumbel_noise(keys, x.shape[-1]) if temperature else x).argmax(-1)
    return tokens, x.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)


if triton is not None:
    @triton.jit
    def _mix32(x):
        x = x ^ (x >> 16)
        x = x * 0x7FEB352D
        x = x ^ (x >> 15)
        x = x * 0x846CA68B
        return x ^ (x >> 16)

    @triton.jit
    def _sample_kernel(logits_ptr, stride, keys_ptr, tokens_ptr, logp_ptr, V, inv_temp,
                       SAMPLE: tl.constexpr, BLOCK_V: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride
        key = tl.load(keys_ptr + row).to(tl.uint32, bitcast=True)
        m = tl.full((), float("-inf"), tl.float32)
        s = tl.zeros((), tl.float32)
        best = tl.full((), float("-inf"), tl.float32)   # the best x + g so far, its token and its x
        best_token = tl.zeros((), tl.int32)
        best_x = tl.full((), float("-inf"), tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            inside = cols < V
            x = tl.load(base + cols, mask=inside, other=float("-inf")).to(tl.float32) * inv_temp
            m_new = tl.maximum(m, tl.max(x, 0))
            # -inf logits (masked tokens) add nothing, also while every logit so far is -inf
            s = s * tl.exp(tl.where(m_new == float("-inf"), 0.0, m - m_new)) + \
                tl.sum(tl.where(x > float("-inf"), tl.exp(x - m_new), 0.0), 0)
            m = m_new
            if SAMPLE:
                h = _mix32(cols.to(tl.uint32) ^ key)
                u = ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216)
                score = tl.where(inside, x - tl.log(-tl.log(u)), float("-inf"))
            else:
                score = x
            top = tl.max(score, 0)
            token = tl.argmax(score, 0)  # the first of equal maxima, as torch.argmax
            take = top > best            # strictly: an earlier block keeps a tie
            best_x = tl.where(take, tl.sum(tl.where(tl.arange(0, BLOCK_V) == token, x, 0.0), 0),
                              best_x)
            best_token = tl.where(take, start + token, best_token)
            best = tl.where(take, top, best)
        tl.store(tokens_ptr + row, best_token.to(tl.int64))
        tl.store(logp_ptr + row, best_x - m - tl.log(s))


def sample_tokens(logits: torch.Tensor, temperature: float, keys: torch.Tensor):
    """logits [B, V] (any float dtype), temperature >= 0, keys [B] int32 from row_keys (unused when
    greedy) -> (tokens [B] int64, logprobs [B] fp32)."""
    if logits.dim() != 2 or keys.shape != logits.shape[:1]:
        raise ValueError(f"sample_tokens needs logits [B, V] and keys [B]; got "
                         f"{list(logits.shape)} and {list(keys.shape)}")
    # compiled: inductor fuses the specification
    if not use_triton(logits) or torch.compiler.is_compiling():
        return sample_tokens_ref(logits, temperature, keys)
    b, v = logits.shape
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    tokens = torch.empty(b, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(b, dtype=torch.float32, device=logits.device)
    if b:
        _sample_kernel[(b,)](logits, logits.stride(0), keys.contiguous(), tokens, logprobs, v,
                             1.0 / (temperature or 1.0), SAMPLE=temperature > 0,
                             BLOCK_V=min(4096, triton.next_power_of_2(v)))
    return tokens, logprobs
