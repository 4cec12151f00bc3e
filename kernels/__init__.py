"""Kernels for pbrl's hot paths, each with a plain PyTorch reference (kernels/reference.py) that is its spec.

    token_logprobs(logits, labels, temperature=1.0, return_entropy=False)
    linear_token_logprobs(hidden, weight, labels, temperature=1.0, return_entropy=False)
    cosine_similarity(a, b)             row-wise, [N, D] x [N, D] -> [N]
    pairwise_cosine_similarity(a, b)    all pairs, [N, D] x [M, D] -> [N, M]

Triton runs on CUDA, and on the CPU under TRITON_INTERPRET=1; otherwise the PyTorch path (kernels/dispatch.py).
"""
from kernels.cosine import cosine_similarity, pairwise_cosine_similarity
from kernels.logprobs import linear_token_logprobs, token_logprobs

__all__ = ["token_logprobs", "linear_token_logprobs", "cosine_similarity", "pairwise_cosine_similarity"]
