"""Kernels for pbrl's hot paths, each with a plain PyTorch reference (reference.py beside them) that
is its spec. They live inside pbrl as `pbrl.kernels`: a top-level `kernels` package would shadow
Hugging Face's `kernels` distribution, which transformers (>= 5.25) imports.

    linear_token_logprobs(hidden, weight, labels, temperature=1.0) -> (log-probs, entropies)
    cosine_similarity(a, b)                    row-wise, [N, D] x [N, D] -> [N]
    sample_tokens(logits, temperature, keys)   one token per row (Gumbel-max with counter-based
                                               noise) and its log-prob
    decode_attention(q, k, v, lengths)         one query per row over its filled KV-cache slots
                                               (flash-decoding, GQA)

Triton runs on CUDA, and on the CPU under TRITON_INTERPRET=1; otherwise the PyTorch path
(dispatch.py).
"""
from pbrl.kernels.cosine import cosine_similarity
from pbrl.kernels.decode import decode_attention
from pbrl.kernels.logprobs import linear_token_logprobs
from pbrl.kernels.sampling import gumbel_noise, row_keys, sample_tokens

__all__ = ["linear_token_logprobs", "cosine_similarity", "sample_tokens", "gumbel_noise",
           "row_keys", "decode_attention"]
