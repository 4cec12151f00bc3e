"""Plain PyTorch references: the specification every kernel is tested against. Short on purpose;
they materialise whatever they need and compute in fp32 (fp64 inputs stay fp64, which makes them the
tests' exact oracle)."""
import torch


def _wide(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def token_logprobs_ref(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0):
    """logits [N, V], labels [N] -> (log p(label), entropy), both [N], of softmax(logits /
    temperature)."""
    logp = (_wide(logits) / temperature).log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return logp.gather(-1, labels[:, None].long()).squeeze(-1), entropy


def linear_token_logprobs_ref(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                              temperature: float = 1.0):
    """hidden [N, H], weight [V, H] (an LM head), labels [N] -> (log-probs [N], entropy [N])
    fp32."""
    return token_logprobs_ref(hidden @ weight.T, labels, temperature)


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Rows of x [N, D] scaled to unit length in fp32. Each row is first divided by its largest
    magnitude, so norms neither overflow nor underflow for any finite input; a row with no non-zero
    entry maps to zero."""
    x = _wide(x)
    scale = x.abs().amax(-1, keepdim=True)
    x = x / torch.where(scale > 0, scale, 1.0)
    norm = x.norm(dim=-1, keepdim=True)
    return x / torch.where(norm > 0, norm, 1.0)


def cosine_similarity_ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of paired rows: a, b [N, D] -> [N] fp32. A zero row gives 0."""
    return (_unit(a) * _unit(b)).sum(-1)


def decode_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         lengths: torch.Tensor) -> torch.Tensor:
    """q [B, Hq, D], k and v [B, Hkv, S, D] (a KV cache; query head h uses key/value head
    h // (Hq / Hkv)), lengths [B] -> [B, Hq, D] in q's dtype: each row's softmax(q k^T / sqrt(D)) v
    over its slots 0..lengths[b] - 1."""
    group = q.shape[1] // k.shape[1]
    k, v = (_wide(x).repeat_interleave(group, 1) for x in (k, v))
    scores = torch.einsum("bhd,bhsd->bhs", _wide(q), k) / q.shape[-1] ** 0.5
    seen = torch.arange(k.shape[2], device=q.device) < lengths[:, None, None]
    weights = scores.masked_fill(~seen, float("-inf")).softmax(-1)
    return torch.einsum("bhs,bhsd->bhd", weights, v).to(q.dtype)
