"""Per-token log-probs (and entropy) of chosen tokens, without a full log_softmax.

  linear_token_logprobs(hidden [N, H], weight [V, H], labels [N]) -> (log p [N], entropy [N])
from final hidden states and the LM head, holding at most a [C, V] block of logits at a time (C
tokens; recomputed in backward).

For x = logits / T (fp32) and p = softmax(x):
  log p_y = (x_y - m) - log s,   H = log s - sum_j e^(x_j-m) (x_j-m) / s,
  with m = max x and s = sum e^(x-m);
  d log p_y / d x_j = 1[j=y] - p_j,   d H / d x_j = -p_j (log p_j + H),   d x / d logits = 1 / T.
The shifted form keeps the digits that x_y - lse would lose when |x| is large (x = -1e4 has an fp32
ulp of 1e-3). The Triton kernels take one row per program and stream the vocabulary in blocks with
an online log-sum-exp: the running max m, s and u = sum e^(x-m) (x-m) are rescaled when m grows.
Forward saves m and log s for backward.
"""
from __future__ import annotations

import torch

from pbrl.kernels.dispatch import tl, triton, use_triton

# Tokens per block of logits in the chunked paths: C * V fp32 values is about 128 MB at V = 151,936.
CHUNK_ELEMENTS = 2 ** 25


# --------------------------------------------------------------------------------------------------
# Triton kernels: one program per row of logits.
# --------------------------------------------------------------------------------------------------
if triton is not None:
    @triton.jit
    def _logprobs_fwd_kernel(logits_ptr, stride, labels_ptr, logp_ptr, max_ptr, logsum_ptr,
                             entropy_ptr, V, inv_temp, BLOCK_V: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride
        m = tl.full((), float("-inf"), tl.float32)
        s = tl.zeros((), tl.float32)
        u = tl.zeros((), tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            inside = cols < V
            x = tl.load(base + cols, mask=inside, other=float("-inf")).to(tl.float32) * inv_temp
            m_new = tl.maximum(m, tl.max(x, 0))
            shift = m - m_new  # <= 0; -inf only on the first block, where s = u = 0
            scale = tl.exp(shift)
            d = tl.where(inside, x - m_new, 0.0)
            e = tl.where(inside, tl.exp(d), 0.0)
            u = scale * (u + tl.where(s > 0, shift, 0.0) * s) + tl.sum(e * d, 0)
            s = scale * s + tl.sum(e, 0)
            m = m_new
        log_s = tl.log(s)
        label = tl.load(labels_ptr + row)
        x_label = tl.load(base + label).to(tl.float32) * inv_temp
        tl.store(logp_ptr + row, (x_label - m) - log_s)
        tl.store(max_ptr + row, m)
        tl.store(logsum_ptr + row, log_s)
        tl.store(entropy_ptr + row, log_s - u / s)

    @triton.jit
    def _logprobs_bwd_kernel(logits_ptr, stride, labels_ptr, max_ptr, logsum_ptr, entropy_ptr,
                             grad_logp_ptr, grad_entropy_ptr,
                             grad_ptr, grad_stride, V, inv_temp, WITH_ENTROPY: tl.constexpr,
                             BLOCK_V: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride
        label = tl.load(labels_ptr + row)
        m = tl.load(max_ptr + row)
        log_s = tl.load(logsum_ptr + row)
        g_logp = tl.load(grad_logp_ptr + row)
        if WITH_ENTROPY:
            g_ent = tl.load(grad_entropy_ptr + row)
            entropy = tl.load(entropy_ptr + row)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            inside = cols < V
            x = tl.load(base + cols, mask=inside, other=0.0).to(tl.float32) * inv_temp
            logp = (x - m) - log_s
            p = tl.exp(logp)
            g = g_logp * (tl.where(cols == label, 1.0, 0.0) - p)
            if WITH_ENTROPY:
                g -= g_ent * p * (logp + entropy)
            tl.store(grad_ptr + row * grad_stride + cols,
                     (g * inv_temp).to(grad_ptr.dtype.element_ty), mask=inside)


def _block_v(v: int) -> int:
    return min(4096, triton.next_power_of_2(v))


def _rows_per_block(v: int) -> int:
    return max(1, CHUNK_ELEMENTS // v)


def _forward(logits: torch.Tensor, labels: torch.Tensor, inv_temp: float, owned: bool = False):
    """logits [N, V] -> (logp, entropy, m, log_s), each [N] fp32. owned=True lets the PyTorch path
    overwrite logits (the linear path's own scratch block), which saves a copy."""
    n, v = logits.shape
    if use_triton(logits):
        logits = logits if logits.stride(-1) == 1 else logits.contiguous()
        logp, entropy, m, log_s = (torch.empty(n, dtype=torch.float32, device=logits.device)
                                   for _ in range(4))
        if n:
            _logprobs_fwd_kernel[(n,)](logits, logits.stride(0), labels, logp, m, log_s, entropy, v,
                                       inv_temp, BLOCK_V=_block_v(v))
        return logp, entropy, m, log_s
    # PyTorch path: blocks of rows through two preallocated fp32 buffers (fresh [C, V] buffers on
    # every block would cost a page-faulting allocation each).
    rows = _rows_per_block(v)
    in_place = owned and logits.dtype == torch.float32
    work = None if in_place else logits.new_empty(min(n, rows), v, dtype=torch.float32)
    exp = logits.new_empty(min(n, rows), v, dtype=torch.float32)
    parts = []
    for start in range(0, n, rows):
        x = logits[start:start + rows]
        x = x if in_place else work[:len(x)].copy_(x)
        if inv_temp != 1.0:
            x.mul_(inv_temp)
        m = x.amax(-1, keepdim=True)
        d = x.sub_(m)
        e = torch.exp(d, out=exp[:len(x)])
        s = e.sum(-1)
        u = e.mul_(d).sum(-1)  # sum e^d d, with the same pairwise-summation accuracy as s
        logp = d.gather(-1, labels[start:start + rows, None]).squeeze(-1) - s.log()
        parts.append((logp, s.log() - u / s, m.squeeze(-1), s.log()))
    if not parts:
        return (logits.new_empty(0, dtype=torch.float32),) * 4
    return tuple(torch.cat(p) for p in zip(*parts))


def _backward(logits, labels, m, log_s, entropy, grad_logp, grad_entropy, inv_temp,
              out) -> torch.Tensor:
    """Writes the gradient of sum(grad_logp * logp + grad_entropy * entropy) w.r.t. logits [N, V]
    into out (same shape; out may be logits itself, which is then overwritten). grad_entropy None:
    entropy unused."""
    n, v = logits.shape
    if use_triton(logits):
        logits = logits if logits.stride(-1) == 1 else logits.contiguous()
        with_entropy = grad_entropy is not None
        # each element is read, then its gradient written, by the same program: out may alias logits
        if n:
            _logprobs_bwd_kernel[(n,)](logits, logits.stride(0), labels, m, log_s, entropy,
                                       grad_logp.contiguous(),
                                       grad_entropy.contiguous() if with_entropy else grad_logp,
                                       out, out.stride(0),
                                       v, inv_temp, WITH_ENTROPY=with_entropy, BLOCK_V=_block_v(v))
        return out
    rows = _rows_per_block(v)
    in_place = out is logits and logits.dtype == torch.float32
    work = None if in_place else logits.new_empty(min(n, rows), v, dtype=torch.float32)
    term = logits.new_empty(min(n, rows), v,
                            dtype=torch.float32) if grad_entropy is not None else None
    for start in range(0, n, rows):
        r = slice(start, start + rows)
        x = logits[r] if in_place else work[:len(logits[r])].copy_(logits[r])
        logp = x.mul_(inv_temp).sub_(m[r, None]).sub_(log_s[r, None])
        if term is not None:  # -g_H p (log p + H)
            t = torch.add(logp, entropy[r, None], out=term[:len(x)])
        p = logp.exp_()
        if term is not None:
            t.mul_(p).mul_(-grad_entropy[r, None])
        g = p.mul_(-grad_logp[r, None])  # g_y (1[j=y] - p_j)
        g.scatter_add_(-1, labels[r, None], grad_logp[r, None])
        if term is not None:
            g.add_(t)
        g.mul_(inv_temp)
        if not in_place:
            out[r].copy_(g)
    return out


def _check(x, labels, temperature, what, vocab):
    if x.dim() != 2:
        raise ValueError(f"{what} must be 2-D [N, *], got shape {list(x.shape)}")
    if labels.shape != x.shape[:1]:
        raise ValueError(f"labels must be [N] = [{x.shape[0]}], got {list(labels.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    # A label outside the vocabulary would make the kernels read out of bounds: check it (one sync).
    if labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) < vocab):
        raise ValueError(f"labels must lie in [0, {vocab}), got values in [{int(labels.min())}, "
                         f"{int(labels.max())}]")


class _LinearTokenLogprobs(torch.autograd.Function):
    """Blocks of C tokens: logits_c = hidden_c @ weight.T into one reused [C, V] buffer, then the
    row kernels above. Backward recomputes each block's logits, turns them into their gradient g_c
    in place, and accumulates grad_hidden_c = g_c @ weight and grad_weight += g_c.T @ hidden_c (in
    weight's dtype, as the matmuls of any training step do; each block's product accumulates in fp32
    inside the matmul)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature):
        inv_temp = 1.0 / temperature
        rows = _rows_per_block(weight.shape[0])
        block = hidden.new_empty(min(hidden.shape[0], rows), weight.shape[0])
        parts = []
        for start in range(0, hidden.shape[0], rows):
            h = hidden[start:start + rows]
            logits = torch.matmul(h, weight.T, out=block[:len(h)])
            parts.append(_forward(logits, labels[start:start + rows], inv_temp, owned=True))
        logp, entropy, m, log_s = (torch.cat(p) for p in zip(*parts)) if parts else \
            (hidden.new_empty(0, dtype=torch.float32),) * 4
        ctx.save_for_backward(hidden, weight, labels, m, log_s, entropy)
        ctx.inv_temp = inv_temp
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, labels, m, log_s, entropy = ctx.saved_tensors
        grad_logp = torch.zeros_like(m) if grad_logp is None else grad_logp.float()
        grad_entropy = None if grad_entropy is None else grad_entropy.float()
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        rows = _rows_per_block(weight.shape[0])
        block = hidden.new_empty(min(hidden.shape[0], rows), weight.shape[0])
        for start in range(0, hidden.shape[0], rows):
            r = slice(start, start + rows)
            h = hidden[r]
            logits = torch.matmul(h, weight.T, out=block[:len(h)])
            g = _backward(logits, labels[r], m[r], log_s[r], entropy[r], grad_logp[r],
                          None if grad_entropy is None else grad_entropy[r], ctx.inv_temp,
                          out=logits)
            if grad_hidden is not None:
                torch.matmul(g, weight, out=grad_hidden[r])
            if grad_weight is not None:
                grad_weight.addmm_(g.T, h)
        return grad_hidden, grad_weight, None, None


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          temperature: float = 1.0):
    """hidden [N, H], weight [V, H] -> log-probs [N] fp32 (, entropy [N] fp32) of softmax(hidden @
    weight.T / T), never holding more than ~CHUNK_ELEMENTS logits; differentiable w.r.t. hidden and
    weight."""
    if weight.dim() != 2 or hidden.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"need hidden [N, H] and weight [V, H], got {list(hidden.shape)} and "
                         f"{list(weight.shape)}")
    _check(hidden, labels, temperature, "hidden", weight.shape[0])
    return _LinearTokenLogprobs.apply(hidden, weight, labels.long(), temperature)
