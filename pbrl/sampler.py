"""Batched generation with a preallocated KV cache: one prefill over the prompts, then one token per step.

Prompts of different lengths share a batch by left padding: every row's last prompt token sits in the same slot,
so each decoding step writes one slot for all rows. Padding slots are hidden by the attention mask and each row
counts its RoPE positions from its own first real token, so a row's output does not depend on its neighbours.

The decoding step has static shapes (gpt-fast's design): it attends over every slot of the cache under a per-row
validity mask, with the slot and the positions as tensors, so on CUDA it can run as one CUDA graph
(`compile=True`: torch.compile, mode reduce-overhead). Sampling is one kernel per step (kernels.sample_tokens:
Gumbel-max with noise hashed from each row's seed and the step, so a row's sample does not depend on the batch).
The host looks at the batch only every SYNC_EVERY steps: to stop when every row has finished, and to drop finished
rows (the batch shrinks to the next of BATCH_SIZES, a handful of shapes to compile). The n samples of a prompt share
its prefill.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

import kernels
from pbrl.model import KVCache, Transformer, pad_rows

SYNC_EVERY = 8  # decoding steps between the host's looks at which rows have finished
# The sizes a batch shrinks to as its rows finish (two per octave: few shapes to compile, little waste).
BATCH_SIZES = sorted({1} | {c << k for k in range(16) for c in (2, 3)})  # 1, 2, 3, 4, 6, 8, 12, 16, ...
# What compile=True passes to torch.compile (tests switch the backend to check that the step is one graph).
COMPILE_OPTIONS = {"mode": "reduce-overhead", "fullgraph": True, "dynamic": False}


class Completions(NamedTuple):
    """Row i*n + j is sample j of prompt i. A finished row's completion ends with its stop token."""
    tokens: torch.Tensor          # [N, L] long, pad_id after each row's end
    lengths: torch.Tensor         # [N] long, tokens generated per row (stop token included)
    finished: torch.Tensor        # [N] bool, the row ended on a stop id (else it ran out of max_new_tokens)
    logprobs: torch.Tensor | None  # [N, L] float32: log softmax(logits / temperature) of each chosen token, 0 after

    def as_lists(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths.tolist())]


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V], keys [B] (kernels.row_keys of each row's seed and the step) -> (token ids [B], their
    log-probs [B] under softmax(logits / temperature), untruncated). temperature 0 is greedy. Without top-k/top-p
    one fused kernel; with them, the same noise added to the truncated logits in PyTorch."""
    if temperature == 0 or (top_k is None and top_p is None):
        return kernels.sample_tokens(logits, temperature, keys)
    x = logits.float() / temperature
    kept = x
    if top_k is not None:
        kth = torch.topk(x, min(top_k, x.shape[-1]), dim=-1).values[:, -1:]
        kept = kept.masked_fill(x < kth, float("-inf"))
    if top_p is not None:
        sorted_x, order = kept.sort(dim=-1, descending=True)
        probs = sorted_x.softmax(-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass; the best token always stays.
        drop = (probs.cumsum(-1) - probs) >= top_p
        kept = kept.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    tokens = (kept + kernels.gumbel_noise(keys, x.shape[-1])).argmax(-1)
    return tokens, x.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)


def decode_step(model: Transformer, ids: torch.Tensor, positions: torch.Tensor, slot: torch.Tensor,
                valid: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """ids [B] at RoPE positions [B], written to cache slot `slot` [1]; valid [B, max_len] marks the slots each
    row may attend to (slot included) -> next-token logits [B, V]. Every shape is fixed for the whole generation."""
    return model(ids[:, None], attention_mask=valid, position_ids=positions[:, None], cache=cache, start=slot)[:, -1]


def static_cache(cache: KVCache) -> None:
    """Tell torch.compile that the cache tensors keep their addresses for the graph's lifetime: CUDA graphs may then
    write them in place (the step's index_copy_); a graph that mutates any other input is run without CUDA graphs.
    A new cache (each call, each compaction) makes the graph re-record once, not recompile."""
    for t in cache.k + cache.v:
        torch._dynamo.mark_static_address(t, guard=False)


def row_seeds(n_rows: int, seed: int | None, seeds) -> torch.Tensor:
    """[N] int64: the given per-row seeds, or N seeds derived from `seed`, or drawn from torch's global RNG."""
    if seeds is not None:
        seeds = torch.as_tensor(seeds, dtype=torch.int64).flatten()
        if len(seeds) != n_rows:
            raise ValueError(f"one seed per row: need len(prompts) * n = {n_rows}, got {len(seeds)}")
        return seeds
    if seed is None:
        return torch.randint(-2**63, 2**63 - 1, (n_rows,), dtype=torch.int64)
    return (seed % 2**31) * 2**32 + torch.arange(n_rows)  # row r of a seeded call: (seed, r) in one int64


@torch.inference_mode()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, n: int = 1, stop_ids=(), pad_id: int = 0,
             seed: int | None = None, seeds=None, return_logprobs: bool = False,
             compile: bool = False) -> Completions:
    """Sample up to max_new_tokens after each prompt (token ids), n samples per prompt.

    seeds: one per row (len(prompts) * n, row i*n + j = sample j of prompt i), for samples that do not depend on
    how rows are batched; else `seed` derives them, else they are drawn from torch's RNG. Sampling log-probs are
    those of the tempered, untruncated distribution (temperature 0: the raw one), the same quantity a trainer
    recomputes with a full forward pass; top-k/top-p only change which token is drawn. compile=True runs the
    decoding step through torch.compile (COMPILE_OPTIONS: CUDA graphs on CUDA).
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
    rows = [p for p in prompts for _ in range(n)]
    seeds = row_seeds(len(rows), seed, seeds).to(device)
    step_fn = torch.compile(decode_step, **COMPILE_OPTIONS) if compile else decode_step

    # The cache and the validity mask span prompt + max_new_tokens slots (rounded up to 128 when compiling, so that
    # calls with other prompt lengths reuse the compiled graph). A generated slot becomes valid when it is written.
    b, p_len = len(rows), longest
    length = p_len + max_new_tokens
    length = -(-length // 128) * 128 if compile else length
    input_ids, prompt_mask = pad_rows(prompts, side="left")  # padding slots hold id 0: masked, never attended to
    valid = torch.zeros(b, length, dtype=torch.bool, device=device)
    valid[:, :p_len] = prompt_mask.repeat_interleave(n, 0).to(device)
    positions = torch.tensor([len(p) for p in rows], device=device)  # position of each row's next token
    cache = KVCache(model.args, len(prompts), length, model.embed_tokens.weight.dtype, device)
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)

    tokens = torch.full((b, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(b, max_new_tokens, device=device)
    lengths = torch.zeros(b, dtype=torch.long, device=device)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    live = torch.arange(b, device=device)  # the output row of each row still in the batch
    done = finished.clone()                # per batch row

    # Prefill each prompt once, then give each of its n samples a copy of its cache.
    hidden = model.hidden_states(input_ids.to(device), attention_mask=prompt_mask.to(device), cache=cache)
    logits = model.lm_head(hidden[:, -1]).repeat_interleave(n, 0)  # only the last position's logits are needed
    if n > 1:
        cache.k, cache.v = [k.repeat_interleave(n, 0) for k in cache.k], [v.repeat_interleave(n, 0) for v in cache.v]
    if compile:
        static_cache(cache)
    slot = torch.tensor([p_len], device=device)
    for step in range(max_new_tokens):
        # Finished rows keep decoding until the next look (or ride along as padding of a compacted batch); they
        # record nothing.
        next_ids, lp = sample_next(logits, temperature, top_k, top_p, kernels.row_keys(seeds, step))
        tokens[live, step] = torch.where(done, pad_id, next_ids)
        logprobs[live, step] = torch.where(done, 0.0, lp)
        lengths[live] += (~done).long()
        done |= torch.isin(next_ids, stop)
        if step == max_new_tokens - 1:
            break
        if (step + 1) % SYNC_EVERY == 0:
            alive = int((~done).sum())
            if alive == 0:
                break
            size = next(s for s in BATCH_SIZES if s >= alive) if alive <= BATCH_SIZES[-1] else len(live)
            if size < len(live):  # keep the live rows (and finished ones to fill the size), drop the rest
                finished[live] = done  # before the rows that leave are forgotten
                keep = torch.argsort(done.int(), stable=True)[:size]
                live, done, seeds, next_ids, positions, valid = (
                    t[keep] for t in (live, done, seeds, next_ids, positions, valid))
                cache.k, cache.v = [k[keep] for k in cache.k], [v[keep] for v in cache.v]
                if compile:
                    static_cache(cache)
        valid.index_fill_(1, slot, True)
        logits = step_fn(model, next_ids, positions + step, slot, valid, cache)
        slot += 1
    finished[live] = done
    width = int(lengths.max())
    return Completions(tokens[:, :width].cpu(), lengths.cpu(), finished.cpu(),
                       logprobs[:, :width].cpu() if return_logprobs else None)
