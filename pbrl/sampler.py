"""Batched generation with a KV cache: one prefill over the prompts, then one token per step.

Prompts are right padded: row b's token at position p sits in cache slot p, and each decoding step
writes every row's new token at its own position (pbrl/model.py: prefill, decode). The n samples of
a prompt share its prefill. Sampling draws with Gumbel noise hashed from each row's seed and the
step (kernels.sample_tokens), so a row's sample does not depend on its batch. The host looks at the
batch every SYNC_EVERY steps: to stop once every row has finished, and to drop finished rows (the
live ones move to the front of the same buffers; the batch shrinks to the next of BATCH_SIZES). A
decoding step has static shapes and never syncs with the host: pbrl/cudagraphs.py runs it as one
CUDA graph. docs/sampler.md has more.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import NamedTuple

import torch

from pbrl import kernels
from pbrl.model import KVCache, Transformer, pad_rows

SYNC_EVERY = 8  # decoding steps between the host's looks at which rows have finished
# The sizes a batch shrinks to as its rows finish: two per octave, few shapes to compile, little
# waste.
BATCH_SIZES = sorted({1} | {c << k for k in range(16) for c in (2, 3)})  # 1, 2, 3, 4, 6, 8, 12, ...


class Completions(NamedTuple):
    """Row i*n + j is sample j of prompt i. A finished row's completion ends with its stop token."""
    tokens: torch.Tensor    # [N, L] long, pad_id after each row's end
    lengths: torch.Tensor   # [N] long, tokens generated per row (stop token included)
    finished: torch.Tensor  # [N] bool, the row drew a stop id (else it ran out of max_new_tokens)
    logprobs: torch.Tensor  # [N, L] fp32, log softmax(logits / temperature) of each token, 0 after

    def as_lists(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths.tolist())]


@dataclass
class Sampling:
    """What to sample after each prompt, and how. temperature 0 is greedy."""
    max_new_tokens: int
    n: int               # samples per prompt
    temperature: float
    top_k: int | None
    top_p: float | None
    stop: torch.Tensor   # [K] long, the ids that end a row
    pad_id: int          # written after a row's end


@dataclass
class DecodeState:
    """What one decoding step reads and updates in place, for the B rows still in the batch."""
    ids: torch.Tensor        # [B] long, each row's last token
    positions: torch.Tensor  # [B] long, its position, which is also its cache slot
    seeds: torch.Tensor      # [B] int64, each row's sampling seed
    done: torch.Tensor       # [B] bool, the row drew a stop id
    live: torch.Tensor       # [B] long, each row's output row
    step: torch.Tensor       # [1] long, the output column of the next token
    tokens: torch.Tensor     # [N, max_new_tokens] long, the outputs of all N rows
    logprobs: torch.Tensor   # [N, max_new_tokens] fp32
    lengths: torch.Tensor    # [N] long, tokens generated per output row
    cache: KVCache

    def keep(self, rows: torch.Tensor) -> DecodeState:
        """These batch rows only: moved to the front of the same buffers (cache rows too) and
        returned as views of the first len(rows) rows, so that a batch size always has the same
        addresses."""
        batch = ("ids", "positions", "seeds", "done", "live")
        for t in [getattr(self, name) for name in batch] + self.cache.k + self.cache.v:
            t[:len(rows)] = t[rows]  # t[rows] is a copy: no row is overwritten before it is read
        views = {name: getattr(self, name)[:len(rows)] for name in batch}
        return replace(self, **views, cache=self.cache.rows(len(rows)))

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of the state, the cache's included."""
        own = [getattr(self, f.name) for f in fields(self) if f.name != "cache"]
        return own + self.cache.k + self.cache.v


def new_state(model: Transformer, rows: int, slots: int, max_new_tokens: int) -> DecodeState:
    """A zeroed state for `rows` rows, a cache of `slots` slots and max_new_tokens output
    columns."""
    device, dtype = model.embed_tokens.weight.device, model.embed_tokens.weight.dtype

    def zeros(*shape, dtype=torch.long):
        return torch.zeros(shape, dtype=dtype, device=device)
    return DecodeState(
        ids=zeros(rows), positions=zeros(rows), seeds=zeros(rows),
        done=zeros(rows, dtype=torch.bool), live=torch.arange(rows, device=device), step=zeros(1),
        tokens=zeros(rows, max_new_tokens), lengths=zeros(rows),
        logprobs=zeros(rows, max_new_tokens, dtype=torch.float32),
        cache=KVCache(model.args, rows, slots, dtype, device))


def sample_next(logits: torch.Tensor, s: Sampling, keys: torch.Tensor):
    """logits [B, V], keys [B] (kernels.row_keys of each row's seed and the step) -> (token ids [B],
    their log-probs [B] under softmax(logits / temperature), untruncated): one fused kernel."""
    if s.temperature == 0 or (s.top_k is None and s.top_p is None):
        return kernels.sample_tokens(logits, s.temperature, keys)
    return sample_truncated(logits, s, keys)


def sample_truncated(logits: torch.Tensor, s: Sampling, keys: torch.Tensor):
    """sample_next under top-k and/or top-p: the same noise added to the truncated logits."""
    x = logits.float() / s.temperature
    kept = x
    if s.top_k is not None:
        kth = torch.topk(x, min(s.top_k, x.shape[-1]), dim=-1).values[:, -1:]
        kept = kept.masked_fill(x < kth, float("-inf"))
    if s.top_p is not None:
        sorted_x, order = kept.sort(dim=-1, descending=True)
        probs = sorted_x.softmax(-1)
        # A token goes when those ranked above it hold top_p of the mass; the best one always stays.
        drop = (probs.cumsum(-1) - probs) >= s.top_p
        kept = kept.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    tokens = (kept + kernels.gumbel_noise(keys, x.shape[-1])).argmax(-1)
    return tokens, x.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)


def record(logits: torch.Tensor, st: DecodeState, s: Sampling) -> None:
    """Draw each row's next token from logits [B, V] and write it and its log-prob at output column
    st.step; a finished row records nothing, and a row that draws a stop id is done."""
    next_ids, logp = sample_next(logits, s, kernels.row_keys(st.seeds, st.step))
    column = st.step.expand_as(st.live)
    st.tokens.index_put_((st.live, column), torch.where(st.done, s.pad_id, next_ids))
    st.logprobs.index_put_((st.live, column), torch.where(st.done, 0.0, logp))
    st.lengths.index_add_(0, st.live, (~st.done).long())
    st.done |= torch.isin(next_ids, s.stop)
    st.ids.copy_(next_ids)


def decode_step(model: Transformer, st: DecodeState, s: Sampling) -> None:
    """One token for every row: the model reads each row's last token, then `record` draws the
    next."""
    logits = model.decode(st.ids, st.positions, st.cache)
    st.positions += 1
    st.step += 1
    record(logits, st, s)


def prefill(model: Transformer, st: DecodeState, prompts: list[list[int]], n: int) -> torch.Tensor:
    """Each prompt once; its n samples (rows i*n .. i*n + n-1) get copies of its keys and values.
    Returns the logits [N, V] that draw each row's first token."""
    device = st.ids.device
    ids, _ = pad_rows(prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    cache = KVCache(model.args, len(prompts), ids.shape[1], st.cache.k[0].dtype, device)
    hidden = model.prefill(ids.to(device), cache)
    for full, prompt in zip(st.cache.k + st.cache.v, cache.k + cache.v):
        full[:, :, :ids.shape[1]].unflatten(0, (len(prompts), n)).copy_(prompt[:, None])
    st.positions.copy_(lengths.repeat_interleave(n))
    last = hidden[torch.arange(len(prompts), device=device), lengths - 1]
    return model.lm_head(last).repeat_interleave(n, 0)


@torch.inference_mode()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             n: int = 1, stop_ids=(), pad_id: int = 0, seed: int | None = None, seeds=None,
             slots: int | None = None, graphs=None) -> Completions:
    """Up to max_new_tokens after each prompt (token ids), n samples per prompt.

    seeds: one per row (row i*n + j is sample j of prompt i), for samples that do not depend on the
    batch; else `seed` derives them, else torch's RNG draws them. Log-probs are those of the
    tempered, untruncated distribution, the quantity a trainer recomputes: top-k/top-p only change
    which token is drawn. slots: the cache's length (default: the longest prompt + max_new_tokens).
    graphs: a pbrl.cudagraphs.CudaGraphs, to decode through CUDA graphs on buffers it keeps between
    calls."""
    check_request(model, prompts, max_new_tokens, n, temperature, top_k, top_p, slots)
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long,
                        device=model.embed_tokens.weight.device)
    s = Sampling(max_new_tokens, n, temperature, top_k, top_p, stop, pad_id)
    return complete(model, prompts, s, row_seeds(len(prompts) * n, seed, seeds), slots, graphs)


@torch.inference_mode()
def complete(model: Transformer, prompts: list[list[int]], s: Sampling, seeds: torch.Tensor,
             slots: int | None = None, graphs=None) -> Completions:
    """generate's work, on a request already checked (the trainer checks its own once, at setup):
    seeds [len(prompts) * s.n], one per row."""
    rows, new_tokens = len(prompts) * s.n, s.max_new_tokens
    start, step = (new_state, decode_step) if graphs is None else (graphs.state, graphs.step)
    longest = max(map(len, prompts))
    st = start(model, rows, slots or longest + new_tokens, new_tokens)
    st.seeds.copy_(seeds)
    st.tokens.fill_(s.pad_id)
    record(prefill(model, st, prompts, s.n), st, s)  # the first token
    finished = torch.zeros_like(st.done)
    for t in range(1, new_tokens):
        if t % SYNC_EVERY == 0:  # the host's look: stop, or drop finished rows to a smaller batch
            alive = int((~st.done).sum())
            if alive == 0:
                break
            size = next((b for b in BATCH_SIZES if b >= alive), len(st.live))
            if size < len(st.live):
                finished[st.live] = st.done  # before the rows that leave are forgotten
                st = st.keep(torch.argsort(st.done.int(), stable=True)[:size])
        # eager, the cache up to the furthest row's slot: attention reads no slot beyond it
        step(model, st if graphs else replace(st, cache=st.cache.upto(longest + t)), s)
    finished[st.live] = st.done
    width = int(st.lengths.max())
    # Copies: CudaGraphs writes the next call into the same buffers.
    return Completions(st.tokens[:, :width].to("cpu", copy=True), st.lengths.to("cpu", copy=True),
                       finished.cpu(), st.logprobs[:, :width].to("cpu", copy=True))


def check_request(model, prompts, max_new_tokens, n, temperature, top_k, top_p, slots) -> None:
    if not prompts or not all(prompts):
        raise ValueError("generate() needs at least one prompt and every prompt needs at least one "
                         "token")
    if max_new_tokens < 1 or n < 1:
        raise ValueError(f"max_new_tokens and n must be >= 1, got {max_new_tokens} and {n}")
    bad_top_p, bad_top_k = top_p is not None and not 0 < top_p <= 1, top_k is not None and top_k < 1
    if temperature < 0 or bad_top_p or bad_top_k:
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 1; got {temperature}, "
                         f"{top_p}, {top_k}")
    longest, context = max(map(len, prompts)), model.args.max_position_embeddings
    if longest + max_new_tokens > context:
        raise ValueError(f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds "
                         f"the model's context of {context} tokens (max_position_embeddings)")
    if slots is not None and longest + max_new_tokens > slots:
        raise ValueError(f"slots={slots} cannot hold the longest prompt ({longest} tokens) + "
                         f"max_new_tokens={max_new_tokens}")
    low, high = min(map(min, prompts)), max(map(max, prompts))
    if low < 0 or high >= model.args.vocab_size:
        raise ValueError(f"a prompt holds token id {low if low < 0 else high} outside the model's "
                         f"vocabulary [0, {model.args.vocab_size})")


def row_seeds(rows: int, seed: int | None, seeds) -> torch.Tensor:
    """[N] int64: the given per-row seeds, or N seeds derived from `seed`, or drawn from torch's
    RNG."""
    if seeds is not None:
        seeds = torch.as_tensor(seeds, dtype=torch.int64).flatten()
        if len(seeds) != rows:
            raise ValueError(f"one seed per row: need len(prompts) * n = {rows}, got {len(seeds)}")
        return seeds
    if seed is None:
        return torch.randint(-2**63, 2**63 - 1, (rows,), dtype=torch.int64)
    # row r of a seeded call: (seed, r) in one int64
    return (seed % 2**31) * 2**32 + torch.arange(rows)
