"""Batched generation with a preallocated KV cache: one prefill over the prompts, then one token per step.

Prompts of different lengths share a batch by left padding: every row's last prompt token sits in the same slot,
so each decoding step writes one slot for all rows. Padding slots are hidden by the attention mask and each row
counts its RoPE positions from its own first real token, so a row's output does not depend on its neighbours.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from pbrl.model import KVCache, Transformer, pad_rows


class Completions(NamedTuple):
    """Row i*n + j is sample j of prompt i. A finished row's completion ends with its stop token."""
    tokens: torch.Tensor          # [N, L] long, pad_id after each row's end
    lengths: torch.Tensor         # [N] long, tokens generated per row (stop token included)
    finished: torch.Tensor        # [N] bool, the row ended on a stop id (else it ran out of max_new_tokens)
    logprobs: torch.Tensor | None  # [N, L] float32: log softmax(logits / temperature) of each chosen token, 0 after

    def as_lists(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths.tolist())]


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]. temperature 0 is greedy (argmax). Sampling is Gumbel-max,
    argmax(logits / T + Gumbel noise), which draws exactly from softmax(logits / T) and lets each row take its
    noise from its own generator (a list of B): a row's sample then does not depend on the rest of the batch."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass; the best token always stays.
        drop = (cumulative - sorted_logits.softmax(-1)) >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    if isinstance(generator, (list, tuple)):
        u = torch.stack([torch.rand(logits.shape[-1], generator=g, device=logits.device) for g in generator])
    else:
        u = torch.rand(logits.shape, generator=generator, device=logits.device)
    return (logits - torch.log(-torch.log(u))).argmax(-1)


@torch.inference_mode()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, n: int = 1, stop_ids=(), pad_id: int = 0,
             seed: int | None = None, generator: torch.Generator | list[torch.Generator] | None = None,
             return_logprobs: bool = False) -> Completions:
    """Sample up to max_new_tokens after each prompt (token ids), n samples per prompt.

    generator: one for the batch, or one per row (len(prompts) * n, row i*n + j = sample j of prompt i) for
    samples that do not depend on how rows are batched. Sampling log-probs are those of the tempered, untruncated
    distribution (temperature 0: the raw one), the same quantity a trainer recomputes with a full forward pass;
    top-k/top-p only change which token is drawn.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate() needs at least one prompt and every prompt needs at least one token")
    if max_new_tokens < 1 or n < 1:
        raise ValueError(f"max_new_tokens and n must be >= 1, got {max_new_tokens} and {n}")
    if temperature < 0 or (top_p is not None and not 0 < top_p <= 1) or (top_k is not None and top_k < 1):
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 1; got {temperature}, {top_p}, {top_k}")
    context = model.args.max_position_embeddings
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > context:
        raise ValueError(f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the model's context "
                         f"of {context} tokens (max_position_embeddings)")
    vocab = model.args.vocab_size
    for i, p in enumerate(prompts):
        if min(p) < 0 or max(p) >= vocab:
            raise ValueError(f"prompt {i} holds token id {min(p) if min(p) < 0 else max(p)} outside the "
                             f"model's vocabulary [0, {vocab})")
    device = model.embed_tokens.weight.device
    if isinstance(generator, (list, tuple)) and len(generator) != len(prompts) * n:
        raise ValueError(f"one generator per row: need len(prompts) * n = {len(prompts) * n}, got {len(generator)}")
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)

    rows = [p for p in prompts for _ in range(n)]
    b, p_len = len(rows), longest
    input_ids, prompt_mask = pad_rows(rows, side="left")  # padding slots hold id 0: masked, never attended to
    # Generated slots are real tokens (a finished row's are never read).
    valid = torch.cat([prompt_mask, torch.ones(b, max_new_tokens, dtype=torch.bool)], dim=1)
    input_ids, valid = input_ids.to(device), valid.to(device)
    positions = torch.tensor([len(p) for p in rows], device=device)  # position of each row's next token
    cache = KVCache(model.args, b, p_len + max_new_tokens, model.embed_tokens.weight.dtype, device)
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)

    tokens = torch.full((b, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(b, max_new_tokens, device=device) if return_logprobs else None
    done = torch.zeros(b, dtype=torch.bool, device=device)
    lengths = torch.zeros(b, dtype=torch.long, device=device)

    hidden = model.hidden_states(input_ids, attention_mask=valid[:, :p_len], cache=cache)
    logits = model.lm_head(hidden[:, -1])  # only the last position's logits are needed
    step = 0
    for step in range(max_new_tokens):
        # Finished rows keep decoding (a batch moves in lockstep) but record pad_id; their slots are never read.
        next_ids = sample_next(logits, temperature, top_k, top_p, generator)
        tokens[:, step] = torch.where(done, pad_id, next_ids)
        if logprobs is not None:
            lp = (logits.float() / (temperature or 1.0)).log_softmax(-1).gather(-1, next_ids[:, None]).squeeze(-1)
            logprobs[:, step] = torch.where(done, 0.0, lp)
        lengths += (~done).long()
        done |= torch.isin(next_ids, stop)
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        slot = p_len + step
        hidden = model.hidden_states(next_ids[:, None], attention_mask=valid[:, :slot + 1],
                                     position_ids=(positions + step)[:, None], cache=cache, start=slot)
        logits = model.lm_head(hidden[:, -1])
    width = step + 1
    return Completions(tokens[:, :width].cpu(), lengths.cpu(), done.cpu(),
                       None if logprobs is None else logprobs[:, :width].cpu())
